"""The gateway's Prometheus metrics (``GET /metrics``, text format, admin token required: the
series name tenants).

Per tenant and SLO class: requests by outcome, prompt / cached / completion tokens, rejections by
reason, preemptions, and histograms of time to first token, time per output token, time in the
queue and end-to-end latency. Read at each scrape from the scheduler: queue depth and fair-share
counter per tenant; over a sliding window (``window_s``): SLO attainment per class and per tenant
and class, of the TTFT target and, for a class that has one, of the TPOT target (the mean time
per output token after the first, over requests with at least two), and
Jain's fairness index over the tenants that stayed backlogged the whole window, of the service
each received in it.

Service is measured as the active policy charges it (``policy``; ``scheduling.md`` §1-§2), so
that the figures, the receipts and the policy's bounds speak of one quantity: ``w_in`` × prompt
tokens + ``w_out`` × output tokens, times the model's cost factor, divided by the weight the
request was admitted at (a demoted one's is lowered; a weight the admin changes later counts
from the tenant's next request, where the policies apply it at once). The prompt tokens are,
under VTC, the whole prompt (VTC charges it in full, cached or not); under DLPM, D²LPM and the
others, those its prefill computed (a prefix-cache hit costs the workers nothing, and those
policies and the simulator's figures count the same). A resumption's prompt is charged by no
policy, and counts nowhere here. The prompt is counted at the first token (VTC charges it at
placement: a request that fails before its first token is in VTC's counters and not here).
Label values are tenant names and configured class names only (a request that fails
authentication counts under tenant ``""``): the number of series is bounded by the tenants.

For the fairness views (``gateway.fairness_history``, the dashboard, the alert rules): per
tenant, its service so far in service units (``fairgate_tenant_service_units_total``, the
quantity Jain's index is computed over), its weight, whether it is backlogged (requests queued
now), its entitled share now (its weight over the backlogged tenants' weights), and over the
window, of the intervals it was backlogged in, its entitled share and its received share
(``FairnessHistory.shares``; the pair the starvation alert compares), and its queue by class. A
tenant's weight is the fair policies' (``gateway.policies``): the weight of its last request
that was not demoted (``tenant_weight``, from ``gateway.generation`` as a policy's ``enqueue``
takes it), or an admin's change (``Gateway.apply_admin_change``, beside the policy's
``update_tenant``). A deleted tenant is forgotten (``forget_tenant``), a renamed one's series
take its new name (``rename_tenant``): no two series of one name.

Per worker, from the registry's handles (``WorkerSnapshot``; labels: the worker's id, or its
URL before it said one, its role and its model's id): its state (one series per worker, at 1),
its batch, its KV blocks used and in all (from its last load report, and only while the
worker's state is neither ``dead`` nor ``unknown``: a report from before it stopped answering
says nothing of it now), and the tokens its prefills were sent and found cached
(``worker_prefilled``: prefix hit rate = cached / prompt). Only workers the registry knows now
are exposed: a removed one's series go with it.

Everything is called on the gateway's event loop; the scrape runs there too. Torch-free.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import SloClass
from gateway.fairness_history import FairnessHistory, TenantPoint, WindowShares
from gateway.scheduler import ModelBacklog, TenantState
from gateway.workers import WorkerHandle

__all__ = [
    "CLIENT_DISCONNECTED",
    "GatewayMetrics",
    "RequestRecord",
    "WorkerSnapshot",
    "charges_full_prompt",
    "jain_index",
    "service_measure",
    "worker_labels",
]

# Seconds; TTFT and latency span a cached short prompt to a long queue wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UNAUTHENTICATED = ""
CLIENT_DISCONNECTED = "client_disconnected"  # an outcome, never a rejection
# ``model``: the model a request was served by, by id (an alias's target; "" before a request's
# model was resolved): ids come from the workers and the admins, never from a client's text.
_LABELS = ("tenant", "slo_class", "model")
# A worker in these states has no load now: its last report is not shown (module docstring).
_SILENT_STATES = frozenset({"dead", "unknown"})


def charges_full_prompt(policy: str) -> bool:
    """Whether the policy charges a request's whole prompt, cached or not (VTC), rather than
    the prompt tokens its prefill computed (``scheduling.md`` §1-§2)."""
    return policy == "vtc"


def service_measure(policy: str) -> str:
    """What service counts under the policy, for people (receipts, documents)."""
    prompt = (
        "all prompt tokens, cached or not (VTC's charge)"
        if charges_full_prompt(policy)
        else "the prompt tokens its prefill computed (a prefix-cache hit is free)"
    )
    return f"w_in x {prompt} + w_out x output tokens, x the model's cost factor"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A finished request, as the metrics see it (seconds; None: the stage was not reached)."""

    tenant: str
    slo_class: str
    outcome: str  # "ok", or the error code it ended with
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queue_s: float | None
    ttft_s: float | None
    e2e_s: float
    num_preemptions: int
    model: str = ""  # its model's id


