"""DLPM, Deficit Longest Prefix Match (``scheduling.md`` §3), over the prefill pool as one.
Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies.base import DEFAULT_BLOCK_SIZE, Entry, Flight, Lane, Pass
from gateway.policies.lpm import IndexedEntry, IndexedPolicy, LpmQueue
from gateway.policies.service_book import ServiceBook
from gateway.scheduler import QueuedRequest, WorkerView


class _Deficits:
    """DLPM deficits of one class (at one worker, for D²LPM) of its active tenants: those with
    a request of the class queued (``queued``) or in flight. A tenant starts at 0 when it
    becomes active and its deficit is dropped when it is no longer active (``drop``), not when
    its queue empties while its requests are in flight; refills are held back while any active
    tenant has credit, and serve every active tenant. The paper's backlog is the gateway's
    queue, but a client that keeps requests in flight empties its queue whenever the workers
    take all it has sent: restarting it at 0 then forgave its debt and threw its credit away,
    and the refills it missed while everything it had was in flight were never made up, so
    service followed concurrency, not weight (measured on the real stack: weights 1/2/4 served
    138 : 133 : 160 requests, Jain 0.80, FCFS's figure; the simulator's closed-loop tenants
    reproduce it, ``tests/bench/test_sim.py``).

    A tenant holding credit with nothing queued holds the refill back, but it is not waiting
    for room: the queued tenants may then borrow to ``max_borrow_tokens`` below the best of
    them (``best_queued``) rather than below 0, so they go on in their deficits' order (their
    weights still count) and pay the debt back in later rounds. With the limit at 0, a tenant
    sending within its share kept the others of its class waiting for the refill for as long
    as it took to spend its credit (``slo_mix``: interactive TTFT attainment 0.91); with no
    limit, the others were served in arrival order, whatever their weights (Jain 0.79).

    That debt has no bound while the credit is held (the borrowers' floor moves down with the
    best of them), so a tenant joining the queue (again) gets a lead of at most ``max_lead``
    over the best queued tenant (``join``), as VTC's lift does: a tenant whose last request
    outlived its clients (a cancelled request still ending on a worker) kept its credit for
    the whole time it was away while the steady tenant's debt grew, and on its return it was
    served alone until that debt was paid (the lift rule's test on the real stack: 14 and 46
    times the steady tenant's service; ``tests/gateway/test_policies.py``). A fresh tenant
    starts at 0 only when that is within the lead. ``num_positive`` keeps "does an active
    tenant have credit" O(1)."""

    __slots__ = ("num_positive", "queued", "values")

    def __init__(self, active: Iterable[str], queued: Iterable[str]) -> None:
        self.values: dict[str, float] = dict.fromkeys(active, 0.0)
        self.queued: set[str] = set(queued)
        self.num_positive = 0

    def has_credit(self, aside: Collection[str] = ()) -> bool:
        """Whether an active tenant has credit (no refill is due), not counting the tenants
        ``aside`` (held back by something else than their deficit: their credit, which they
        cannot spend now, must not hold the others' refill)."""
        num_aside = sum(1 for t in aside if self.values.get(t, 0.0) > 0)
        return self.num_positive - num_aside > 0

    def best_queued(self) -> float:
        """The highest deficit among the tenants with a request queued (0 when none)."""
        return max((self.values[t] for t in self.queued), default=0.0)

    def join(self, tenant_id: str, max_lead: float) -> None:
        """The tenant has a request of the class queued (again): an active one keeps its
        deficit, a new one starts at 0, either at most ``max_lead`` over the best queued (or,
        with none queued, the best of the other active tenants)."""
        if tenant_id in self.queued:
            return
        value = self.values.get(tenant_id, 0.0)
        # Against the best queued tenant; with none queued, the best of the others active (a
        # closed-loop client whose requests the workers have all taken is still competing).
        others = (
            [self.values[t] for t in self.queued]
            if self.queued
            else [v for t, v in self.values.items() if t != tenant_id]
        )
        if others:
            value = min(value, max(others) + max_lead)
        self._set(tenant_id, value)
        self.queued.add(tenant_id)

    def leave(self, tenant_id: str) -> None:
        """Its queue in the class is empty (it keeps its deficit while it is active)."""
        self.queued.discard(tenant_id)

    def drop(self, tenant_id: str) -> None:
        """Nothing of the tenant's class is queued or in flight: it restarts at 0."""
        self.leave(tenant_id)
        if self.values.pop(tenant_id, 0.0) > 0:
            self.num_positive -= 1

    def charge(self, tenant_id: str, cost: float) -> None:
        value = self.values.get(tenant_id)
        if value is not None:
            self._set(tenant_id, value - cost)

    def rounds_to_credit(self, quantum: float, aside: Collection[str] = ()) -> int:
        """Refill rounds until the first tenant (not ``aside``) has credit."""
        value = max((v for t, v in self.values.items() if t not in aside), default=1.0)
        return 0 if value > 0 else math.floor(-value / quantum) + 1

    def refill(self, quantum: float, num_rounds: int) -> None:
        """``num_rounds`` refills at once, each as in §3: every tenant with ``q <= 0`` gets
        ``q += Q`` (so a tenant stops gaining in the round it gets credit)."""
        for tenant_id, value in self.values.items():
            if value <= 0:
                rounds = min(num_rounds, math.floor(-value / quantum) + 1)
                self._set(tenant_id, value + rounds * quantum)

    def _set(self, tenant_id: str, value: float) -> None:
        self.num_positive += (value > 0) - (self.values.get(tenant_id, 0.0) > 0)
        self.values[tenant_id] = value


class LpmLane(Lane):
    """DLPM state of one class: deficits per gate (the pool for DLPM, a worker for D²LPM), the
    class's queued entries in LPM order (``ordered``), and the service book, which keeps the
    weights across gateway replicas (``ServiceBook``; the deficits are only this replica's)."""

    __slots__ = ("gates", "ordered")

    def __init__(self, slo: SloClass, book: ServiceBook) -> None:
        super().__init__(slo)
        self.gates: dict[str, _Deficits] = {}
        self.ordered: LpmQueue[DlpmEntry] = LpmQueue()
        self.book: ServiceBook = book

    def gate(self, key: str) -> _Deficits:
        deficits = self.gates.get(key)
        if deficits is None:
            active = self.queues.keys() | self.inflight.keys()
            deficits = self.gates[key] = _Deficits(active, self.queues.keys())
        return deficits


@dataclass(slots=True, eq=False)
class DlpmEntry(IndexedEntry):
    """``kind``: (tenant, prompt tokens), what a sweep's verdicts are remembered by
    (``DlpmPolicy._sweep``)."""

    kind: tuple[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.kind = (self.request.tenant_id, self.request.num_prompt_tokens)


class DlpmPolicy(IndexedPolicy[LpmLane, DlpmEntry]):
    """Deficit Longest Prefix Match (§3) over the prefill pool as one: the queued requests of a
    class in order of their longest match (then arrival), each let through while its tenant's
    deficit is positive; the deficits are refilled only when no queued tenant has credit.

    Work conservation: when a sweep placed nothing because the tenants with credit have nothing
    that fits, one more sweep lets the others borrow (``_sweep``) rather than idle the workers.
    The order is computed once per pass, as in the paper's step. Deficit refills of several
    rounds at once (``_Deficits.refill``) stand for the paper's repeated single refills."""

    name = "dlpm"

    def __init__(
        self,
        settings: SchedulerSection | None = None,
        slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        books: dict[str, ServiceBook] | None = None,
    ) -> None:
        super().__init__(settings, slo_classes, block_size=block_size, books=books)
        # By request: the gate its output was prepaid at and the tokens prepaid and not yet
        # generated (``_charge_prompt``).
        self._prepaid: dict[str, tuple[str | None, int]] = {}

    def _new_lane(self, slo: SloClass) -> LpmLane:
        return LpmLane(slo, self._book_of(slo))

    def _new_entry(
        self, request: QueuedRequest, lane: LpmLane, deadline: float, *, is_charged: bool
    ) -> DlpmEntry:
        return DlpmEntry(request, lane, deadline, is_charged)

    def _gate_key(self, worker_id: str) -> str:
        return ""

    def _joined(self, lane: LpmLane, tenant_id: str) -> None:
        max_lead = self.settings.quantum_tokens + self.settings.max_borrow_tokens
        for deficits in lane.gates.values():
            deficits.join(tenant_id, max_lead)
        self._lift(lane, tenant_id)

    def _left(self, lane: LpmLane, tenant_id: str) -> None:
        for deficits in lane.gates.values():
            deficits.leave(tenant_id)
        lane.book.left(tenant_id)

    def _lane_idle(self, lane: LpmLane, tenant_id: str) -> None:
        for deficits in lane.gates.values():
            deficits.drop(tenant_id)

    def _lpm_queued(self, entry: DlpmEntry) -> None:
        cast(LpmLane, entry.lane).ordered.add(entry)

    def _lpm_reordered(self, entry: DlpmEntry) -> None:
        cast(LpmLane, entry.lane).ordered.is_unsorted = True

    def _dequeued_entry(self, entry: DlpmEntry) -> None:
        super()._dequeued_entry(entry)
        cast(LpmLane, entry.lane).ordered.num_gone += 1

    def _serve(self, lane: LpmLane, run: Pass) -> None:
        self._refresh_orders(run)
        entries = list(lane.ordered.in_order())  # a copy: placements in the pass leave it alone
        is_forced = False
        for _ in range(len(lane.queues) + 2):
            num_placed, num_starved = self._sweep(lane, entries, run, is_forced=is_forced)
            if not num_starved or not run.has_room() or is_forced:
                return
            is_forced = not num_placed

    def _sweep(
        self, lane: LpmLane, entries: list[DlpmEntry], run: Pass, *, is_forced: bool
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
        # With several models' pools sharing the class's service book, a tenant further than
        # the borrowing limit ahead of the least counter queued here waits: the deficits are
        # this pool's, and one also served on another model would otherwise get its full share
        # here too (``gateway.policies.per_model``). The least counter only rises as the pass
        # charges, so the one taken now holds back at most a little more than needed.
        book = lane.book
        pool_floor = book.least_of(lane.queues) if book.num_pools > 1 else None
        ahead_limit = self.settings.max_borrow_tokens
        # Those the floor holds back now: their credit here does not hold the others' refill
        # (it would leave the others only borrowing, the pool nearly idle).
        aside = (
            frozenset(t for t in lane.queues if book.counters[t] - pool_floor > ahead_limit)
            if pool_floor is not None
            else frozenset()
        )
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
            if self._is_held_back_elsewhere(lane, kind[0]) or (
                pool_floor is not None and book.counters[kind[0]] - pool_floor > ahead_limit
            ):
                held_back[kind] = version  # (not starved: borrowing does not lift this)
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
                self._is_held_back(lane, tenant_id, worker, is_forced=is_forced, aside=aside)
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
            if deficits.values[tenant_id] <= 0 and not deficits.has_credit(aside):
                deficits.refill(quantum, deficits.rounds_to_credit(quantum, aside))
                version += 1
            deficit = deficits.values[tenant_id]
            may_borrow = self._may_borrow(deficits, deficit)
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
        self,
        lane: LpmLane,
        tenant_id: str,
        worker: WorkerView,
        *,
        is_forced: bool,
        aside: Collection[str] = (),
    ) -> bool:
        """Whether the sweep would hold the tenant's request back if it chose ``worker``: no
        credit at its gate, no refill due (another tenant there has credit), no borrowing."""
        deficits = lane.gates.get(self._gate_key(worker.worker_id))
        if deficits is None:  # a new gate starts everyone at 0: a refill would follow
            return False
        deficit = deficits.values[tenant_id]
        if deficit > 0 or not deficits.has_credit(aside):
            return False
        return not (is_forced and self._may_borrow(deficits, deficit))

    def _may_borrow(self, deficits: _Deficits, deficit: float) -> bool:
        """Whether a tenant at ``deficit`` may go further into debt when the tenants with credit
        cannot use the room: down to ``max_borrow_tokens`` below 0, or below the best queued
        tenant's deficit when that is lower (``_Deficits``); without limit when nothing is in
        flight (room for the others would never come back)."""
        floor = min(0.0, deficits.best_queued()) - self.settings.max_borrow_tokens
        return deficit > floor or not self._flights

    def _reachable(
        self, entry: DlpmEntry, candidates: list[WorkerView], run: Pass
    ) -> tuple[list[WorkerView], bool]:
        """The workers ``_choose_worker`` may return for ``entry`` whatever its prefix matches
        (DLPM: the gate is the pool, one is enough), and whether the state changed finding
        them. ``candidates`` is not empty."""
        return candidates[:1], False

    def _choose_worker(
        self, entry: DlpmEntry, candidates: list[WorkerView], run: Pass
    ) -> WorkerView:
        """``_pick_worker`` past ``_reachable``: the one with the longest match."""
        return self._most_cached(entry, candidates)

    def _gate_charge(self, entry: Entry, worker_id: str | None, cost: float) -> None:
        lane = cast(LpmLane, entry.lane)
        key = self._gate_key(worker_id or "")
        if key in lane.gates:
            lane.gates[key].charge(entry.request.tenant_id, cost * self._unit(entry.request))

    def _share_realized(self, entry: Entry, worker_id: str | None, cost: float) -> None:
        """Service computed (not prepaid, not refunded): into the service book, and what other
        replicas charge too. A prepaid charge shared would reach a replica where the tenant is
        not active (and be dropped) while its refund later reaches it where the tenant is (and
        be credit)."""
        lane = cast(LpmLane, entry.lane)
        key = self._gate_key(worker_id or "")
        tenant_id = entry.request.tenant_id
        cost *= self._unit(entry.request)
        lane.book.charge(tenant_id, cost)
        self._share(lane, key, tenant_id, cost)

    def _remote_charge(self, lane: LpmLane, gate: str, tenant_id: str, cost: float) -> None:
        lane.book.remote_charge(tenant_id, cost)
        if tenant_id in lane.queues or tenant_id in lane.inflight:
            lane.gate(gate).charge(tenant_id, cost)  # (a tenant not active here starts at 0)

    def _charge_prompt(self, entry: DlpmEntry, worker_id: str | None, num_cached: int) -> None:
        """The uncached prompt, and its output up to ``max_tokens`` in advance: the deficit
        that decides the next dispatch then already counts the work in flight. Charged as the
        tokens come instead, a tenant coming back with nothing in flight had the credit of a
        fresh start against the others' in-flight work still to be charged, and took every
        free slot until its own output caught up (the lift rule's test: the steady tenant got
        no request through for seconds). What is not generated is refunded at the finish."""
        super()._charge_prompt(entry, worker_id, num_cached)
        request = entry.request
        uncached = request.num_prompt_tokens - num_cached
        num_prepaid = max(0, request.max_tokens - request.num_output_tokens)
        self._prepaid[request.request_id] = (worker_id, num_prepaid)
        cost = self.settings.w_in * uncached + self.settings.w_out * num_prepaid
        self._gate_charge(entry, worker_id, cost)
        self._share_realized(entry, worker_id, self.settings.w_in * uncached)

    def _charge_output(self, flight: Flight, num_tokens: int) -> None:
        super()._charge_output(flight, num_tokens)
        request_id = flight.entry.request.request_id
        worker_id, num_prepaid = self._prepaid.get(request_id, (flight.worker_id, 0))
        used = min(num_prepaid, num_tokens)
        if request_id in self._prepaid:
            self._prepaid[request_id] = (worker_id, num_prepaid - used)
        if num_tokens > used:
            self._gate_charge(
                flight.entry, flight.worker_id, self.settings.w_out * (num_tokens - used)
            )
        self._share_realized(flight.entry, flight.worker_id, self.settings.w_out * num_tokens)

    def _flight_finished(self, flight: Flight) -> None:
        self._refund(flight.entry)

    def remove(self, request_id: str) -> QueuedRequest | None:
        entry = self._entries.get(request_id)
        request = super().remove(request_id)
        if entry is not None:
            self._refund(entry)  # (a request queued again after a preemption)
        return request

    def _reject(self, entry: DlpmEntry, run: Pass) -> None:
        super()._reject(entry, run)
        self._refund(entry)

    def _refund(self, entry: Entry) -> None:
        """What was prepaid of the request's output and not generated goes back."""
        worker_id, num_prepaid = self._prepaid.pop(entry.request.request_id, (None, 0))
        if num_prepaid:
            self._gate_charge(entry, worker_id, -self.settings.w_out * num_prepaid)

    def _correct_prompt(self, flight: Flight, num_cached_tokens: int) -> None:
        missed = flight.num_expected_cached - num_cached_tokens
        super()._correct_prompt(flight, num_cached_tokens)
        self._gate_charge(flight.entry, flight.worker_id, self.settings.w_in * missed)
        self._share_realized(flight.entry, flight.worker_id, self.settings.w_in * missed)

    def _can_forget(self, tenant_id: str) -> bool:
        """Deficits restart at 0 on return; with replicas or other models' pools, the book's
        counter must be at most what the lift gives back (VTC's rule)."""
        return all(
            lane.book.can_forget(tenant_id)
            for lane in self._lanes.values()
            if self._is_shared or lane.book.num_pools > 1
        )

    def _forget(self, tenant_id: str) -> None:
        for lane in self._lanes.values():
            lane.book.forget(tenant_id)

    def _deficit(self, tenant_id: str) -> float:
        return sum(
            deficits.values.get(tenant_id, 0.0)
            for lane in self._lanes.values()
            for deficits in lane.gates.values()
        )
