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

The life of a request in a policy (``scheduling.md``)::

    enqueue ──schedule──▶ placed ──on_first_token──▶ decoding ──on_tokens…──▶ on_finish
       │  └─ Shed (sheddable, cannot meet its deadline)      (on_finish also ends a request
       └─ remove (caller gone / timed out); requeue (placed, could not start)   at any stage)

Charges (``scheduling.md`` §1) happen as the work does: prompt tokens at placement (corrected
at ``on_first_token`` with the tokens the worker actually found cached), ``w_out`` per generated
token in ``on_tokens``; ``on_finish`` reconciles to the final count.

What is safe to call when: every method runs on the gateway's event loop, one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "Decision",
    "Placement",
    "QueuedRequest",
    "Rejection",
    "SchedulingPolicy",
    "Shed",
    "TenantState",
    "WorkerView",
    "has_prefill_room",
    "outranks",
    "place",
]


@dataclass(slots=True, eq=False)
class QueuedRequest:
    """A request waiting for workers. ``demoted``: over quota under the ``demote`` policy,
    served only with spare capacity (the lowest class, a small weight). ``cache_salt``: the
    tenant's prefix-cache scope, the root of its block hash chains (``engine.block_manager``).
    ``num_output_tokens``: tokens already generated (non-zero for a request handed back by a
    ``recompute`` preemption, whose prompt then includes them). ``rank``: the rank of the SLO
    class it is served in (the lowest when demoted), which the workers order and preempt by; the
    caller sets it, a policy only reads it."""

    request_id: str
    tenant_id: str
    slo_class: str
    weight: float
    arrival: float  # seconds, on the clock the caller passes as ``now``
    num_prompt_tokens: int
    max_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    demoted: bool = False
    cache_salt: bytes = b""
    num_output_tokens: int = 0
    rank: int = 0


@dataclass(slots=True)
class WorkerView:
    """What a policy sees of a worker. ``inflight_tokens``: prompt tokens placed there and not
    yet computed (its load, ``scheduling.md`` §4); ``free_kv_tokens``: decode KV slots free;
    ``prefill_tok_s``: its measured prefill throughput, None until measured. Policies copy and
    update these while placing several requests in one ``schedule``."""

    worker_id: str
    inflight_tokens: int = 0
    max_inflight_tokens: int = 0
    free_kv_tokens: int = 0
    prefill_tok_s: float | None = None
    free_slots: int | None = None  # decode: batch slots left (None: no limit known)
    # prefill: the highest SLO class rank among the prompts in flight there (None: none). A
    # request of a higher class is not held back by ``max_inflight_tokens``: the worker runs
    # the most important chunk first, so it goes ahead of everything there (``outranks``).
    max_inflight_rank: int | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Decision: run ``request`` on these workers (``prefill_worker_id`` is None when the decode
    worker is colocated and prefills itself). ``num_cached_tokens``: the prefix the policy
    expects the prefill worker to hold (0 when it keeps no index)."""

    request: QueuedRequest
    prefill_worker_id: str | None
    decode_worker_id: str
    num_cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Rejection:
    """Decision: end ``request`` now with ``reason`` (a sheddable request that can no longer
    make its TTFT deadline). The caller answers 503."""

    request: QueuedRequest
    reason: str


class Shed(Exception):
    """Raised by ``enqueue`` for a sheddable request that cannot meet its deadline."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Decision = Placement | Rejection


@dataclass(frozen=True, slots=True)
class TenantState:
    """A tenant as a policy sees it, for metrics and the simulator. ``counter``: its VTC counter
    or accumulated normalized service (per class where the policy keeps one per class, the
    sum here); ``deficit``: its DLPM deficit (0 for policies without one)."""

    tenant_id: str
    num_queued: int
    counter: float
    deficit: float = 0.0


class SchedulingPolicy(Protocol):
    """A queueing and placement policy. ``schedule`` removes what it places from the queue."""

    name: str

    def enqueue(self, request: QueuedRequest, now: float) -> None:
        """A new arrival; ``Shed`` when it is sheddable and cannot make its deadline."""

    def requeue(self, request: QueuedRequest, now: float) -> None:
        """Put back a request that was placed but could not start (e.g. the decode worker had no
        room after all) or was preempted: it keeps its original arrival and its place ahead of
        later arrivals, and what it was charged stays charged."""

    def remove(self, request_id: str) -> QueuedRequest | None:
        """Take a request out of the queue (its client went away, or it timed out)."""

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
    ) -> list[Decision]:
        """Decisions for now. ``prefill`` empty means colocated decode workers prefill."""

    def on_first_token(self, request: QueuedRequest, num_cached_tokens: int, now: float) -> None:
        """The prefill ended: the worker found ``num_cached_tokens`` of the prompt cached."""

    def on_tokens(self, request: QueuedRequest, num_tokens: int, now: float) -> None:
        """``num_tokens`` more output tokens were generated."""

    def on_finish(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        """The request ended, whatever the outcome, with ``num_output_tokens`` generated in
        all (those not yet reported by ``on_tokens`` are charged now)."""

    def on_evicted(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        """The worker evicted these prefix-cache blocks (its index is corrected)."""

    def update_tenant(self, tenant_id: str, weight: float) -> None:
        """The tenant's weight changed (admin API)."""

    def queued(self) -> int: ...

    def tenants(self) -> list[TenantState]:
        """Every tenant the policy knows."""

    def counter(self, tenant_id: str) -> float:
        """The tenant's ``TenantState.counter`` alone (0 for a tenant it does not know): asked
        on every placement, for the priority the workers order and preempt by."""


def outranks(request: QueuedRequest, worker: WorkerView) -> bool:
    """Whether ``request`` is of a higher class than every prompt in flight on the prefill
    ``worker`` (so its in-flight cap does not hold it back: see ``WorkerView``)."""
    return worker.max_inflight_rank is not None and request.rank > worker.max_inflight_rank


def has_prefill_room(request: QueuedRequest, worker: WorkerView) -> bool:
    """The room rule on a prefill worker: an idle worker always has room (a prompt longer
    than the cap must go somewhere); else the prompt must fit under the in-flight cap, unless
    it outranks everything in flight there."""
    return (
        worker.inflight_tokens == 0
        or worker.inflight_tokens + request.num_prompt_tokens <= worker.max_inflight_tokens
        or outranks(request, worker)
    )


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
        prefill_candidates = [w for w in prefill if has_prefill_room(request, w)]
        if not prefill_candidates:
            return None
        prefill_worker = min(prefill_candidates, key=lambda w: w.inflight_tokens)
        prefill_worker.inflight_tokens += request.num_prompt_tokens
        prefill_worker.max_inflight_rank = max(
            request.rank,
            request.rank
            if prefill_worker.max_inflight_rank is None
            else prefill_worker.max_inflight_rank,
        )
    decode_worker.free_kv_tokens -= needed_kv
    if decode_worker.free_slots is not None:
        decode_worker.free_slots -= 1
        if decode_worker.free_slots <= 0:
            decode_worker.free_kv_tokens = 0  # every policy's "does it fit" sees it full
    return Placement(
        request,
        None if prefill_worker is None else prefill_worker.worker_id,
        decode_worker.worker_id,
    )
