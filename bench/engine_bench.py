"""``fairgate bench engine``: our engine against transformers on the same weights, in one run.

Measured on this machine in this process, so ratios hold even when the machine is shared:
- prefill: one 512-token prompt (time to first token);
- decode at batch 1 and 16: tokens per second after the prompt, greedy, EOS ignored;
- memory read bandwidth: a pre-filled buffer summed, best of several passes.
transformers runs in its ordinary configuration: fp32, ``generate()`` with its default cache,
greedy, the same thread count. Decode rates on both sides come from the difference of two
generation lengths, so the prompt's cost cancels out.
"""

from __future__ import annotations

import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.engine import EngineConfig
from engine.loader import LoadedEngine, Precision, load_engine
from engine.sequence import SamplingParams

__all__ = ["measure_mem_read_gbps", "run_engine_bench"]

PREFILL_TOKENS = 512
DECODE_PROMPT_TOKENS = 64


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if repeats < 3 else statistics.median(times)


def measure_mem_read_gbps(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth of a buffer far larger than the caches, filled before timing."""
    buffer = torch.empty(num_bytes // 4, dtype=torch.float32)
    buffer.fill_(1.0)
    seconds = min(_timed(lambda: buffer.sum()) for _ in range(repeats))
    return num_bytes / seconds / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids, where the special tokens live.
    return [[rng.randrange(1000, vocab_size) for _ in range(length)] for _ in range(count)]


def _ours_generate(loaded: LoadedEngine, prompts: list[list[int]], new_tokens: int) -> None:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    outputs = loaded.engine.generate(prompts, params)
    assert all(len(o) == new_tokens for o in outputs)


def _hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> None:
    input_ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == input_ids.shape[1] + new_tokens


def _decode_rate(
    generate: Callable[[list[list[int]], int], None],
    prompts: list[list[int]],
    short: int,
    long: int,
    repeats: int,
) -> float:
    t_short = _best_time(lambda: generate(prompts, short), repeats)
    t_long = _best_time(lambda: generate(prompts, long), repeats)
    return len(prompts) * (long - short) / (t_long - t_short)


@dataclass(frozen=True, slots=True)
class _BenchPrompts:
    prefill: list[list[int]]
    batch_1: list[list[int]]
    batch_16: list[list[int]]


def _measure(
    side: str,
    generate: Callable[[list[list[int]], int], None],
    prompts: _BenchPrompts,
    short: int,
    long: int,
    repeats: int,
) -> dict[str, float]:
    """Prefill and decode rates of one side (``ours`` or ``hf``)."""
    prefill_s = _best_time(lambda: generate(prompts.prefill, 1), repeats)
    figures = {f"{side}_prefill_tok_s": PREFILL_TOKENS / prefill_s}
    for name, batch in (("b1", prompts.batch_1), ("b16", prompts.batch_16)):
        figures[f"{side}_decode_tok_s_{name}"] = _decode_rate(generate, batch, short, long, repeats)
    _log(f"{side}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    return figures


def _load_hf(model_path: Path) -> Any:
    import transformers

    model: Any
    if model_path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=torch.float32
        )
    return model.eval()


def run_engine_bench(
    *,
    model: str = "default",
    device: str = "cpu",
    precision: Precision = "auto",
    quick: bool = False,
    output: str | None = None,
) -> int:
    from engine.model_store import resolve_model

    spec = resolve_model(model)
    if spec.path is None:
        raise ValueError("bench engine needs a model with weights on disk (not 'tiny')")
    repeats = 2 if quick else 5
    short, long = (4, 20) if quick else (8, 72)
    threads = torch.get_num_threads()
    _log(f"bench engine: {spec.model_id}, {threads} threads, device {device}")

    # No prefix cache: every repeat must compute its prompt again.
    loaded = load_engine(spec, device=device, engine_config=EngineConfig(enable_prefix_cache=False))
    vocab_size = loaded.runner.config.vocab_size
    prefill_prompt = _random_prompts(1, PREFILL_TOKENS, vocab_size, seed=1)
    prompts_b16 = _random_prompts(16, DECODE_PROMPT_TOKENS, vocab_size, seed=2)

    result: dict[str, Any] = {"model": spec.model_id, "threads": threads, "quick": quick}
    runner = loaded.runner
    result["precision"] = f"{runner.dtype}, batched {runner.batched_dtype or runner.dtype}"
    prompts = _BenchPrompts(prefill_prompt, prompts_b16[:1], prompts_b16)
    result["weights_bytes"] = loaded.runner.weights_bytes
    ours = functools.partial(_ours_generate, loaded)
    result |= _measure("ours", ours, prompts, short, long, repeats)
    del loaded, ours  # free the model before loading the next one
    hf = functools.partial(_hf_generate, _load_hf(spec.path))
    result |= _measure("hf", hf, prompts, short, long, repeats)
    del hf
    result["mem_read_gbps"] = measure_mem_read_gbps()
    result["roofline_fraction_b1"] = (
        result["weights_bytes"] * result["ours_decode_tok_s_b1"] / result["mem_read_gbps"] / 1e9
    )
    for name in ("prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b16"):
        result[f"ratio_{name}"] = result[f"ours_{name}"] / result[f"hf_{name}"]
    line = json.dumps(result, sort_keys=True)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(line + "\n")
    print(line)
    return 0
