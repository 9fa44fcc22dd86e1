"""What the live dashboard shows (``gateway.dashboard``), read from the same place ``/metrics``
is: the gateway's Prometheus registry (``GatewayMetrics.registry.collect()``, the very families
the exposition prints), plus the fairness history's per-tenant series for the charts.

A figure on the page is therefore a figure of ``/metrics`` at the moment of the snapshot, never
a second count that could drift from it. The only derived figures are ratios and rates of those
series: throughput (tokens/s) from the token counters' change over the last
``THROUGHPUT_WINDOW_S`` of snapshots, a worker's prefix hit rate (cached / prompt tokens), a
tenant's service rate (the history's last few points) and totals over labels. Building a
snapshot does not call ``GatewayMetrics.sample`` (the scrape does): a dashboard open in several
browsers would otherwise sample the windows faster than the gateway's own sampler, which
changes which tenants count as backlogged "in every sample".

Label values are tenant names, class names and worker ids: the page escapes them (its script
writes text nodes only). Everything here runs on the gateway's event loop. Torch-free.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from gateway.fairness_history import TenantSeries
from gateway.metrics import UNAUTHENTICATED

__all__ = [
    "HISTORY_WINDOW_S",
    "RATE_POINTS",
    "THROUGHPUT_WINDOW_S",
    "FamilyValues",
    "OverallView",
    "SeriesSource",
    "Snapshot",
    "SnapshotBuilder",
    "TenantView",
    "Throughput",
    "WorkerView",
    "read_families",
]

HISTORY_WINDOW_S = 300.0  # what the charts span
THROUGHPUT_WINDOW_S = 10.0  # tokens/s over the snapshots of the last this many seconds
# A tenant's service rate: the mean of its last this many history points (about seconds), as
# the charts draw it: service is counted when tokens come back, one second's is bursty.
RATE_POINTS = 5
# The sample names a snapshot reads (counters with their ``_total``): nothing else is kept.
_WANTED = frozenset(
    {
        "fairgate_requests_total",
        "fairgate_prompt_tokens_total",
        "fairgate_completion_tokens_total",
        "fairgate_rejections_total",
        "fairgate_preemptions_total",
        "fairgate_queue_depth",
        "fairgate_tenant_queue_depth",
        "fairgate_fair_counter",
        "fairgate_requests_in_gateway",
        "fairgate_slo_attainment",
        "fairgate_tpot_attainment",
        "fairgate_tenant_slo_attainment",
        "fairgate_tenant_tpot_attainment",
        "fairgate_jain_index",
        "fairgate_tenant_service_units_total",
        "fairgate_tenant_weight",
        "fairgate_tenant_backlogged",
        "fairgate_tenant_entitled_share",
        "fairgate_tenant_service_share",
        "fairgate_backend_worker_state",
        "fairgate_backend_batch_size",
        "fairgate_backend_kv_blocks_used",
        "fairgate_backend_kv_blocks_total",
        "fairgate_backend_prompt_tokens_total",
        "fairgate_backend_cached_tokens_total",
    }
)

Labels = dict[str, str]
# sample name -> [(labels, value)], in the order the registry gave them
FamilyValues = dict[str, list[tuple[Labels, float]]]


def read_families(registry: CollectorRegistry, names: Iterable[str] = _WANTED) -> FamilyValues:
    """The samples of ``names`` (full sample names, e.g. ``fairgate_requests_total``) as the
    registry collects them now."""
    wanted = frozenset(names)
    values: FamilyValues = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in wanted:
                values.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return values


# ``FairnessHistory.series``: per tenant, its chart points over the last ``window_s``.
SeriesSource = Callable[[float], Sequence[TenantSeries]]


@dataclass(slots=True)
class TenantView:
    """One tenant's row; every figure but ``history`` and ``service_rate`` is a /metrics
    sample (or a sum of them over labels)."""

    name: str
    weight: float | None = None
    is_backlogged: bool = False
    entitled_share: float | None = None
    service_share: float | None = None
    service_units: float = 0.0
    service_rate: float | None = None  # units/s, the history's last ``RATE_POINTS``
    fair_counter: float | None = None
    queue_depth: float = 0.0
    queue_by_class: dict[str, float] = field(default_factory=dict)
    ttft_attainment: dict[str, float] = field(default_factory=dict)
    tpot_attainment: dict[str, float] = field(default_factory=dict)
    requests_ok: float = 0.0
    rejections: float = 0.0
    rejections_by_reason: dict[str, float] = field(default_factory=dict)
    preemptions: float = 0.0
    completion_tokens: float = 0.0
    in_gateway: float = 0.0
    # (t, service units/s, entitled share or None, received share or None)
    history: list[tuple[float, float, float | None, float | None]] = field(default_factory=list)


@dataclass(slots=True)
class WorkerView:
    worker: str
    role: str
    model: str
    state: str = "unknown"
    batch: float = 0.0
    kv_blocks_used: float = 0.0
    kv_blocks_total: float = 0.0
    prompt_tokens: float = 0.0
    cached_tokens: float = 0.0
    prefix_hit_rate: float | None = None  # cached / prompt; None before any prompt


@dataclass(slots=True)
class OverallView:
    window_s: float
    jain: float | None = None
    output_tokens_s: float | None = None  # None until two snapshots apart
    prompt_tokens_s: float | None = None
    completion_tokens: float = 0.0
    prompt_tokens: float = 0.0
    queue_depth: float = 0.0
    in_gateway: float = 0.0
    rejections: float = 0.0  # unauthenticated requests' included
    preemptions: float = 0.0
    ttft_attainment: dict[str, float] = field(default_factory=dict)
    tpot_attainment: dict[str, float] = field(default_factory=dict)
    num_workers: int = 0
    num_workers_ready: int = 0


@dataclass(slots=True)
class Snapshot:
    at: float  # epoch seconds
    seq: int  # counts the builder's snapshots: the page tells a fresh one by it
    slo_classes: list[str]
    overall: OverallView
    tenants: list[TenantView]
    workers: list[WorkerView]


class Throughput:
    """Tokens/s from cumulative token counts seen at successive snapshots, over the last
    ``window_s`` (at least two observations apart)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        self.window_s = window_s
        self._seen: deque[tuple[float, float, float]] = deque()  # (time, output, prompt)

    def observe(self, now: float, output: float, prompt: float) -> tuple[float, float] | None:
        """(output tokens/s, prompt tokens/s), or None before a second observation."""
        self._seen.append((now, output, prompt))
        # keep one observation at or before the window's start, as the rate's base
        while len(self._seen) > 2 and self._seen[1][0] <= now - self.window_s:
            self._seen.popleft()
        if len(self._seen) == 2 and self._seen[0][0] < now - 3 * self.window_s:
            # nobody watched for a while: an average over that gap is not "now"
            self._seen.popleft()
        first_t, first_output, first_prompt = self._seen[0]
        if now - first_t <= 0.0:
            return None
        elapsed = now - first_t
        return (output - first_output) / elapsed, (prompt - first_prompt) / elapsed


