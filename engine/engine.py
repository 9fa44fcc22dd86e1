"""The engine loop: continuous batching over the paged cache, one ``step()`` at a time.

A step is "schedule, run, postprocess": swapped-out requests come back in when there is room;
every running request whose tokens are all computed decodes one token, the most important first
(``engine.preemption.importance_order``); then prompt chunks of at most ``prefill_chunk_size``
tokens, within ``max_num_batched_tokens``, go in ``engine.preemption.prefill_order``, admitting
waiting requests (prefix-cache hits first, then fresh blocks) as they come up. That order puts
the most important requests first (a short interactive prompt does not wait behind a long batch
prompt between chunks), and inside one tenant (its cache salt) and class the shortest remaining
prompt, aged by the steps it has waited so that a long prompt is passed during at most as many
steps as it takes alone (PecSched: short inputs are not blocked by long ones). A step mixes
decodes and prefill chunks freely.

Priority acts between steps only, so a step must be short for it to act often enough. On a slow
backend (a CPU computes a few hundred prompt tokens a second) ``max_num_batched_tokens`` alone
makes steps of seconds; so the prompt tokens of a step are also capped to what the measured
``prefill_tok_s`` computes in ``max_prefill_step_s`` (whole blocks, at least one). On a fast
backend that cap is above the token budget, which rules as before. Decodes are not capped.

Preemption. When a decode needs a block and none is free, or ``make_room`` is asked to free
blocks or a batch slot for a more important request, the least important running request
(``engine.preemption.victim_order``) gives its blocks up, by ``EngineConfig.preemption_mode``:

- ``swap``: its computed blocks are copied to the runner's host pool in runs of consecutive
  blocks, and it resumes here (swapped in before it decodes again) once there is room. A request
  still computing its prompt, or one the host pool cannot take, is recomputed instead.
- ``recompute``: its blocks go back (full ones stay in the prefix cache). With
  ``hand_back_preempted`` it leaves the engine and goes back to whoever added it, as a
  ``StepOutput`` with ``is_preempted``; that is what workers do, since their caller can re-queue
  it on the prefill pool with ``num_prior_output_tokens``. Without it (``generate``, tools, tests:
  nobody to hand it to) it waits here and is recomputed, its output kept.

``make_room`` makes room for one request: blocks for its tokens and a batch slot
(``max_num_seqs`` counts running requests and reservations; swapped-out and waiting ones take a
slot only when they come in). The room is held for a short while (``room_hold_s``) for the
request it was made for: less important requests that were already here (swapped out, or
waiting) neither swap back in nor get admitted into it. Requests added after it are the
caller's own decision and may take its blocks, but not its batch slot: no less important
request takes that (there is often only the one, and whoever took it would be preempted again).
The first request at least as important ends the hold.

Disaggregated serving splits a request between two engines. On the prefill worker it is added
with ``prefill_only``: after its first token it is *handed off* (``StepOutput.is_handed_off``),
keeping its blocks until ``release_handed_off`` once the KV has been shipped. On the decode worker
``reserve`` sets blocks aside for KV that will arrive from elsewhere, and ``add_prefilled`` turns
the reservation into a running request that continues from the first token (``cancel_reservation``
gives the blocks back when the KV never comes).

A request resumed after a recompute hand-back carries its earlier output at the end of its prompt
(``num_prior_output_tokens``); it continues exactly as if it had never been interrupted.

Failures. A request the runner cannot compute fails alone and the engine goes on: its blocks go
back and it leaves the engine with a ``StepOutput`` carrying ``error``. Two kinds: a run whose
logits are not finite (the runner samples None for it), and a runner ``step`` that raises, which
is pinned on the runs that make it raise by running the step's runs again in halves (KV writes
are idempotent: a run writes the same slots with the same values), so a request of death takes
only itself down. The blocks only a failed request holds are scrubbed of non-finite KV before
they go back (it would fail whoever reuses them; ``Runner.scrub``) and leave the prefix cache.
A step in which the runner raised on every run, ``max_failed_steps_in_a_row`` times in a row
with requests of two tenants or more (ten times as many with one tenant's alone, which may be
its requests of death), says the runner itself is broken: ``step`` raises, after failing those
requests. Until then each failed request is final for its caller: with a broken runner, a few
steps' requests fail before the engine gives up and its worker is restarted. Logits that are not
finite never count: the runner computed them. ``step`` raising for any other reason is a bug in
the engine's own bookkeeping, whose state can no longer be trusted; whoever owns the engine must
then give it up (``EngineThread`` does, and the worker process exits). The failpoint
``engine.forward`` (``transfer.failpoints``) makes every runner step raise, for the tests of
real worker processes.

The loop itself is torch-free: a ``Runner`` computes the scheduled runs, samples and moves
swapped blocks. The model runner (``engine.runner``) does it with the model; the null runner
(``engine.null_engine``) with a clock and a hash.

Not thread-safe: the caller owns the engine from one thread.
"""

