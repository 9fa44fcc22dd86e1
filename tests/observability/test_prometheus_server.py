"""PrometheusServer: a real Prometheus scrapes a prometheus_client exporter on loopback and answers
PromQL; and deploy/prometheus.sh says why when it cannot get a binary."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.observability.prometheus_server import (
    FETCH_SCRIPT,
    PrometheusError,
    PrometheusServer,
    Result,
    require_prometheus,
)


@dataclass(frozen=True, slots=True)
class Exporter:
    address: str  # host:port
    requests: Counter  # demo_requests_total{tenant=...}


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    """prometheus_client's own HTTP server on loopback, serving a registry of its own whose
    ``demo_requests_total`` the tests count up between scrapes."""
    registry = CollectorRegistry()
    requests = Counter(
        "demo_requests", "Requests served, by tenant.", ["tenant"], registry=registry
    )
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield Exporter(f"127.0.0.1:{server.server_port}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def down_address() -> str:
    """A loopback address nothing listens on (the port was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def prom(
    exporter: Exporter, down_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    # One server for the module: Prometheus 2.42 applies its targets on a 5 s tick.
    targets = {"demo": [exporter.address], "gone": [down_address]}
    work_dir = tmp_path_factory.mktemp("prometheus")
    with PrometheusServer(require_prometheus(), targets, work_dir) as server:
        yield server


def by_tenant(results: list[Result]) -> dict[str, float]:
    return {result["metric"]["tenant"]: float(result["value"][1]) for result in results}


def test_series_are_scraped_and_read_back_with_their_labels(
    exporter: Exporter, prom: PrometheusServer
) -> None:
    exporter.requests.labels(tenant="acme").inc(3)
    exporter.requests.labels(tenant="globex").inc(5)
    results = prom.wait_for("demo_requests_total", lambda results: len(results) == 2)
    assert {
        (result["metric"]["__name__"], result["metric"]["job"], result["metric"]["instance"])
        for result in results
    } == {("demo_requests_total", "demo", exporter.address)}
    assert by_tenant(results) == {"acme": 3.0, "globex": 5.0}

    # A later change shows once a scrape has seen it, and PromQL works on the labels.
    exporter.requests.labels(tenant="acme").inc(4)  # to 7
    results = prom.wait_for(
        'sum by (tenant) (demo_requests_total{tenant="acme"})',
        lambda results: by_tenant(results) == {"acme": 7.0},
    )
    assert [result["metric"] for result in results] == [{"tenant": "acme"}]

    health_by_url = {target["scrapeUrl"]: target["health"] for target in prom.targets()}
    assert health_by_url[f"http://{exporter.address}/metrics"] == "up"


def test_invalid_promql_is_an_error(prom: PrometheusServer) -> None:
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("sum by (tenant (demo_requests_total)")
    with pytest.raises(PrometheusError, match="scalar"):
        prom.query("1 + 1")


def test_wait_for_reports_a_target_it_cannot_scrape(
    prom: PrometheusServer, down_address: str
) -> None:
    [up] = prom.wait_for('up{job="gone"}')
    assert (up["metric"]["instance"], up["value"][1]) == (down_address, "0")
    # Scraped (and found down) within the timeout, so the predicate is what times out.
    with pytest.raises(PrometheusError, match="no result satisfied the predicate") as raised:
        prom.wait_for('up{job="gone"} == 1', timeout_s=2)
    assert f"gone http://{down_address}/metrics: down" in str(raised.value)
    assert "connection refused" in str(raised.value)


def test_fetch_script_says_why_without_apt(tmp_path: Path) -> None:
    # An empty PATH: no prometheus, no apt-get; an empty cache: no earlier copy.
    (tmp_path / "bin").mkdir()
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run(
        [bash, str(FETCH_SCRIPT)],
        env={"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert "no prometheus on PATH, and no apt-get" in done.stderr
    assert "FAIRGATE_SKIP_PROMETHEUS=1" in done.stderr
