"""The ``null`` engine: no model and no torch, deterministic tokens at a configurable speed.

It is the real engine loop (``LLMEngine``: continuous batching, KV block accounting, prefix cache,
preemption) over a runner that computes nothing: a step sleeps for the time the configured speeds
give its work and emits tokens that are a pure function of the request's seed and the output
position. Load tests of the workers and the gateway get realistic capacity, cached tokens and
back-pressure without paying for a model.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.engine import EngineConfig, LLMEngine
from engine.sequence import ScheduledRun
from engine.swap import BlockRun

__all__ = ["NullEngineConfig", "NullRunner", "create_null_engine", "null_token"]


@dataclass(frozen=True, slots=True)
class NullEngineConfig:
    """Speeds and sizes of the pretend backend."""

    vocab_size: int = 49152
    first_token_id: int = 1000  # tokens are drawn from [first_token_id, vocab_size)
    prefill_tok_s: float = 20_000.0  # prompt tokens computed per second
    decode_step_s: float = 0.005  # seconds per step that decodes, whatever the batch size
    num_blocks: int = 4096
    block_size: int = 16
    max_model_len: int = 8192
    num_host_blocks: int = 0  # of the pretend host pool swapped-out KV goes to
    swap_block_s: float = 0.0  # seconds to copy one block either way


def null_token(seed: int, output_position: int, config: NullEngineConfig) -> int:
    """The token a request with ``seed`` emits at ``output_position``."""
    digest = hashlib.blake2b(f"{seed}:{output_position}".encode(), digest_size=8).digest()
    span = config.vocab_size - config.first_token_id
    return config.first_token_id + int.from_bytes(digest, "little") % span


class NullRunner:
    """A ``Runner`` that sleeps instead of computing."""

    def __init__(
        self, config: NullEngineConfig, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        if config.first_token_id >= config.vocab_size:
            raise ValueError("first_token_id must be below vocab_size")
        self.config = config
        self._sleep = sleep
        self.num_steps = 0
        self.num_swap_copies = 0
        self.num_swapped_blocks = 0

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def num_host_blocks(self) -> int:
        return self.config.num_host_blocks

    @property
    def precision(self) -> str:
        return "none (null engine: no arithmetic)"

    def swap_out(self, runs: list[BlockRun]) -> None:
        self._copy(runs)

    def swap_in(self, runs: list[BlockRun]) -> None:
        self._copy(runs)

    def scrub(self, block_ids: list[int]) -> list[int]:
        """Nothing to scrub: no KV, and no logits to be non-finite."""
        return []

    def _copy(self, runs: list[BlockRun]) -> None:
        """Bookkeeping only: the tokens are a function of seed and position, not of the KV."""
        num_blocks = sum(count for _, _, count in runs)
        self.num_swap_copies += len(runs)
        self.num_swapped_blocks += num_blocks
        if self.config.swap_block_s > 0:
            self._sleep(num_blocks * self.config.swap_block_s)

    def step(self, runs: list[ScheduledRun]) -> list[int]:
        num_prefill_tokens = sum(run.num_tokens for run in runs if run.num_tokens > 1)
        has_decodes = any(run.num_tokens == 1 for run in runs)
        duration_s = num_prefill_tokens / self.config.prefill_tok_s
        if has_decodes:
            duration_s += self.config.decode_step_s
        self._sleep(duration_s)
        self.num_steps += 1
        return [
            null_token(run.seq.seed, len(run.seq.output_token_ids), self.config)
            for run in runs
            if run.samples_next_token
        ]


def create_null_engine(
    config: NullEngineConfig | None = None,
    engine_config: EngineConfig | None = None,
    *,
    eos_token_ids: Iterable[int] = (),
    sleep: Callable[[float], None] = time.sleep,
) -> LLMEngine:
    """An ``LLMEngine`` over a ``NullRunner``."""
    runner = NullRunner(config or NullEngineConfig(), sleep=sleep)
    return LLMEngine(runner, engine_config, eos_token_ids=eos_token_ids)
