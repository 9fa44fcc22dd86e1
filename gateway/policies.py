"""The scheduling policies behind ``gateway.scheduler.SchedulingPolicy`` (``scheduling.md``), and
``make_policy``, which builds one by its config name. Pure: the gateway's dispatcher and the
simulator (``bench.sim``) run the same classes.

    fcfs     first come, first served (``gateway.scheduler.FcfsPolicy``)
    vtc      Virtual Token Counter, with the lift rule (§2)
    dlpm     Deficit Longest Prefix Match over the prefill pool as one (§3)
    d2lpm    DLPM per worker plus a (tenant, worker) deficit for placement (§4)
    rr_lpm   round-robin routing + longest prefix match at each worker: locality only, the
             unfair baseline

What they share lives in ``_FairPolicy``: one lane per SLO class (§5) holding a FIFO queue per
tenant and that class's fairness state; admission (``Shed``) and rejection of sheddable requests
that can no longer make their deadline; at-risk requests of lower classes first; the charges of
§1 as the work happens; and forgetting idle tenants. A policy adds only its order (``_serve``),
its placement (``_dispatch``) and what it does with a charge. One schedule pass::

    reject hopeless sheddable heads ─▶ at-risk heads of lower classes, earliest deadline first
        ─▶ each class, highest rank first: the policy's own order, placing until nothing fits

Work conservation, bounded. When the request a policy prefers cannot be placed now (its prompt
does not fit the room left), others of its class are tried, but a tenant may get ahead of the
blocked one's fair turn by at most ``max_borrow_tokens`` of service; beyond that, and for lower
classes, the room is left for the blocked request. Unbounded passing lets a tenant with small
requests take every gap as it opens, so one with large requests never fits again and the
fairness bound is lost (measured with the test backend: VTC fell to FCFS's service gap). The
workers do not idle for it: a request fits an idle prefill worker, and the wait ends as work in
flight completes; with nothing in flight, nothing is held back. Placement only gets harder
within a pass, so a prompt that failed to fit lets every prompt at least as long be skipped
without trying. A tenant's own queue stays FIFO under VTC. (rr_lpm, which has no fair turn to
pass, lets any request that fits its worker go.)

Weights: a charge is divided by the tenant's weight: the one ``update_tenant`` last set, else the
request's own (a demoted request keeps its own reduced weight).

The module is longer than the house's 300 lines because the four policies share one skeleton
that is clearer in one place than spread over a package; the prefix index is its own module.

Torch-free.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from engine.block_manager import block_hashes
from gateway.config import DEFAULT_SLO_CLASSES, SloClass
from gateway.prefix_index import PrefixIndex, PrefixPath
from gateway.scheduler import (
    Decision,
    FcfsPolicy,
    Placement,
    QueuedRequest,
    Rejection,
    SchedulingPolicy,
    Shed,
    TenantState,
    WorkerView,
    has_prefill_room,
    place,
)

__all__ = [
    "POLICY_NAMES",
    "D2lpmPolicy",
    "DlpmPolicy",
    "PolicySettings",
    "RrLpmPolicy",
    "VtcPolicy",
    "make_policy",
]

POLICY_NAMES = ("fcfs", "vtc", "dlpm", "d2lpm", "rr_lpm")

_MIN_WEIGHT = 1e-6  # a weight of 0 would make every charge infinite


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Everything a policy is configured with (``[scheduler]`` and ``[[slo_classes]]``)."""

    slo_classes: Sequence[SloClass] = field(default_factory=lambda: list(DEFAULT_SLO_CLASSES))
    w_in: float = 1.0  # cost of a computed prompt token (§1)
    w_out: float = 2.0  # cost of a generated token
    quantum_tokens: float = 4096.0  # DLPM's Q_u (§3)
    worker_quantum_tokens: float = 8192.0  # D²LPM's Q_w (§4)
    block_size: int = 16  # the workers' KV block size: the prefix index's granularity
    prefix_index_blocks: int = 1 << 16  # per prefill worker, LRU-bounded
    hot_spot_ratio: float = 1.5  # route by load alone above this ratio to the least loaded…
    hot_spot_margin_tokens: int = 2048  # …and this many tokens more
    default_prefill_tok_s: float = 5000.0  # until a worker's throughput is measured
    forget_idle_after_s: float = 600.0  # drop the state of a tenant idle this long (if safe)
    # Service a tenant may take ahead of its fair turn while the request whose turn it is cannot
    # be placed yet (module docstring); inf: fully work-conserving within a class.
    max_borrow_tokens: float = 4096.0

    def __post_init__(self) -> None:
        if not self.slo_classes:
            raise ValueError("at least one SLO class is needed")
        for name in ("quantum_tokens", "worker_quantum_tokens", "default_prefill_tok_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.block_size < 1 or self.prefix_index_blocks < 1:
            raise ValueError("block_size and prefix_index_blocks must be at least 1")
        if not self.max_borrow_tokens >= 0:
            raise ValueError(f"max_borrow_tokens must be >= 0, got {self.max_borrow_tokens}")


# ---- state shared by every fair policy ---------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Entry:
    """A queued request with what the policy derived from it. ``is_charged``: requeued, its
    prompt was charged when it was first placed (charges stay charged)."""

    request: QueuedRequest
    lane: _Lane
    deadline: float  # arrival + the class's TTFT target
    is_charged: bool = False
    is_queued: bool = True
    hashes: list[bytes] | None = None  # the prompt's block hash chain (indexed policies)
    path: PrefixPath | None = None  # the chain followed in the prefix index while queued
    lpm_order: tuple[int, float] = (0, 0.0)  # (-longest match over the workers, arrival)
    routed_to: str | None = None  # rr_lpm: the worker it was routed to (``RrLpmPolicy``)
    kind: tuple[str, int] = field(init=False)  # (tenant, prompt tokens): see ``DlpmPolicy``

    def __post_init__(self) -> None:
        self.kind = (self.request.tenant_id, self.request.num_prompt_tokens)


@dataclass(slots=True, eq=False)
class _Flight:
    """A placed request until ``on_finish``. ``num_output_tokens`` counts the output charged so
    far, starting from those generated before a recompute preemption (charged back then)."""

    entry: _Entry
    worker_id: str | None  # the locality worker: prefill worker, or colocated decode worker
    num_expected_cached: int
    num_output_tokens: int
    # The cached prefix counted in its prefill worker's ``inflight_tokens`` until its prefill
    # ends (``_load``). 0 on a colocated worker: ``place`` adds nothing to a decode worker's
    # view, and its handle holds the prompt until the decode ends, so its load stays whole
    # prompts.
    num_pending_cached: int = 0


class _Lane:
    """One SLO class: a FIFO queue per backlogged tenant (an ``OrderedDict``: removal anywhere
    and a requeue at the front are O(1)), and its queued prompt tokens for wait estimates.
    Subclasses add the policy's fairness state for the class."""

    __slots__ = ("num_queued_tokens", "queues", "slo")

    def __init__(self, slo: SloClass) -> None:
        self.slo = slo
        self.queues: dict[str, OrderedDict[str, _Entry]] = {}
        self.num_queued_tokens = 0

    def head(self, tenant_id: str) -> _Entry:
        return next(iter(self.queues[tenant_id].values()))

    def heads(self) -> Iterator[_Entry]:
        for queue in self.queues.values():
            yield next(iter(queue.values()))


@dataclass(frozen=True, slots=True)
class _Throughput:
    """The workers as of the last ``schedule``, for the deadline estimates of §5: the pool's
    prefill speed, the fastest worker's, and how long until the least busy worker has computed
    what it already holds."""

    pool_tok_s: float
    fastest_tok_s: float
    wait_s: float

    @classmethod
    def of(cls, workers: Sequence[WorkerView], default_tok_s: float) -> _Throughput:
        if not workers:
            return cls(default_tok_s, default_tok_s, 0.0)
        rates = [w.prefill_tok_s or default_tok_s for w in workers]
        wait_s = min(w.inflight_tokens / rate for w, rate in zip(workers, rates, strict=True))
        return cls(sum(rates), max(rates), wait_s)


class _Pass:
    """One ``schedule`` call: the views (updated by ``place`` as requests are placed), the
    decisions so far, and the shortest prompt that failed to place. Views only fill up within a
    pass and room is monotone in prompt length, so nothing that long or longer fits any more.
    ``has_room`` is remembered until the next decision or failure."""

    __slots__ = (
        "_has_room",
        "_min_failed_tokens",
        "decisions",
        "decode",
        "locality",
        "now",
        "prefill",
        "top_rank",
    )

    def __init__(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
        top_rank: int = 0,
    ):
        """``top_rank``: the highest class rank queued."""
        self.prefill = prefill
        self.decode = decode
        self.locality = prefill or decode  # whose caches a prompt can hit
        self.now = now
        self.top_rank = top_rank
        self.decisions: list[Decision] = []
        # Per class rank, the shortest prompt that failed. A higher class may pass a prefill
        # worker's cap (``outranks``), so a failure says nothing of classes above it.
        self._min_failed_tokens: dict[int, float] = {}
        self._has_room: bool | None = None

    def add(self, decision: Decision) -> None:
        self.decisions.append(decision)
        self._has_room = None

    def fits(self, entry: _Entry) -> bool:
        request = entry.request
        return all(
            request.num_prompt_tokens < failed
            for rank, failed in self._min_failed_tokens.items()
            if rank >= request.rank
        )

    def failed(self, entry: _Entry) -> None:
        request = entry.request
        failed = self._min_failed_tokens.get(request.rank, math.inf)
        self._min_failed_tokens[request.rank] = min(failed, request.num_prompt_tokens)
        self._has_room = None

    def has_room(self) -> bool:
        """Whether the shortest possible prompt of the highest class queued could still be
        placed."""
        if self._has_room is None:
            self._has_room = (
                self._min_failed_tokens.get(self.top_rank, math.inf) > 1
                and any(
                    _has_room_for_any(w, is_colocated=True, top_rank=self.top_rank)
                    for w in self.decode
                )
                and (
                    not self.prefill
                    or any(
                        _has_room_for_any(w, is_colocated=False, top_rank=self.top_rank)
                        for w in self.prefill
                    )
                )
            )
        return self._has_room


def _has_room(worker: WorkerView, request: QueuedRequest, is_colocated: bool) -> bool:
    """``place``'s room rule for one worker: KV for the prompt on a colocated worker;
    ``has_prefill_room`` on a prefill worker."""
    if is_colocated:
        return worker.free_kv_tokens >= request.num_prompt_tokens + 1
    return has_prefill_room(request, worker)


def _has_room_for_any(worker: WorkerView, *, is_colocated: bool, top_rank: int) -> bool:
    """Whether the shortest possible prompt (one token) of the highest class queued
    (``top_rank``) could go to ``worker``: KV for it and its first token on a decode worker
    (colocated or not), room under the cap on a prefill worker, or only lower classes in
    flight there."""
    if is_colocated:
        return worker.free_kv_tokens >= 2
    return worker.inflight_tokens < max(worker.max_inflight_tokens, 1) or (
        worker.max_inflight_rank is not None and worker.max_inflight_rank < top_rank
    )


LaneT = TypeVar("LaneT", bound=_Lane)
_LPM_ORDER = operator.attrgetter("lpm_order")


class _FairPolicy(Generic[LaneT]):
    """Queues, SLO classes, charges and tenant bookkeeping common to the fair policies.

    Hooks for a policy: ``_new_lane``, ``_joined`` / ``_left`` (a tenant's queue in a class
    became non-empty / empty; ``_joined`` runs before the tenant is in ``lane.queues``),
    ``_serve`` (its order within a class), ``_dispatch`` (place one request, no fairness gate),
    ``_charge_prompt`` / ``_charge_output`` / ``_correct_prompt``, ``_can_forget`` / ``_forget``,
    ``_counter`` / ``_deficit`` for ``tenants``.

    Forgetting: a tenant with nothing queued or in flight for ``forget_idle_after_s`` loses its
    state (and leaves ``tenants``) when ``_can_forget`` says that changes nothing it would get
    on return: under VTC, its counter is at most what the lift rule would give it back; DLPM
    deficits restart at 0 on return anyway. Weights set by ``update_tenant`` are kept: they are
    configuration, one number per tenant the admin named.
    """

    name: str

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        ranked = sorted(settings.slo_classes, key=lambda c: -c.rank)
        self._lanes: dict[str, LaneT] = {}
        for slo in ranked:
            self._lanes.setdefault(slo.name, self._new_lane(slo))  # highest rank first
        self._lowest = self._lanes[ranked[-1].name]
        self._entries: dict[str, _Entry] = {}
        self._flights: dict[str, _Flight] = {}
        self._num_queued: dict[str, int] = {}  # per tenant, over all classes
        self._num_inflight: dict[str, int] = {}
        # Per locality worker: the cached prefixes (as expected at placement) of the prompts
        # whose prefill has not ended. The views' ``inflight_tokens`` count whole prompts (the
        # dispatcher's room rule); less these, they are the load of §4: tokens to compute.
        self._pending_cached: dict[str, int] = {}
        self._weights: dict[str, float] = {}  # set by update_tenant
        self._service: dict[str, float] = {}  # normalized service charged, for tenants()
        self._idle_since: dict[str, float] = {}
        self._next_sweep_s = -math.inf
        self._now = -math.inf
        self._throughput = _Throughput.of([], settings.default_prefill_tok_s)

    # ---- the interface ---------------------------------------------------------------------

    def enqueue(self, request: QueuedRequest, now: float) -> None:
        if request.request_id in self._entries:
            raise ValueError(f"request {request.request_id!r} is already queued")
        self._now = max(self._now, now)
        lane = self._lane_of(request)
        deadline = request.arrival + lane.slo.ttft_target_s
        if lane.slo.sheddable:
            ahead = sum(
                other.num_queued_tokens
                for other in self._lanes.values()
                if other.slo.rank >= lane.slo.rank
            )
            throughput = self._throughput
            wait_s = throughput.wait_s + ahead / throughput.pool_tok_s
            if now + wait_s + self._prefill_s(request) > deadline:
                raise Shed(
                    f"class {lane.slo.name!r} cannot meet its {lane.slo.ttft_target_s:g} s "
                    f"time-to-first-token target: about {wait_s:.1f} s of work is queued ahead"
                )
        self._put(_Entry(request, lane, deadline), at_front=False)

    def requeue(self, request: QueuedRequest, now: float) -> None:
        if request.request_id in self._entries:
            return
        self._now = max(self._now, now)
        flight = self._flights.pop(request.request_id, None)
        if flight is not None:  # requeued without on_finish (a preemption): it left the worker
            self._num_inflight[request.tenant_id] -= 1
            self._prefill_ended(flight)
        lane = self._lane_of(request)
        entry = _Entry(request, lane, request.arrival + lane.slo.ttft_target_s, is_charged=True)
        self._put(entry, at_front=True)

    def remove(self, request_id: str) -> QueuedRequest | None:
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        self._take(entry)
        return entry.request

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
    ) -> list[Decision]:
        self._now = max(self._now, now)
        top_rank = max((lane.slo.rank for lane in self._lanes.values() if lane.queues), default=0)
        run = _Pass(prefill, decode, now, top_rank)
        self._throughput = _Throughput.of(run.locality, self.settings.default_prefill_tok_s)
        if self._entries:
            self._reject_hopeless(run)
            if run.has_room():
                self._serve_at_risk(run)
            for lane in self._lanes.values():
                if not run.has_room():
                    break
                if lane.queues:
                    self._serve(lane, run)
                    if lane.queues and self._flights:
                        break  # a waiting request keeps the room from lower classes
        self._forget_idle(now)
        return run.decisions

    def on_first_token(self, request: QueuedRequest, num_cached_tokens: int, now: float) -> None:
        flight = self._flights.get(request.request_id)
        if flight is None:
            return
        self._prefill_ended(flight)
        if not flight.entry.is_charged:
            self._correct_prompt(flight, num_cached_tokens)

    def on_tokens(self, request: QueuedRequest, num_tokens: int, now: float) -> None:
        flight = self._flights.get(request.request_id)
        if flight is not None and num_tokens > 0:
            flight.num_output_tokens += num_tokens
            self._charge_output(flight, num_tokens)

    def on_finish(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        self._now = max(self._now, now)
        flight = self._flights.pop(request.request_id, None)
        if flight is None:
            return
        self._prefill_ended(flight)  # (ended without a first token: failed or no room)
        unreported = num_output_tokens - flight.num_output_tokens
        if unreported > 0:  # never refund: what was reported was generated
            flight.num_output_tokens = num_output_tokens
            self._charge_output(flight, unreported)
        tenant_id = request.tenant_id
        self._num_inflight[tenant_id] -= 1
        self._mark_if_idle(tenant_id)

    def on_evicted(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        pass

    def update_tenant(self, tenant_id: str, weight: float) -> None:
        self._weights[tenant_id] = weight

    def queued(self) -> int:
        return len(self._entries)

    def tenants(self) -> list[TenantState]:
        known = self._service.keys() | self._num_queued.keys() | self._num_inflight.keys()
        return [
            TenantState(
                tenant_id,
                self._num_queued.get(tenant_id, 0),
                self._counter(tenant_id),
                self._deficit(tenant_id),
            )
            for tenant_id in sorted(known)
        ]

    def counter(self, tenant_id: str) -> float:
        return self._counter(tenant_id)

    # ---- hooks -----------------------------------------------------------------------------

    def _new_lane(self, slo: SloClass) -> LaneT:
        raise NotImplementedError

    def _joined(self, lane: LaneT, tenant_id: str) -> None:
        pass

    def _left(self, lane: LaneT, tenant_id: str) -> None:
        pass

    def _queued_entry(self, entry: _Entry) -> None:
        """``entry`` joined its lane's queues (``_put``)."""

    def _dequeued_entry(self, entry: _Entry) -> None:
        """``entry`` left the queues (``_take``)."""

    def _serve(self, lane: LaneT, run: _Pass) -> None:
        raise NotImplementedError

    def _dispatch(self, entry: _Entry, run: _Pass) -> bool:
        raise NotImplementedError

    def _charge_prompt(self, entry: _Entry, worker_id: str | None, num_cached: int) -> None:
        pass

    def _charge_output(self, flight: _Flight, num_tokens: int) -> None:
        pass

    def _correct_prompt(self, flight: _Flight, num_cached_tokens: int) -> None:
        pass

    def _can_forget(self, tenant_id: str) -> bool:
        return True

    def _forget(self, tenant_id: str) -> None:
        pass

    def _counter(self, tenant_id: str) -> float:
        return self._service.get(tenant_id, 0.0)

    def _deficit(self, tenant_id: str) -> float:
        return 0.0

    # ---- queues ----------------------------------------------------------------------------

    def _lane_of(self, request: QueuedRequest) -> LaneT:
        """Demoted requests and (already validated elsewhere) unknown classes: the lowest."""
        if request.demoted:
            return self._lowest
        return self._lanes.get(request.slo_class, self._lowest)

    def _put(self, entry: _Entry, *, at_front: bool) -> None:
        lane = cast(LaneT, entry.lane)  # made by _lane_of
        request = entry.request
        tenant_id = request.tenant_id
        queue = lane.queues.get(tenant_id)
        if queue is None:
            self._joined(lane, tenant_id)
            queue = lane.queues[tenant_id] = OrderedDict()
        queue[request.request_id] = entry
        if at_front:
            queue.move_to_end(request.request_id, last=False)
        lane.num_queued_tokens += request.num_prompt_tokens
        self._entries[request.request_id] = entry
        self._queued_entry(entry)
        self._num_queued[tenant_id] = self._num_queued.get(tenant_id, 0) + 1
        self._idle_since.pop(tenant_id, None)

    def _take(self, entry: _Entry) -> None:
        """Out of the queue: placed, rejected or removed."""
        lane = cast(LaneT, entry.lane)
        request = entry.request
        tenant_id = request.tenant_id
        queue = lane.queues[tenant_id]
        del queue[request.request_id]
        if not queue:
            del lane.queues[tenant_id]
            self._left(lane, tenant_id)
        lane.num_queued_tokens -= request.num_prompt_tokens
        del self._entries[request.request_id]
        entry.is_queued = False
        self._dequeued_entry(entry)
        self._num_queued[tenant_id] -= 1
        if self._num_queued[tenant_id] == 0:
            del self._num_queued[tenant_id]
            self._mark_if_idle(tenant_id)

    def _placed(
        self, entry: _Entry, placement: Placement, worker_id: str | None, num_cached: int
    ) -> None:
        """Bookkeeping of a placement; ``_dispatch`` calls it after ``place`` succeeded."""
        request = entry.request
        num_pending = num_cached if placement.prefill_worker_id is not None else 0
        self._flights[request.request_id] = _Flight(
            entry, worker_id, num_cached, request.num_output_tokens, num_pending
        )
        if worker_id is not None and num_pending:
            self._pending_cached[worker_id] = self._pending_cached.get(worker_id, 0) + num_pending
        self._num_inflight[request.tenant_id] = self._num_inflight.get(request.tenant_id, 0) + 1
        self._take(entry)
        if not entry.is_charged:
            self._charge_prompt(entry, worker_id, num_cached)

    def _prefill_ended(self, flight: _Flight) -> None:
        """The flight's prompt has left its worker's ``inflight_tokens``."""
        if flight.worker_id is not None and flight.num_pending_cached:
            self._pending_cached[flight.worker_id] -= flight.num_pending_cached
            flight.num_pending_cached = 0

    def _load(self, worker: WorkerView) -> int:
        """Load (§4): prompt tokens placed there and not yet computed, less the prefixes it
        was expected to hold (a cached prefix costs the worker nothing to compute)."""
        return max(0, worker.inflight_tokens - self._pending_cached.get(worker.worker_id, 0))

    def _load_key(self, worker: WorkerView) -> tuple[int, int]:
        """By load, then (colocated decode workers, whose views carry none) most free KV, as
        ``place`` does."""
        return (self._load(worker), -worker.free_kv_tokens)

    def _weight(self, request: QueuedRequest) -> float:
        weight = request.weight
        if not request.demoted:
            weight = self._weights.get(request.tenant_id, weight)
        return max(weight, _MIN_WEIGHT)

    def _add_service(self, tenant_id: str, cost: float) -> None:
        self._service[tenant_id] = self._service.get(tenant_id, 0.0) + cost

    # ---- SLO classes (§5) ------------------------------------------------------------------

    def _prefill_s(self, request: QueuedRequest) -> float:
        return request.num_prompt_tokens / self._throughput.fastest_tok_s

    def _is_hopeless(self, entry: _Entry, now: float) -> bool:
        """A sheddable request that misses its deadline even if its prefill started now on the
        fastest worker. (Admission sheds on an estimate; a queued request is dropped only once
        it is sure to miss.)"""
        return entry.lane.slo.sheddable and now + self._prefill_s(entry.request) > entry.deadline

    def _reject(self, entry: _Entry, run: _Pass) -> None:
        self._take(entry)
        run.add(
            Rejection(
                entry.request,
                f"class {entry.lane.slo.name!r} can no longer meet its "
                f"{entry.lane.slo.ttft_target_s:g} s time-to-first-token target",
            )
        )

    def _reject_hopeless(self, run: _Pass) -> None:
        """Heads only: within a tenant's queue of one class, deadlines follow arrivals; a later
        hopeless request is rejected when it reaches the head or is picked."""
        for lane in self._lanes.values():
            if not lane.slo.sheddable:
                continue
            for tenant_id in list(lane.queues):
                while tenant_id in lane.queues and self._is_hopeless(lane.head(tenant_id), run.now):
                    self._reject(lane.head(tenant_id), run)

    def _serve_at_risk(self, run: _Pass) -> None:
        """Heads of classes below the highest busy one that will miss their deadline behind the
        work queued in higher classes, but can still make it if served now (serving a request
        that is late anyway would only make others late too), earliest deadline first."""
        at_risk: list[_Entry] = []
        num_tokens_ahead = 0
        throughput = self._throughput
        for lane in self._lanes.values():
            if not lane.queues:
                continue
            if num_tokens_ahead:
                behind_s = throughput.wait_s + num_tokens_ahead / throughput.pool_tok_s
                for head in lane.heads():
                    start = run.now + self._prefill_s(head.request)
                    if start + behind_s > head.deadline >= start + throughput.wait_s:
                        at_risk.append(head)
            num_tokens_ahead += lane.num_queued_tokens
        at_risk.sort(key=lambda e: (e.deadline, e.request.arrival))
        for entry in at_risk:
            if not run.has_room():
                return
            if run.fits(entry):
                self._dispatch(entry, run)

    # ---- bounded state ---------------------------------------------------------------------

    def _mark_if_idle(self, tenant_id: str) -> None:
        if tenant_id not in self._num_queued and not self._num_inflight.get(tenant_id):
            self._num_inflight.pop(tenant_id, None)
            self._idle_since[tenant_id] = self._now

    def _forget_idle(self, now: float) -> None:
        """Every half ``forget_idle_after_s`` of the caller's clock, a sweep over idle tenants."""
        if now < self._next_sweep_s:
            return
        after_s = self.settings.forget_idle_after_s
        self._next_sweep_s = now + after_s / 2
        for tenant_id, since in list(self._idle_since.items()):
            if now - since >= after_s and self._can_forget(tenant_id):
                del self._idle_since[tenant_id]
                self._service.pop(tenant_id, None)
                self._forget(tenant_id)


# ---- VTC (§2) ---------------------------------------------------------------------------------


class _VtcLane(_Lane):
    """VTC state of one class. ``last_left``: the tenant that most recently left the backlog;
    its counter (kept in ``last_left_counter`` once it is forgotten) is the lift when every
    queue is empty."""

    __slots__ = ("counters", "last_left", "last_left_counter")

    def __init__(self, slo: SloClass) -> None:
        super().__init__(slo)
        self.counters: dict[str, float] = {}
        self.last_left: str | None = None
        self.last_left_counter = 0.0

    def floor(self) -> float:
        """What a tenant joining now is lifted to (at least): the least counter among the
        backlogged tenants, or the last leaver's when none is. It never decreases, which is
        what makes forgetting a tenant whose counter is at most this safe."""
        if self.queues:
            return min(self.counters[t] for t in self.queues)
        if self.last_left is None:
            return 0.0
        return self.counters.get(self.last_left, self.last_left_counter)


class VtcPolicy(_FairPolicy[_VtcLane]):
    """Virtual Token Counter (§2): the head of the backlogged tenant with the least counter,
    ties to the earlier head. Placement by load (``place``); no prefix index, so
    ``Placement.num_cached_tokens`` is 0. A tenant whose head does not fit waits for this pass
    (FIFO within a tenant) while the others go on."""

    name = "vtc"

    def _new_lane(self, slo: SloClass) -> _VtcLane:
        return _VtcLane(slo)

    def _joined(self, lane: _VtcLane, tenant_id: str) -> None:
        # The lift: c[u] = max(c[u], min c[v] over other backlogged v), else the last leaver's.
        lane.counters[tenant_id] = max(lane.counters.get(tenant_id, 0.0), lane.floor())

    def _left(self, lane: _VtcLane, tenant_id: str) -> None:
        lane.last_left = tenant_id

    def _serve(self, lane: _VtcLane, run: _Pass) -> None:
        heap = [(lane.counters[t], lane.head(t).request.arrival, t) for t in lane.queues]
        heapq.heapify(heap)
        blocked_counter = math.inf  # the least counter whose head could not be placed
        while heap and run.has_room():
            counter, _, tenant_id = heapq.heappop(heap)
            if counter - blocked_counter > self.settings.max_borrow_tokens and self._flights:
                return  # every tenant left is even further ahead: room is kept for the blocked
            entry = lane.head(tenant_id)
            if self._is_hopeless(entry, run.now):
                self._reject(entry, run)
            elif not (run.fits(entry) and self._dispatch(entry, run)):
                blocked_counter = min(blocked_counter, counter)
                continue  # this tenant waits for this pass
            if tenant_id in lane.queues:
                head = lane.head(tenant_id)
                heapq.heappush(heap, (lane.counters[tenant_id], head.request.arrival, tenant_id))

    def _dispatch(self, entry: _Entry, run: _Pass) -> bool:
        placement = place(entry.request, run.prefill, run.decode)
        if placement is None:
            run.failed(entry)
            return False
        run.add(placement)
        self._placed(entry, placement, placement.prefill_worker_id, 0)
        return True

    def _charge(self, entry: _Entry, cost: float) -> None:
        request = entry.request
        cost /= self._weight(request)
        counters = cast(_VtcLane, entry.lane).counters
        counters[request.tenant_id] = counters.get(request.tenant_id, 0.0) + cost
        self._add_service(request.tenant_id, cost)

    def _charge_prompt(self, entry: _Entry, worker_id: str | None, num_cached: int) -> None:
        self._charge(entry, self.settings.w_in * entry.request.num_prompt_tokens)

    def _charge_output(self, flight: _Flight, num_tokens: int) -> None:
        self._charge(flight.entry, self.settings.w_out * num_tokens)

    def _can_forget(self, tenant_id: str) -> bool:
        return all(
            lane.counters.get(tenant_id, -math.inf) <= lane.floor() for lane in self._lanes.values()
        )

    def _forget(self, tenant_id: str) -> None:
        for lane in self._lanes.values():
            counter = lane.counters.pop(tenant_id, None)
            if counter is not None and lane.last_left == tenant_id:
                lane.last_left_counter = counter

    def _counter(self, tenant_id: str) -> float:
        return sum(lane.counters.get(tenant_id, 0.0) for lane in self._lanes.values())


# ---- prefix locality: rr_lpm, dlpm, d2lpm -----------------------------------------------------


class _IndexedPolicy(_FairPolicy[LaneT]):
    """A policy that places by prefix locality: it keeps the prefix index (``gateway.
    prefix_index``), sends a request to a worker with room holding its longest match (least
    loaded among ties; ``_pick_worker``) and records the prompt there. With no prefill workers
    (colocated decode workers) the index is by decode worker. Service (``tenants``) counts
    uncached prompt tokens (§1 for DLPM), corrected by what the worker found cached."""

    # Whether ``_longest`` is the match at one worker rather than over all of them: the index
    # must then report changes at each worker (``PrefixIndex``'s ``report_each_worker``).
    _orders_by_one_worker = False

    def __init__(self, settings: PolicySettings) -> None:
        super().__init__(settings)
        self._index = PrefixIndex(
            settings.prefix_index_blocks, report_each_worker=self._orders_by_one_worker
        )
        # Every queued prompt is tracked in the index (``PrefixIndex.track``), which says whose
        # longest match may have changed; ``lpm_order`` is kept up to date from that
        # (``_refresh_orders``), over the index's workers while they are all in the pass's
        # locality views (those not in the index hold nothing), else (a worker went away)
        # over the views' workers, as a scan would.
        self._worker_ids: frozenset[str] = frozenset()
        self._is_index_local = True

    def on_evicted(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        self._index.evict(worker_id, block_hashes)

    def _queued_entry(self, entry: _Entry) -> None:
        request = entry.request
        block_size = self.settings.block_size
        if entry.hashes is None:
            entry.hashes = block_hashes(request.prompt_token_ids, block_size, request.cache_salt)
        # An engine recomputes the last block of a fully cached prompt (``PrefixMatcher``).
        max_blocks = max(0, (request.num_prompt_tokens - 1) // block_size)
        entry.path = self._index.track(entry.hashes, max_blocks, entry)
        entry.lpm_order = (-self._longest(entry), request.arrival)
        self._lpm_queued(entry)

    def _dequeued_entry(self, entry: _Entry) -> None:
        if entry.path is not None:
            self._index.untrack(entry.path)
            entry.path = None

    def _lpm_queued(self, entry: _Entry) -> None:
        """Hook: ``entry`` was queued with its ``lpm_order``."""

    def _lpm_reordered(self, entry: _Entry) -> None:
        """Hook: the ``lpm_order`` of the queued ``entry`` changed."""

    def _cached_tokens(self, entry: _Entry, worker_id: str) -> int:
        assert entry.path is not None  # queued
        return entry.path.num_blocks_at(worker_id) * self.settings.block_size

    def _longest(self, entry: _Entry) -> int:
        assert entry.path is not None
        if self._is_index_local:
            return entry.path.longest() * self.settings.block_size
        return max((self._cached_tokens(entry, w) for w in self._worker_ids), default=0)

    def _refresh_orders(self, run: _Pass) -> None:
        """Bring ``lpm_order`` up to date for ``run.locality``: the entries whose longest match
        an index change may have altered, or every entry when the workers changed."""
        worker_ids = frozenset(w.worker_id for w in run.locality)
        if worker_ids != self._worker_ids:
            self._worker_ids = worker_ids
            self._is_index_local = self._index.worker_ids() <= worker_ids
            self._index.take_changed()
            entries: Iterable[_Entry] = list(self._entries.values())
        else:
            entries = (cast(_Entry, path.owner) for path in self._index.take_changed())
        for entry in entries:
            if not entry.is_queued:
                continue
            order = (-self._longest(entry), entry.request.arrival)
            if order != entry.lpm_order:
                entry.lpm_order = order
                self._lpm_reordered(entry)

    def _candidates(self, entry: _Entry, run: _Pass) -> list[WorkerView]:
        is_colocated = not run.prefill
        return [w for w in run.locality if _has_room(w, entry.request, is_colocated)]

    def _pick_worker(self, entry: _Entry, run: _Pass) -> WorkerView | None:
        candidates = self._candidates(entry, run)
        if not candidates:
            return None
        return self._most_cached(entry, candidates)

    def _most_cached(self, entry: _Entry, candidates: list[WorkerView]) -> WorkerView:
        return max(
            candidates,
            key=lambda w: (
                self._cached_tokens(entry, w.worker_id),
                -self._load(w),
                w.free_kv_tokens,
            ),
        )

    def _dispatch(self, entry: _Entry, run: _Pass) -> bool:
        worker = self._pick_worker(entry, run)
        if worker is None:
            run.failed(entry)
            return False
        return self._dispatch_to(entry, worker, run)

    def _dispatch_to(self, entry: _Entry, worker: WorkerView, run: _Pass) -> bool:
        request = entry.request
        num_cached = self._cached_tokens(entry, worker.worker_id)
        if run.prefill:
            placement = place(request, [worker], run.decode)
        else:
            placement = place(request, [], [worker])
        if placement is None:  # no decode worker has KV room for it
            run.failed(entry)
            return False
        placement = Placement(
            request, placement.prefill_worker_id, placement.decode_worker_id, num_cached
        )
        run.add(placement)
        assert entry.hashes is not None  # made when it was queued
        self._index.insert(worker.worker_id, entry.hashes)
        self._placed(entry, placement, worker.worker_id, num_cached)
        entry.hashes = None  # the chain is no longer needed: free it
        return True

    def _charge_prompt(self, entry: _Entry, worker_id: str | None, num_cached: int) -> None:
        request = entry.request
        cost = self.settings.w_in * (request.num_prompt_tokens - num_cached)
        self._add_service(request.tenant_id, cost / self._weight(request))

    def _charge_output(self, flight: _Flight, num_tokens: int) -> None:
        request = flight.entry.request
        cost = self.settings.w_out * num_tokens
        self._add_service(request.tenant_id, cost / self._weight(request))

    def _correct_prompt(self, flight: _Flight, num_cached_tokens: int) -> None:
        request = flight.entry.request
        cost = self.settings.w_in * (flight.num_expected_cached - num_cached_tokens)
        self._add_service(request.tenant_id, cost / self._weight(request))
        flight.num_expected_cached = num_cached_tokens


class _LpmQueue:
    """Queued entries in LPM order (``_Entry.lpm_order``), kept across passes: arrivals are
    inserted in place, and it is re-sorted only when some entry's order changed
    (``is_unsorted``); entries that left stay until then and are skipped (``num_gone``)."""

    __slots__ = ("entries", "is_unsorted", "num_gone")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.is_unsorted = False
        self.num_gone = 0

    def add(self, entry: _Entry) -> None:
        bisect.insort_right(self.entries, entry, key=_LPM_ORDER)

    def in_order(self) -> list[_Entry]:
        if self.is_unsorted or self.num_gone > len(self.entries) // 2:
            self.entries = [entry for entry in self.entries if entry.is_queued]
            self.entries.sort(key=_LPM_ORDER)
            self.is_unsorted = False
            self.num_gone = 0
        return self.entries


class _RrLpmLane(_Lane):
    """rr_lpm state of one class: per worker, the requests routed there, in LPM order at that
    worker."""

    __slots__ = ("by_worker",)

    def __init__(self, slo: SloClass) -> None:
        super().__init__(slo)
        self.by_worker: dict[str, _LpmQueue] = {}


class RrLpmPolicy(_IndexedPolicy[_RrLpmLane]):
    """Round-robin + longest prefix match: the locality-only baseline (scheduling.md, the list
    of policies; the "round-robin + LPM" the DLPM paper measures D²LPM's latency against, §4).

    Requests are routed to the workers (the locality views: prefill workers, else colocated
    decode workers) round-robin, in arrival order, whatever they hold; each worker then serves
    the requests routed to it in longest-prefix-match order at that worker (most cached tokens
    first, then arrival), SGLang's LPM, while it has room. No accounting of who is served: a
    tenant with more requests, or better cached ones, gets more.

    Why this reading. "Round-robin" is the router: the baseline is a distributed one (the
    paper compares it with D²LPM, a placement across workers), and the order within a worker
    is the LPM half of the name. Round-robin over tenants instead (this class until now) is a
    fairness mechanism (request-count fair), which "locality-only" rules out. Routing to the
    worker holding the longest match is not round-robin: it is D²LPM with ``Q_w = ∞``, which
    §4 names separately ("a locality-only router") and whose weakness is unfairness, not the
    locality the round-robin router gives up.

    The gateway holds the queues, so "routed" means bound to a worker at the first pass after
    arrival (the gateway learns its workers in passes); a request waits for its worker's room
    even when another has some, as in a per-worker queue. Requests of a worker that goes away
    are routed again. The round-robin cursor is over all classes, as one router's. SLO classes
    and shedding are those of the other policies (``_FairPolicy``): classes by rank, at-risk
    requests of lower classes first (on their worker), sheddable requests that cannot make
    their deadline rejected."""

    name = "rr_lpm"
    _orders_by_one_worker = True

    def __init__(self, settings: PolicySettings) -> None:
        super().__init__(settings)
        self._unrouted: list[_Entry] = []  # queued since the last pass, in arrival order
        self._num_routed = 0  # the round-robin cursor
        self._num_served = 0  # which worker's queue a pass serves first, round-robin too

    def _new_lane(self, slo: SloClass) -> _RrLpmLane:
        return _RrLpmLane(slo)

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
    ) -> list[Decision]:
        self._route(prefill or decode)
        return super().schedule(prefill, decode, now)

    def _route(self, workers: Sequence[WorkerView]) -> None:
        """Route what arrived since the last pass, and what was routed to a worker gone."""
        if not workers:
            return
        worker_ids = [w.worker_id for w in workers]
        present = set(worker_ids)
        unrouted = self._unrouted
        for lane in self._lanes.values():
            for worker_id in [w for w in lane.by_worker if w not in present]:
                unrouted += lane.by_worker.pop(worker_id).entries
        unrouted.sort(key=lambda e: e.request.arrival)  # (stable: ties stay in queued order)
        for entry in unrouted:
            if not entry.is_queued:
                continue
            worker_id = worker_ids[self._num_routed % len(worker_ids)]
            self._num_routed += 1
            entry.routed_to = worker_id
            entry.lpm_order = (-self._longest(entry), entry.request.arrival)
            lane = cast(_RrLpmLane, entry.lane)
            lane.by_worker.setdefault(worker_id, _LpmQueue()).add(entry)
        self._unrouted = []

    def _longest(self, entry: _Entry) -> int:
        # The order a worker serves its requests in: the match at that worker.
        return 0 if entry.routed_to is None else self._cached_tokens(entry, entry.routed_to)

    def _lpm_queued(self, entry: _Entry) -> None:
        self._unrouted.append(entry)

    def _lpm_reordered(self, entry: _Entry) -> None:
        if entry.routed_to is not None:
            cast(_RrLpmLane, entry.lane).by_worker[entry.routed_to].is_unsorted = True

    def _dequeued_entry(self, entry: _Entry) -> None:
        super()._dequeued_entry(entry)
        if entry.routed_to is not None:
            queue = cast(_RrLpmLane, entry.lane).by_worker.get(entry.routed_to)
            if queue is not None:
                queue.num_gone += 1

    def _serve(self, lane: _RrLpmLane, run: _Pass) -> None:
        self._refresh_orders(run)
        is_colocated = not run.prefill
        # The first worker's queue may take all the decode room a pass has: each worker is
        # first in turn.
        workers = run.locality
        start = self._num_served % len(workers) if workers else 0
        self._num_served += 1
        for worker in [*workers[start:], *workers[:start]]:
            queue = lane.by_worker.get(worker.worker_id)
            if queue is None or not _has_room_for_any(
                worker, is_colocated=is_colocated, top_rank=lane.slo.rank
            ):
                continue
            min_failed_tokens = math.inf  # nothing this long or longer fits this worker now
            for entry in list(queue.in_order()):  # a copy: placements leave it alone
                if not run.has_room():
                    return
                request = entry.request
                if not entry.is_queued or request.num_prompt_tokens >= min_failed_tokens:
                    continue
                if self._is_hopeless(entry, run.now):
                    self._reject(entry, run)
                elif not _has_room(worker, request, is_colocated):
                    min_failed_tokens = request.num_prompt_tokens
                elif run.fits(entry):
                    self._dispatch_to(entry, worker, run)

    def _dispatch(self, entry: _Entry, run: _Pass) -> bool:
        # An at-risk request goes first, but on the worker it was routed to.
        worker = next((w for w in run.locality if w.worker_id == entry.routed_to), None)
        if worker is None or not _has_room(worker, entry.request, not run.prefill):
            return False  # its worker is full: no sign that the others are (not ``failed``)
        return self._dispatch_to(entry, worker, run)


# ---- DLPM (§3) and D²LPM (§4) -----------------------------------------------------------------


class _Deficits:
    """DLPM deficits of the backlogged tenants of one class (at one worker, for D²LPM). A
    tenant (re)joins at 0 and is dropped when it leaves, so charges while it is not backlogged
    are moot (they would be reset on return). ``num_positive`` keeps "does any queued tenant
    have credit" O(1)."""

    __slots__ = ("num_positive", "values")

    def __init__(self, tenant_ids: Sequence[str]) -> None:
        self.values: dict[str, float] = dict.fromkeys(tenant_ids, 0.0)
        self.num_positive = 0

    def has_credit(self) -> bool:
        return self.num_positive > 0

    def join(self, tenant_id: str) -> None:
        self._set(tenant_id, 0.0)

    def leave(self, tenant_id: str) -> None:
        if self.values.pop(tenant_id, 0.0) > 0:
            self.num_positive -= 1

    def charge(self, tenant_id: str, cost: float) -> None:
        value = self.values.get(tenant_id)
        if value is not None:
            self._set(tenant_id, value - cost)

    def rounds_to_credit(self, quantum: float) -> int:
        """Refill rounds until the first tenant has credit."""
        value = max(self.values.values(), default=1.0)
        return 0 if value > 0 else math.floor(-value / quantum) + 1

    def refill(self, quantum: float, num_rounds: int) -> None:
        """``num_rounds`` refills at once, each as in §3: every tenant with ``q <= 0`` gets
        ``q += Q`` (so a tenant stops gaining in the round it gets credit)."""
        for tenant_id, value in self.values.items():
            if value <= 0:
                rounds = min(num_rounds, math.floor(-value / quantum) + 1)
                self._set(tenant_id, value + rounds * quantum)

    def _set(self, tenant_id: str, value: float) -> None:
        if self.values.get(tenant_id, 0.0) > 0:
            self.num_positive -= 1
        self.values[tenant_id] = value
        if value > 0:
            self.num_positive += 1


class _LpmLane(_Lane):
    """DLPM state of one class: deficits per gate (the pool for DLPM, a worker for D²LPM), and
    the class's queued entries in LPM order (``ordered``)."""

    __slots__ = ("gates", "ordered")

    def __init__(self, slo: SloClass) -> None:
        super().__init__(slo)
        self.gates: dict[str, _Deficits] = {}
        self.ordered = _LpmQueue()

    def gate(self, key: str) -> _Deficits:
        deficits = self.gates.get(key)
        if deficits is None:
            deficits = self.gates[key] = _Deficits(list(self.queues))
        return deficits


class DlpmPolicy(_IndexedPolicy[_LpmLane]):
    """Deficit Longest Prefix Match (§3) over the prefill pool as one: the queued requests of a
    class in order of their longest match (then arrival), each let through while its tenant's
    deficit is positive; the deficits are refilled only when no queued tenant has credit.

    Work conservation: when a sweep placed nothing because the tenants with credit have nothing
    that fits, one more sweep lets the others borrow (``_sweep``) rather than idle the workers.
    The order is computed once per pass, as in the paper's step. Deficit refills of several
    rounds at once (``_Deficits.refill``) stand for the paper's repeated single refills."""

    name = "dlpm"

    def _new_lane(self, slo: SloClass) -> _LpmLane:
        return _LpmLane(slo)

    def _gate_key(self, worker_id: str) -> str:
        return ""

    def _joined(self, lane: _LpmLane, tenant_id: str) -> None:
        for deficits in lane.gates.values():
            deficits.join(tenant_id)

    def _left(self, lane: _LpmLane, tenant_id: str) -> None:
        for deficits in lane.gates.values():
            deficits.leave(tenant_id)

    def _lpm_queued(self, entry: _Entry) -> None:
        cast(_LpmLane, entry.lane).ordered.add(entry)

    def _lpm_reordered(self, entry: _Entry) -> None:
        cast(_LpmLane, entry.lane).ordered.is_unsorted = True

    def _dequeued_entry(self, entry: _Entry) -> None:
        super()._dequeued_entry(entry)
        cast(_LpmLane, entry.lane).ordered.num_gone += 1

    def _serve(self, lane: _LpmLane, run: _Pass) -> None:
        self._refresh_orders(run)
        entries = list(lane.ordered.in_order())  # a copy: placements in the pass leave it alone
        is_forced = False
        for _ in range(len(lane.queues) + 2):
            num_placed, num_starved = self._sweep(lane, entries, run, is_forced=is_forced)
            if not num_starved or not run.has_room() or is_forced:
                return
            is_forced = not num_placed

    def _sweep(
        self, lane: _LpmLane, entries: list[_Entry], run: _Pass, *, is_forced: bool
    ) -> tuple[int, int]:
        """One pass over ``entries`` (LPM order); how many were placed, and how many were held
        back for lack of credit. ``is_forced``: the tenants with credit could not use the room,
        so those without may borrow: go into debt (not a free refill: that would hand them a
        quantum each time and let them run away), down to ``-max_borrow_tokens``. Beyond that
        they wait for room for the others, which comes back as requests in flight end; with
        nothing in flight it never would, so then there is no limit."""
        quantum = self.settings.quantum_tokens
        num_placed = num_starved = 0
        # Whether a tenant's request is held back for lack of credit depends only on the
        # tenant, the prompt's length (which workers have room) and the state of the pass
        # (``version``: bumped by anything that changes views, deficits or the index), and,
        # when it depends on which worker gets it, on the workers' matches, which are the same
        # for requests with the same frontier (``PrefixPath.frontier``). Verdicts are remembered
        # by (tenant, length) and by (tenant, length, frontier) for the version they were
        # reached in: the long queue of a tenant without credit costs a look-up per request.
        version = 0
        held_back: dict[tuple[str, int], int] = {}  # kind -> version of the verdict
        chose_held_back: dict[tuple[tuple[str, int], object], int] = {}  # (kind, frontier)
        is_sheddable = lane.slo.sheddable
        for entry in entries:
            if not entry.is_queued:
                continue
            if is_sheddable and self._is_hopeless(entry, run.now):
                if run.fits(entry):
                    self._reject(entry, run)
                    version += 1
                continue
            kind = entry.kind
            if held_back.get(kind) == version:  # (an earlier request was counted already)
                continue
            assert entry.path is not None  # queued
            choice = (kind, entry.path.frontier())
            if chose_held_back.get(choice) == version:
                continue
            if not run.fits(entry):
                continue
            candidates = self._candidates(entry, run)
            if not candidates:
                run.failed(entry)
                continue
            tenant_id = kind[0]
            reachable, is_changed = self._reachable(entry, candidates, run)
            version += is_changed
            if all(
                self._is_held_back(lane, tenant_id, worker, is_forced=is_forced)
                for worker in reachable
            ):
                held_back[kind] = version
                num_starved += 1
                continue
            worker = self._choose_worker(entry, candidates, run)
            if not any(w is worker for w in candidates):  # it waits for its worker's room
                chose_held_back[choice] = version
                continue
            key = self._gate_key(worker.worker_id)
            version += key not in lane.gates  # a new gate: deficits start at 0
            deficits = lane.gate(key)
            if deficits.values[tenant_id] <= 0 and not deficits.has_credit():
                deficits.refill(quantum, deficits.rounds_to_credit(quantum))
                version += 1
            deficit = deficits.values[tenant_id]
            may_borrow = deficit > -self.settings.max_borrow_tokens or not self._flights
            if deficit <= 0 and not (is_forced and may_borrow):
                chose_held_back[choice] = version
                num_starved += 1
                continue
            version += 1  # a placement, or a failure to place
            if self._dispatch_to(entry, worker, run):
                num_placed += 1
                if not run.has_room():
                    break
        return num_placed, num_starved

    def _is_held_back(
        self, lane: _LpmLane, tenant_id: str, worker: WorkerView, *, is_forced: bool
    ) -> bool:
        """Whether the sweep would hold the tenant's request back if it chose ``worker``: no
        credit at its gate, no refill due (another tenant there has credit), no borrowing."""
        deficits = lane.gates.get(self._gate_key(worker.worker_id))
        if deficits is None:  # a new gate starts everyone at 0: a refill would follow
            return False
        deficit = deficits.values[tenant_id]
        if deficit > 0 or not deficits.has_credit():
            return False
        may_borrow = deficit > -self.settings.max_borrow_tokens or not self._flights
        return not (is_forced and may_borrow)

    def _reachable(
        self, entry: _Entry, candidates: list[WorkerView], run: _Pass
    ) -> tuple[list[WorkerView], bool]:
        """The workers ``_choose_worker`` may return for ``entry`` whatever its prefix matches
        (DLPM: the gate is the pool, one is enough), and whether the state changed finding
        them. ``candidates`` is not empty."""
        return candidates[:1], False

    def _choose_worker(self, entry: _Entry, candidates: list[WorkerView], run: _Pass) -> WorkerView:
        """``_pick_worker`` past ``_reachable``: the one with the longest match."""
        return self._most_cached(entry, candidates)

    def _gate_charge(self, entry: _Entry, worker_id: str | None, cost: float) -> None:
        lane = cast(_LpmLane, entry.lane)
        key = self._gate_key(worker_id or "")
        if key in lane.gates:
            lane.gates[key].charge(entry.request.tenant_id, cost / self._weight(entry.request))

    def _charge_prompt(self, entry: _Entry, worker_id: str | None, num_cached: int) -> None:
        super()._charge_prompt(entry, worker_id, num_cached)
        uncached = entry.request.num_prompt_tokens - num_cached
        self._gate_charge(entry, worker_id, self.settings.w_in * uncached)

    def _charge_output(self, flight: _Flight, num_tokens: int) -> None:
        super()._charge_output(flight, num_tokens)
        self._gate_charge(flight.entry, flight.worker_id, self.settings.w_out * num_tokens)

    def _correct_prompt(self, flight: _Flight, num_cached_tokens: int) -> None:
        missed = flight.num_expected_cached - num_cached_tokens
        super()._correct_prompt(flight, num_cached_tokens)
        self._gate_charge(flight.entry, flight.worker_id, self.settings.w_in * missed)

    def _deficit(self, tenant_id: str) -> float:
        return sum(
            deficits.values.get(tenant_id, 0.0)
            for lane in self._lanes.values()
            for deficits in lane.gates.values()
        )


class D2lpmPolicy(DlpmPolicy):
    """D²LPM (§4): DLPM at each worker (deficits per class and worker), and a router deficit
    per (tenant, worker) ``q[u][w]`` with quantum ``Q_w`` that bounds how long a tenant sticks
    to the worker holding its prefixes.

    The gateway holds the queue, so a request is bound to a worker when it is dispatched, and
    each worker's DLPM sees the whole class queue. The router chooses among every worker, as
    §4 writes it: when the one it chooses has no room now, the request waits for it (a cached
    prefix is worth waiting for: it would cost its whole length elsewhere) unless the hot-spot
    guard (``_choose_worker``), which compares with the least loaded worker with room, sends it
    there. Load is what a worker has left to compute (``_load``), not whole prompts. Choices of
    ours: the router deficit is per tenant, not per class (it is about locality, not order); it
    is charged the uncached prompt tokens, the D²LPM cost of §1 (§4's pseudo-code writes the
    whole prompt: that would push a tenant off the worker holding its prefix after ``Q_w`` /
    prompt length requests, however little they cost there), corrected at the first token as
    DLPM's charge is; output tokens are charged as they arrive rather than all at the finish
    (the same total); the deficits restart at 0 when the tenant leaves the backlog (``_left``);
    and the hot-spot margin includes what the prefix saves (``_choose_worker``)."""

    name = "d2lpm"

    def __init__(self, settings: PolicySettings) -> None:
        super().__init__(settings)
        self._route: dict[str, dict[str, float]] = {}  # tenant -> worker -> q[u][w]

    def _gate_key(self, worker_id: str) -> str:
        return worker_id

    def _left(self, lane: _LpmLane, tenant_id: str) -> None:
        super()._left(lane, tenant_id)
        if not any(tenant_id in other.queues for other in self._lanes.values()):
            # Out of the backlog: its router deficits restart at 0 on return, as DLPM's do
            # (§3) and as deficit round-robin resets an emptied queue's counter. Kept, they
            # would carry the debt of a tenant that sends within its share from one visit to
            # the next and push it off the worker holding its prefixes (the bound is about
            # backlogged tenants only).
            self._route.pop(tenant_id, None)

    def _pick_worker(self, entry: _Entry, run: _Pass) -> WorkerView | None:
        # Only for requests that must go now (at risk of their deadline): when the router's
        # worker is full, the least loaded with room rather than a wait.
        candidates = self._candidates(entry, run)
        if not candidates:
            return None
        self._refill_route(entry, run)
        worker = self._choose_worker(entry, candidates, run)
        if not any(w is worker for w in candidates):
            return min(candidates, key=self._load_key)
        return worker

    def _refill_route(self, entry: _Entry, run: _Pass) -> bool:
        """While no worker has q[u][w] > 0: every q[u][w] += Q_w. Whether it refilled."""
        route = self._route.setdefault(entry.request.tenant_id, {})
        quantum = self.settings.worker_quantum_tokens
        best = max(route.get(w.worker_id, 0.0) for w in run.locality)
        if best > 0:
            return False
        refill = (math.floor(-best / quantum) + 1) * quantum
        for worker_id in {w.worker_id for w in run.locality} | route.keys():
            route[worker_id] = route.get(worker_id, 0.0) + refill
        return True

    def _reachable(
        self, entry: _Entry, candidates: list[WorkerView], run: _Pass
    ) -> tuple[list[WorkerView], bool]:
        # The choice is among the workers with router credit, or the least loaded with room.
        is_refilled = self._refill_route(entry, run)
        route = self._route[entry.request.tenant_id]
        reachable = [w for w in run.locality if route[w.worker_id] > 0]
        least = min(candidates, key=self._load_key)
        if least not in reachable:
            reachable.append(least)
        return reachable, is_refilled

    def _choose_worker(self, entry: _Entry, candidates: list[WorkerView], run: _Pass) -> WorkerView:
        """After ``_refill_route``: C = G ∩ A, else A, by load, over every worker (a worker
        without room included: the request then waits for it); the hot-spot guard, against
        the least loaded of the ``candidates`` (those with room). The guard's absolute margin
        is ``hot_spot_margin_tokens`` plus the prefix the request would compute again at the
        least loaded worker: load beyond that is a hot spot, load within it costs less to
        wait for than the recomputation does (ours; §4 leaves the margin open). Without it a
        worker busy with one uncached document was a hot spot for every request holding a
        document there, which then went elsewhere and missed too (prefix_heavy, 8 workers:
        hit rate 0.90, against 0.95 with it)."""
        route = self._route[entry.request.tenant_id]
        with_credit = [w for w in run.locality if route[w.worker_id] > 0]  # A
        cached = {w.worker_id: self._cached_tokens(entry, w.worker_id) for w in run.locality}
        longest = max(cached.values())
        local = [w for w in with_credit if cached[w.worker_id] == longest]  # C = G ∩ A
        chosen = min(local or with_credit, key=self._load_key)
        least = min(candidates, key=self._load_key)
        chosen_load, least_load = self._load(chosen), self._load(least)
        saved = cached[chosen.worker_id] - cached.get(least.worker_id, 0)
        if (
            chosen_load > self.settings.hot_spot_ratio * least_load
            and chosen_load - least_load > self.settings.hot_spot_margin_tokens + max(0, saved)
        ):
            return least  # a hot spot: by load alone
        return chosen

    def _route_charge(self, entry: _Entry, worker_id: str | None, cost: float) -> None:
        route = self._route.get(entry.request.tenant_id)
        if route is not None and worker_id is not None:
            route[worker_id] = route.get(worker_id, 0.0) - cost / self._weight(entry.request)

    def _charge_prompt(self, entry: _Entry, worker_id: str | None, num_cached: int) -> None:
        super()._charge_prompt(entry, worker_id, num_cached)
        uncached = entry.request.num_prompt_tokens - num_cached
        self._route_charge(entry, worker_id, self.settings.w_in * uncached)

    def _correct_prompt(self, flight: _Flight, num_cached_tokens: int) -> None:
        missed = flight.num_expected_cached - num_cached_tokens
        super()._correct_prompt(flight, num_cached_tokens)
        self._route_charge(flight.entry, flight.worker_id, self.settings.w_in * missed)

    def _charge_output(self, flight: _Flight, num_tokens: int) -> None:
        super()._charge_output(flight, num_tokens)
        self._route_charge(flight.entry, flight.worker_id, self.settings.w_out * num_tokens)

    def _forget(self, tenant_id: str) -> None:
        self._route.pop(tenant_id, None)


# ---- by name ----------------------------------------------------------------------------------

_FAIR_POLICIES: dict[str, Callable[[PolicySettings], SchedulingPolicy]] = {
    "vtc": VtcPolicy,
    "dlpm": DlpmPolicy,
    "d2lpm": D2lpmPolicy,
    "rr_lpm": RrLpmPolicy,
}


def make_policy(name: str, settings: PolicySettings | None = None) -> SchedulingPolicy:
    """The policy called ``name`` (one of ``POLICY_NAMES``)."""
    settings = settings or PolicySettings()
    if name == "fcfs":
        return FcfsPolicy()
    factory = _FAIR_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    return factory(settings)
