"""Several models behind one gateway: one policy per model's pool, fair per tenant across them.
Torch-free.

Each model has its own workers (a prefill worker only pairs with a decode worker of its model),
so placement is per pool: the dispatcher calls ``schedule`` once per model with that pool's
workers (``model=``), and each model's requests wait in that model's policy, whose queues, room
and in-flight accounting are that pool's alone. A tenant's request stuck on a full large model
does not hold its requests for an idle small one.

Fairness is per tenant across models: the policies of one SLO class share that class's service
book (``gateway.policies.service_book``), charged in normalized units (a model's cost factor
times §1's cost, over the weight: ``QueuedRequest.cost_factor``). So a tenant that moves its
traffic to the expensive model is charged more per token, and one served on two models meets
the others on either with its whole service: under VTC the order is by that counter; under
DLPM, whose deficits are each pool's, a tenant more than ``max_borrow_tokens`` ahead of the
least counter queued in a pool waits there (``DlpmPolicy._sweep``).

Shared with other gateway replicas (``gateway.replica_sync``): service deltas carry the model in
their gate (``model<TAB>gate``); floors are the shared books'.

Not here: QLM's model swap (a colocated worker told to load another model when one queue grows
and another pool idles). Its inputs are here (``backlogs``), the decision and the worker's
reload are not built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from gateway.policies.base import FairPolicy
from gateway.policies.service_book import (
    ServiceBook,
    idle_floors,
    set_remote_floors,
    shared_floors,
)
from gateway.scheduler import (
    Decision,
    ModelBacklog,
    QueuedRequest,
    SchedulingPolicy,
    TenantState,
    WorkerView,
)

__all__ = ["PerModelPolicy"]

GATE_SEPARATOR = "\t"


class PerModelPolicy:
    """A ``SchedulingPolicy`` over several models' pools (module docstring): ``name``'s
    policies, one per model, ``make(books)`` making one that shares ``books`` (by class), at a
    model's first request."""

    def __init__(
        self, name: str, make: Callable[[dict[str, ServiceBook]], SchedulingPolicy]
    ) -> None:
        self.name = name
        self._make = make
        self._books: dict[str, ServiceBook] = {}
        self._policies: dict[str, SchedulingPolicy] = {}
        self._weights: dict[str, float] = {}  # update_tenant's, for policies made later
        self._block_size: int | None = None
        self._is_shared = False

    def policy(self, model: str) -> SchedulingPolicy:
        """The policy of ``model``'s pool (made on first use)."""
        policy = self._policies.get(model)
        if policy is None:
            policy = self._policies[model] = self._make(self._books)
            for tenant_id, weight in self._weights.items():
                policy.update_tenant(tenant_id, weight)
            if self._block_size is not None:
                policy.set_block_size(self._block_size)
            if self._is_shared:
                _sharing(policy)  # (nothing charged yet: no deltas lost)
        return policy

    def models(self) -> list[str]:
        return list(self._policies)

    # ---- SchedulingPolicy ------------------------------------------------------------------

    def enqueue(self, request: QueuedRequest, now: float) -> None:
        self.policy(request.model).enqueue(request, now)

    def requeue(self, request: QueuedRequest, now: float) -> None:
        self.policy(request.model).requeue(request, now)

    def remove(self, request_id: str) -> QueuedRequest | None:
        for policy in self._policies.values():
            request = policy.remove(request_id)
            if request is not None:
                return request
        return None

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
        *,
        model: str = "",
    ) -> list[Decision]:
        return self.policy(model).schedule(prefill, decode, now, model=model)

    def on_first_token(self, request: QueuedRequest, num_cached_tokens: int, now: float) -> None:
        self.policy(request.model).on_first_token(request, num_cached_tokens, now)

    def on_tokens(self, request: QueuedRequest, num_tokens: int, now: float) -> None:
        self.policy(request.model).on_tokens(request, num_tokens, now)

    def on_finish(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        self.policy(request.model).on_finish(request, num_output_tokens, now)

    def on_evicted(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        for policy in self._policies.values():  # (only its model's indexes the worker)
            policy.on_evicted(worker_id, block_hashes)

    def update_tenant(self, tenant_id: str, weight: float) -> None:
        self._weights[tenant_id] = weight
        for policy in self._policies.values():
            policy.update_tenant(tenant_id, weight)

    def set_block_size(self, block_size: int) -> None:
        self._block_size = block_size
        for policy in self._policies.values():
            policy.set_block_size(block_size)

    def queued(self) -> int:
        return sum(policy.queued() for policy in self._policies.values())

    def tenants(self) -> list[TenantState]:
        """Each tenant once: its requests queued on every model, its counter (``counter``) and
        its deficits summed."""
        queued: dict[str, int] = {}
        deficits: dict[str, float] = {}
        for policy in self._policies.values():
            for state in policy.tenants():
                queued[state.tenant_id] = queued.get(state.tenant_id, 0) + state.num_queued
                deficits[state.tenant_id] = deficits.get(state.tenant_id, 0.0) + state.deficit
        return [
            TenantState(tenant_id, queued[tenant_id], self.counter(tenant_id), deficits[tenant_id])
            for tenant_id in sorted(queued)
        ]

    def counter(self, tenant_id: str) -> float:
        """With one model, its policy's; with several, the tenant's normalized service on all
        of them (the shared books), or, for a policy without books, the sum of its policies'."""
        if len(self._policies) == 1:
            return next(iter(self._policies.values())).counter(tenant_id)
        if self._books:
            return sum(book.counters.get(tenant_id, 0.0) for book in self._books.values())
        return sum(policy.counter(tenant_id) for policy in self._policies.values())

    def backlog_estimate(self) -> tuple[int, int, float | None]:
        """Every model's queue together; the wait of the model whose queue waits longest."""
        backlogs = self.backlogs()
        waits = [b.est_wait_s for b in backlogs if b.est_wait_s is not None]
        return (
            sum(b.num_queued for b in backlogs),
            sum(b.num_queued_tokens for b in backlogs),
            max(waits) if waits else None,
        )

    def backlogs(self) -> list[ModelBacklog]:
        """Each model's queue and estimated wait (QLM's per-model view)."""
        return [
            ModelBacklog(model, *policy.backlog_estimate())
            for model, policy in self._policies.items()
        ]

    # ---- gateway replicas (``gateway.replica_sync.ServiceSharing``) -------------------------

    def take_service_deltas(self) -> dict[tuple[str, str, str], float]:
        self._is_shared = True
        deltas: dict[tuple[str, str, str], float] = {}
        for model, policy in self._policies.items():
            for (class_name, gate, tenant_id), cost in _sharing(policy).items():
                deltas[(class_name, f"{model}{GATE_SEPARATOR}{gate}", tenant_id)] = cost
        return deltas

    def apply_remote_service(self, deltas: dict[tuple[str, str, str], float]) -> None:
        by_model: dict[str, dict[tuple[str, str, str], float]] = {}
        for (class_name, model_gate, tenant_id), cost in deltas.items():
            if GATE_SEPARATOR not in model_gate:
                # A replica of a version without models: which pool it served is unknown, and
                # a policy made for "" would count as a second pool here. Its deltas wait for
                # its upgrade; the counters meet again through the floors meanwhile.
                continue
            model, _, gate = model_gate.rpartition(GATE_SEPARATOR)
            by_model.setdefault(model, {})[(class_name, gate, tenant_id)] = cost
        for model, of_model in by_model.items():
            policy = self.policy(model)
            if isinstance(policy, FairPolicy):
                policy.apply_remote_service(of_model)

    def backlog_floors(self) -> dict[str, float]:
        return shared_floors(self._named_books())

    def idle_floors(self) -> dict[str, float]:
        return idle_floors(self._named_books())

    def set_remote_floors(self, floors: dict[str, float], idle: dict[str, float]) -> None:
        set_remote_floors(self._named_books(), floors, idle)

    def _named_books(self) -> Iterator[tuple[str, ServiceBook]]:
        return iter(list(self._books.items()))


def _sharing(policy: SchedulingPolicy) -> dict[tuple[str, str, str], float]:
    """The policy's service deltas since the last call (none for one that shares nothing)."""
    return policy.take_service_deltas() if isinstance(policy, FairPolicy) else {}
