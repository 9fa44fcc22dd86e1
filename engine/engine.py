"""The engine loop: continuous batching over the paged cache, one ``step()`` at a time.

A step is "schedule, run, postprocess": every running request whose tokens are all computed
decodes one token; waiting requests are admitted (prefix-cache hits first, then fresh blocks) and
their prompts are computed in chunks of at most ``prefill_chunk_size`` tokens within
``max_num_batched_tokens``; a step mixes decodes and prefill chunks freely. When a decode needs a
block and none is free, the latest-arrived running request is preempted by recompute: its blocks
go back (full ones stay in the prefix cache, so its re-prefill is mostly hits) and it waits at the
head of the queue.

Disaggregated serving splits a request between two engines. On the prefill worker it is added
with ``prefill_only``: after its first token it is *handed off* (``StepOutput.is_handed_off``),
keeping its blocks until ``release_handed_off`` once the KV has been shipped. On the decode worker
``reserve`` sets blocks aside for KV that will arrive from elsewhere, and ``add_prefilled`` turns
the reservation into a running request that continues from the first token (``cancel_reservation``
gives the blocks back when the KV never comes).

The loop itself is torch-free: a ``Runner`` computes the scheduled runs and samples. The model
runner (``engine.runner``) does it with the model; the null runner (``engine.null_engine``) with a
clock and a hash.

Not thread-safe: the caller owns the engine from one thread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from engine.block_manager import BlockManager, hash_block, root_hash
from engine.sequence import (
    FinishReason,
    SamplingParams,
    ScheduledRun,
    Sequence,
    SequenceStatus,
    StepOutput,
)

__all__ = ["EngineConfig", "LLMEngine", "Runner"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Batching limits of one engine."""

    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 2048  # tokens computed in one step
    prefill_chunk_size: int = 512  # prompt tokens of one request in one step
    enable_prefix_cache: bool = True


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

    def step(self, runs: list[ScheduledRun]) -> list[int]:
        """Compute the runs' tokens into the cache; return one sampled token per run whose
        ``samples_next_token`` is true, in order."""
        ...


