"""The scheduler interface (the policies behind it are ``gateway.policies``), and what every
policy shares: least-loaded placement (``place``) and the make-room decision (``RoomAsks``).

A policy is pure: it holds the queue (its own state), and on ``schedule`` takes a snapshot of the
workers and returns decisions: which queued requests go where now (``Placement``), which end
(``Rejection``), and which decode worker to ask for room (``MakeRoom``). It never awaits, never
does I/O, never reads the clock (``now`` is passed in); the "do" side of its decisions is
``gateway.core``, which the gateway (``gateway.dispatch.Dispatcher``) and the simulator
(``bench.sim``) share.

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

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "ROOM_RETRY_S",
    "Decision",
    "MakeRoom",
    "ModelBacklog",
    "Placement",
    "QueuedRequest",
    "Rejection",
    "RoomAsks",
    "SchedulingPolicy",
    "Shed",
    "TenantState",
    "TpotGuard",
    "WorkerView",
    "has_prefill_room",
    "keeps_tpot",
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
    caller sets it, a policy only reads it. ``model``: the model whose pool serves it (""
    where there is one); ``cost_factor``: what a token of that model costs in the reference
    model's tokens, fixed at admission (the policies charge §1's cost times it)."""

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
    tpot_target_s: float | None = None  # its class's, set by the caller like ``rank``
    model: str = ""
    cost_factor: float = 1.0


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
    # prefill: the longest prompt in flight there (0: none). A shorter prompt is not held back
    # by it (``has_prefill_room``).
    longest_inflight_tokens: int = 0
    # decode: requests in flight there by class rank (what ``MakeRoom`` could preempt), and the
    # rank up to which it may not be asked to make room now (``gateway.core``; -1: any rank).
    ranks_inflight: dict[int, int] = field(default_factory=dict)
    room_refused_rank: int = -1
    # decode: its step time, ``decode_base_s + decode_token_s × num_context_tokens`` (the
    # tokens its batch holds, with what was placed there since its report); None: unmeasured.
    decode_base_s: float | None = None
    decode_token_s: float = 0.0
    num_context_tokens: int = 0

    def decode_step_s(self, more_tokens: int = 0) -> float | None:
        """Its decode step time with ``more_tokens`` more in its batch; None: unmeasured."""
        if self.decode_base_s is None:
            return None
        return self.decode_base_s + self.decode_token_s * (self.num_context_tokens + more_tokens)


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


@dataclass(frozen=True, slots=True)
class MakeRoom:
    """Decision: ask the decode worker ``decode_worker_id`` to preempt requests less important
    than ``request`` until ``num_tokens`` KV tokens and a batch slot are free for it, and hold
    them a while (``scheduling.md`` §6). ``request`` stays queued."""

    request: QueuedRequest
    decode_worker_id: str
    num_tokens: int


class Shed(Exception):
    """Raised by ``enqueue`` for a sheddable request that cannot meet its deadline."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Decision = Placement | Rejection | MakeRoom


@dataclass(frozen=True, slots=True)
class TenantState:
    """A tenant as a policy sees it, for metrics and the simulator. ``counter``: its VTC counter
    or accumulated normalized service (per class where the policy keeps one per class, the
    sum here); ``deficit``: its DLPM deficit (0 for policies without one)."""

    tenant_id: str
    num_queued: int
    counter: float
    deficit: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelBacklog:
    """One model's queue: requests and prompt tokens waiting, and the estimated wait of a
    request arriving now (what is queued ahead at the pool's measured prefill speed; None:
    the policy has no estimate)."""

    model: str
    num_queued: int
    num_queued_tokens: int
    est_wait_s: float | None


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
        *,
        model: str = "",
    ) -> list[Decision]:
        """Decisions for now, for the requests of ``model`` on its pool's workers (a policy of
        one pool ignores it: ``gateway.policies.per_model`` keeps one per model). ``prefill``
        empty means colocated decode workers prefill. A ``MakeRoom`` leaves its request
        queued."""

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

    def set_block_size(self, block_size: int) -> None:
        """The workers' KV block size (their ``WorkerInfo``), the prefix index's granularity;
        known before the first request."""

    def queued(self) -> int: ...

    def backlog_estimate(self) -> tuple[int, int, float | None]:
        """Requests and prompt tokens queued, and the estimated wait of a request arriving
        now (None: the policy has no estimate)."""

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
    it outranks everything in flight there. And the longest prompt in flight does not count
    against a shorter one (PecSched, ``scheduling.md`` §6): the worker runs the shorter
    prompt's chunks ahead of a longer one's of the same tenant and class
    (``engine.preemption.prefill_order``), so holding it here would only make it wait the
    long prompt's whole prefill. A worker whose in-flight work is one long prompt takes a
    shorter one as an idle worker would; still at most the cap besides that prompt."""
    inflight = worker.inflight_tokens
    num_tokens = request.num_prompt_tokens
    if inflight == 0 or inflight + num_tokens <= worker.max_inflight_tokens:
        return True
    if outranks(request, worker):
        return True
    longest = worker.longest_inflight_tokens
    if 0 < num_tokens < longest:
        rest = inflight - longest
        return rest == 0 or rest + num_tokens <= worker.max_inflight_tokens
    return False


