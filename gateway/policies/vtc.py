"""VTC, the Virtual Token Counter (``scheduling.md`` §2), with the lift rule. Torch-free."""

from __future__ import annotations

import heapq
import math
from typing import cast

from gateway.config import SloClass
from gateway.policies.base import Entry, FairPolicy, Flight, Lane, Pass
from gateway.policies.service_book import ServiceBook
from gateway.scheduler import QueuedRequest, place


class _VtcLane(Lane):
    """VTC state of one class: its service book (``ServiceBook``) is the counters."""

    __slots__ = ()

    def __init__(self, slo: SloClass, book: ServiceBook) -> None:
        super().__init__(slo)
        self.book: ServiceBook = book


class VtcPolicy(FairPolicy[_VtcLane, Entry]):
    """Virtual Token Counter (§2): the head of the backlogged tenant with the least counter,
    ties to the earlier head. Placement by load (``place``); no prefix index, so
    ``Placement.num_cached_tokens`` is 0. A tenant whose head does not fit waits for this pass
    (FIFO within a tenant) while the others go on."""

    name = "vtc"

    def _new_lane(self, slo: SloClass) -> _VtcLane:
        return _VtcLane(slo, self._book_of(slo))

    def _new_entry(
        self, request: QueuedRequest, lane: _VtcLane, deadline: float, *, is_charged: bool
    ) -> Entry:
        return Entry(request, lane, deadline, is_charged)

    def _joined(self, lane: _VtcLane, tenant_id: str) -> None:
        # The lift: c[u] = max(c[u], min c[v] over other backlogged v), else the last leaver's.
        self._lift(lane, tenant_id)

    def _left(self, lane: _VtcLane, tenant_id: str) -> None:
        lane.book.left(tenant_id)

    def _serve(self, lane: _VtcLane, run: Pass) -> None:
        counters = lane.book.counters
        heap = [(counters[t], lane.head(t).request.arrival, t) for t in lane.queues]
        heapq.heapify(heap)
        blocked_counter = math.inf  # the least counter whose head could not be placed
        while heap and run.has_room():
            counter, _, tenant_id = heapq.heappop(heap)
            if self._is_held_back_elsewhere(lane, tenant_id):
                return  # (so is every tenant left: they are further ahead)
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
                heapq.heappush(heap, (counters[tenant_id], head.request.arrival, tenant_id))

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
        cost *= self._unit(request)
        lane = cast(_VtcLane, entry.lane)
        lane.book.charge(request.tenant_id, cost)
        self._add_service(request.tenant_id, cost)
        self._share(lane, "", request.tenant_id, cost)

    def _remote_charge(self, lane: _VtcLane, gate: str, tenant_id: str, cost: float) -> None:
        lane.book.remote_charge(tenant_id, cost)

    def _charge_prompt(self, entry: Entry, worker_id: str | None, num_cached: int) -> None:
        self._charge(entry, self.settings.w_in * entry.request.num_prompt_tokens)

    def _charge_output(self, flight: Flight, num_tokens: int) -> None:
        self._charge(flight.entry, self.settings.w_out * num_tokens)

    def _can_forget(self, tenant_id: str) -> bool:
        return all(lane.book.can_forget(tenant_id) for lane in self._lanes.values())

    def _forget(self, tenant_id: str) -> None:
        for lane in self._lanes.values():
            lane.book.forget(tenant_id)

    def _counter(self, tenant_id: str) -> float:
        return sum(lane.book.counters.get(tenant_id, 0.0) for lane in self._lanes.values())
