"""FCFS: first come, first served, with least-loaded placement (``gateway.scheduler.place``).
Torch-free."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from gateway.scheduler import Decision, QueuedRequest, TenantState, WorkerView, place

__all__ = ["FcfsPolicy"]


class FcfsPolicy:
    """First come, first served; demoted requests only when no other request waits. Strict: the
    head waits for room rather than letting later requests pass it."""

    name = "fcfs"

    def __init__(self) -> None:
        self._queue: deque[QueuedRequest] = deque()
        self._demoted: deque[QueuedRequest] = deque()

    def enqueue(self, request: QueuedRequest, now: float) -> None:
        (self._demoted if request.demoted else self._queue).append(request)

    def requeue(self, request: QueuedRequest, now: float) -> None:
        (self._demoted if request.demoted else self._queue).appendleft(request)

    def remove(self, request_id: str) -> QueuedRequest | None:
        for queue in (self._queue, self._demoted):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    return request
        return None

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
    ) -> list[Decision]:
        placements: list[Decision] = []
        for queue in (self._queue, self._demoted):
            while queue:
                placement = place(queue[0], prefill, decode)
                if placement is None:
                    return placements
                queue.popleft()
                placements.append(placement)
        return placements

    def on_first_token(self, request: QueuedRequest, num_cached_tokens: int, now: float) -> None:
        pass

    def on_tokens(self, request: QueuedRequest, num_tokens: int, now: float) -> None:
        pass

    def on_finish(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        pass

    def on_evicted(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        pass

    def update_tenant(self, tenant_id: str, weight: float) -> None:
        pass

    def queued(self) -> int:
        return len(self._queue) + len(self._demoted)

    def tenants(self) -> list[TenantState]:
        counts: dict[str, int] = {}
        for queue in (self._queue, self._demoted):
            for request in queue:
                counts[request.tenant_id] = counts.get(request.tenant_id, 0) + 1
        return [TenantState(tenant_id, count, 0.0) for tenant_id, count in counts.items()]

    def counter(self, tenant_id: str) -> float:
        return 0.0
