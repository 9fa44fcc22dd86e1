"""What the fair policies share (``scheduling.md``): one lane per SLO class (§5) holding a FIFO
queue per tenant and that class's fairness state; admission (``Shed``) and rejection of
sheddable requests that can no longer make their deadline; at-risk requests of lower classes
first; the charges of §1 as the work happens; and forgetting idle tenants. A policy adds its
order (``FairPolicy._serve``), its placement (``_dispatch``), what it does with a charge, and
what it keeps on a queue entry (``_new_entry``). Torch-free.

Longer than the house's 300 lines: the pass (``Pass``), the lane and the skeleton that walks
them are one algorithm, every policy's; split, each part would only make sense read with the
others.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies.service_book import (
    ServiceBook,
    idle_floors,
    set_remote_floors,
    shared_floors,
)
from gateway.scheduler import (
    Decision,
    Placement,
    QueuedRequest,
    Rejection,
    RoomAsks,
    Shed,
    TenantState,
    TpotGuard,
    WorkerView,
    has_prefill_room,
)

MIN_WEIGHT = 1e-6  # a weight of 0 would make every charge infinite
DEFAULT_BLOCK_SIZE = 16  # the engine's default


# ---- state shared by every fair policy ---------------------------------------------------------


@dataclass(slots=True, eq=False)
class Entry:
    """A queued request with what the policy derived from it. ``is_charged``: requeued, its
    prompt was charged when it was first placed (charges stay charged)."""

    request: QueuedRequest
    lane: Lane
    deadline: float  # arrival + the class's TTFT target
    is_charged: bool = False
    is_queued: bool = True


@dataclass(slots=True, eq=False)
class Flight:
    """A placed request until ``on_finish``. ``num_output_tokens`` counts the output charged so
    far, starting from those generated before a recompute preemption (charged back then)."""

    entry: Entry
    worker_id: str | None  # the locality worker: prefill worker, or colocated decode worker
    num_expected_cached: int
    num_output_tokens: int
    # The cached prefix counted in its prefill worker's ``inflight_tokens`` until its prefill
    # ends (``_load``). 0 on a colocated worker: ``place`` adds nothing to a decode worker's
    # view, and its handle holds the prompt until the decode ends, so its load stays whole
    # prompts.
    num_pending_cached: int = 0


class Lane:
    """One SLO class: a FIFO queue per backlogged tenant (an ``OrderedDict``: removal anywhere
    and a requeue at the front are O(1)), and its queued prompt tokens for wait estimates.
    Subclasses add the policy's fairness state for the class; a fair one keeps a ``book``
    (``ServiceBook``): the tenants' service, which gateway replicas compare."""

    __slots__ = ("book", "inflight", "num_queued_tokens", "queues", "slo")

    def __init__(self, slo: SloClass) -> None:
        self.slo = slo
        self.queues: dict[str, OrderedDict[str, Entry]] = {}
        self.num_queued_tokens = 0
        self.inflight: dict[str, int] = {}  # per tenant: its requests of the class in flight
        self.book: ServiceBook | None = None

    def head(self, tenant_id: str) -> Entry:
        return next(iter(self.queues[tenant_id].values()))

    def heads(self) -> Iterator[Entry]:
        for queue in self.queues.values():
            yield next(iter(queue.values()))


@dataclass(frozen=True, slots=True)
class Throughput:
    """The workers as of the last ``schedule``, for the deadline estimates of §5: the pool's
    prefill speed, the fastest worker's, and how long until the least busy worker has computed
    what it already holds."""

    pool_tok_s: float
    fastest_tok_s: float
    wait_s: float

    @classmethod
    def of(cls, workers: Sequence[WorkerView], default_tok_s: float) -> Throughput:
        if not workers:
            return cls(default_tok_s, default_tok_s, 0.0)
        rates = [w.prefill_tok_s or default_tok_s for w in workers]
        wait_s = min(w.inflight_tokens / rate for w, rate in zip(workers, rates, strict=True))
        return cls(sum(rates), max(rates), wait_s)


class Pass:
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
        "tpot_guard",
    )

    def __init__(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
        top_rank: int = 0,
        tpot_guard: TpotGuard | None = None,
    ):
        """``top_rank``: the highest class rank queued."""
        self.prefill = prefill
        self.decode = decode
        self.tpot_guard = tpot_guard
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

    def fits(self, entry: Entry) -> bool:
        request = entry.request
        return all(
            request.num_prompt_tokens < failed
            for rank, failed in self._min_failed_tokens.items()
            if rank >= request.rank
        )

    def failed(self, entry: Entry) -> None:
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
                    has_room_for_any(w, is_colocated=True, top_rank=self.top_rank)
                    for w in self.decode
                )
                and (
                    not self.prefill
                    or any(
                        has_room_for_any(w, is_colocated=False, top_rank=self.top_rank)
                        for w in self.prefill
                    )
                )
            )
        return self._has_room