@dataclass(frozen=True, slots=True)
class TpotGuard:
    """The tightest TPOT target among the SLO classes active now (``floor_s``), and the decode
    step time lower classes may push a worker to (``step_limit_s``: the floor less a margin)."""

    floor_s: float
    step_limit_s: float


def keeps_tpot(request: QueuedRequest, worker: WorkerView, guard: TpotGuard | None) -> bool:
    """The TPOT guard (``scheduling.md`` §5): a request of a class without a TPOT target, or
    with a looser one than the tightest among the classes active now, may go to a decode worker
    only if its predicted step time with the request's prompt added stays within the guard's
    ``step_limit_s``. Every request on a decode worker decodes in its steps, so a batch request
    that slows them takes the interactive requests' time per token; held back, it fills only
    what they leave. A worker whose speed is unmeasured, or that holds nothing, takes it; so
    does every worker a request of the tightest class itself (it is routed to the lightest)."""
    if guard is None or (
        request.tpot_target_s is not None and request.tpot_target_s <= guard.floor_s
    ):
        return True
    if worker.num_context_tokens == 0:
        return True
    step_s = worker.decode_step_s(request.num_prompt_tokens)
    return step_s is None or step_s <= guard.step_limit_s


def place(
    request: QueuedRequest,
    prefill: Sequence[WorkerView],
    decode: Sequence[WorkerView],
    *,
    tpot_guard: TpotGuard | None = None,
) -> Placement | None:
    """Least-loaded placement, updating the chosen views; None if no pair has room. The decode
    worker: among those with KV for the prompt that the TPOT guard lets it go to
    (``keeps_tpot``), the one with the shortest predicted step for a request whose class has a
    TPOT target (the lightest batch), else the one with the most free KV."""
    needed_kv = request.num_prompt_tokens + 1
    decode_candidates = [
        w for w in decode if w.free_kv_tokens >= needed_kv and keeps_tpot(request, w, tpot_guard)
    ]
    if not decode_candidates:
        return None
    if request.tpot_target_s is not None and all(
        w.decode_base_s is not None for w in decode_candidates
    ):
        decode_worker = min(
            decode_candidates,
            key=lambda w: (w.decode_step_s(request.num_prompt_tokens), -w.free_kv_tokens),
        )
    else:
        decode_worker = max(decode_candidates, key=lambda w: w.free_kv_tokens)
    prefill_worker: WorkerView | None = None
    if prefill:
        prefill_candidates = [w for w in prefill if has_prefill_room(request, w)]
        if not prefill_candidates:
            return None
        prefill_worker = min(prefill_candidates, key=lambda w: w.inflight_tokens)
        prefill_worker.inflight_tokens += request.num_prompt_tokens
        prefill_worker.longest_inflight_tokens = max(
            prefill_worker.longest_inflight_tokens, request.num_prompt_tokens
        )
        prefill_worker.max_inflight_rank = max(
            request.rank,
            request.rank
            if prefill_worker.max_inflight_rank is None
            else prefill_worker.max_inflight_rank,
        )
    decode_worker.free_kv_tokens -= needed_kv
    decode_worker.num_context_tokens += needed_kv
    if decode_worker.free_slots is not None:
        decode_worker.free_slots -= 1
        if decode_worker.free_slots <= 0:
            decode_worker.free_kv_tokens = 0  # every policy's "does it fit" sees it full
    return Placement(
        request,
        None if prefill_worker is None else prefill_worker.worker_id,
        decode_worker.worker_id,
    )


ROOM_RETRY_S = 5.0  # the workers' default room hold: ask again for a request after this long


class RoomAsks:
    """The make-room decision every policy returns (``MakeRoom``): when the most important
    waiting request fits on no decode worker, and a decode worker runs requests of a lower
    class, ask that worker (the one with the most lower-class requests) to make room for it.
    At most one ask per request every ``ROOM_RETRY_S``; workers the views mark as not to be
    asked for that rank (``WorkerView.room_refused_rank``) are left out."""

    def __init__(self) -> None:
        self._asked_until: dict[str, float] = {}  # by request id

    def decide(
        self, top: Iterable[QueuedRequest], decode: Sequence[WorkerView], now: float
    ) -> MakeRoom | None:
        """``top``: the waiting requests of the highest class rank queued (one rank). Which
        workers could be asked is looked at first: that is a few views, where the requests
        are a queue, and every pass asks."""
        requests = iter(top)
        first = next(requests, None)
        if first is None:
            return None
        rank = first.rank
        workers = [
            w
            for w in decode
            if w.room_refused_rank < rank and min(w.ranks_inflight, default=rank) < rank
        ]
        if not workers:
            return None
        candidates: list[QueuedRequest] = [
            r
            for r in itertools.chain((first,), requests)
            if self._asked_until.get(r.request_id, 0.0) <= now
        ]
        if not candidates:
            return None
        request = min(candidates, key=lambda r: r.arrival)
        needed = request.num_prompt_tokens + 1
        if any(w.free_kv_tokens >= needed for w in decode):
            return None  # it fits somewhere: it waits for the prefill side or its turn
        worker = max(workers, key=lambda w: sum(n for r, n in w.ranks_inflight.items() if r < rank))
        self._asked_until[request.request_id] = now + ROOM_RETRY_S
        return MakeRoom(request, worker.worker_id, needed)

    def forget(self, request_id: str) -> None:
        """The request left the queue."""
        self._asked_until.pop(request_id, None)
