"""FCFS: first come, first served, with least-loaded placement (``gateway.scheduler.place``).
Torch-free."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from gateway.scheduler import Decision, QueuedRequest, RoomAsks, TenantState, WorkerView, place

__all__ = ["FcfsPolicy"]


class FcfsPolicy:
    """First come, first served; demoted requests only when no other request waits. Strict: the
    head waits for room rather than letting later requests pass it."""

    name = "fcfs"

    def __init__(self, *, make_room: bool = True) -> None:
        """``make_room``: return ``MakeRoom`` decisions (``RoomAsks``)."""
        self._queue: deque[QueuedRequest] = deque()
        self._demoted: deque[QueuedRequest] = deque()
        self._make_room = make_room
        self._room = RoomAsks()

    def enqueue(self, request: QueuedRequest, now: float) -> None:
        (self._demoted if request.demoted else self._queue).append(request)

    def requeue(self, request: QueuedRequest, now: float) -> None:
        (self._demoted if request.demoted else self._queue).appendleft(request)

    def remove(self, request_id: str) -> QueuedRequest | None:
        for queue in (self._queue, self._demoted):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._room.forget(request_id)
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
        decisions: list[Decision] = []
        for queue in (self._queue, self._demoted):
            while queue:
                placement = place(queue[0], prefill, decode)
                if placement is None:
                    break
                self._room.forget(queue.popleft().request_id)
                decisions.append(placement)
            if queue:
                break
        waiting = [*self._queue, *self._demoted]
        if waiting and self._make_room:
            top_rank = max(r.rank for r in waiting)
            room = self._room.decide((r for r in waiting if r.rank == top_rank), decode, now)
            if room is not None:
                decisions.append(room)
        return decisions

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

    def set_block_size(self, block_size: int) -> None:
        pass

    def queued(self) -> int:
        return len(self._queue) + len(self._demoted)

    def backlog_estimate(self) -> tuple[int, int, float | None]:
        """(FCFS measures no speed: no wait estimate.)"""
        num_tokens = sum(r.num_prompt_tokens for q in (self._queue, self._demoted) for r in q)
        return self.queued(), num_tokens, None

    def tenants(self) -> list[TenantState]:
        counts: dict[str, int] = {}
        for queue in (self._queue, self._demoted):
            for request in queue:
                counts[request.tenant_id] = counts.get(request.tenant_id, 0) + 1
        return [TenantState(tenant_id, count, 0.0) for tenant_id, count in counts.items()]

    def counter(self, tenant_id: str) -> float:
        return 0.0