from __future__ import annotations

import collections.abc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from engine.block_manager import BlockManager, hash_block, root_hash
from engine.preemption import (
    PreemptionMode,
    PrefillCandidate,
    importance_order,
    prefill_order,
    victim_order,
)
from engine.sequence import (
    DEFAULT_PRIORITY,
    FinishReason,
    Priority,
    SamplingParams,
    ScheduledRun,
    Sequence,
    SequenceStatus,
    StepOutput,
)
from engine.swap import BlockRun, SwapSpace
from transfer.failpoints import failpoint

__all__ = ["EngineConfig", "LLMEngine", "Runner", "step_prompt_tokens"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Batching limits of one engine."""

    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 2048  # tokens computed in one step
    prefill_chunk_size: int = 512  # prompt tokens of one request in one step
    enable_prefix_cache: bool = True
    preemption_mode: PreemptionMode = "recompute"
    hand_back_preempted: bool = False  # recompute victims go back to their caller (workers)
    room_hold_s: float = 5.0  # how long room made by ``make_room`` waits for its request
    # The prompt tokens of one step are at most what ``LLMEngine.prefill_tok_s`` computes in
    # this long (None: no time cap, ``max_num_batched_tokens`` alone).
    max_prefill_step_s: float | None = 0.5
    # Steps in a row in which the runner raised on every run before the engine gives up on it
    # (see Failures in the module docstring).
    max_failed_steps_in_a_row: int = 3

    def __post_init__(self) -> None:
        if self.max_prefill_step_s is not None and not self.max_prefill_step_s > 0:
            raise ValueError(
                f"max_prefill_step_s must be positive or None, got {self.max_prefill_step_s}"
            )
        if self.max_failed_steps_in_a_row < 1:
            raise ValueError(
                f"max_failed_steps_in_a_row must be at least 1, got "
                f"{self.max_failed_steps_in_a_row}"
            )


class Runner(Protocol):
    """What the engine loop needs from whatever computes tokens."""

    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def num_host_blocks(self) -> int:
        """Blocks of the host pool swapped-out KV goes to (0: none, no swapping)."""
        ...

    @property
    def precision(self) -> str:
        """The arithmetic it runs, in words (``engine.precision.PrecisionPlan.describe``)."""
        ...

    def step(self, runs: list[ScheduledRun]) -> collections.abc.Sequence[int | None]:
        """Compute the runs' tokens into the cache; return one sampled token per run whose
        ``samples_next_token`` is true, in order: None where that run's logits were not finite
        (the engine fails its request). May raise: the engine then calls it again with parts of
        ``runs`` to find the runs that make it raise, so computing a run twice must be
        harmless."""
        ...

    def swap_out(self, runs: list[BlockRun]) -> None:
        """Copy device blocks to host blocks, one copy per ``(device, host, count)`` run; done
        when it returns (the device blocks may be reused at once)."""
        ...

    def swap_in(self, runs: list[BlockRun]) -> None:
        """Copy host blocks to device blocks, one copy per ``(host, device, count)`` run; done
        when it returns (the host blocks may be reused at once)."""
        ...

    def scrub(self, block_ids: list[int]) -> list[int]:
        """Zero those of ``block_ids`` whose KV is not all finite, and return them. Attention
        reads slots it masks (a reused block's stale tail, the padding of a batch's block
        tables) with weight zero, and zero times NaN is NaN: a non-finite value left in a free
        block would fail whoever gets that block next."""
        ...


@dataclass(frozen=True, slots=True)
class _RunFailure:
    """Why a scheduled run could not be computed; its request fails."""

    reason: str
    runner_raised: bool  # else the runner computed it, and its logits were not finite


# What became of one scheduled run: its sampled token, None for a run that samples nothing (a
# prompt chunk before the end), or why it failed.
_RunOutcome = int | None | _RunFailure

NON_FINITE_LOGITS = "the model's output for it is not finite (NaN or infinity)"
SINGLE_TENANT_FACTOR = 10  # see ``LLMEngine._runner_is_broken``


@dataclass(frozen=True, slots=True)
class _RoomHold:
    """Blocks and a batch slot ``make_room`` freed for a request of ``priority`` until ``until``
    (the engine's clock) or until a request at least that important comes: the blocks are kept
    from less important requests that came before ``arrival_order``, the slot from every less
    important request."""

    num_blocks: int
    priority: Priority
    until: float
    arrival_order: int
    num_slots: int = 1  # the request it was made for runs (or reserves) in one


class LLMEngine:
    """Continuous batching over a ``Runner`` and a ``BlockManager``."""

    def __init__(
        self,
        runner: Runner,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.config = config or EngineConfig()
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.blocks = BlockManager(runner.num_blocks, runner.block_size)
        self.swap_space = (
            SwapSpace(
                runner,
                self.blocks,
                runner.num_host_blocks,
                enable_prefix_cache=self.config.enable_prefix_cache,
            )
            if self.config.preemption_mode == "swap" and runner.num_host_blocks > 0
            else None
        )
        self.eos_token_ids = frozenset(eos_token_ids)
        self._clock = clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}  # every request id in use, handed off included
        self.handed_off: dict[str, Sequence] = {}
        self.reservations: dict[str, list[int]] = {}  # request id -> blocks for arriving KV
        self._reservation_priority: dict[str, tuple[Priority, int]] = {}  # and arrival order
        self._pending_outputs: list[StepOutput] = []  # hand-backs not yet returned by step()
        self._room_hold: _RoomHold | None = None
        self._next_arrival_order = 0
        self.num_preemptions = 0  # by any mode
        self.num_swapped_out = 0
        self.num_handed_back = 0
        # Tokens of requests admitted since the start, and how many of them the prefix cache
        # held (its hit rate, for metrics).
        self.num_admitted_tokens = 0
        self.num_admitted_cached_tokens = 0
        self.num_scheduled_runs = 0  # of the last step: 0 means it could do nothing
        self.num_steps = 0  # steps that ran something, since the start (prefill aging)
        self.num_failed_steps_in_a_row = 0  # steps in which the runner raised on every run
        self._failed_salts: set[bytes] = set()  # the tenants (cache salts) of those steps' runs
        self.num_failed_requests = 0  # since the start
        self.num_step_prompt_tokens = 0  # of the last step: prompt tokens it computed
        # Prompt tokens per second, measured by whoever times the steps (``EngineThread``);
        # None until measured, and then no time cap on a step's prompt tokens.
        self.prefill_tok_s: float | None = None

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        salt: bytes = b"",
        arrival_s: float = 0.0,
        prefill_only: bool = False,
        priority: Priority = DEFAULT_PRIORITY,
        num_prior_output_tokens: int = 0,
    ) -> Sequence:
        """Queue a request. ``prefill_only``: stop after the first token and hand off (see the
        module docstring). The last ``num_prior_output_tokens`` of the prompt are the request's
        own output from before a preemption. Raises ``ValueError`` for a request this engine can
        never serve."""
        self._check_new_id(request_id)
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        _check_prior_output(len(prompt_token_ids), num_prior_output_tokens, params)
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens does not fit the model's context of "
                f"{self.max_model_len}"
            )
        vocab_size = self.runner.vocab_size
        if any(not 0 <= t < vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        num_original = len(prompt_token_ids) - num_prior_output_tokens
        # A prefill-only request holds its prompt's blocks and no more.
        max_total_tokens = (
            len(prompt_token_ids)
            if prefill_only
            else min(num_original + params.max_tokens, self.max_model_len)
        )
        if -(-max_total_tokens // self.block_size) > self.blocks.num_total_blocks:
            raise ValueError(
                f"a request of up to {max_total_tokens} tokens can never fit in this engine's "
                f"{self.blocks.num_total_blocks} KV blocks of {self.block_size} tokens"
            )
        seq = self._new_sequence(
            request_id, prompt_token_ids, num_prior_output_tokens, params, salt, arrival_s
        )
        seq.priority = priority
        seq.is_prefill_only = prefill_only
        self.sequences[request_id] = seq
        self.waiting.append(seq)
        return seq

    def _new_sequence(
        self,
        request_id: str,
        token_ids: list[int],
        num_prior_output_tokens: int,
        params: SamplingParams,
        salt: bytes,
        arrival_s: float,
    ) -> Sequence:
        """A sequence whose prompt is ``token_ids`` less its last ``num_prior_output_tokens``,
        which become its output so far."""
        num_original = len(token_ids) - num_prior_output_tokens
        seq = Sequence(
            request_id,
            list(token_ids[:num_original]),
            params,
            salt=salt,
            arrival_s=arrival_s,
            arrival_order=self._next_arrival_order,
            output_token_ids=list(token_ids[num_original:]),
            arrival_step=self.num_steps,
        )
        self._next_arrival_order += 1
        return seq

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.sequences or request_id in self.reservations:
            raise ValueError(f"request id {request_id!r} is already in the engine")

    def reserve(
        self, request_id: str, num_tokens: int, *, priority: Priority = DEFAULT_PRIORITY
    ) -> list[int] | None:
        """Blocks for ``num_tokens`` tokens of KV computed elsewhere, or None (nothing changed)
        when the blocks or a batch slot are not free now, or when a swapped-out request at least
        as important is owed them. The slot counts against ``max_num_seqs`` like a running
        request. A reservation at least as important as room ``make_room`` holds takes it
        over; a less important one never takes the held batch slot."""
        self._check_new_id(request_id)
        if not 0 < num_tokens <= self.max_model_len:
            raise ValueError(f"cannot reserve for {num_tokens} tokens")
        if self.num_free_slots() <= 0:
            return None
        if any(seq.priority.importance >= priority.importance for seq in self.swapped):
            return None
        num_blocks = -(-num_tokens // self.block_size)
        if not self._may_take(num_blocks, priority, self._next_arrival_order):
            return None
        block_ids = self.blocks.allocate(num_blocks)
        if block_ids is None:
            return None
        self.reservations[request_id] = block_ids
        self._reservation_priority[request_id] = (priority, self._next_arrival_order)
        self._next_arrival_order += 1
        return block_ids

    def cancel_reservation(self, request_id: str) -> bool:
        """Give a reservation's blocks back; False when there is none (any more)."""
        block_ids = self.reservations.pop(request_id, None)
        if block_ids is None:
            return False
        self._reservation_priority.pop(request_id, None)
        self.blocks.free(block_ids)
        return True

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: SamplingParams,
        *,
        salt: bytes = b"",
        arrival_s: float = 0.0,
        num_cached_tokens: int = 0,
        num_prior_output_tokens: int = 0,
    ) -> Sequence:
        """Start decoding a request whose prompt KV now fills its reserved blocks and whose first
        token was sampled elsewhere (with ``params.seed``, which decoding continues with). The
        last ``num_prior_output_tokens`` of the prompt are its output from before a preemption,
        ``first_token_id`` the one after them. Its priority is the reservation's."""
        block_ids = self.reservations.get(request_id)
        if block_ids is None:
            raise ValueError(f"request {request_id!r} has no reservation")
        num_tokens = len(prompt_token_ids) + 1
        if not prompt_token_ids or -(-num_tokens // self.block_size) > len(block_ids):
            raise ValueError(
                f"{len(block_ids)} reserved blocks do not hold {num_tokens} tokens of "
                f"request {request_id!r}"
            )
        if not 0 <= first_token_id < self.runner.vocab_size:
            raise ValueError(f"first token id {first_token_id} is not in the vocabulary")
        _check_prior_output(len(prompt_token_ids), num_prior_output_tokens, params)
        del self.reservations[request_id]
        priority, arrival_order = self._reservation_priority.pop(request_id)
        seq = self._new_sequence(
            request_id, prompt_token_ids, num_prior_output_tokens, params, salt, arrival_s
        )
        seq.priority = priority
        seq.arrival_order = arrival_order
        seq.output_token_ids.append(first_token_id)
        seq.block_table = block_ids
        seq.num_computed_tokens = len(prompt_token_ids)
        seq.num_cached_tokens = num_cached_tokens
        seq.was_admitted = True
        seq.status = SequenceStatus.RUNNING
        self.sequences[request_id] = seq
        self.running.append(seq)
        return seq

    def release_handed_off(self, request_id: str) -> bool:
        """Free a handed-off request's blocks (its KV has been shipped, or never will be)."""
        seq = self.handed_off.pop(request_id, None)
        if seq is None:
            return False
        del self.sequences[request_id]
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        return True

    def abort(self, request_id: str) -> bool:
        """Drop a request (or reservation) and free its blocks; False when it is not (or no
        longer) here."""
        if self.cancel_reservation(request_id):
            return True
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        if seq.status is SequenceStatus.HANDED_OFF:
            del self.handed_off[request_id]
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
            assert self.swap_space is not None
            self.swap_space.free(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self._pending_outputs)

    def num_free_slots(self) -> int:
        """Batch slots left of ``max_num_seqs``: running requests and reservations take one
        each. Swapped-out and waiting requests take none (they hold no device blocks and are
        not in the batch); each takes one when it comes (back) in, held room permitting."""
        return self.config.max_num_seqs - len(self.running) - len(self.reservations)

    # ---- making room ----------------------------------------------------------------------

    def make_room(
        self,
        num_tokens: int,
        priority: Priority,
        *,
        preempt_reservation: Callable[[str], bool] | None = None,
    ) -> tuple[int, int]:
        """Room for one request of ``priority`` and ``num_tokens`` tokens: preempt requests
        strictly less important, least important first, until ``num_tokens`` tokens' worth of
        blocks *and* a batch slot (``num_free_slots``) are free, or no such request is left; hold
        both for ``room_hold_s`` for a request of ``priority``. Returns (free KV token slots now,
        requests preempted); the free token slots are 0 while no batch slot is free (a
        reservation could take none of them), as a worker's load report counts them.

        With ``preempt_reservation``, reservations are candidates too (by the priority they
        were reserved with): the callback preempts the one named and says whether it could (it
        may free the blocks later, when KV landing in them is done). Hand-backs reach the caller
        as outputs of the next ``step``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        num_blocks = -(-num_tokens // self.block_size)
        excluded: set[str] = set()
        num_preempted = 0
        while self.blocks.num_free_blocks < num_blocks or self.num_free_slots() < 1:
            victim_id = self._pick_victim(
                priority, excluded, with_reservations=preempt_reservation is not None
            )
            if victim_id is None:
                break
            seq = self.sequences.get(victim_id)
            if seq is not None and seq.status is SequenceStatus.RUNNING:
                self._preempt(seq)
                num_preempted += 1
                continue
            excluded.add(victim_id)
            assert preempt_reservation is not None
            if preempt_reservation(victim_id):
                num_preempted += 1
        self._room_hold = _RoomHold(
            num_blocks, priority, self._clock() + self.config.room_hold_s, self._next_arrival_order
        )
        if self.num_free_slots() < 1:
            return 0, num_preempted
        return self.blocks.num_free_blocks * self.block_size, num_preempted

    def seconds_until_change(self) -> float | None:
        """When an engine that can do nothing now may do something without a new command: when
        a room hold expires. None: only a command can change anything."""
        if self._room_hold is None:
            return None
        remaining_s = self._room_hold.until - self._clock()
        if remaining_s <= 0:
            self._room_hold = None  # expired: one more look, then nothing until a command
            return 0.0
        return remaining_s

    def _may_take(self, num_blocks: int, priority: Priority, arrival_order: int) -> bool:
        """Whether a request of ``priority`` may take ``num_blocks`` free blocks and a batch slot
        (every caller takes one: admission, swap-in, reservation) without eating into room held
        for a more important one. A request at least as important takes the hold over (it is
        the one the room was made for, or as good); one added after the hold was the caller's
        choice, and may take the held blocks, not the held slot."""
        hold = self._room_hold
        if hold is None:
            return True
        if self._clock() >= hold.until or priority.importance >= hold.priority.importance:
            self._room_hold = None
            return True
        # The slot is kept from every less important request, even one added after the hold:
        # there is often just the one, and a request that took it would only be preempted
        # again when the one it was made for asks anew.
        if self.num_free_slots() - 1 < hold.num_slots:
            return False
        if arrival_order >= hold.arrival_order:
            return True
        return self.blocks.num_free_blocks - num_blocks >= hold.num_blocks

    def _pick_victim(
        self, below: Priority | None, excluded: set[str], *, with_reservations: bool = False
    ) -> str | None:
        """The request id to preempt next: the least important running request (or
        reservation) not in ``excluded``, strictly less important than ``below`` if given."""
        candidates = [
            (victim_order(seq.priority, seq.arrival_order), seq.request_id)
            for seq in self.running
            if seq.request_id not in excluded and not seq.is_prefill_only
        ]
        if with_reservations:
            candidates += [
                (victim_order(priority, arrival_order), request_id)
                for request_id, (priority, arrival_order) in self._reservation_priority.items()
                if request_id not in excluded
            ]
        if below is not None:
            candidates = [c for c in candidates if c[0][:3] < victim_order(below, 0)[:3]]
        return min(candidates)[1] if candidates else None

    def _preempt(self, seq: Sequence) -> None:
        """Take ``seq``'s device blocks, by swap if the mode and the host pool allow."""
        self.num_preemptions += 1
        if self.config.preemption_mode == "swap" and self._swap_out(seq):
            self.num_swapped_out += 1
            logger.debug("preempted %s (swap) at %d tokens", seq.request_id, seq.num_tokens)
            return
        self.running.remove(seq)
        self._release(seq)
        if self.config.hand_back_preempted:
            del self.sequences[seq.request_id]
            seq.status = SequenceStatus.PREEMPTED
            self.num_handed_back += 1
            self._pending_outputs.append(_output_of(seq, [], is_preempted=True))
            logger.debug("preempted %s (hand back) at %d tokens", seq.request_id, seq.num_tokens)
            return
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)  # its early arrival order puts it first among its equals
        logger.debug("preempted %s (recompute) at %d tokens", seq.request_id, seq.num_tokens)

    # ---- swapping -------------------------------------------------------------------------

    def _swap_out(self, seq: Sequence) -> bool:
        if self.swap_space is None or not self.swap_space.swap_out(seq):
            return False
        self.running.remove(seq)
        self.swapped.append(seq)
        seq.status = SequenceStatus.SWAPPED
        seq.num_swap_outs += 1
        return True

    def _swap_in_ready(self) -> None:
        """Bring swapped requests back, most important first, while there is room."""
        for seq in sorted(
            self.swapped, key=lambda s: importance_order(s.priority, s.arrival_order)
        ):
            if self.num_free_slots() <= 0 or not self._swap_in(seq):
                return

    def _swap_in(self, seq: Sequence) -> bool:
        def may_take(num_blocks: int) -> bool:
            return self._may_take(num_blocks, seq.priority, seq.arrival_order)

        if self.swap_space is None or not self.swap_space.swap_in(seq, may_take):
            return False
        self.swapped.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return True

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One step; ``num_scheduled_runs == 0`` afterwards means nothing could run until a
        reservation or a handed-off request gives its blocks back (or a room hold expires)."""
        runs = self._schedule()
        self.num_scheduled_runs = len(runs)
        self.num_step_prompt_tokens = sum(
            run.num_tokens for run in runs if run.seq.num_tokens - run.seq.num_computed_tokens > 1
        )
        if not runs:
            is_holding = self._room_hold is not None
            if (self.waiting or self.swapped) and not (
                self.running or self.reservations or self.handed_off or is_holding
            ):
                # add_request admits only what fits an empty cache, so this is a bug, not load.
                raise RuntimeError(
                    f"engine stalled: {len(self.waiting)} waiting and {len(self.swapped)} "
                    "swapped requests cannot be admitted"
                )
            return self._take_pending_outputs()
        self.num_steps += 1
        outcomes = self._execute(runs)
        failures = [outcome for outcome in outcomes if isinstance(outcome, _RunFailure)]
        num_raised = sum(failure.runner_raised for failure in failures)
        if num_raised:
            # A step timed with retries in it would distort the measured prefill speed.
            self.num_step_prompt_tokens = 0
        # Logits that are not finite are the request's doing: the runner computed them.
        if num_raised == len(runs):
            self.num_failed_steps_in_a_row += 1
            self._failed_salts.update(run.seq.salt for run in runs)
        else:
            self.num_failed_steps_in_a_row = 0
            self._failed_salts.clear()
        # Hand-backs first: they come from this step's scheduling, before its tokens.
        outputs = self._take_pending_outputs() + self._postprocess(runs, outcomes)
        if self._runner_is_broken():
            # The failed requests are out and their blocks free: the state is whole, the
            # runner is not.
            reasons = {failure.reason for failure in failures}
            raise RuntimeError(
                f"the runner failed every run in {self.num_failed_steps_in_a_row} steps in a "
                f"row; it is broken (last: {'; '.join(sorted(reasons))})"
            )
        return outputs

    def _runner_is_broken(self) -> bool:
        """Steps in which every run raised, in a row: ``max_failed_steps_in_a_row`` of them
        with requests of two tenants or more (cache salts) say the runner is broken; of one
        tenant alone, they may be that tenant's requests of death, so it takes
        ``SINGLE_TENANT_FACTOR`` times as many (one tenant must not restart a worker at will;
        a broken runner serving one tenant still ends). Any step with a run that did not raise
        starts the count again."""
        limit = self.config.max_failed_steps_in_a_row
        if len(self._failed_salts) < 2:
            limit *= SINGLE_TENANT_FACTOR
        return self.num_failed_steps_in_a_row >= limit

    def _execute(self, runs: list[ScheduledRun]) -> list[_RunOutcome]:
        """Run ``runs`` on the runner: one outcome per run. When the runner raises, each half
        is run again on its own, down to single runs, which fail alone (see Failures)."""
        try:
            failpoint("engine.forward")
            token_ids = self.runner.step(runs)
        except Exception as exc:
            if len(runs) > 1:
                logger.warning("the runner failed on %d runs (%r): again in halves", len(runs), exc)
                half = len(runs) // 2
                return self._execute(runs[:half]) + self._execute(runs[half:])
            request_id = runs[0].seq.request_id
            logger.exception("the runner failed on request %s alone", request_id)
            detail = f"{type(exc).__name__}: {str(exc)[:200]}"
            return [_RunFailure(f"the engine failed computing it ({detail})", runner_raised=True)]
        num_sampling = sum(run.samples_next_token for run in runs)
        if len(token_ids) != num_sampling:
            raise RuntimeError(
                f"the runner sampled {len(token_ids)} tokens for {num_sampling} sampling runs"
            )
        sampled = iter(token_ids)
        outcomes: list[_RunOutcome] = []
        for run in runs:
            token_id = next(sampled) if run.samples_next_token else None
            if run.samples_next_token and token_id is None:
                outcomes.append(_RunFailure(NON_FINITE_LOGITS, runner_raised=False))
            else:
                outcomes.append(token_id)
        return outcomes

    def _take_pending_outputs(self) -> list[StepOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion (a convenience for tools and tests)."""
        ids = [f"generate-{index}" for index in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, params)
        results: dict[str, list[int]] = {request_id: [] for request_id in ids}
        while self.has_unfinished():
            for output in self.step():
                if output.error is not None:
                    for request_id in ids:
                        self.abort(request_id)
                    raise RuntimeError(f"{output.request_id} failed: {output.error}")
                results[output.request_id].extend(output.new_token_ids)
        return [results[request_id] for request_id in ids]

    def _schedule(self) -> list[ScheduledRun]:
        self._swap_in_ready()
        runs: list[ScheduledRun] = []
        budget = self._schedule_decodes(runs, self.config.max_num_batched_tokens)
        self._schedule_prefills(runs, min(budget, self.max_step_prompt_tokens()))
        return runs

    def max_step_prompt_tokens(self) -> int:
        """The most prompt tokens one step may compute (``step_prompt_tokens``)."""
        max_step_s = self.config.max_prefill_step_s
        if max_step_s is None or self.prefill_tok_s is None:
            return self.config.max_num_batched_tokens
        return step_prompt_tokens(
            self.config.max_num_batched_tokens, self.prefill_tok_s, max_step_s, self.block_size
        )

    def _schedule_decodes(self, runs: list[ScheduledRun], budget: int) -> int:
        """Requests whose every token is computed decode one more, the most important first, so
        that a victim for a missing block is never one already scheduled."""
        decoding = [seq for seq in self.running if seq.num_tokens - seq.num_computed_tokens == 1]
        decoding.sort(key=lambda seq: importance_order(seq.priority, seq.arrival_order))
        scheduled: set[str] = set()
        for seq in decoding:
            if seq.status is not SequenceStatus.RUNNING:  # preempted to make room for another
                continue
            if not self._reserve_for(seq, seq.num_tokens, scheduled):
                continue
            scheduled.add(seq.request_id)
            runs.append(ScheduledRun(seq, 1))
            budget -= 1
        return budget

    def _schedule_prefills(self, runs: list[ScheduledRun], budget: int) -> None:
        """Prompt chunks in ``prefill_order`` (the most important request first; inside a
        tenant and class, the shortest aged remaining prompt): running ones continue, waiting
        ones are admitted when their turn comes. Once a waiting request cannot be admitted, no
        later one in that order is (no overtaking for blocks); nor is one no more important than
        a swapped-out request (its room comes first)."""
        candidates = [seq for seq in self.running if seq.num_tokens - seq.num_computed_tokens > 1]
        candidates += self.waiting
        order = prefill_order(
            [self._prefill_candidate(seq) for seq in candidates], self.max_step_prompt_tokens()
        )
        most_important_swapped = max(
            (seq.priority.importance for seq in self.swapped), default=None
        )
        can_admit = True
        for seq in (candidates[index] for index in order):
            if budget <= 0:
                return
            if seq.status is SequenceStatus.WAITING:
                if not can_admit or self.num_free_slots() <= 0:
                    continue
                if (
                    most_important_swapped is not None
                    and seq.priority.importance <= most_important_swapped
                ):
                    can_admit = False
                    continue
                if not self._admit(seq):
                    can_admit = False
                    continue
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = SequenceStatus.RUNNING
            count = min(seq.num_tokens - seq.num_computed_tokens, self.config.prefill_chunk_size)
            count = min(count, budget)
            runs.append(ScheduledRun(seq, count))
            seq.num_prefill_chunks += 1
            budget -= count

    def _prefill_candidate(self, seq: Sequence) -> PrefillCandidate:
        """``seq`` as ``prefill_order`` sees it: plain values, its tenant its cache salt."""
        return PrefillCandidate(
            tenant=seq.salt,
            rank=seq.priority.rank,
            counter=seq.priority.counter,
            arrival=seq.priority.arrival,
            num_remaining_tokens=seq.num_tokens - seq.num_computed_tokens,
            num_waited_steps=self.num_steps - seq.arrival_step,
            arrival_order=seq.arrival_order,
        )

    def _admit(self, seq: Sequence) -> bool:
        """Take prefix-cache hits and reserve blocks for the rest of the known tokens."""
        token_ids = seq.token_ids
        hashes: list[bytes] = []
        cached: list[int] = []
        if self.config.enable_prefix_cache:
            hashes = self.blocks.hash_blocks(token_ids, seq.salt)
            cached = self.blocks.match_prefix(hashes)
            if len(cached) * self.block_size >= len(token_ids):
                # Everything is cached: recompute the last block so there are logits to sample.
                self.blocks.free(cached[-1:])
                cached = cached[:-1]
        num_needed = -(-len(token_ids) // self.block_size) - len(cached)
        fresh = (
            self.blocks.allocate(num_needed)
            if self._may_take(num_needed, seq.priority, seq.arrival_order)
            else None
        )
        if fresh is None:
            self.blocks.free(cached)
            return False
        seq.block_table = cached + fresh
        seq.block_hashes = hashes[: len(cached)]
        seq.num_computed_tokens = len(cached) * self.block_size
        if not seq.was_admitted:
            # Of a resumed request: over its prompt and its earlier output alike.
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.was_admitted = True
            self.num_admitted_tokens += seq.num_tokens
            self.num_admitted_cached_tokens += seq.num_cached_tokens
        return True

    def _reserve_for(self, seq: Sequence, num_tokens: int, scheduled: set[str]) -> bool:
        """Make sure ``seq`` has blocks for ``num_tokens`` tokens, preempting the least important
        running requests not yet ``scheduled`` this step (``seq`` itself, if it is the least)."""
        while len(seq.block_table) * self.block_size < num_tokens:
            new = self.blocks.allocate(1)
            if new is not None:
                seq.block_table.extend(new)
                continue
            victim_id = self._pick_victim(None, scheduled)
            assert victim_id is not None  # seq itself is a candidate
            victim = self.sequences[victim_id]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _postprocess(
        self, runs: list[ScheduledRun], outcomes: list[_RunOutcome]
    ) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        sampled: list[tuple[Sequence, int]] = []
        for run, outcome in zip(runs, outcomes, strict=True):
            if isinstance(outcome, _RunFailure):
                outputs.append(self._fail(run.seq, outcome.reason))
                continue
            run.seq.num_computed_tokens += run.num_tokens
            if self.config.enable_prefix_cache:
                self._register_full_blocks(run.seq)
            if outcome is not None:
                sampled.append((run.seq, outcome))
        for seq, token_id in sampled:
            seq.output_token_ids.append(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self._finish(seq, reason)
            elif seq.is_prefill_only:
                self._hand_off(seq)
            outputs.append(_output_of(seq, [token_id], finish_reason=reason))
        return outputs

    def _scrub(self, seq: Sequence) -> None:
        """Before a failed request gives its blocks back: have the runner zero those holding
        non-finite KV (its logits were not finite, or a failing step left some) that nobody else
        holds (a block shared through the prefix cache is left to its other holders, who fail
        on it in turn; zeroing it would turn their failure into a wrong answer), and keep prefix
        matches off the zeroed ones."""
        own = [b for b in seq.block_table if self.blocks.ref_count(b) == 1]
        # A runner that cannot even do this (its device failed) raises out of the step: the
        # engine is given up and its worker restarted, rather than left with blocks that may
        # hold anything.
        scrubbed = self.runner.scrub(own)
        # Their content is no longer what their hashes say: out of the prefix cache.
        self.blocks.unregister(scrubbed)
        if scrubbed:
            logger.warning("zeroed %d KV blocks holding non-finite values", len(scrubbed))

    def _fail(self, seq: Sequence, reason: str) -> StepOutput:
        """Take a running request out and free its blocks: it failed (see Failures)."""
        self._scrub(seq)
        self.running.remove(seq)
        del self.sequences[seq.request_id]
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        self.num_failed_requests += 1
        message = f"request {seq.request_id} failed: {reason}"
        logger.warning("%s; the engine goes on", message)
        return _output_of(seq, [], error=message)

    def _hand_off(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.HANDED_OFF
        self.handed_off[seq.request_id] = seq

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Put each newly filled block in the prefix cache, extending the sequence's hash chain."""
        block_size = self.block_size
        num_full = seq.num_computed_tokens // block_size
        if num_full <= len(seq.block_hashes):
            return
        token_ids = seq.token_ids
        parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(seq.salt)
        for index in range(len(seq.block_hashes), num_full):
            parent = hash_block(parent, token_ids[index * block_size : (index + 1) * block_size])
            self.blocks.register(seq.block_table[index], parent)
            seq.block_hashes.append(parent)

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Checked for each newly sampled token only: a resumed request's earlier output was
        checked when it was sampled."""
        params = seq.params
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.running.remove(seq)
        del self.sequences[seq.request_id]
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _output_of(
    seq: Sequence,
    new_token_ids: list[int],
    *,
    finish_reason: FinishReason | None = None,
    is_preempted: bool = False,
    error: str | None = None,
) -> StepOutput:
    """What a step produced for ``seq``: ``new_token_ids`` and its counts as they are now."""
    return StepOutput(
        request_id=seq.request_id,
        new_token_ids=new_token_ids,
        finish_reason=finish_reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        num_output_tokens=len(seq.output_token_ids),
        is_handed_off=seq.status is SequenceStatus.HANDED_OFF,
        is_preempted=is_preempted,
        seed=seq.seed,
        num_prefill_chunks=seq.num_prefill_chunks,
        num_swap_outs=seq.num_swap_outs,
        error=error,
    )


def step_prompt_tokens(
    max_num_batched_tokens: int, prefill_tok_s: float, max_step_s: float, block_size: int
) -> int:
    """The prompt tokens a step may compute at a measured ``prefill_tok_s``: what that speed
    computes in ``max_step_s``, within ``max_num_batched_tokens``. Never below one block
    (unless the token budget is), so prompts always progress; whole blocks, so that a prompt
    with the cap to itself has its chunks end on block boundaries and each chunk's blocks reach
    the prefix cache at once (not required for correctness: any chunk size works). The
    engine's rule, and the simulator's (``bench.sim``)."""
    num_blocks = int(prefill_tok_s * max_step_s) // block_size
    return min(max_num_batched_tokens, max(num_blocks, 1) * block_size)


def _check_prior_output(
    num_tokens: int, num_prior_output_tokens: int, params: SamplingParams
) -> None:
    """The earlier output of a resumed request is part of its prompt, never all of it, and
    leaves ``max_tokens`` at least one more token to generate."""
    if not 0 <= num_prior_output_tokens < num_tokens:
        raise ValueError(
            f"num_prior_output_tokens must be in [0, {num_tokens}) for a prompt of {num_tokens} "
            f"tokens, got {num_prior_output_tokens}"
        )
    if num_prior_output_tokens >= params.max_tokens:
        raise ValueError(
            f"num_prior_output_tokens ({num_prior_output_tokens}) must be below max_tokens "
            f"({params.max_tokens}): the request would have finished already"
        )
