"""A real Prometheus server on loopback for tests: it scrapes the given targets and answers PromQL.

``deploy/prometheus.sh`` finds or fetches the binary (Debian's package, no root needed);
``require_prometheus()`` turns its failure into a failed test, or into a skipped one where
``FAIRGATE_SKIP_PROMETHEUS=1``. ``PrometheusServer`` runs the binary as a context manager::

    targets = {"gateway": [gateway_address], "workers": worker_addresses}  # job -> host:port
    with PrometheusServer(require_prometheus(), targets, tmp_path) as prometheus:
        results = prometheus.wait_for('fairgate_requests_total{tenant="acme"}')

Everything the server writes (configuration, TSDB, log) stays in the directory it is given. It
listens on port 0 of 127.0.0.1 and reads the port it got from its own log, so servers started side
by side never race for a port.

Prometheus 2.42 (Debian 12's) applies its targets on a 5 s tick, so the first scrape comes about
5 s after the start: share one server between the tests of a module where they allow it, and give a
first ``wait_for`` at least that long (its default 15 s is).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tests.deploy_scripts import require_path

__all__ = ["PrometheusError", "PrometheusServer", "Result", "require_prometheus"]

FETCH_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "prometheus.sh"
SKIP_ENV = "FAIRGATE_SKIP_PROMETHEUS"

# One element of an instant query's result: {"metric": {label: value}, "value": [time, "1.5"]}
# (a range query's has "values": [[time, "1.5"], ...]).
Result = dict[str, Any]

# `msg="Listening on" address=127.0.0.1:40123`, from Prometheus 2.x (go-kit log) and 3.x (slog).
_LISTENING = re.compile(r'msg="Listening on".*?\baddress=(\S+)')


class PrometheusError(RuntimeError):
    """Prometheus did not start, died, answered with an error, or a wait ran out of time."""


def require_prometheus() -> Path:
    """The prometheus binary. Without one the calling test fails with the script's error, or is
    skipped with it where FAIRGATE_SKIP_PROMETHEUS=1."""
    return require_path(FETCH_SCRIPT, SKIP_ENV, "Prometheus")


def _non_empty(results: list[Result]) -> bool:
    return bool(results)


class PrometheusServer:
    """A prometheus process scraping ``metrics_path`` of each ``host:port`` in ``targets`` (job name
    -> addresses) every ``scrape_interval_s``; its HTTP API at ``url`` once started.

    A context manager: ``__enter__`` returns once the server is ready, ``__exit__`` stops it and
    raises if it had died on its own. Not thread-safe: call it from one thread.
    """

    def __init__(
        self,
        binary: Path,
        targets: Mapping[str, Sequence[str]],
        work_dir: Path,
        *,
        scrape_interval_s: float = 1.0,
        metrics_path: str = "/metrics",
        start_timeout_s: float = 30.0,
        bearer_tokens: Mapping[str, str] | None = None,
    ) -> None:
        """``bearer_tokens``: job name -> the token its scrapes send (the gateway's admin
        token)."""
        self.binary = binary
        self.bearer_tokens = dict(bearer_tokens or {})
        self.addresses_by_job = {job: list(addresses) for job, addresses in targets.items()}
        self.work_dir = work_dir
        self.scrape_interval_s = scrape_interval_s
        self.metrics_path = metrics_path
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "prometheus.log"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # With an exception already on its way, a crash report would only hide it.
        self.stop(check=exc_type is None)

    def start(self) -> None:
        """Start the process and return once ``/-/ready`` answers 200."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.work_dir / "prometheus.yml"
        # JSON is YAML, and json.dumps quotes every job name and address correctly.
        config_path.write_text(json.dumps(self._config(), indent=2))
        command = [
            str(self.binary),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
            "--web.listen-address=127.0.0.1:0",
        ]
        deadline = time.monotonic() + self.start_timeout_s
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self.url = f"http://{self._wait_for_address(deadline)}"
            # trust_env=False: a proxy configured for the outside world must not see loopback calls.
            self._client = httpx.Client(base_url=self.url, timeout=5.0, trust_env=False)
            self._wait_until_ready(deadline)
        except BaseException:
            self.stop(check=False)
            raise

    def stop(self, *, check: bool = True, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``. With ``check``, raise if the process had
        already exited by itself (its log in the message)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        if process is None:
            return
        exited_early = process.poll()
        if exited_early is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if check and exited_early is not None:
            raise PrometheusError(
                f"prometheus exited with status {exited_early} while in use; its log:\n"
                f"{self._log_tail()}"
            )

    def query(self, promql: str) -> list[Result]:
        """``/api/v1/query`` now: the vector's (or range selector's matrix's) elements."""
        data = self._get("/api/v1/query", {"query": promql})
        if data["resultType"] not in ("vector", "matrix"):
            raise PrometheusError(
                f"{promql!r} gives a {data['resultType']}, not a vector: wrap it in vector(...)"
            )
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        """``/api/v1/targets``' active targets: ``labels``, ``scrapeUrl``, ``health`` ("up",
        "down" or "unknown"), ``lastError``, ``lastScrape``, ..."""
        return list(self._get("/api/v1/targets", {"state": "active"})["activeTargets"])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Result]], bool] = _non_empty,
        *,
        timeout_s: float = 15.0,
        poll_s: float = 0.2,
    ) -> list[Result]:
        """Poll until every target has been scraped since this call began (so the answer is no
        older than the call) and ``predicate(query(promql))`` holds; that result. On timeout,
        ``PrometheusError`` with the last result and the state of each target."""
        began = datetime.now(UTC)
        deadline = time.monotonic() + timeout_s
        results: list[Result] = []
        scraped = False
        while True:
            if not scraped:
                scraped = self._all_scraped_since(began)
            if scraped:
                results = self.query(promql)
                if predicate(results):
                    return results
            if time.monotonic() >= deadline:
                outcome = "no result satisfied the predicate" if scraped else "not all scraped"
                raise PrometheusError(
                    f"{promql!r}: {outcome} within {timeout_s:g} s; last result "
                    f"{json.dumps(results)[:2000]}; targets:\n{self._describe_targets()}"
                )
            time.sleep(poll_s)

    def _config(self) -> dict[str, Any]:
        interval = f"{round(self.scrape_interval_s * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": addresses}],
                    **(
                        {
                            "authorization": {
                                "type": "Bearer",
                                "credentials": self.bearer_tokens[job],
                            }
                        }
                        if job in self.bearer_tokens
                        else {}
                    ),
                }
                for job, addresses in self.addresses_by_job.items()
            ],
        }

    def _wait_for_address(self, deadline: float) -> str:
        while True:
            match = _LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            self._check_running("before it listened")
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"prometheus did not listen within {self.start_timeout_s:g} s; its log:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.02)

    def _wait_until_ready(self, deadline: float) -> None:
        assert self._client is not None
        while True:
            try:
                if self._client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # listening but not serving yet
            self._check_running("before it was ready")
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"prometheus at {self.url} not ready within {self.start_timeout_s:g} s; "
                    f"its log:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _check_running(self, when: str) -> None:
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            raise PrometheusError(
                f"prometheus exited with status {code} {when}; its log:\n{self._log_tail()}"
            )

    def _get(self, path: str, params: dict[str, str]) -> Any:
        if self._client is None:
            raise PrometheusError("the Prometheus server is not running (start() it first)")
        try:
            response = self._client.get(path, params=params)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            code = self._process.poll() if self._process is not None else None
            state = "running" if code is None else f"exited with status {code}"
            raise PrometheusError(
                f"GET {path} {params}: {exc!r} (prometheus {state}); its log:\n{self._log_tail()}"
            ) from exc
        if body.get("status") != "success":
            raise PrometheusError(
                f"GET {path} {params}: HTTP {response.status_code}, "
                f"{body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def _all_scraped_since(self, began: datetime) -> bool:
        """Whether each configured target is active and its last scrape started after ``began``."""
        last_scrape = {
            (target["scrapePool"], target["discoveredLabels"]["__address__"]): target["lastScrape"]
            for target in self.targets()
        }
        for job, addresses in self.addresses_by_job.items():
            for address in addresses:
                scraped_at = last_scrape.get((job, address))
                if scraped_at is None or datetime.fromisoformat(scraped_at) < began:
                    return False
        return True

    def _describe_targets(self) -> str:
        lines = []
        for target in self.targets():
            line = f"  {target['scrapePool']} {target['scrapeUrl']}: {target['health']}"
            line += f", last scrape {target['lastScrape']}"
            if target.get("lastError"):
                line += f", {target['lastError']}"
            lines.append(line)
        return "\n".join(lines)

    def _log_tail(self, num_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(unreadable: {exc})"
        return "\n".join(lines[-num_lines:])
