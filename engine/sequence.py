"""Request state inside an engine: sampling parameters, tokens, blocks and progress. Torch-free, so
the null engine and the gateway can share it."""

from __future__ import annotations

import enum
import math
import secrets
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_PRIORITY",
    "MIN_SAMPLING_TEMPERATURE",
    "FinishReason",
    "Priority",
    "SamplingParams",
    "ScheduledRun",
    "Sequence",
    "SequenceStatus",
    "StepOutput",
]

FinishReason = Literal["stop", "length", "abort"]

# Below this temperature sampling is greedy (vLLM's ``_SAMPLING_EPS``, the same value). Dividing
# fp32 logits by a smaller one overflows: 1e-39 is subnormal in fp32, a logit of 10 over 1e-38
# is already beyond fp32's 3.4e38, and softmax of infinities is NaN. At 1e-5 logits up to 3e33
# stay finite, and a gap of 1e-4 between two logits already makes the odds e^10 (22000 to 1):
# what is left of sampling below it is the order of near-ties at float rounding, which greedy
# decides the same way every time.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. A ``temperature`` below ``MIN_SAMPLING_TEMPERATURE`` (0 included) is
    greedy.

    Sampling is a pure function of (seed, output position), so a request resumed on another worker
    or after preemption draws the same tokens it would have drawn in place.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


@dataclass(frozen=True, slots=True)
class Priority:
    """How important a request is relative to the others in the engine, as the gateway sees it:
    its SLO class ``rank`` (higher: more important), its tenant's fair-share ``counter`` at
    dispatch (higher: less important) and its ``arrival`` time at the gateway (later: less
    important). ``importance`` orders them: prefill chunks go in decreasing, preemption victims
    are taken in increasing importance."""

    rank: int = 0
    counter: float = 0.0
    arrival: float = 0.0

    @property
    def importance(self) -> tuple[int, float, float]:
        """Larger is more important: rank first, then the lower counter, then the earlier
        arrival."""
        return (self.rank, -self.counter, -self.arrival)


DEFAULT_PRIORITY = Priority()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: its KV waits in the host pool, no device blocks
    HANDED_OFF = "handed_off"  # prefill done, first token sampled; blocks held for the transfer
    PREEMPTED = "preempted"  # preempted by recompute and handed back to its caller; gone here
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """One request's progress: the tokens so far and the KV blocks that hold them.

    A request resumed after a recompute preemption elsewhere starts with its earlier output in
    ``output_token_ids`` (and only its original prompt in ``prompt_token_ids``), so that sampling
    positions, ``max_tokens`` and the reported counts continue as if it had never stopped.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes = b""
    arrival_s: float = 0.0
    priority: Priority = DEFAULT_PRIORITY
    arrival_order: int = 0  # the engine's own admission order: ties of ``priority`` go by it
    arrival_step: int = 0  # the engine's ``num_steps`` when it arrived (prefill aging)
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    host_block_table: list[int] = field(default_factory=list)  # while swapped out
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    is_prefill_only: bool = False  # hand off after the first token instead of decoding
    was_admitted: bool = False  # blocks were taken for it once (num_cached_tokens is set)
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    num_prefill_chunks: int = 0  # prefill runs scheduled for it, over its life
    num_swap_outs: int = 0

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.seed = self.params.seed

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    is_handed_off: bool = False  # a prefill-only request stopped here, its KV held for transfer
    # Preempted by recompute and handed back: no new tokens, its blocks are free, and the caller
    # resumes it elsewhere with its tokens so far and ``seed``.
    is_preempted: bool = False
    seed: int = 0  # the seed sampling uses for this request
    num_prefill_chunks: int = 0  # prefill runs it took (traces)
    num_swap_outs: int = 0  # times its KV went to host memory (traces)
    # The request failed here (why, for its caller; never prompt text): it is gone from the
    # engine, its blocks are free, and no finish reason or tokens come with it. The engine goes on.
    error: str | None = None


@dataclass(slots=True)
class ScheduledRun:
    """Compute ``num_tokens`` tokens of ``seq`` starting at ``seq.num_computed_tokens``."""

    seq: Sequence
    num_tokens: int

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples_next_token(self) -> bool:
        """True when this run reaches the last known token, so its logits pick the next one."""
        return self.start + self.num_tokens == self.seq.num_tokens
