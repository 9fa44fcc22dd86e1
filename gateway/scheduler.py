"""The scheduler interface, and the first policy behind it: FCFS with least-loaded placement.

A policy is pure: it holds the queue (its own state), and on ``schedule`` takes a snapshot of the
workers and returns decisions: which queued requests go where now. It never awaits, never does
I/O, never reads the clock (``now`` is passed in), so the same class runs in the gateway (driven
by ``gateway.dispatch.Dispatcher``) and in a simulator.

Placement, shared by every policy (``place``): the prefill worker with the fewest tokens in
flight that still has room under ``max_inflight_tokens`` (an idle worker always has room, so one
long prompt is never stuck), and the decode worker with the most free KV token slots that can
hold the prompt. Work is held in the gateway's queue, not pushed into the workers', so a policy
decides the order in which requests reach the engines.

What is safe to call when: every method runs on the gateway's event loop, one at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "FcfsPolicy",
    "Placement",
    "QueuedRequest",
    "SchedulingPolicy",
    "WorkerView",
    "place",
]


@dataclass(slots=True, eq=False)
class QueuedRequest:
    """A request waiting for workers. ``demoted``: over quota under the ``demote`` policy,
    served only with spare capacity."""

    request_id: str
    tenant_id: str
    slo_class: str
    weight: float
    arrival: float  # seconds, on the clock the caller passes as ``now``
    num_prompt_tokens: int
    max_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    demoted: bool = False


@dataclass(slots=True)
class WorkerView:
    """What a policy sees of a worker. ``inflight_tokens``: prefill tokens placed there and not
    yet answered; ``free_kv_tokens``: decode KV slots free. Policies copy and update these while
    placing several requests in one ``schedule``."""

    worker_id: str
    inflight_tokens: int = 0
    max_inflight_tokens: int = 0
    free_kv_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Decision: run ``request`` on these workers (``prefill_worker_id`` is None when the decode
    worker is colocated and prefills itself)."""

    request: QueuedRequest
    prefill_worker_id: str | None
    decode_worker_id: str


class SchedulingPolicy(Protocol):
    """A queueing and placement policy. ``schedule`` removes what it places from the queue."""

    name: str

    def enqueue(self, request: QueuedRequest, now: float) -> None: ...

    def requeue(self, request: QueuedRequest, now: float) -> None:
        """Put back a request that was placed but could not start (e.g. the decode worker had no
        room after all): it keeps its place ahead of later arrivals."""

    def remove(self, request_id: str) -> QueuedRequest | None:
        """Take a request out of the queue (its client went away, or it timed out)."""

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
    ) -> list[Placement]:
        """Decisions for now. ``prefill`` empty means colocated decode workers prefill."""

    def on_finish(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        """The request ended (for accounting)."""

    def update_tenant(self, tenant_id: str, weight: float) -> None:
        """The tenant's weight changed (admin API)."""

    def queued(self) -> int: ...


def place(
    request: QueuedRequest, prefill: Sequence[WorkerView], decode: Sequence[WorkerView]
) -> Placement | None:
    """Least-loaded placement, updating the chosen views; None if no pair has room."""
    needed_kv = request.num_prompt_tokens + 1
    decode_candidates = [w for w in decode if w.free_kv_tokens >= needed_kv]
    if not decode_candidates:
        return None
    decode_worker = max(decode_candidates, key=lambda w: w.free_kv_tokens)
    prefill_worker: WorkerView | None = None
    if prefill:
        prefill_candidates = [
            w
            for w in prefill
            if w.inflight_tokens == 0
            or w.inflight_tokens + request.num_prompt_tokens <= w.max_inflight_tokens
        ]
        if not prefill_candidates:
            return None
        prefill_worker = min(prefill_candidates, key=lambda w: w.inflight_tokens)
        prefill_worker.inflight_tokens += request.num_prompt_tokens
    decode_worker.free_kv_tokens -= needed_kv
    return Placement(
        request,
        None if prefill_worker is None else prefill_worker.worker_id,
        decode_worker.worker_id,
    )


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
    ) -> list[Placement]:
        placements: list[Placement] = []
        for queue in (self._queue, self._demoted):
            while queue:
                placement = place(queue[0], prefill, decode)
                if placement is None:
                    return placements
                queue.popleft()
                placements.append(placement)
        return placements

    def on_finish(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        pass

    def update_tenant(self, tenant_id: str, weight: float) -> None:
        pass

    def queued(self) -> int:
        return len(self._queue) + len(self._demoted)