def worker_labels(handle: WorkerHandle) -> tuple[str, str, str]:
    """A worker's labels: its id (its URL until it said one), its role, its model's id ("" until
    it said one). The admins, the configuration and the workers name them, never a client."""
    info = handle.info
    return handle.worker_id, handle.role, "" if info is None else info.model_id


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """A worker as its series show it (``of``: from the registry's handle); the load figures
    are None until its first load report."""

    worker: str
    role: str
    model: str
    state: str
    num_running: int | None = None
    num_kv_blocks_used: int | None = None
    num_kv_blocks_total: int | None = None

    @classmethod
    def of(cls, handle: WorkerHandle) -> WorkerSnapshot:
        load = handle.load
        worker, role, model = worker_labels(handle)
        if load is None:
            return cls(worker, role, model, handle.state)
        used = load.num_total_blocks - load.num_free_blocks
        return cls(worker, role, model, handle.state, load.num_running, used, load.num_total_blocks)

    @property
    def labels(self) -> tuple[str, str, str]:
        return self.worker, self.role, self.model


def jain_index(values: Sequence[float]) -> float | None:
    """(Σx)² / (n·Σx²); 1 when everyone got the same, 1/n when one got everything. None for
    no values or all zero."""
    total_sq = sum(x * x for x in values)
    if not values or total_sq == 0.0:
        return None
    return sum(values) ** 2 / (len(values) * total_sq)


