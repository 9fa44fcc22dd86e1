"""Step-time model of the engine, for the scheduling simulator (``bench.sim``), DistServe-style.

    prefill step:  t = prefill_base_s + prefill_token_s · Σ n_i + prefill_attention_s · Σ n_i·c_i
    decode step:   t = decode_base_s + decode_seq_s · batch + decode_context_s · Σ context_j

``n_i`` is the number of prompt tokens run i computes in the step (a chunk of at most 512) and
``c_i`` the context its last token attends to (tokens before the chunk plus the chunk), so
``Σ n·c`` is the attention work: ``len²`` for a whole prompt in one chunk. A decode step runs one
token for each of ``batch`` sequences whose contexts sum to ``Σ context``.

``fit`` measures the real engine (``engine.loader.load_engine``) step by step through a timing
wrapper around its runner and fits the six coefficients by least squares on relative error;
``fairgate bench sched --fit`` writes them to ``latency_model.json`` beside this file, which also
records where they come from. ``LatencyModel.scaled(speedup)`` stands in for a faster backend:
every step takes ``1/speedup`` of the time (the rates of the scenarios follow, see
``bench.scenarios``).
"""

from __future__ import annotations

import datetime
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import log

if TYPE_CHECKING:
    from engine.sequence import ScheduledRun

__all__ = ["DEFAULT_MODEL_PATH", "LatencyModel", "StepSample", "fit", "fit_samples"]

DEFAULT_MODEL_PATH = Path(__file__).with_name("latency_model.json")


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Seconds per engine step; see the module docstring for the two formulas."""

    prefill_base_s: float
    prefill_token_s: float
    prefill_attention_s: float
    decode_base_s: float
    decode_seq_s: float
    decode_context_s: float
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def prefill_step_s(self, num_tokens: int, attention_units: int) -> float:
        """A prefill step computing ``num_tokens`` prompt tokens with ``Σ n·c`` attention work."""
        return (
            self.prefill_base_s
            + self.prefill_token_s * num_tokens
            + self.prefill_attention_s * attention_units
        )

    def decode_step_s(self, num_seqs: int, num_context_tokens: int) -> float:
        """A decode step of ``num_seqs`` sequences holding ``num_context_tokens`` in all."""
        return (
            self.decode_base_s
            + self.decode_seq_s * num_seqs
            + self.decode_context_s * num_context_tokens
        )

    def scaled(self, speedup: float) -> LatencyModel:
        """The same shape on a backend ``speedup`` times faster."""
        if speedup <= 0:
            raise ValueError(f"speedup must be positive, got {speedup}")
        return replace(
            self,
            prefill_base_s=self.prefill_base_s / speedup,
            prefill_token_s=self.prefill_token_s / speedup,
            prefill_attention_s=self.prefill_attention_s / speedup,
            decode_base_s=self.decode_base_s / speedup,
            decode_seq_s=self.decode_seq_s / speedup,
            decode_context_s=self.decode_context_s / speedup,
            provenance=self.provenance | {"speedup": speedup},
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH) -> LatencyModel:
        data = json.loads(path.read_text())
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{path} is not a latency model: {exc}") from exc


# ---- fitting ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepSample:
    """One timed engine step: a pure prefill step (``num_seqs`` 0) or a pure decode step."""

    seconds: float
    num_prefill_tokens: int = 0
    attention_units: int = 0
    num_seqs: int = 0
    num_context_tokens: int = 0


class _TimingRunner:
    """Wraps the engine's runner: times every ``step`` and records its features. Steps that mix
    prefill chunks and decodes are timed but not kept (each formula covers one kind)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.samples: list[StepSample] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, runs: list[ScheduledRun]) -> list[int]:
        prefill = [r for r in runs if r.num_tokens > 1 or r.start < r.seq.num_prompt_tokens - 1]
        start = time.perf_counter()
        token_ids: list[int] = self.inner.step(runs)
        seconds = time.perf_counter() - start
        if len(prefill) == len(runs):
            self.samples.append(
                StepSample(
                    seconds,
                    num_prefill_tokens=sum(r.num_tokens for r in runs),
                    attention_units=sum(r.num_tokens * (r.start + r.num_tokens) for r in runs),
                )
            )
        elif not prefill:
            self.samples.append(
                StepSample(
                    seconds,
                    num_seqs=len(runs),
                    num_context_tokens=sum(r.start + 1 for r in runs),
                )
            )
        return token_ids