class SnapshotBuilder:
    """Builds the dashboard's snapshots from the registry (and the history, when there is
    one); holds the throughput's observations between them."""

    def __init__(
        self,
        registry: CollectorRegistry,
        slo_classes: Sequence[str],
        window_s: float,
        *,
        history: SeriesSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.slo_classes = list(slo_classes)
        self.window_s = window_s
        self.history = history
        self._clock = clock
        self._wall_clock = wall_clock
        self._throughput = Throughput()
        self._seq = 0

    def build(self) -> Snapshot:
        families = read_families(self.registry)
        tenants = _tenants(families)
        if self.history is not None:
            _add_history(tenants, self.history(HISTORY_WINDOW_S))
        workers = _workers(families)
        overall = _overall(families, self.window_s, workers)
        rates = self._throughput.observe(
            self._clock(), overall.completion_tokens, overall.prompt_tokens
        )
        if rates is not None:
            overall.output_tokens_s, overall.prompt_tokens_s = rates
        self._seq += 1
        return Snapshot(
            at=self._wall_clock(),
            seq=self._seq,
            slo_classes=self.slo_classes,
            overall=overall,
            tenants=[tenants[name] for name in sorted(tenants)],
            workers=sorted(workers.values(), key=lambda w: (w.model, w.role, w.worker)),
        )


# One figure per tenant or worker, copied as /metrics has it: sample name -> the view's field.
_TENANT_GAUGES = {
    "fairgate_tenant_weight": "weight",
    "fairgate_tenant_entitled_share": "entitled_share",
    "fairgate_tenant_service_share": "service_share",
    "fairgate_tenant_service_units_total": "service_units",
    "fairgate_fair_counter": "fair_counter",
    "fairgate_queue_depth": "queue_depth",
    "fairgate_requests_in_gateway": "in_gateway",
}
_WORKER_GAUGES = {
    "fairgate_backend_batch_size": "batch",
    "fairgate_backend_kv_blocks_used": "kv_blocks_used",
    "fairgate_backend_kv_blocks_total": "kv_blocks_total",
    "fairgate_backend_prompt_tokens_total": "prompt_tokens",
    "fairgate_backend_cached_tokens_total": "cached_tokens",
}


def _tenants(families: FamilyValues) -> dict[str, TenantView]:
    views: dict[str, TenantView] = {}

    def view(labels: Labels) -> TenantView | None:
        name = labels.get("tenant", UNAUTHENTICATED)
        if name == UNAUTHENTICATED:  # refused before anyone was known: in the totals only
            return None
        return views.setdefault(name, TenantView(name))

    def each(sample_name: str) -> Iterable[tuple[TenantView, Labels, float]]:
        for labels, value in families.get(sample_name, []):
            tenant = view(labels)
            if tenant is not None:
                yield tenant, labels, value

    for sample_name, attribute in _TENANT_GAUGES.items():
        for tenant, _, value in each(sample_name):
            setattr(tenant, attribute, value)
    for tenant, _, value in each("fairgate_tenant_backlogged"):
        tenant.is_backlogged = value > 0
    for tenant, labels, value in each("fairgate_tenant_queue_depth"):
        by_class = tenant.queue_by_class
        by_class[labels["slo_class"]] = by_class.get(labels["slo_class"], 0.0) + value
    for tenant, labels, value in each("fairgate_tenant_slo_attainment"):
        tenant.ttft_attainment[labels["slo_class"]] = value
    for tenant, labels, value in each("fairgate_tenant_tpot_attainment"):
        tenant.tpot_attainment[labels["slo_class"]] = value
    for tenant, labels, value in each("fairgate_requests_total"):
        if labels.get("outcome") == "ok":
            tenant.requests_ok += value
    for tenant, labels, value in each("fairgate_rejections_total"):
        tenant.rejections += value
        reasons = tenant.rejections_by_reason
        reasons[labels["reason"]] = reasons.get(labels["reason"], 0.0) + value
    for tenant, _, value in each("fairgate_preemptions_total"):
        tenant.preemptions += value
    for tenant, _, value in each("fairgate_completion_tokens_total"):
        tenant.completion_tokens += value
    return views


def _add_history(tenants: dict[str, TenantView], series: Sequence[TenantSeries]) -> None:
    """Each tenant's chart points, by name (the metrics' label); a tenant the history knows
    and the metrics do not yet gets a row of its own."""
    for one in series:
        tenant = tenants.setdefault(one.tenant, TenantView(one.tenant))
        tenant.history = [
            (p.t, p.service_rate, p.entitled_share, p.received_share) for p in one.points
        ]
        recent = tenant.history[-RATE_POINTS:]
        if recent:
            tenant.service_rate = sum(point[1] for point in recent) / len(recent)


def _workers(families: FamilyValues) -> dict[tuple[str, str, str], WorkerView]:
    views: dict[tuple[str, str, str], WorkerView] = {}

    def each(sample_name: str) -> Iterable[tuple[WorkerView, Labels, float]]:
        for labels, value in families.get(sample_name, []):
            key = (labels.get("worker", ""), labels.get("role", ""), labels.get("model", ""))
            yield views.setdefault(key, WorkerView(*key)), labels, value

    for worker, labels, value in each("fairgate_backend_worker_state"):
        if value > 0:
            worker.state = labels.get("state", "unknown")
    for sample_name, attribute in _WORKER_GAUGES.items():
        for worker, _, value in each(sample_name):
            setattr(worker, attribute, value)
    for worker in views.values():
        if worker.prompt_tokens > 0:
            worker.prefix_hit_rate = worker.cached_tokens / worker.prompt_tokens
    return views


def _overall(
    families: FamilyValues, window_s: float, workers: dict[tuple[str, str, str], WorkerView]
) -> OverallView:
    def total(sample_name: str) -> float:
        return sum(value for _, value in families.get(sample_name, []))

    overall = OverallView(
        window_s=window_s,
        completion_tokens=total("fairgate_completion_tokens_total"),
        prompt_tokens=total("fairgate_prompt_tokens_total"),
        queue_depth=total("fairgate_queue_depth"),
        in_gateway=total("fairgate_requests_in_gateway"),
        rejections=total("fairgate_rejections_total"),
        preemptions=total("fairgate_preemptions_total"),
        num_workers=len(workers),
        num_workers_ready=sum(w.state == "ready" for w in workers.values()),
    )
    jain = families.get("fairgate_jain_index")
    if jain:
        overall.jain = jain[0][1]
    for labels, value in families.get("fairgate_slo_attainment", []):
        overall.ttft_attainment[labels["slo_class"]] = value
    for labels, value in families.get("fairgate_tpot_attainment", []):
        overall.tpot_attainment[labels["slo_class"]] = value
    return overall