class GatewayMetrics:
    """What the gateway records. ``tenants()`` is the scheduler's view (queue depths and
    counters), read at each scrape and each ``sample``."""

    def __init__(
        self,
        slo_classes: Sequence[SloClass],
        tenants: Callable[[], list[TenantState]],
        *,
        w_in: float = 1.0,
        w_out: float = 2.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        requests_in_gateway: Callable[[], Mapping[str, int]] = dict,
        loop_lag_s: Callable[[], float] = float,
        model_backlogs: Callable[[], Sequence[ModelBacklog]] = list,
        cost_factors: Callable[[], Mapping[str, float]] = dict,
        queued_by_class: Callable[[], Mapping[tuple[str, str], int]] = dict,
        workers: Callable[[], Iterable[WorkerSnapshot]] = list,
        policy: str = "",
    ) -> None:
        """``policy``: the scheduling policy's name, which says how service is measured
        (``charges_full_prompt``); ``requests_in_gateway``: by tenant id, the requests between
        the gatekeeper and their end; ``loop_lag_s``: how late the event loop's last lag
        sample was (``LoadGuard``); ``model_backlogs``: each model's queue and estimated wait
        (the scheduler's); ``cost_factors``: by model id, what its token costs
        (``gateway.model_costs``); ``queued_by_class``: by (tenant id, class name), the
        requests waiting for workers; ``workers``: every worker the registry knows now."""
        self.model_backlogs = model_backlogs
        self.cost_factors = cost_factors
        self.queued_by_class = queued_by_class
        self.workers = workers
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests_in_gateway = requests_in_gateway
        self.loop_lag_s = loop_lag_s
        self._classes = {c.name: c for c in slo_classes}
        self._tenants = tenants
        self.w_in, self.w_out = w_in, w_out
        self.policy = policy
        self.measure = service_measure(policy)
        self._charges_full_prompt = charges_full_prompt(policy)
        self.window_s = window_s
        self._clock = clock
        self._names: dict[str, str] = {}  # tenant id → name, for the scheduler's series
        self._service: dict[str, float] = {}  # tenant id → normalized service so far
        self._cost: dict[str, float] = {}  # … and in cost units (not divided by the weight)
        self._weights: dict[str, float] = {}  # tenant id → its weight (module docstring)
        # Per worker's labels: [prompt tokens its prefills computed or found cached, cached]
        self._prefilled: dict[tuple[str, str, str], list[int]] = {}
        # The shares over the window (``fairgate_tenant_service_share``, ``…_entitled_share_
        # window``). A sample at each scrape too: closer than 0.5 s, the history skips it.
        self._shares = FairnessHistory(horizon_s=window_s, clock=clock)
        # (time, {tenant id: service so far}) for tenants backlogged at that time
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        # (time, tenant id, class, TTFT met, TPOT met or None: no target or too few tokens)
        self._slo_window: deque[tuple[float, str, str, bool, bool | None]] = deque()

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, (*_LABELS, *extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=self.registry)

        self.requests = counter("fairgate_requests", "Requests that ended, by outcome", "outcome")
        self.prompt_tokens = counter("fairgate_prompt_tokens", "Prompt tokens of ended requests")
        self.cached_tokens = counter(
            "fairgate_cached_tokens", "Prompt tokens served from the prefix cache"
        )
        self.completion_tokens = counter("fairgate_completion_tokens", "Generated tokens")
        self.rejections = counter(
            "fairgate_rejections", "Requests refused or ended with an error, by reason", "reason"
        )
        self.preemptions = counter(
            "fairgate_preemptions", "Times a decode worker handed a request back (recompute)"
        )
        self.slo_requests = counter(
            "fairgate_slo_requests",
            "Requests admitted to a class, by TTFT target met (none without a first token)",
            "met",
        )
        self.tpot_requests = counter(
            "fairgate_tpot_requests",
            "Requests of a class with a TPOT target and at least two tokens, by target met",
            "met",
        )
        self.ttft = histogram("fairgate_ttft_seconds", "Time to first token", LATENCY_BUCKETS)
        self.tpot = histogram(
            "fairgate_tpot_seconds", "Time per output token after the first", TPOT_BUCKETS
        )
        self.queue_time = histogram(
            "fairgate_queue_seconds", "Time from arrival to placement on workers", LATENCY_BUCKETS
        )
        self.e2e = histogram(
            "fairgate_e2e_seconds", "Time from arrival to the end", LATENCY_BUCKETS
        )
        self.registry.register(_SchedulerCollector(self))

    # ---- recording --------------------------------------------------------------------------

    def tenant_seen(self, tenant_id: str, name: str) -> None:
        """A request of this tenant was admitted (names its scheduler series)."""
        self._names[tenant_id] = name

    def tenant_weight(self, tenant_id: str, weight: float) -> None:
        """The tenant's weight now (module docstring: where it comes from)."""
        self._weights[tenant_id] = weight

    def rename_tenant(self, tenant_id: str, name: str) -> None:
        """The tenant's name changed (an admin's): its series take the new one. A tenant the
        metrics never named stays unnamed (its first request names it)."""
        if tenant_id in self._names:
            self._names[tenant_id] = name

    def forget_tenant(self, tenant_id: str) -> None:
        """The tenant was deleted: its service, weight and name go, and with them its series
        (a new tenant of its name starts its own). Requests of it still queued show under its
        id until they end."""
        for book in (self._service, self._cost, self._weights, self._names):
            book.pop(tenant_id, None)

    def worker_prefilled(
        self, labels: tuple[str, str, str], num_prompt_tokens: int, num_cached_tokens: int
    ) -> None:
        """A prefill ran on the worker of ``labels`` (``worker_labels``): the tokens it was
        sent (a resumption's: the prompt and the output so far), and how many of them its
        prefix cache held."""
        counts = self._prefilled.setdefault(labels, [0, 0])
        counts[0] += num_prompt_tokens
        counts[1] += num_cached_tokens

    def served(
        self,
        tenant_id: str,
        weight: float,
        num_computed_tokens: int,
        num_output_tokens: int,
        *,
        num_prompt_tokens: int | None = None,
        cost_factor: float = 1.0,
    ) -> None:
        """A request of the tenant running at ``weight`` received this much work: at its first
        token, its prompt (``num_prompt_tokens``, of which its prefill computed
        ``num_computed_tokens``; None: all of it was computed), then output tokens, of a model
        whose token costs ``cost_factor`` (``gateway.model_costs``). Counted as the policy
        charges it (module docstring): service in normalised units."""
        num_charged = num_computed_tokens
        if self._charges_full_prompt and num_prompt_tokens is not None:
            num_charged = num_prompt_tokens
        cost = (self.w_in * num_charged + self.w_out * num_output_tokens) * cost_factor
        self._service[tenant_id] = self._service.get(tenant_id, 0.0) + cost / weight
        self._cost[tenant_id] = self._cost.get(tenant_id, 0.0) + cost

    def rejected(self, tenant: str, slo_class: str, reason: str, model: str = "") -> None:
        """A request refused before it ran (auth, validation, quota, shed, no worker), or whose
        client left while it was admitted (counted, but refused by nobody); ``model``: its
        model's id, once resolved."""
        if reason != CLIENT_DISCONNECTED:
            self.rejections.labels(tenant, slo_class, model, reason).inc()
        self.requests.labels(tenant, slo_class, model, reason).inc()

    def finished(self, record: RequestRecord) -> None:
        labels = (record.tenant, record.slo_class, record.model)
        self.requests.labels(*labels, record.outcome).inc()
        if record.queue_s is None and record.outcome not in ("ok", CLIENT_DISCONNECTED):
            # Never placed: shed, or no worker had room in time.
            self.rejections.labels(*labels, record.outcome).inc()
        self.prompt_tokens.labels(*labels).inc(record.prompt_tokens)
        self.cached_tokens.labels(*labels).inc(record.cached_tokens)
        self.completion_tokens.labels(*labels).inc(record.completion_tokens)
        if record.num_preemptions:
            self.preemptions.labels(*labels).inc(record.num_preemptions)
        if record.queue_s is not None:
            self.queue_time.labels(*labels).observe(record.queue_s)
        self.e2e.labels(*labels).observe(record.e2e_s)
        tpot_s: float | None = None
        if record.ttft_s is not None:
            self.ttft.labels(*labels).observe(record.ttft_s)
            if record.completion_tokens > 1:
                tpot_s = (record.e2e_s - record.ttft_s) / (record.completion_tokens - 1)
                self.tpot.labels(*labels).observe(tpot_s)
        elif record.outcome == CLIENT_DISCONNECTED:
            return  # it left before its first token: no verdict on the target
        slo_class = self._classes.get(record.slo_class)
        if slo_class is not None:
            # A request that ended without a first token (shed, timed out, failed) missed it.
            met = record.ttft_s is not None and record.ttft_s <= slo_class.ttft_target_s
            self.slo_requests.labels(*labels, "true" if met else "false").inc()
            tpot_met: bool | None = None
            if slo_class.tpot_target_s is not None and tpot_s is not None:
                tpot_met = tpot_s <= slo_class.tpot_target_s
                self.tpot_requests.labels(*labels, "true" if tpot_met else "false").inc()
            self._slo_window.append((self._clock(), record.tenant, record.slo_class, met, tpot_met))

    def sample(self) -> None:
        """Note which tenants are backlogged now and the service they have had (called about
        once a second, and at each scrape)."""
        now = self._clock()
        states = self._tenants()
        backlogged = {
            t.tenant_id: self._service.get(t.tenant_id, 0.0) for t in states if t.num_queued > 0
        }
        self._shares.sample(self.fairness_points(states))
        self._samples.append((now, backlogged))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        while self._slo_window and self._slo_window[0][0] < now - self.window_s:
            self._slo_window.popleft()

    # ---- reading ----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        self.sample()
        return generate_latest(self.registry)

    def jain(self) -> float | None:
        """Over the tenants backlogged in every sample of the window (at least two samples and
        two tenants), of the service each received between the first and the last sample."""
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0][1], self._samples[-1][1]
        always = set(first).intersection(*(s for _, s in self._samples))
        if len(always) < 2:
            return None
        return jain_index([last[t] - first[t] for t in sorted(always)])

    def slo_attainment(self, *, by_tenant: bool = False) -> dict[tuple[str, ...], float]:
        """Per class (and tenant, by name, first, with ``by_tenant``), the share of the
        window's requests whose first token met the class's TTFT target."""
        return self._attainment(by_tenant, tpot=False)

    def tpot_attainment(self, *, by_tenant: bool = False) -> dict[tuple[str, ...], float]:
        """As ``slo_attainment``, of the TPOT target (classes that have one; requests with at
        least two tokens)."""
        return self._attainment(by_tenant, tpot=True)

    def _attainment(self, by_tenant: bool, *, tpot: bool) -> dict[tuple[str, ...], float]:
        met: dict[tuple[str, ...], list[int]] = {}
        for _, tenant, slo_class, ttft_met, tpot_met in self._slo_window:
            is_met = tpot_met if tpot else ttft_met
            if is_met is None:
                continue
            key = (tenant, slo_class) if by_tenant else (slo_class,)
            counts = met.setdefault(key, [0, 0])
            counts[0] += is_met
            counts[1] += 1
        return {key: hits / total for key, (hits, total) in met.items()}

    def fairness_points(self, states: Iterable[TenantState] | None = None) -> list[TenantPoint]:
        """Every tenant the scheduler or the service books know, now (``FairnessHistory``'s
        samples); ``states``: the scheduler's, when the caller has just read them."""
        queued = {
            s.tenant_id: s.num_queued for s in (self._tenants() if states is None else states)
        }
        return [
            TenantPoint(
                tenant_id,
                self.name_of(tenant_id),
                self.weight_of(tenant_id),
                self._service.get(tenant_id, 0.0),
                self._cost.get(tenant_id, 0.0),
                queued.get(tenant_id, 0),
            )
            for tenant_id in sorted(queued.keys() | self._service.keys())
        ]

    def window_shares(self) -> dict[str, WindowShares]:
        """By tenant id, of the tenants backlogged in the window and known now (a deleted
        one is not): its entitled and received shares over the window."""
        known = self._names.keys() | self._service.keys()
        return {t: s for t, s in self._shares.shares(self.window_s).items() if t in known}

    def weight_of(self, tenant_id: str) -> float:
        return self._weights.get(tenant_id, 1.0)

    def prefilled(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """By worker labels, of the workers known now: (prompt tokens, cached tokens) their
        prefills had. Forgets the workers the registry no longer knows."""
        known = {w.labels for w in self.workers()}
        self._prefilled = {k: v for k, v in self._prefilled.items() if k in known}
        return {k: (v[0], v[1]) for k, v in self._prefilled.items()}

    def name_of(self, tenant_id: str) -> str:
        return self._names.get(tenant_id, tenant_id)

    def tenant_states(self) -> Iterable[TenantState]:
        return self._tenants()


class _SchedulerCollector(Collector):
    """The series read from the scheduler and the windows at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        depth = GaugeMetricFamily(
            "fairgate_queue_depth", "Requests waiting in the scheduler", labels=["tenant"]
        )
        counter = GaugeMetricFamily(
            "fairgate_fair_counter",
            "The tenant's fair-share counter (VTC counter or normalized service)",
            labels=["tenant"],
        )
        for state in metrics.tenant_states():
            name = metrics.name_of(state.tenant_id)
            depth.add_metric([name], state.num_queued)
            counter.add_metric([name], state.counter)
        yield depth
        yield counter
        yield from _fairness_series(metrics)
        yield from _worker_series(metrics)
        in_gateway = GaugeMetricFamily(
            "fairgate_requests_in_gateway",
            "Requests past the gatekeeper and not yet ended (being admitted, queued or running)",
            labels=["tenant"],
        )
        for tenant_id, count in sorted(metrics.requests_in_gateway().items()):
            in_gateway.add_metric([metrics.name_of(tenant_id)], count)
        yield in_gateway
        yield from _model_series(metrics)
        yield GaugeMetricFamily(
            "fairgate_event_loop_lag_seconds",
            "How late the gateway's event loop ran its last lag sample (overloaded while over "
            "gateway.max_loop_lag_s)",
            value=metrics.loop_lag_s(),
        )
        for name, target, attained in (
            ("fairgate_slo_attainment", "TTFT", metrics.slo_attainment),
            ("fairgate_tpot_attainment", "TPOT", metrics.tpot_attainment),
        ):
            per_class = GaugeMetricFamily(
                name,
                f"Share of requests meeting their class's {target} target, "
                f"last {metrics.window_s:g} s",
                labels=["slo_class"],
            )
            for (slo_class,), share in sorted(attained().items()):
                per_class.add_metric([slo_class], share)
            yield per_class
            per_tenant = GaugeMetricFamily(
                name.replace("fairgate_", "fairgate_tenant_"),
                f"Share of the tenant's requests meeting their class's {target} target, "
                f"last {metrics.window_s:g} s",
                labels=["tenant", "slo_class"],
            )
            for (tenant, slo_class), share in sorted(attained(by_tenant=True).items()):
                per_tenant.add_metric([tenant, slo_class], share)
            yield per_tenant
        jain = metrics.jain()
        if jain is not None:
            yield GaugeMetricFamily(
                "fairgate_jain_index",
                f"Jain's index of backlogged tenants' service, last {metrics.window_s:g} s",
                value=jain,
            )


def _model_series(metrics: GatewayMetrics) -> Iterator[Metric]:
    """Per model (QLM's view): its queue, the wait a request arriving now would have, and its
    cost factor."""
    depth = GaugeMetricFamily(
        "fairgate_model_queue_depth", "Requests waiting for the model's pool", labels=["model"]
    )
    tokens = GaugeMetricFamily(
        "fairgate_model_queued_tokens",
        "Prompt tokens waiting for the model's pool",
        labels=["model"],
    )
    wait = GaugeMetricFamily(
        "fairgate_model_estimated_wait_seconds",
        "Estimated wait of a request of the model arriving now (queued prompt tokens at the "
        "pool's measured prefill speed)",
        labels=["model"],
    )
    for backlog in metrics.model_backlogs():
        depth.add_metric([backlog.model], backlog.num_queued)
        tokens.add_metric([backlog.model], backlog.num_queued_tokens)
        if backlog.est_wait_s is not None:
            wait.add_metric([backlog.model], backlog.est_wait_s)
    factor = GaugeMetricFamily(
        "fairgate_model_cost_factor",
        "What a token of the model costs, in tokens of the reference model",
        labels=["model"],
    )
    for model, value in sorted(metrics.cost_factors().items()):
        factor.add_metric([model], value)
    yield from (depth, tokens, wait, factor)


def _fairness_series(metrics: GatewayMetrics) -> Iterator[Metric]:
    """Per tenant (module docstring): service, weight, backlogged, shares, queue by class."""
    points = metrics.fairness_points()
    service = CounterMetricFamily(
        "fairgate_tenant_service_units",
        f"Normalized service received, as the {metrics.policy or 'scheduling'} policy charges "
        f"it: ({metrics.measure}) / the weight the request ran at",
        labels=["tenant"],
    )
    weight = GaugeMetricFamily("fairgate_tenant_weight", "The tenant's weight", labels=["tenant"])
    backlogged = GaugeMetricFamily(
        "fairgate_tenant_backlogged",
        "1 while the tenant has requests waiting for workers, else 0",
        labels=["tenant"],
    )
    entitled = GaugeMetricFamily(
        "fairgate_tenant_entitled_share",
        "The backlogged tenant's weight over the sum of the backlogged tenants' weights",
        labels=["tenant"],
    )
    share = GaugeMetricFamily(
        "fairgate_tenant_service_share",
        "The tenant's share of the service (cost units) received by the tenants backlogged "
        f"with it, over the intervals it was backlogged in the last {metrics.window_s:g} s",
        labels=["tenant"],
    )
    entitled_window = GaugeMetricFamily(
        "fairgate_tenant_entitled_share_window",
        "The tenant's entitled share (its weight over the backlogged tenants' weights), "
        f"averaged over the intervals it was backlogged in the last {metrics.window_s:g} s "
        "(what fairgate_tenant_service_share is measured against)",
        labels=["tenant"],
    )
    total_weight = sum(p.weight for p in points if p.num_queued > 0)
    for point in points:
        name = [point.name]
        service.add_metric(name, point.service_units)
        weight.add_metric(name, point.weight)
        backlogged.add_metric(name, 1.0 if point.num_queued > 0 else 0.0)
        if point.num_queued > 0:
            entitled.add_metric(name, point.weight / total_weight)
    for tenant_id, shares in sorted(metrics.window_shares().items()):
        entitled_window.add_metric([metrics.name_of(tenant_id)], shares.entitled)
        if shares.received is not None:
            share.add_metric([metrics.name_of(tenant_id)], shares.received)
    by_class = GaugeMetricFamily(
        "fairgate_tenant_queue_depth",
        "Requests of the tenant waiting for workers, by SLO class",
        labels=["tenant", "slo_class"],
    )
    for (tenant_id, slo_class), count in sorted(metrics.queued_by_class().items()):
        by_class.add_metric([metrics.name_of(tenant_id), slo_class], count)
    yield from (service, weight, backlogged, entitled, share, entitled_window, by_class)


def _worker_series(metrics: GatewayMetrics) -> Iterator[Metric]:
    """Per worker the registry knows (module docstring); one series per worker's labels."""
    labels = ["worker", "role", "model"]
    state = GaugeMetricFamily(
        "fairgate_backend_worker_state",
        "The worker's state as the gateway sees it (1 for its current state)",
        labels=[*labels, "state"],
    )
    batch = GaugeMetricFamily(
        "fairgate_backend_batch_size", "Requests running on the worker", labels=labels
    )
    used = GaugeMetricFamily(
        "fairgate_backend_kv_blocks_used", "KV cache blocks in use on the worker", labels=labels
    )
    total = GaugeMetricFamily(
        "fairgate_backend_kv_blocks_total", "KV cache blocks of the worker", labels=labels
    )
    seen: set[tuple[str, str, str]] = set()
    for worker in metrics.workers():
        if worker.labels in seen:
            continue  # two handles of one worker (a URL and its id): one series
        seen.add(worker.labels)
        state.add_metric([*worker.labels, worker.state], 1.0)
        if worker.state in _SILENT_STATES:
            continue  # its last load report is old news (module docstring)
        if worker.num_running is not None:
            batch.add_metric(list(worker.labels), worker.num_running)
        if worker.num_kv_blocks_used is not None:
            used.add_metric(list(worker.labels), worker.num_kv_blocks_used)
        if worker.num_kv_blocks_total is not None:
            total.add_metric(list(worker.labels), worker.num_kv_blocks_total)
    prompt = CounterMetricFamily(
        "fairgate_backend_prompt_tokens",
        "Prompt tokens of the prefills the worker ran (computed or found cached)",
        labels=labels,
    )
    cached = CounterMetricFamily(
        "fairgate_backend_cached_tokens",
        "Prompt tokens the worker's prefills found in its prefix cache",
        labels=labels,
    )
    for labels_of, (num_prompt, num_cached) in sorted(metrics.prefilled().items()):
        prompt.add_metric(list(labels_of), num_prompt)
        cached.add_metric(list(labels_of), num_cached)
    yield from (state, batch, used, total, prompt, cached)
