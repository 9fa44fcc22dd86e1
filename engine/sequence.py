"""Request state inside an engine: sampling parameters, tokens, blocks and progress. Torch-free, so
the null engine and the gateway can share it."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "FinishReason",
    "SamplingParams",
    "ScheduledRun",
    "Sequence",
    "SequenceStatus",
    "StepOutput",
]

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy.

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
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HANDED_OFF = "handed_off"  # prefill done, first token sampled; blocks held for the transfer
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """One request's progress: the tokens so far and the KV blocks that hold them."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes = b""
    arrival_s: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    is_prefill_only: bool = False  # hand off after the first token instead of decoding
    seed: int = field(default_factory=lambda: secrets.randbits(63))

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