def has_room(worker: WorkerView, request: QueuedRequest, is_colocated: bool) -> bool:
    """``place``'s room rule for one worker: KV for the prompt on a colocated worker;
    ``has_prefill_room`` on a prefill worker."""
    if is_colocated:
        return worker.free_kv_tokens >= request.num_prompt_tokens + 1
    return has_prefill_room(request, worker)


def has_room_for_any(worker: WorkerView, *, is_colocated: bool, top_rank: int) -> bool:
    """Whether the shortest possible prompt (one token) of the highest class queued
    (``top_rank``) could go to ``worker``: KV for it and its first token on a decode worker
    (colocated or not), room under the cap on a prefill worker (beside its longest prompt in
    flight, ``has_prefill_room``), or only lower classes in flight there."""
    if is_colocated:
        return worker.free_kv_tokens >= 2
    cap = max(worker.max_inflight_tokens, 1)
    beside_longest = worker.inflight_tokens - worker.longest_inflight_tokens
    return (
        worker.inflight_tokens < cap
        or (worker.longest_inflight_tokens > 1 and beside_longest < cap)
        or (worker.max_inflight_rank is not None and worker.max_inflight_rank < top_rank)
    )


LaneT = TypeVar("LaneT", bound=Lane)
EntryT = TypeVar("EntryT", bound=Entry)


