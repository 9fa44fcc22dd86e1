"""VTC, the Virtual Token Counter (``scheduling.md`` §2), with the lift rule. Torch-free."""

from __future__ import annotations

import heapq
import math
from typing import cast

from gateway.config import SloClass
from gateway.policies.base import Entry, FairPolicy, Flight, Lane, Pass
from gateway.scheduler import QueuedRequest, place


class _VtcLane(Lane):
    """VTC state of one class. ``last_left``: the tenant that most recently left the backlog;
    its counter (kept in ``last_left_counter`` once it is forgotten) is the lift when every
    queue is empty."""

    __slots__ = ("counters", "last_left", "last_left_counter", "remote_floor", "remote_idle")

    def __init__(self, slo: SloClass) -> None:
        super().__init__(slo)
        self.counters: dict[str, float] = {}
        self.last_left: str | None = None
        self.last_left_counter = 0.0
        # The least counter among the other gateway replicas' backlogged tenants, None when
        # they have none (or there are no replicas); and, of those with no backlog, the highest
        # of their last leavers' counters (what they would lift a newcomer to).
        self.remote_floor: float | None = None
        self.remote_idle: float | None = None

    def local_floor(self) -> float | None:
        """The least counter among this replica's backlogged tenants."""
        return min((self.counters[t] for t in self.queues), default=None)

    def floor(self) -> float:
        """What a tenant joining now is lifted to (at least): the least counter among the
        backlogged tenants (of every replica), or the last leaver's when none is. Alone, it
        never decreases, which is what makes forgetting a tenant whose counter is at most this
        safe; with replicas, another's backlog may bring it down by what the counters drift
        apart between syncs."""
        floors = [f for f in (self.local_floor(), self.remote_floor) if f is not None]
        if floors:
            return min(floors)
        idle = [f for f in (self.idle_floor(), self.remote_idle) if f is not None]
        return max(idle, default=0.0)

    def idle_floor(self) -> float | None:
        """The last leaver's counter (what a newcomer is lifted to with no backlog anywhere);
        None before anyone left."""
        if self.last_left is None:
            return None
        return self.counters.get(self.last_left, self.last_left_counter)


class VtcPolicy(FairPolicy[_VtcLane, Entry]):
    """Virtual Token Counter (§2): the head of the backlogged tenant with the least counter,
    ties to the earlier head. Placement by load (``place``); no prefix index, so
    ``Placement.num_cached_tokens`` is 0. A tenant whose head does not fit waits for this pass
    (FIFO within a tenant) while the others go on."""

    name = "vtc"

    def _new_lane(self, slo: SloClass) -> _VtcLane:
        return _VtcLane(slo)

    def _new_entry(
        self, request: QueuedRequest, lane: _VtcLane, deadline: float, *, is_charged: bool
    ) -> Entry:
        return Entry(request, lane, deadline, is_charged)

    def _joined(self, lane: _VtcLane, tenant_id: str) -> None:
        # The lift: c[u] = max(c[u], min c[v] over other backlogged v), else the last leaver's.
        lane.counters[tenant_id] = max(lane.counters.get(tenant_id, 0.0), lane.floor())

    def _left(self, lane: _VtcLane, tenant_id: str) -> None:
        lane.last_left = tenant_id

    def _serve(self, lane: _VtcLane, run: Pass) -> None:
        heap = [(lane.counters[t], lane.head(t).request.arrival, t) for t in lane.queues]
        heapq.heapify(heap)
        blocked_counter = math.inf  # the least counter whose head could not be placed
        # Backlogged tenants of other replicas wait for the same workers: one of ours further
        # ahead of them than the borrowing limit waits too, so the room goes to them (without
        # this, tenants each sending to their own replica got the same service whatever
        # their weights).
        elsewhere = math.inf if lane.remote_floor is None else lane.remote_floor
        while heap and run.has_room():
            counter, _, tenant_id = heapq.heappop(heap)
            if counter - elsewhere > self.settings.max_borrow_tokens:
                return
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

    def _dispatch(self, entry: Entry, run: Pass) -> bool:
        placement = place(entry.request, run.prefill, run.decode, tpot_guard=run.tpot_guard)
        if placement is None:
            run.failed(entry)
            return False
        run.add(placement)
        self._placed(entry, placement, placement.prefill_worker_id, 0)
        return True

    def _charge(self, entry: Entry, cost: float) -> None:
        request = entry.request
        cost /= self._weight(request)
        lane = cast(_VtcLane, entry.lane)
        lane.counters[request.tenant_id] = lane.counters.get(request.tenant_id, 0.0) + cost
        self._add_service(request.tenant_id, cost)
        self._share(lane, "", request.tenant_id, cost)

    def _remote_charge(self, lane: _VtcLane, gate: str, tenant_id: str, cost: float) -> None:
        if tenant_id in lane.counters:
            lane.counters[tenant_id] += cost

    def backlog_floors(self) -> dict[str, float]:
        floors = {name: lane.local_floor() for name, lane in self._lanes.items()}
        return {name: floor for name, floor in floors.items() if floor is not None}

    def idle_floors(self) -> dict[str, float]:
        floors = {name: lane.idle_floor() for name, lane in self._lanes.items()}
        return {name: floor for name, floor in floors.items() if floor is not None}

    def set_remote_floors(self, floors: dict[str, float], idle: dict[str, float]) -> None:
        for name, lane in self._lanes.items():
            lane.remote_floor = floors.get(name)
            lane.remote_idle = idle.get(name)

    def _charge_prompt(self, entry: Entry, worker_id: str | None, num_cached: int) -> None:
        self._charge(entry, self.settings.w_in * entry.request.num_prompt_tokens)

    def _charge_output(self, flight: Flight, num_tokens: int) -> None:
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
