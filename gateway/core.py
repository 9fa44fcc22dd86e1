"""The scheduling core: what the gateway counts on each worker, and the "do" side of a policy's
decisions, shared by the gateway's dispatcher (``gateway.dispatch``) and the simulator
(``bench.sim``). Only the transport differs: real HTTP calls in one, simulated workers in the
other.

    policy.schedule(views) ──▶ Placement ──placed──▶ prefill_done ──▶ tokens_generated…
                          │                                        ──▶ decode_done / given_up
                          ├──▶ Rejection (the caller answers 503)
                          └──▶ MakeRoom  ──room_asked──▶ (the caller asks the worker) room_answered

``WorkerAccount`` is one worker as scheduling sees it: what it last reported (``WorkerInfo``,
``WorkerLoad``) and what was placed on it or ended there since, which a report does not count
yet. ``SchedulingCore`` turns accounts into the ``WorkerView``s a policy decides on (with the
prefill in-flight caps), keeps the accounts as decisions are carried out and requests progress,
and tells the policy what happened, in the same order in both callers.

The prefill cap (``SchedulingCore.prefill_cap``): work sent to a worker runs in the worker's
order; work held here runs in the policy's. So a prefill worker gets at most
``max_prefill_inflight_tokens`` prompt tokens, and no more than ``max_prefill_inflight_s`` of work
at its measured speed; an idle worker still takes any one prompt.

Make-room bookkeeping: one ``MakeRoom`` call per worker at a time; a worker that found no room
for a request of some rank is not asked again for ``ROOM_RETRY_S`` except for a higher rank
(which may preempt more); one whose call failed, by no one for as long. Views carry that as
``WorkerView.room_refused_rank``.

Torch-free; not thread-safe (one event loop, or the simulator's single thread).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.scheduler import (
    ROOM_RETRY_S,
    Decision,
    MakeRoom,
    Placement,
    QueuedRequest,
    SchedulingPolicy,
    WorkerView,
)
from transfer.messages import WorkerInfo, WorkerLoad

__all__ = ["SchedulingCore", "WorkerAccount"]

NO_REFUSAL = -1  # ``WorkerView.room_refused_rank`` of a worker that may be asked for any rank


@dataclass(slots=True, eq=False)
class WorkerAccount:
    """One worker as scheduling sees it. ``inflight_*``: requests placed here whose stage on
    this worker has not ended (prefill: until the first token; decode: until the last), and
    their class ranks (``ranks_inflight``: on a prefill worker what a higher class goes ahead
    of, on a decode worker what it could be asked to preempt). The ``*_since_report`` counts
    and ``is_full`` are what changed through the gateway since the last load report."""

    info: WorkerInfo | None = None
    load: WorkerLoad | None = None
    inflight_requests: int = 0
    inflight_tokens: int = 0
    ranks_inflight: Counter[int] = field(default_factory=Counter)
    prompts_inflight: Counter[int] = field(default_factory=Counter)  # prefill: by length
    tokens_reserved_since_report: int = 0
    tokens_freed_since_report: int = 0
    requests_placed_since_report: int = 0
    requests_ended_since_report: int = 0
    is_full: bool = False  # said "no room" since its last report
    # make_room: a call in flight; until when and for which rank it last found no room
    is_making_room: bool = False
    room_refused_until: float = 0.0
    room_refused_rank: int = NO_REFUSAL

    @property
    def worker_id(self) -> str:
        return "" if self.info is None else self.info.worker_id

    def reported(self, load: WorkerLoad) -> None:
        """A load report: it counts everything placed and ended before it."""
        self.load = load
        self.tokens_reserved_since_report = self.tokens_freed_since_report = 0
        self.requests_placed_since_report = self.requests_ended_since_report = 0
        self.is_full = False

    def prefill_tok_s(self) -> float | None:
        """The prompt throughput the worker measured, None until it has."""
        if self.load is None or self.load.prefill_tok_s <= 0.0:
            return None
        return self.load.prefill_tok_s

    def free_slots(self) -> int | None:
        """Decode: batch slots left, None when the worker does not say how many it has."""
        if self.load is None or self.info is None or not self.info.max_num_seqs:
            return None
        taken = self.load.num_running + self.load.num_reserved
        taken += self.requests_placed_since_report - self.requests_ended_since_report
        return min(self.info.max_num_seqs, max(0, self.info.max_num_seqs - taken))

    def num_context_tokens(self) -> int:
        """Decode: the tokens its batch holds, as best the gateway can tell: what it reported
        running, with what was placed there and ended since; and at least the prompts of the
        requests the gateway placed there and that have not ended (a report counts running
        requests only, not the reservations whose prefill is still under way)."""
        if self.load is None:
            return self.inflight_tokens
        held = self.load.num_running_tokens
        reported = held + self.tokens_reserved_since_report - self.tokens_freed_since_report
        return max(reported, self.inflight_tokens, 0)

    def free_kv_tokens(self) -> int:
        """Decode: KV token slots free now, as best the gateway can tell; 0 when its batch
        slots are all taken (``max_num_seqs``: a reservation needs one as much as it needs
        blocks)."""
        if self.is_full or self.load is None or self.info is None or self.free_slots() == 0:
            return 0
        free = self.load.num_free_blocks * self.info.block_size
        free += self.tokens_freed_since_report - self.tokens_reserved_since_report
        return min(free, self.info.num_total_blocks * self.info.block_size)


class SchedulingCore:
    """The policy and the accounts of the workers it places on (module docstring)."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        *,
        max_prefill_inflight_tokens: int = 8192,
        max_prefill_inflight_s: float | None = 0.025,
    ) -> None:
        """``max_prefill_inflight_s`` None: no time cap (the simulator's option)."""
        self.policy = policy
        self.max_prefill_inflight_tokens = max_prefill_inflight_tokens
        self.max_prefill_inflight_s = max_prefill_inflight_s

    # ---- deciding --------------------------------------------------------------------------

    def prefill_cap(self, account: WorkerAccount) -> int:
        """Prompt tokens a prefill worker may have in flight (module docstring)."""
        tok_s = account.prefill_tok_s()
        if tok_s is None or self.max_prefill_inflight_s is None:
            return self.max_prefill_inflight_tokens
        return min(self.max_prefill_inflight_tokens, int(tok_s * self.max_prefill_inflight_s))

    def prefill_view(self, account: WorkerAccount) -> WorkerView:
        return WorkerView(
            account.worker_id,
            inflight_tokens=account.inflight_tokens,
            max_inflight_tokens=self.prefill_cap(account),
            prefill_tok_s=account.prefill_tok_s(),
            max_inflight_rank=max(account.ranks_inflight, default=None),
            longest_inflight_tokens=max(account.prompts_inflight, default=0),
        )

    def decode_view(self, account: WorkerAccount, now: float) -> WorkerView:
        if account.is_making_room:
            refused_rank = sys.maxsize
        elif now < account.room_refused_until:
            refused_rank = account.room_refused_rank
        else:
            refused_rank = NO_REFUSAL
        load = account.load
        is_measured = load is not None and (load.decode_base_s > 0 or load.decode_token_s > 0)
        return WorkerView(
            account.worker_id,
            inflight_tokens=account.inflight_tokens,
            free_kv_tokens=account.free_kv_tokens(),
            prefill_tok_s=account.prefill_tok_s(),
            free_slots=account.free_slots(),
            ranks_inflight=dict(account.ranks_inflight),
            room_refused_rank=refused_rank,
            decode_base_s=load.decode_base_s if load is not None and is_measured else None,
            decode_token_s=0.0 if load is None else load.decode_token_s,
            num_context_tokens=account.num_context_tokens(),
        )

    def schedule(
        self,
        prefill: Sequence[WorkerAccount],
        decode: Sequence[WorkerAccount],
        now: float,
        *,
        model: str = "",
    ) -> list[Decision]:
        """One pass of the policy over these workers, ``model``'s pool (``prefill`` empty:
        ``decode`` are colocated workers, which prefill themselves)."""
        return self.policy.schedule(
            [self.prefill_view(a) for a in prefill],
            [self.decode_view(a, now) for a in decode],
            now,
            model=model,
        )

    # ---- carrying out ----------------------------------------------------------------------

    def placed(
        self, placement: Placement, prefill: WorkerAccount | None, decode: WorkerAccount
    ) -> None:
        """The placement is carried out: the prompt is in flight on its prefill worker until
        ``prefill_done``, and holds a batch slot and KV for the prompt and its first token on
        the decode worker until ``decode_done``."""
        request = placement.request
        if prefill is not None:
            prefill.inflight_tokens += request.num_prompt_tokens
            prefill.inflight_requests += 1
            prefill.ranks_inflight[request.rank] += 1
            prefill.prompts_inflight[request.num_prompt_tokens] += 1
        decode.inflight_requests += 1
        decode.inflight_tokens += request.num_prompt_tokens
        decode.ranks_inflight[request.rank] += 1
        decode.tokens_reserved_since_report += request.num_prompt_tokens + 1
        decode.requests_placed_since_report += 1

    def not_placed(self, placement: Placement, now: float) -> None:
        """The placement could not be carried out (its caller gave up in the same tick):
        nothing was reserved, but the policy dispatched it and must hear that it ended."""
        self.policy.on_finish(placement.request, 0, now)

    def prefill_done(
        self,
        prefill: WorkerAccount | None,
        request: QueuedRequest,
        num_cached_tokens: int | None,
        now: float,
    ) -> None:
        """The prefill stage ended: its first token, with ``num_cached_tokens`` found cached;
        or a failure (None). Its tokens leave the prefill worker's account."""
        if prefill is not None:
            prefill.inflight_tokens -= request.num_prompt_tokens
            prefill.inflight_requests -= 1
            _untrack(prefill.ranks_inflight, request.rank)
            _untrack(prefill.prompts_inflight, request.num_prompt_tokens)
        if num_cached_tokens is not None:
            self.policy.on_first_token(request, num_cached_tokens, now)

    def tokens_generated(self, request: QueuedRequest, num_tokens: int, now: float) -> None:
        self.policy.on_tokens(request, num_tokens, now)

    def decode_done(
        self,
        decode: WorkerAccount,
        request: QueuedRequest,
        num_output_tokens: int,
        now: float,
        *,
        finished: bool = True,
    ) -> None:
        """The request left its decode worker: it ended, whatever the outcome, or (``finished``
        False) the worker handed it back, to be queued again (``policy.requeue``) or given up
        (``given_up``)."""
        decode.inflight_requests -= 1
        decode.inflight_tokens -= request.num_prompt_tokens
        _untrack(decode.ranks_inflight, request.rank)
        decode.is_full = False  # it freed blocks
        decode.requests_ended_since_report += 1
        # (A resumed request's prompt holds the output generated before it was handed back.)
        num_new_tokens = num_output_tokens - request.num_output_tokens
        decode.tokens_freed_since_report += request.num_prompt_tokens + max(1, num_new_tokens)
        if finished:
            self.policy.on_finish(request, num_output_tokens, now)

    def given_up(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        """A request handed back (``decode_done`` with ``finished`` False) that will not be
        queued again: it ends for the policy with what it generated."""
        self.policy.on_finish(request, num_output_tokens, now)

    def no_room(self, decode: WorkerAccount) -> None:
        """The decode worker answered "no room": none there until it reports or frees some."""
        decode.is_full = True

    # ---- make room -------------------------------------------------------------------------

    def room_asked(self, decode: WorkerAccount) -> None:
        """A ``MakeRoom`` call to this worker is under way."""
        decode.is_making_room = True

    def room_answered(
        self, decode: WorkerAccount, room: MakeRoom, has_room: bool | None, now: float
    ) -> None:
        """The call ended: room was made (True), none was found (False: not asked again for a
        request of this rank or lower for ``ROOM_RETRY_S``), or the call failed (None: not
        asked again by anyone for as long)."""
        decode.is_making_room = False
        if not has_room:
            decode.room_refused_until = now + ROOM_RETRY_S
            decode.room_refused_rank = sys.maxsize if has_room is None else room.request.rank


def _untrack(counts: Counter[int], key: int) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