class LLMEngine:
    """Continuous batching over a ``Runner`` and a ``BlockManager``."""

    def __init__(
        self,
        runner: Runner,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.runner = runner
        self.config = config or EngineConfig()
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.blocks = BlockManager(runner.num_blocks, runner.block_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}  # every request id in use, handed off included
        self.handed_off: dict[str, Sequence] = {}
        self.reservations: dict[str, list[int]] = {}  # request id -> blocks for arriving KV
        self.num_preemptions = 0
        self.num_scheduled_runs = 0  # of the last step: 0 means it could do nothing
        self.num_step_prompt_tokens = 0  # of the last step: prompt tokens it computed

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
    ) -> Sequence:
        """Queue a request. ``prefill_only``: stop after the first token and hand off (see the
        module docstring). Raises ``ValueError`` for a request this engine can never serve."""
        self._check_new_id(request_id)
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens does not fit the model's context of "
                f"{self.max_model_len}"
            )
        vocab_size = self.runner.vocab_size
        if any(not 0 <= t < vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        # A prefill-only request holds its prompt's blocks and no more.
        max_total_tokens = (
            len(prompt_token_ids)
            if prefill_only
            else min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        )
        if -(-max_total_tokens // self.block_size) > self.blocks.num_total_blocks:
            raise ValueError(
                f"a request of up to {max_total_tokens} tokens can never fit in this engine's "
                f"{self.blocks.num_total_blocks} KV blocks of {self.block_size} tokens"
            )
        seq = Sequence(request_id, list(prompt_token_ids), params, salt=salt, arrival_s=arrival_s)
        seq.is_prefill_only = prefill_only
        self.sequences[request_id] = seq
        self.waiting.append(seq)
        return seq

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.sequences or request_id in self.reservations:
            raise ValueError(f"request id {request_id!r} is already in the engine")

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` tokens of KV computed elsewhere, or None (nothing changed)
        when the blocks or a batch slot are not free now. The slot counts against
        ``max_num_seqs`` like a running request."""
        self._check_new_id(request_id)
        if not 0 < num_tokens <= self.max_model_len:
            raise ValueError(f"cannot reserve for {num_tokens} tokens")
        if len(self.running) + len(self.reservations) >= self.config.max_num_seqs:
            return None
        block_ids = self.blocks.allocate(-(-num_tokens // self.block_size))
        if block_ids is None:
            return None
        self.reservations[request_id] = block_ids
        return block_ids

    def cancel_reservation(self, request_id: str) -> bool:
        """Give a reservation's blocks back; False when there is none (any more)."""
        block_ids = self.reservations.pop(request_id, None)
        if block_ids is None:
            return False
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
    ) -> Sequence:
        """Start decoding a request whose prompt KV now fills its reserved blocks and whose first
        token was sampled elsewhere (with ``params.seed``, which decoding continues with)."""
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
        del self.reservations[request_id]
        seq = Sequence(request_id, list(prompt_token_ids), params, salt=salt, arrival_s=arrival_s)
        seq.output_token_ids.append(first_token_id)
        seq.block_table = block_ids
        seq.num_computed_tokens = len(prompt_token_ids)
        seq.num_cached_tokens = num_cached_tokens
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
        elif seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One step; ``num_scheduled_runs == 0`` afterwards means nothing could run until a
        reservation or a handed-off request gives its blocks back."""
        runs = self._schedule()
        self.num_scheduled_runs = len(runs)
        self.num_step_prompt_tokens = sum(
            run.num_tokens for run in runs if run.seq.num_tokens - run.seq.num_computed_tokens > 1
        )
        if not runs:
            if self.waiting and not (self.running or self.reservations or self.handed_off):
                # add_request admits only what fits an empty cache, so this is a bug, not load.
                raise RuntimeError(
                    f"engine stalled: {len(self.waiting)} requests cannot be admitted"
                )
            return []
        token_ids = self.runner.step(runs)
        return self._postprocess(runs, token_ids)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion (a convenience for tools and tests)."""
        ids = [f"generate-{index}" for index in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, params)
        results: dict[str, list[int]] = {request_id: [] for request_id in ids}
        while self.has_unfinished():
            for output in self.step():
                results[output.request_id].extend(output.new_token_ids)
        return [results[request_id] for request_id in ids]

    def _schedule(self) -> list[ScheduledRun]:
        budget = self.config.max_num_batched_tokens
        runs: list[ScheduledRun] = []
        # Requests whose every token is computed decode one more; others continue their prompt.
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an earlier one
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 1:
                if not self._reserve_for(seq, seq.num_tokens):
                    continue
                runs.append(ScheduledRun(seq, 1))
                budget -= 1
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1 and budget > 0:
                count = min(remaining, self.config.prefill_chunk_size, budget)
                runs.append(ScheduledRun(seq, count))
                budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            count = min(seq.num_tokens - seq.num_computed_tokens, self.config.prefill_chunk_size)
            count = min(count, budget)
            runs.append(ScheduledRun(seq, count))
            budget -= count
        return runs

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
        fresh = self.blocks.allocate(num_needed)
        if fresh is None:
            self.blocks.free(cached)
            return False
        seq.block_table = cached + fresh
        seq.block_hashes = hashes[: len(cached)]
        seq.num_computed_tokens = len(cached) * self.block_size
        if not seq.output_token_ids:
            seq.num_cached_tokens = seq.num_computed_tokens
        return True

    def _reserve_for(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure ``seq`` has blocks for ``num_tokens`` tokens, preempting later arrivals."""
        while len(seq.block_table) * self.block_size < num_tokens:
            new = self.blocks.allocate(1)
            if new is not None:
                seq.block_table.extend(new)
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (recompute) at %d tokens", seq.request_id, seq.num_tokens)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _postprocess(self, runs: list[ScheduledRun], token_ids: list[int]) -> list[StepOutput]:
        sampling = [run.seq for run in runs if run.samples_next_token]
        for run in runs:
            run.seq.num_computed_tokens += run.num_tokens
            if self.config.enable_prefix_cache:
                self._register_full_blocks(run.seq)
        outputs: list[StepOutput] = []
        for seq, token_id in zip(sampling, token_ids, strict=True):
            seq.output_token_ids.append(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self._finish(seq, reason)
            elif seq.is_prefill_only:
                self._hand_off(seq)
            outputs.append(
                StepOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token_id],
                    finish_reason=reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_cached_tokens=seq.num_cached_tokens,
                    num_output_tokens=len(seq.output_token_ids),
                    is_handed_off=seq.status is SequenceStatus.HANDED_OFF,
                )
            )
        return outputs

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
