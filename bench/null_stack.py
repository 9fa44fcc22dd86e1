"""The stack the gateway benchmarks measure, and what they read from it.

``start_null_stack``: ``fairgate up``'s code with one prefill and one decode worker on the null
engine, made fast enough that it is never the limit (``NULL_ENGINE_ENV``), and the gateway with
its default settings. The rest reads the stack from outside: a tenant and its key through the
admin API, the processes' ids (for ``bench.cpu_meter``), the gateway's metrics (requests ended by
outcome, requests waiting in its queue) and its processes' logs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx

from deploy.stack import Stack, StackConfig, start_stack

__all__ = [
    "METRICS_TIMEOUT_S",
    "NULL_ENGINE_ENV",
    "create_tenant",
    "log_counts",
    "queue_depth",
    "read_metrics",
    "requests_by_outcome",
    "stack_pids",
    "start_null_stack",
]

NULL_ENGINE_ENV = {
    "FAIRGATE_NULL_PREFILL_TOK_S": "5e6",
    "FAIRGATE_NULL_DECODE_STEP_S": "0.0005",
}
METRICS_TIMEOUT_S = 5.0  # a scrape of a flooded gateway may wait its turn; not for long


def start_null_stack(state_dir: Path, env: dict[str, str], *, log_dir: Path | None = None) -> Stack:
    """``log_dir``: each process's logs to ``ROLE-N.log`` there (None: this process's stderr)."""
    return start_stack(
        StackConfig(
            engine="null",
            port=0,
            state_dir=state_dir,
            env=NULL_ENGINE_ENV | env,
            worker_args=["--log-level", "warning", "--max-num-seqs", "256"],
            gateway_args=["--log-level", "warning"],
            log_dir=log_dir,
        )
    )


async def create_tenant(stack: Stack, name: str) -> str:
    """A new tenant with default quotas; the secret of a new key for it."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=admin, timeout=30.0) as client:
        response = await client.post("/admin/v1/tenants", json={"name": name})
        response.raise_for_status()
        response = await client.post(f"/admin/v1/tenants/{name}/keys", json={"name": "bench"})
        response.raise_for_status()
        return str(response.json()["secret"])


def stack_pids(stack: Stack) -> dict[str, int]:
    """The stack's processes by name (``gateway``, ``prefill-0``, ``decode-0``, ...)."""
    pids = {"gateway": stack.gateway.process.pid}
    for role in ("prefill", "decode", "colocated"):
        of_role = [w for w in stack.workers if w.spec.role == role]
        pids |= {f"{role}-{i}": w.process.pid for i, w in enumerate(of_role)}
    return pids


async def read_metrics(stack: Stack) -> str:
    """The gateway's Prometheus exposition (``/metrics``, an admin route)."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(
        base_url=stack.base_url, headers=admin, timeout=METRICS_TIMEOUT_S
    ) as client:
        response = await client.get("/metrics")
        response.raise_for_status()
        return response.text


def _samples(metrics: str, name: str, label: str) -> Counter[str]:
    """``name``'s samples summed by the value of ``label``."""
    marker = f'{label}="'
    sums: Counter[str] = Counter()
    for line in metrics.splitlines():
        if line.startswith(name + "{") and marker in line:
            value = line.split(marker, 1)[1].split('"', 1)[0]
            sums[value] += int(float(line.rsplit(" ", 1)[1]))
    return sums


def requests_by_outcome(metrics: str) -> Counter[str]:
    """The gateway's count of the requests that ended, by outcome (``ok``,
    ``client_disconnected``, ``queue_full``, ...): ``fairgate_requests_total``."""
    return _samples(metrics, "fairgate_requests_total", "outcome")


def queue_depth(metrics: str) -> int:
    """Requests waiting in the gateway's queue for workers, all tenants."""
    return sum(_samples(metrics, "fairgate_queue_depth", "tenant").values())


def log_counts(log_dir: Path) -> dict[str, dict[str, int]]:
    """Per process log (``ROLE-N.log``): how many lines were warnings, errors and tracebacks
    (a bench sends the stack's logs to files: a flood's worth of warnings would drown its
    progress lines)."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(log_dir.glob("*.log")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        counts[path.stem] = {
            level: sum(level in line for line in lines)
            for level in ("WARNING", "ERROR", "Traceback")
        }
    return counts