class FairPolicy(Generic[LaneT, EntryT]):
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

    def __init__(
        self,
        settings: SchedulerSection | None = None,
        slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        books: dict[str, ServiceBook] | None = None,
    ) -> None:
        """``block_size``: the workers' KV block size until ``set_block_size`` says theirs.
        ``books``: the service books by class this policy shares with the policies of other
        models' pools (``gateway.policies.per_model``); None: its own."""
        if not slo_classes:
            raise ValueError("at least one SLO class is needed")
        self.settings = settings = settings or SchedulerSection()
        self.block_size = block_size
        self._class_books = books if books is not None else {}
        self._room = RoomAsks()
        self._tpot_active_until: dict[str, float] = {}  # by class name
        ranked = sorted(slo_classes, key=lambda c: -c.rank)
        self._lanes: dict[str, LaneT] = {}
        for slo in ranked:
            self._lanes.setdefault(slo.name, self._new_lane(slo))  # highest rank first
        self._lowest = self._lanes[ranked[-1].name]
        self._entries: dict[str, EntryT] = {}
        self._flights: dict[str, Flight] = {}
        self._num_queued: dict[str, int] = {}  # per tenant, over all classes
        self._num_inflight: dict[str, int] = {}
        # Per locality worker: the cached prefixes (as expected at placement) of the prompts
        # whose prefill has not ended. The views' ``inflight_tokens`` count whole prompts (the
        # dispatcher's room rule); less these, they are the load of §4: tokens to compute.
        self._pending_cached: dict[str, int] = {}
        self._weights: dict[str, float] = {}  # set by update_tenant
        self._service: dict[str, float] = {}  # normalized service charged, for tenants()
        # Normalized service charged here since ``take_service_deltas``, by (class, gate,
        # tenant): what other gateway replicas add to theirs (``gateway.replica_sync``).
        self._service_deltas: dict[tuple[str, str, str], float] = {}
        self._is_shared = False  # set by the first take_service_deltas
        self._idle_since: dict[str, float] = {}
        self._next_sweep_s = -math.inf
        self._now = -math.inf
        self._throughput = Throughput.of([], settings.default_prefill_tok_s)

    # ---- the interface ---------------------------------------------------------------------

    def enqueue(self, request: QueuedRequest, now: float) -> None:
        if request.request_id in self._entries:
            raise ValueError(f"request {request.request_id!r} is already queued")
        if not request.demoted:
            # The tenant's weight as its key was last read (at most ``admin_sync_s`` old with
            # replicas): a replica that missed an admin change's message catches up here.
            self._weights[request.tenant_id] = request.weight
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
        self._put(self._new_entry(request, lane, deadline, is_charged=False), at_front=False)

    def requeue(self, request: QueuedRequest, now: float) -> None:
        if request.request_id in self._entries:
            return
        self._now = max(self._now, now)
        flight = self._flights.pop(request.request_id, None)
        if flight is not None:  # requeued without on_finish (a preemption): it left the worker
            self._num_inflight[request.tenant_id] -= 1
            self._prefill_ended(flight)
            self._landed(flight, is_requeued=True)
        lane = self._lane_of(request)
        deadline = request.arrival + lane.slo.ttft_target_s
        entry = self._new_entry(request, lane, deadline, is_charged=True)
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
        *,
        model: str = "",
    ) -> list[Decision]:
        self._now = max(self._now, now)
        top_rank = max((lane.slo.rank for lane in self._lanes.values() if lane.queues), default=0)
        run = Pass(prefill, decode, now, top_rank, self._tpot_guard(now))
        self._throughput = Throughput.of(run.locality, self.settings.default_prefill_tok_s)
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
            self._ask_for_room(run)
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
        self._flight_finished(flight)
        tenant_id = request.tenant_id
        self._num_inflight[tenant_id] -= 1
        self._landed(flight, is_requeued=False)
        self._mark_if_idle(tenant_id)

    def on_evicted(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        pass

    def update_tenant(self, tenant_id: str, weight: float) -> None:
        self._weights[tenant_id] = weight

    def set_block_size(self, block_size: int) -> None:
        self.block_size = block_size

    def queued(self) -> int:
        return len(self._entries)

    def backlog_estimate(self) -> tuple[int, int, float | None]:
        """What admission's deadline estimate uses (§5): the queued prompt tokens at the pool's
        measured prefill speed, after the least busy worker's own work."""
        num_tokens = sum(lane.num_queued_tokens for lane in self._lanes.values())
        throughput = self._throughput
        return (
            len(self._entries),
            num_tokens,
            throughput.wait_s + num_tokens / throughput.pool_tok_s,
        )

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

    # ---- gateway replicas (``gateway.replica_sync``) ---------------------------------------

    def take_service_deltas(self) -> dict[tuple[str, str, str], float]:
        """The normalized service this policy charged since the last call, by (class name,
        gate, tenant): the gate is where a deficit policy keeps it ("" for the pool, a worker
        id for D²LPM). Other replicas apply it with ``apply_remote_service``."""
        self._is_shared = True
        deltas, self._service_deltas = self._service_deltas, {}
        return deltas

    def apply_remote_service(self, deltas: dict[tuple[str, str, str], float]) -> None:
        """Service other gateway replicas charged: counted as if charged here (to tenants this
        replica knows; one it does not is lifted on arrival as any newcomer)."""
        for (class_name, gate, tenant_id), cost in deltas.items():
            lane = self._lanes.get(class_name)
            if lane is not None:
                self._remote_charge(lane, gate, tenant_id, cost)

    def backlog_floors(self) -> dict[str, float]:
        """By class, the least counter among this replica's tenants backlogged since the last
        call (classes with none left out): what the other replicas' lift rule and hold-back
        take into account."""
        return shared_floors(self._books())

    def idle_floors(self) -> dict[str, float]:
        """By class, what this replica lifts a newcomer to with no backlog anywhere (its last
        leaver's counter); classes with none left out."""
        return idle_floors(self._books())

    def set_remote_floors(self, floors: dict[str, float], idle: dict[str, float]) -> None:
        """The least of the other replicas' ``backlog_floors`` and the highest of their
        ``idle_floors``, by class: the lift rule's global backlog minimum, and what it lifts
        to when no replica has a backlog."""
        set_remote_floors(self._books(), floors, idle)

    def _books(self) -> Iterator[tuple[str, ServiceBook]]:
        for name, lane in self._lanes.items():
            if lane.book is not None:
                yield name, lane.book

    def _book_of(self, slo: SloClass) -> ServiceBook:
        """The class's service book (shared with other pools' policies), for a new lane."""
        book = self._class_books.get(slo.name)
        if book is None:
            book = self._class_books[slo.name] = ServiceBook()
        book.num_pools += 1
        return book

    def _lift(self, lane: LaneT, tenant_id: str) -> None:
        """The lift rule in the lane's service book, for a tenant joining its backlog: one with
        requests of the class in flight may stay up to the borrowing limit below the other
        replicas' floor (``gateway.policies.service_book``)."""
        assert lane.book is not None
        slack = self.settings.max_borrow_tokens if tenant_id in lane.inflight else 0.0
        # With several models' pools, the same slack against this replica's floors too: a
        # closed-loop tenant whose queue one pool emptied is lifted at most to within it.
        local_slack = slack if lane.book.num_pools > 1 else 0.0
        lane.book.lift(tenant_id, remote_slack=slack, pool=lane.queues, local_slack=local_slack)

    def _is_held_back_elsewhere(self, lane: LaneT, tenant_id: str) -> bool:
        """Whether the tenant is further than the borrowing limit ahead of the least counter
        backlogged on another replica (``ServiceBook``): it waits for that one."""
        return (
            lane.book is not None
            and lane.book.lead_elsewhere(tenant_id) > self.settings.max_borrow_tokens
        )

    def _share(self, lane: LaneT, gate: str, tenant_id: str, cost: float) -> None:
        if not self._is_shared:
            return  # one gateway: nobody takes them
        key = (lane.slo.name, gate, tenant_id)
        self._service_deltas[key] = self._service_deltas.get(key, 0.0) + cost

    def _remote_charge(self, lane: LaneT, gate: str, tenant_id: str, cost: float) -> None:
        """Hook: apply another replica's normalized charge (nothing by default)."""

    # ---- hooks -----------------------------------------------------------------------------

    def _new_lane(self, slo: SloClass) -> LaneT:
        raise NotImplementedError

    def _new_entry(
        self, request: QueuedRequest, lane: LaneT, deadline: float, *, is_charged: bool
    ) -> EntryT:
        """A queue entry for ``request`` (a policy that keeps more per request subclasses
        ``Entry``)."""
        raise NotImplementedError

    def _joined(self, lane: LaneT, tenant_id: str) -> None:
        pass

    def _left(self, lane: LaneT, tenant_id: str) -> None:
        pass

    def _queued_entry(self, entry: EntryT) -> None:
        """``entry`` joined its lane's queues (``_put``)."""

    def _dequeued_entry(self, entry: EntryT) -> None:
        """``entry`` left the queues (``_take``)."""

    def _serve(self, lane: LaneT, run: Pass) -> None:
        raise NotImplementedError

    def _dispatch(self, entry: EntryT, run: Pass) -> bool:
        raise NotImplementedError

    def _charge_prompt(self, entry: EntryT, worker_id: str | None, num_cached: int) -> None:
        pass

    def _charge_output(self, flight: Flight, num_tokens: int) -> None:
        pass

    def _correct_prompt(self, flight: Flight, num_cached_tokens: int) -> None:
        pass

    def _became_idle(self, tenant_id: str) -> None:
        """Nothing of the tenant's is queued or in flight any more."""

    def _flight_finished(self, flight: Flight) -> None:
        """The flight's request ended (``on_finish``), its output charged."""

    def _lane_idle(self, lane: LaneT, tenant_id: str) -> None:
        """Nothing of the tenant's is queued or in flight in the class any more."""

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

    def _put(self, entry: EntryT, *, at_front: bool) -> None:
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

    def _take(self, entry: EntryT) -> None:
        """Out of the queue: placed, rejected or removed."""
        lane = cast(LaneT, entry.lane)
        request = entry.request
        tenant_id = request.tenant_id
        queue = lane.queues[tenant_id]
        del queue[request.request_id]
        self._room.forget(request.request_id)
        if not queue:
            del lane.queues[tenant_id]
            self._left(lane, tenant_id)
            if tenant_id not in lane.inflight:
                self._lane_idle(lane, tenant_id)
        lane.num_queued_tokens -= request.num_prompt_tokens
        del self._entries[request.request_id]
        entry.is_queued = False
        self._dequeued_entry(entry)
        self._num_queued[tenant_id] -= 1
        if self._num_queued[tenant_id] == 0:
            del self._num_queued[tenant_id]
            self._mark_if_idle(tenant_id)

    def _placed(
        self, entry: EntryT, placement: Placement, worker_id: str | None, num_cached: int
    ) -> None:
        """Bookkeeping of a placement; ``_dispatch`` calls it after ``place`` succeeded."""
        request = entry.request
        num_pending = num_cached if placement.prefill_worker_id is not None else 0
        self._flights[request.request_id] = Flight(
            entry, worker_id, num_cached, request.num_output_tokens, num_pending
        )
        if worker_id is not None and num_pending:
            self._pending_cached[worker_id] = self._pending_cached.get(worker_id, 0) + num_pending
        self._num_inflight[request.tenant_id] = self._num_inflight.get(request.tenant_id, 0) + 1
        entry.lane.inflight[request.tenant_id] = entry.lane.inflight.get(request.tenant_id, 0) + 1
        self._take(entry)
        if not entry.is_charged:
            self._charge_prompt(entry, worker_id, num_cached)

    def _landed(self, flight: Flight, *, is_requeued: bool) -> None:
        """The flight is over (ended, or ``is_requeued``: its request is queued again at once,
        so its class does not go idle for it)."""
        lane = cast(LaneT, flight.entry.lane)
        tenant_id = flight.entry.request.tenant_id
        lane.inflight[tenant_id] -= 1
        if not lane.inflight[tenant_id]:
            del lane.inflight[tenant_id]
            if not is_requeued and tenant_id not in lane.queues:
                self._lane_idle(lane, tenant_id)

    def _prefill_ended(self, flight: Flight) -> None:
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
        return max(weight, MIN_WEIGHT)

    def _unit(self, request: QueuedRequest) -> float:
        """What one token of the §1 cost is in normalized service: the model's cost factor
        over the tenant's weight."""
        return request.cost_factor / self._weight(request)

    def _add_service(self, tenant_id: str, cost: float) -> None:
        self._service[tenant_id] = self._service.get(tenant_id, 0.0) + cost

    # ---- SLO classes (§5) ------------------------------------------------------------------

    def _prefill_s(self, request: QueuedRequest) -> float:
        return request.num_prompt_tokens / self._throughput.fastest_tok_s

    def _is_hopeless(self, entry: EntryT, now: float) -> bool:
        """A sheddable request that misses its deadline even if its prefill started now on the
        fastest worker. (Admission sheds on an estimate; a queued request is dropped only once
        it is sure to miss.)"""
        return entry.lane.slo.sheddable and now + self._prefill_s(entry.request) > entry.deadline

    def _reject(self, entry: EntryT, run: Pass) -> None:
        self._take(entry)
        run.add(
            Rejection(
                entry.request,
                f"class {entry.lane.slo.name!r} can no longer meet its "
                f"{entry.lane.slo.ttft_target_s:g} s time-to-first-token target",
            )
        )

    def _reject_hopeless(self, run: Pass) -> None:
        """Heads only: within a tenant's queue of one class, deadlines follow arrivals; a later
        hopeless request is rejected when it reaches the head or is picked."""
        for lane in self._lanes.values():
            if not lane.slo.sheddable:
                continue
            for tenant_id in list(lane.queues):
                while tenant_id in lane.queues:
                    head = cast(EntryT, lane.head(tenant_id))
                    if not self._is_hopeless(head, run.now):
                        break
                    self._reject(head, run)

    def _serve_at_risk(self, run: Pass) -> None:
        """Heads of classes below the highest busy one that will miss their deadline behind the
        work queued in higher classes, but can still make it if served now (serving a request
        that is late anyway would only make others late too), earliest deadline first."""
        at_risk: list[EntryT] = []
        num_tokens_ahead = 0
        throughput = self._throughput
        for lane in self._lanes.values():
            if not lane.queues:
                continue
            if num_tokens_ahead:
                behind_s = throughput.wait_s + num_tokens_ahead / throughput.pool_tok_s
                for head in cast(Iterator[EntryT], lane.heads()):
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

    def _ask_for_room(self, run: Pass) -> None:
        """The make-room decision (``RoomAsks``), for the highest class still queued."""
        if not self.settings.make_room_for_higher_classes:
            return
        lane = next((lane for lane in self._lanes.values() if lane.queues), None)
        if lane is None:
            return
        top = (entry.request for queue in lane.queues.values() for entry in queue.values())
        decision = self._room.decide(top, run.decode, run.now)
        if decision is not None:
            run.add(decision)

    def _tpot_guard(self, now: float) -> TpotGuard | None:
        """The guard for this pass (``keeps_tpot``): the tightest TPOT target among the classes
        with requests queued or in flight now or within ``tpot_guard_hold_s`` (so a class
        between two requests keeps its room rather than find the decode batch full of lower
        classes when the next one comes)."""
        hold_s = self.settings.tpot_guard_hold_s
        floor_s: float | None = None
        for lane in self._lanes.values():
            target = lane.slo.tpot_target_s
            if target is None:
                continue
            if lane.queues or lane.inflight:
                self._tpot_active_until[lane.slo.name] = now + hold_s
            if self._tpot_active_until.get(lane.slo.name, -math.inf) > now or (
                lane.queues or lane.inflight
            ):
                floor_s = target if floor_s is None else min(floor_s, target)
        if floor_s is None:
            return None
        return TpotGuard(floor_s, floor_s * self.settings.tpot_headroom)

    # ---- bounded state ---------------------------------------------------------------------

    def _mark_if_idle(self, tenant_id: str) -> None:
        if tenant_id not in self._num_queued and not self._num_inflight.get(tenant_id):
            self._num_inflight.pop(tenant_id, None)
            self._idle_since[tenant_id] = self._now
            self._became_idle(tenant_id)

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
