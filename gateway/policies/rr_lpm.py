"""rr_lpm: round-robin routing + longest prefix match at each worker, the locality-only baseline.
Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies.base import DEFAULT_BLOCK_SIZE, Lane, Pass, has_room, has_room_for_any
from gateway.policies.lpm import IndexedEntry, IndexedPolicy, LpmQueue
from gateway.policies.service_book import ServiceBook
from gateway.scheduler import Decision, QueuedRequest, WorkerView


class _RrLpmLane(Lane):
    """rr_lpm state of one class: per worker, the requests routed there, in LPM order at that
    worker."""

    __slots__ = ("by_worker",)

    def __init__(self, slo: SloClass) -> None:
        super().__init__(slo)
        self.by_worker: dict[str, LpmQueue[_RoutedEntry]] = {}


@dataclass(slots=True, eq=False)
class _RoutedEntry(IndexedEntry):
    routed_to: str | None = None  # the worker it was routed to


class RrLpmPolicy(IndexedPolicy[_RrLpmLane, _RoutedEntry]):
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
    and shedding are those of the other policies (``FairPolicy``): classes by rank, at-risk
    requests of lower classes first (on their worker), sheddable requests that cannot make
    their deadline rejected."""

    name = "rr_lpm"
    _orders_by_one_worker = True

    def __init__(
        self,
        settings: SchedulerSection | None = None,
        slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        books: dict[str, ServiceBook] | None = None,
    ) -> None:
        super().__init__(settings, slo_classes, block_size=block_size, books=books)
        self._unrouted: list[_RoutedEntry] = []  # queued since the last pass, in arrival order
        self._num_routed = 0  # the round-robin cursor
        self._num_served = 0  # which worker's queue a pass serves first, round-robin too

    def _new_lane(self, slo: SloClass) -> _RrLpmLane:
        return _RrLpmLane(slo)

    def _new_entry(
        self, request: QueuedRequest, lane: _RrLpmLane, deadline: float, *, is_charged: bool
    ) -> _RoutedEntry:
        return _RoutedEntry(request, lane, deadline, is_charged)

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
        *,
        model: str = "",
    ) -> list[Decision]:
        self._route(prefill or decode)
        return super().schedule(prefill, decode, now, model=model)

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
            lane.by_worker.setdefault(worker_id, LpmQueue()).add(entry)
        self._unrouted = []

    def _longest(self, entry: _RoutedEntry) -> int:
        # The order a worker serves its requests in: the match at that worker.
        return 0 if entry.routed_to is None else self._cached_tokens(entry, entry.routed_to)

    def _lpm_queued(self, entry: _RoutedEntry) -> None:
        self._unrouted.append(entry)

    def _lpm_reordered(self, entry: _RoutedEntry) -> None:
        if entry.routed_to is not None:
            cast(_RrLpmLane, entry.lane).by_worker[entry.routed_to].is_unsorted = True

    def _dequeued_entry(self, entry: _RoutedEntry) -> None:
        super()._dequeued_entry(entry)
        if entry.routed_to is not None:
            queue = cast(_RrLpmLane, entry.lane).by_worker.get(entry.routed_to)
            if queue is not None:
                queue.num_gone += 1

    def _serve(self, lane: _RrLpmLane, run: Pass) -> None:
        self._refresh_orders(run)
        is_colocated = not run.prefill
        # The first worker's queue may take all the decode room a pass has: each worker is
        # first in turn.
        workers = run.locality
        start = self._num_served % len(workers) if workers else 0
        self._num_served += 1
        for worker in [*workers[start:], *workers[:start]]:
            queue = lane.by_worker.get(worker.worker_id)
            if queue is None or not has_room_for_any(
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
                elif not has_room(worker, request, is_colocated):
                    min_failed_tokens = request.num_prompt_tokens
                elif run.fits(entry):
                    self._dispatch_to(entry, worker, run)

    def _dispatch(self, entry: _RoutedEntry, run: Pass) -> bool:
        # An at-risk request goes first, but on the worker it was routed to.
        worker = next((w for w in run.locality if w.worker_id == entry.routed_to), None)
        if worker is None or not has_room(worker, entry.request, not run.prefill):
            return False  # its worker is full: no sign that the others are (not ``failed``)
        return self._dispatch_to(entry, worker, run)
