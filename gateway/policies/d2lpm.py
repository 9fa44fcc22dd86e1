"""D²LPM (``scheduling.md`` §4): DLPM at each worker plus a (tenant, worker) deficit for
placement. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies.base import DEFAULT_BLOCK_SIZE, Entry, Flight, Pass
from gateway.policies.dlpm import DlpmEntry, DlpmPolicy
from gateway.policies.service_book import ServiceBook
from gateway.scheduler import WorkerView


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
    (the same total); the router deficits restart at 0 when the tenant is idle, nothing queued
    or in flight (``_became_idle``; they refill themselves, so a debt kept meanwhile only
    moves the tenant between workers, never holds it back); and the hot-spot margin includes
    what the prefix saves (``_choose_worker``)."""

    name = "d2lpm"

    def __init__(
        self,
        settings: SchedulerSection | None = None,
        slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        books: dict[str, ServiceBook] | None = None,
    ) -> None:
        super().__init__(settings, slo_classes, block_size=block_size, books=books)
        self._route: dict[str, dict[str, float]] = {}  # tenant -> worker -> q[u][w]

    def _gate_key(self, worker_id: str) -> str:
        return worker_id

    def _became_idle(self, tenant_id: str) -> None:
        super()._became_idle(tenant_id)
        # Idle: its router deficits restart at 0 on return, as DLPM's do (§3). Kept, they
        # would carry the debt of a tenant that sends within its share from one visit to the
        # next and push it off the worker holding its prefixes (the bound is about backlogged
        # tenants only).
        self._route.pop(tenant_id, None)

    def _pick_worker(self, entry: DlpmEntry, run: Pass) -> WorkerView | None:
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

    def _refill_route(self, entry: DlpmEntry, run: Pass) -> bool:
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
        self, entry: DlpmEntry, candidates: list[WorkerView], run: Pass
    ) -> tuple[list[WorkerView], bool]:
        # The choice is among the workers with router credit, or the least loaded with room.
        is_refilled = self._refill_route(entry, run)
        route = self._route[entry.request.tenant_id]
        # (A worker it has no deficit at yet, one that came up or restarted under a new id
        # since its last refill, has no credit there: reachable only as the least loaded.)
        reachable = [w for w in run.locality if route.get(w.worker_id, 0.0) > 0]
        least = min(candidates, key=self._load_key)
        if least not in reachable:
            reachable.append(least)
        return reachable, is_refilled

    def _choose_worker(
        self, entry: DlpmEntry, candidates: list[WorkerView], run: Pass
    ) -> WorkerView:
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
        with_credit = [w for w in run.locality if route.get(w.worker_id, 0.0) > 0]  # A
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

    def _route_charge(self, entry: Entry, worker_id: str | None, cost: float) -> None:
        route = self._route.get(entry.request.tenant_id)
        if route is not None and worker_id is not None:
            route[worker_id] = route.get(worker_id, 0.0) - cost * self._unit(entry.request)

    def _charge_prompt(self, entry: DlpmEntry, worker_id: str | None, num_cached: int) -> None:
        super()._charge_prompt(entry, worker_id, num_cached)
        uncached = entry.request.num_prompt_tokens - num_cached
        self._route_charge(entry, worker_id, self.settings.w_in * uncached)

    def _correct_prompt(self, flight: Flight, num_cached_tokens: int) -> None:
        missed = flight.num_expected_cached - num_cached_tokens
        super()._correct_prompt(flight, num_cached_tokens)
        self._route_charge(flight.entry, flight.worker_id, self.settings.w_in * missed)

    def _charge_output(self, flight: Flight, num_tokens: int) -> None:
        super()._charge_output(flight, num_tokens)
        self._route_charge(flight.entry, flight.worker_id, self.settings.w_out * num_tokens)

    def _forget(self, tenant_id: str) -> None:
        super()._forget(tenant_id)
        self._route.pop(tenant_id, None)