def fit_samples(
    samples: list[StepSample],
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, float]]:
    """(prefill coefficients, decode coefficients, (prefill, decode) mean relative error) by
    least squares on
    relative error; a coefficient that comes out negative (noise on a small term) is dropped and
    the rest refitted, so that no step time can come out below the base."""
    prefill = [s for s in samples if s.num_seqs == 0]
    decode = [s for s in samples if s.num_seqs > 0]
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError("need at least three prefill and three decode steps to fit")
    prefill_coef, prefill_err = _nonnegative_fit(
        [(1.0, s.num_prefill_tokens, s.attention_units) for s in prefill],
        [s.seconds for s in prefill],
    )
    decode_coef, decode_err = _nonnegative_fit(
        [(1.0, s.num_seqs, s.num_context_tokens) for s in decode], [s.seconds for s in decode]
    )
    return prefill_coef, decode_coef, (prefill_err, decode_err)


def _nonnegative_fit(
    rows: list[tuple[float, ...]], seconds: list[float]
) -> tuple[tuple[float, ...], float]:
    import numpy as np

    features = np.asarray(rows, dtype=np.float64)
    target = np.asarray(seconds, dtype=np.float64)
    # Relative error: divide each row by its time, so short steps count as much as long ones.
    weighted = features / target[:, None]
    active = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(weighted[:, active], np.ones(len(target)), rcond=None)
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    predicted = features @ coef
    mean_error = float(np.mean(np.abs(predicted - target) / target))
    return tuple(float(c) for c in coef), mean_error


def _prefill_workloads(quick: bool) -> list[tuple[int, int]]:
    """(prompts, tokens each) for the prefill steps: single prompts up to six chunks long (the
    attention term) and batches of short ones (the per-token and base terms)."""
    if quick:
        return [(1, 16), (1, 256), (1, 1024), (4, 64), (8, 32)]
    return [
        (1, 16),
        (1, 64),
        (1, 256),
        (1, 512),
        (1, 1024),
        (1, 2048),
        (1, 3072),
        (4, 128),
        (8, 64),
        (16, 32),
    ]


def _decode_workloads(quick: bool) -> list[tuple[int, int]]:
    """(batch, context tokens each) for the decode steps, up to 32k context tokens per batch
    (twice a simulated decode worker's default KV)."""
    batches = (1, 8, 32) if quick else (1, 4, 16, 32, 64)
    contexts = (64, 512) if quick else (128, 512, 2048)
    return [(b, c) for c in contexts for b in batches if b * c <= 32_768]


def _machine_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{platform.machine()}, {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.machine()


def fit(
    engine: str = "default", *, quick: bool = False, progress: Callable[[str], None] = log
) -> LatencyModel:
    """Measure ``engine`` (a ``--model`` name) on the CPU step by step and fit the model."""
    import torch

    from engine.engine import EngineConfig
    from engine.loader import load_engine
    from engine.sequence import SamplingParams

    loaded = load_engine(engine, engine_config=EngineConfig())
    timing = _TimingRunner(loaded.runner)
    llm = loaded.engine
    llm.runner = timing  # the engine calls runner.step once per step
    rng = random.Random(0)
    vocab_size = loaded.runner.vocab_size
    low = min(1000, vocab_size // 2)  # skip the low ids, where the special tokens live

    def prompt(length: int) -> list[int]:
        return [rng.randrange(low, vocab_size) for _ in range(length)]

    one_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([prompt(64)], one_token)  # warm-up: allocations and kernel selection
    timing.samples.clear()
    for count, length in _prefill_workloads(quick):
        progress(f"fit: prefill {count} x {length} tokens")
        llm.generate([prompt(length) for _ in range(count)], one_token)  # random: no cache hits
    decode_steps = 4 if quick else 6
    for batch, context in _decode_workloads(quick):
        progress(f"fit: decode batch {batch}, context {context}")
        # One shared prompt per context: the prefix cache computes it once, every sequence of
        # the batch still attends to all of it.
        shared = prompt(context)
        params = SamplingParams(max_tokens=decode_steps + 1, temperature=0, ignore_eos=True)
        llm.generate([shared for _ in range(batch)], params)
    samples = timing.samples
    (pa, pb, pc), (da, db, dc), (prefill_error, decode_error) = fit_samples(samples)
    provenance = {
        "engine": loaded.model_id,
        "device": "cpu",
        "precision": str(getattr(loaded.runner, "dtype", "?")),
        "threads": torch.get_num_threads(),
        "machine": _machine_name(),
        "torch": torch.__version__,
        "measured": datetime.date.today().isoformat(),
        "num_samples": len(samples),
        "prefill_mean_relative_error": round(prefill_error, 4),
        "decode_mean_relative_error": round(decode_error, 4),
        "quick": quick,
        "how": "fairgate bench sched --fit: engine steps timed through a wrapper around the "
        "runner, least squares on relative error",
    }
    return LatencyModel(pa, pb, pc, da, db, dc, provenance)
