"""``fairgate up``: the whole stack on this machine — prefill and decode workers, then the gateway
in front of them — as child processes that stop with it. ``run_up`` keeps the workers up while it
serves (``deploy.supervisor``): one that exits is restarted at the same ports, and only the
gateway exiting or a worker crash loop stops the stack.

State lives in one directory (``--state-dir``, made mode 0700 when fairgate creates it): the
SQLite store (``fairgate.db``) and ``credentials.json`` (``base_url``, ``admin_token``,
``demo_key``; mode 0600). The first start generates the admin token and creates a ``demo`` tenant
with one key; later starts reuse the token and keep tenants, keys and usage. The secrets go to
that file only, never to stdout or the logs: the welcome names the file, and its ``curl`` reads the
key from it. Torch-free (the workers load torch in their own processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.launcher import LaunchError, WorkerProcess, WorkerSpec, start_workers
from deploy.supervisor import RestartPolicy, Supervisor
from transfer.http import SERVER_SHUTDOWN_S

__all__ = ["Stack", "StackConfig", "default_state_dir", "run_up", "start_stack", "worker_specs"]

CREDENTIALS_FILE = "credentials.json"
DEMO_TENANT = "demo"


def default_state_dir() -> Path:
    from engine.model_store import cache_dir

    return cache_dir() / "stack"


@dataclass(frozen=True, slots=True)
class StackConfig:
    engine: str = "default"  # default | tiny | null | PATH
    # Several models, each with its own pool of ``num_prefill_workers`` + ``num_decode_workers``
    # (empty: ``engine`` alone). The first is the gateway's reference model (its ``[model]``):
    # the unit of the other models' cost factors.
    models: Sequence[str] = ()
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    port: int = 8000
    host: str = "127.0.0.1"
    state_dir: Path = Path()
    worker_args: Sequence[str] = ()  # more `fairgate *-worker` flags for every worker
    decode_worker_args: Sequence[str] = ()  # and for decode workers only (e.g. --preemption)
    gateway_args: Sequence[str] = ()  # more `fairgate gateway` flags
    env: dict[str, str] | None = None  # added to every child's environment
    # …and to one worker's, by ROLE-N (e.g. "decode-1": failpoints for one worker in a test)
    worker_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Gateway replicas, each on its own port (the first on ``port``, the others on free ones),
    # all in front of the same workers; more than one needs what they share: a PostgreSQL store
    # (``[store] url``) and Redis (``[replicas] redis_url``), given through ``env`` or a config.
    num_gateways: int = 1
    log_dir: Path | None = None  # each child's logs to ROLE-N.log there; None: our stderr
    ready_timeout_s: float = 600.0
    # torch threads per worker; None: this machine's cores shared among the workers
    # (``worker_threads``), unless ``worker_args`` names ``--threads``
    threads_per_worker: int | None = None
    # ``run_up``'s: when workers that exit come back, and when the stack gives up
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)

    def __post_init__(self) -> None:
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads_per_worker}")
        if len(set(self.served_models())) != len(self.served_models()):
            raise ValueError(f"--models names a model twice: {', '.join(self.models)}")

    def served_models(self) -> list[str]:
        """The models, each with its pool: ``models``, or ``engine`` alone."""
        return list(self.models) or [self.engine]

    def worker_threads(self) -> int:
        """Torch threads for each worker. Every worker left to torch's default takes a thread
        per core, so two workers on one machine run twice as many compute threads as it has
        cores; their OpenMP threads then wait on each other and on the gateway's process
        (measured on 2 cores, tiny model, isolation bench: 1 thread each instead of torch's 2
        completed 61-88 instead of 45-61 requests/s under the flood)."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        num_workers = (self.num_prefill_workers + self.num_decode_workers) * len(
            self.served_models()
        )
        return max(1, len(os.sched_getaffinity(0)) // max(1, num_workers))


@dataclass(slots=True)
class Stack:
    """A started stack: its processes and how to reach it."""

    workers: list[WorkerProcess]
    gateway: WorkerProcess
    base_url: str
    admin_token: str
    demo_key: str
    state_dir: Path
    # Every gateway replica, ``gateway`` first (``StackConfig.num_gateways``).
    gateways: list[WorkerProcess] = field(default_factory=list)

    @property
    def processes(self) -> list[WorkerProcess]:
        return [*(self.gateways or [self.gateway]), *self.workers]

    def stop(self) -> None:
        """Gateways first (each stops taking requests and lets those in flight finish within
        its grace period, while the workers still serve them), then the workers."""
        for gateway in self.gateways or [self.gateway]:
            gateway.stop(timeout_s=_gateway_stop_timeout_s(gateway.spec.env))
        for worker in self.workers:
            worker.stop()


def _gateway_stop_timeout_s(env: dict[str, str]) -> float:
    """How long the gateway may take to stop before it is killed: its grace period for the
    requests in flight (``gateway.shutdown_grace_s``, from its environment), the time it gives
    the rest to send their errors, and uvicorn's own wait for connections, with a margin."""
    from gateway.app import DRAIN_END_S
    from gateway.config import GatewaySection

    merged = {**os.environ, **env}
    grace_s = float(
        merged.get("FAIRGATE_GATEWAY_SHUTDOWN_GRACE_S", GatewaySection().shutdown_grace_s)
    )
    return grace_s + DRAIN_END_S + SERVER_SHUTDOWN_S + 5.0


def start_stack(config: StackConfig) -> Stack:
    """Workers, then the gateway, each ready; the demo tenant; ``credentials.json``. Nothing
    restarts a worker that exits later (``run_up`` does)."""
    state_dir = config.state_dir.expanduser().resolve()
    # Only its owner may look inside (the store holds the tenants and their key hashes); a
    # directory that exists is the operator's, left as the operator made it.
    with contextlib.suppress(FileExistsError):
        state_dir.mkdir(mode=0o700, parents=True)
    credentials = _read_credentials(state_dir)
    admin_token = credentials.get("admin_token") or "fga-" + secrets.token_urlsafe(32)
    specs = worker_specs(config, dict(config.env or {}))  # the admin token is no worker's business
    workers = start_workers(specs, timeout_s=config.ready_timeout_s)
    try:
        gateway_args = [
            "--host",
            config.host,
            "--store",
            str(state_dir / "fairgate.db"),
            *(
                arg
                for w in workers
                if w.spec.role == "prefill"
                for arg in ("--prefill", w.http_url)
            ),
            *(arg for w in workers if w.spec.role == "decode" for arg in ("--decode", w.http_url)),
            *config.gateway_args,
        ]
        env = {**(config.env or {}), "FAIRGATE_GATEWAY_ADMIN_TOKEN": admin_token}
        gateway_specs = [
            WorkerSpec(
                "gateway",
                config.served_models()[0],
                gateway_args,
                env,
                _log(config, "gateway", index),
                config.port if index == 0 else 0,
            )
            for index in range(config.num_gateways)
        ]
        gateways = start_workers(gateway_specs, timeout_s=config.ready_timeout_s)
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    gateway = gateways[0]
    stack = Stack(workers, gateway, gateway.http_url, admin_token, "", state_dir, gateways)
    try:
        stack.demo_key = credentials.get("demo_key") or _create_demo_tenant(stack)
        _write_credentials(stack)
    except BaseException:
        stack.stop()
        raise
    return stack


def worker_specs(config: StackConfig, env: dict[str, str]) -> list[WorkerSpec]:
    """The prefill and decode workers ``start_stack`` starts, a pool per model (named ROLE-N,
    N counting across the models), with ``--threads`` from ``StackConfig.worker_threads``
    unless ``worker_args`` sets it."""
    worker_args = list(config.worker_args)
    if not any(arg == "--threads" or arg.startswith("--threads=") for arg in worker_args):
        worker_args += ["--threads", str(config.worker_threads())]

    def env_of(name: str) -> dict[str, str]:
        return {**env, **config.worker_env.get(name, {})}

    models = config.served_models()
    prefill = [(m, i) for m in models for i in range(config.num_prefill_workers)]
    decode = [(m, i) for m in models for i in range(config.num_decode_workers)]
    return [
        *(
            WorkerSpec(
                "prefill", model, worker_args, env_of(f"prefill-{n}"), _log(config, "prefill", n)
            )
            for n, (model, _) in enumerate(prefill)
        ),
        *(
            WorkerSpec(
                "decode",
                model,
                [*worker_args, *config.decode_worker_args],
                env_of(f"decode-{n}"),
                _log(config, "decode", n),
            )
            for n, (model, _) in enumerate(decode)
        ),
    ]


def _log(config: StackConfig, role: str, index: int) -> str | None:
    if config.log_dir is None:
        return None
    config.log_dir.mkdir(parents=True, exist_ok=True)
    return str(config.log_dir / f"{role}-{index}.log")


def _create_demo_tenant(stack: Stack) -> str:
    headers = {"authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30.0) as client:
        response = client.get(f"/admin/v1/tenants/{DEMO_TENANT}")
        if response.status_code == 404:
            response = client.post("/admin/v1/tenants", json={"name": DEMO_TENANT})
        if not response.is_success:
            raise LaunchError(f"could not create the demo tenant: {response.text}")
        response = client.post(f"/admin/v1/tenants/{DEMO_TENANT}/keys", json={"name": "demo"})
        if not response.is_success:
            raise LaunchError(f"could not create the demo key: {response.text}")
        return str(response.json()["secret"])


def _read_credentials(state_dir: Path) -> dict[str, Any]:
    path = state_dir / CREDENTIALS_FILE
    if not path.is_file() or not (state_dir / "fairgate.db").is_file():
        return {}  # no store: whatever the file says names tenants that no longer exist
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _write_credentials(stack: Stack) -> None:
    path = stack.state_dir / CREDENTIALS_FILE
    data = {
        "base_url": stack.base_url,
        "admin_token": stack.admin_token,
        "demo_key": stack.demo_key,
    }
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a stale .tmp from an interrupted run keeps its old mode otherwise
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(path.with_suffix(".tmp"), path)


def run_up(config: StackConfig) -> int:
    """``fairgate up``: start, say how to use it, serve until Ctrl-C / SIGTERM (0) or until the
    stack cannot go on (1: the gateway exited, or a worker crash-looped; why, on stderr). A
    worker that exits meanwhile is restarted (``deploy.supervisor``). During start-up Ctrl-C
    interrupts (what was started is stopped) and the children die with us anyway
    (``--exit-with-parent``). Stopping, the gateway first lets the requests in flight finish
    (its grace period); a second Ctrl-C or SIGTERM cuts that short."""
    stack = start_stack(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():  # the second: the gateway stops waiting for its requests
            print("fairgate: stopping now", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                stack.gateway.process.send_signal(signal.SIGINT)  # uvicorn's force_exit
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    reason: str | None = None
    try:
        supervisor = Supervisor(
            stack, config.restart_policy, ready_timeout_s=config.ready_timeout_s
        )
        _print_welcome(stack)
        reason = supervisor.run(stop)
        if reason is not None:
            print(f"fairgate: {reason}; stopping", file=sys.stderr, flush=True)
    finally:
        if stop.is_set():
            print(
                "fairgate: stopping; requests in flight may finish (Ctrl-C again: now)",
                file=sys.stderr,
                flush=True,
            )
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if reason is None else 1


def _print_welcome(stack: Stack) -> None:
    """Where it is and how to try it, without a secret: stdout ends up in logs."""
    roles = ", ".join(f"{w.spec.role} {w.http_url}" for w in stack.workers)
    credentials = stack.state_dir / CREDENTIALS_FILE
    read_key = (
        "python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[\"demo_key\"])' "
        + shlex.quote(str(credentials))
    )
    print(
        f"fairgate is up at {stack.base_url}\n"
        f"  workers:     {roles}\n"
        f"  credentials: {credentials} (the admin token and the demo key; only you can read it)\n"
        f"  admin CLI:   fairgate admin --state-dir {shlex.quote(str(stack.state_dir))} workers\n"
        "\n"
        "Try it:\n"
        f"  curl {stack.base_url}/v1/chat/completions \\\n"
        f'    -H "Authorization: Bearer $({read_key})" \\\n'
        "    -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{_model_id(stack)}", '
        '"messages": [{"role": "user", "content": "Hello!"}]}\'\n'
        "\n"
        "A worker that exits is restarted; the log says so.\n"
        "Ctrl-C stops everything.",
        flush=True,
    )


def _model_id(stack: Stack) -> str:
    try:
        response = httpx.get(
            stack.base_url + "/v1/models",
            headers={"authorization": f"Bearer {stack.demo_key}"},
            timeout=10.0,
        )
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return "MODEL"
