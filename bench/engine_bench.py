"""``fairgate bench engine``: our engine against transformers on the same weights, in one run.

Both sides are measured in this process, alternating round by round and keeping each side's best
time, so that the ratios hold on a shared, noisy machine:
- prefill: one prompt of 512, 2k, 4k and 8k tokens (time to first token; the longest is one short
  of the model's context length when that is 8k; ``--quick``: 512 and 2k only, the long ones in
  fewer rounds), and the 4k and 8k figures per token against the 512 one; for ours also the
  share of one profiled prefill spent in attention, and the cost per token against 512 outside
  attention;
- decode at batch 1 and 16: tokens per second after the prompt, greedy, EOS ignored;
- memory read bandwidth: a pre-filled 1 GiB buffer summed, best of several passes taken just
  before and just after the batch-1 decode rounds that the roofline fraction compares it with.
Ours runs with the precision ``--precision`` gives (``auto``: the plan measured at load, see
``engine.precision``; it is in the result). transformers runs in its ordinary configuration:
fp32, ``generate()`` with its default cache, greedy, the same thread count. Decode rates on both
sides come from the difference of two generation lengths, so the prompt's cost cancels out.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.report import log, print_result
from engine.engine import EngineConfig
from engine.loader import LoadedEngine, Precision, load_engine
from engine.runner import ModelRunner
from engine.sequence import SamplingParams

__all__ = ["measure_mem_read_gbps", "run_engine_bench"]

PREFILL_TOKENS = 512
LONG_PREFILL_TOKENS = (2048, 4096, 8192)
QUICK_LONG_PREFILL_TOKENS = (2048,)
DECODE_PROMPT_TOKENS = 64


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


Generate = Callable[[list[list[int]], int], None]


@dataclass(frozen=True, slots=True)
class _BenchPrompts:
    prefill: list[list[int]]
    long_prefills: list[list[list[int]]]  # one prompt each, longest last
    batch_1: list[list[int]]
    batch_16: list[list[int]]


def _long_lengths(lengths: tuple[int, ...], max_model_len: int) -> list[int]:
    """``lengths`` cut to what the context holds (one token kept free), one per label: a
    shorter context would put two lengths on one label."""
    by_label: dict[str, int] = {}
    for length in sorted(min(n, max_model_len - 1) for n in lengths):
        if length > PREFILL_TOKENS:
            by_label[_label(length)] = length  # the longest of a label
    return list(by_label.values())


def _label(num_tokens: int) -> str:
    """2048 -> "2k"; 8191 (8k less the one token the context must keep free) -> "8k"."""
    return f"{round(num_tokens / 1024)}k"


def _interleaved_best(
    sides: dict[str, Generate],
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
    *,
    warm_up: bool = True,
) -> dict[str, float]:
    """Best wall time of each side. The sides alternate inside every round, so a slow spell of
    the shared machine falls on both rather than on whichever ran during it."""
    for generate in sides.values() if warm_up else ():
        generate(prompts, new_tokens)  # warm-up: allocations and kernel selection
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(repeats):
        for name, generate in sides.items():
            seconds = _timed(lambda: generate(prompts, new_tokens))  # noqa: B023
            best[name] = min(best[name], seconds)
    return best


def _attention_share(loaded: LoadedEngine, prompt: list[list[int]]) -> float:
    """The fraction of one profiled prefill of ``prompt`` (ours) spent in attention calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        seconds = _timed(lambda: _ours_generate(loaded, prompt, 1))
    attention_us: float = sum(
        event.cpu_time_total
        for event in profiled.key_averages()
        if event.key == "aten::scaled_dot_product_attention"
    )
    return min(1.0, attention_us / 1e6 / seconds)


def _measure(
    sides: dict[str, Generate],
    prompts: _BenchPrompts,
    short: int,
    long: int,
    repeats: int,
    ours: LoadedEngine,
) -> dict[str, float]:
    """Prefill and decode rates of every side, keyed ``{side}_prefill_tok_s`` and so on, and
    the share of our prefill spent in attention (``ours_prefill_attention_share[_{length}]``)."""
    figures: dict[str, float] = {}
    prefill_s = _interleaved_best(sides, prompts.prefill, 1, repeats)
    for name in sides:
        figures[f"{name}_prefill_tok_s"] = PREFILL_TOKENS / prefill_s[name]
    figures["ours_prefill_attention_share"] = _attention_share(ours, prompts.prefill)
    for prompt in prompts.long_prefills:
        # Seconds each: two rounds, and no warm-up (the 512-token rounds made the kernels).
        num_tokens = len(prompt[0])
        label = _label(num_tokens)
        long_s = _interleaved_best(sides, prompt, 1, repeats=2, warm_up=False)
        for name in sides:
            figures[f"{name}_prefill_tok_s_{label}"] = num_tokens / long_s[name]
        figures[f"ours_prefill_attention_share_{label}"] = _attention_share(ours, prompt)
        log(", ".join(f"{k} {v:.2f}" for k, v in figures.items() if "prefill" in k))
    bandwidths: list[float] = []
    for label, batch in (("b1", prompts.batch_1), ("b16", prompts.batch_16)):
        if label == "b1":  # the roofline compares batch-1 decode with bandwidth of the same spell
            bandwidths.append(measure_mem_read_gbps())
        # The difference of two lengths: the prompt's cost cancels out.
        short_s = _interleaved_best(sides, batch, short, repeats)
        long_s = _interleaved_best(sides, batch, long, repeats)
        for name in sides:
            rate = len(batch) * (long - short) / (long_s[name] - short_s[name])
            figures[f"{name}_decode_tok_s_{label}"] = rate
        if label == "b1":
            bandwidths.append(measure_mem_read_gbps())
    figures["mem_read_gbps"] = max(bandwidths)
    log(", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
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
    repeats = 2 if quick else 4
    short, long = (4, 20) if quick else (8, 72)
    threads = torch.get_num_threads()
    log(f"bench engine: {spec.model_id}, {threads} threads, device {device}")

    # No prefix cache: every repeat must compute its prompt again.
    loaded = load_engine(
        spec,
        device=device,
        precision=precision,
        engine_config=EngineConfig(enable_prefix_cache=False),
    )
    runner = loaded.runner
    assert isinstance(runner, ModelRunner)
    vocab_size = runner.config.vocab_size
    prompts_b16 = _random_prompts(16, DECODE_PROMPT_TOKENS, vocab_size, seed=2)
    long_lengths = QUICK_LONG_PREFILL_TOKENS if quick else LONG_PREFILL_TOKENS
    prompts = _BenchPrompts(
        _random_prompts(1, PREFILL_TOKENS, vocab_size, seed=1),
        [
            _random_prompts(1, length, vocab_size, seed=length)
            # A shorter context cuts the lengths to it, once each (one label per length).
            for length in _long_lengths(long_lengths, runner.max_model_len)
        ],
        prompts_b16[:1],
        prompts_b16,
    )
    result: dict[str, Any] = {
        "model": spec.model_id,
        "threads": threads,
        "quick": quick,
        "precision": runner.precision,
        "weights_bytes": runner.weights_bytes,
    }
    sides: dict[str, Generate] = {
        "ours": functools.partial(_ours_generate, loaded),
        "hf": functools.partial(_hf_generate, _load_hf(spec.path)),
    }
    result |= _measure(sides, prompts, short, long, repeats, loaded)
    result["roofline_fraction_b1"] = (
        result["weights_bytes"] * result["ours_decode_tok_s_b1"] / result["mem_read_gbps"] / 1e9
    )
    labels = [_label(len(prompt[0])) for prompt in prompts.long_prefills]
    names = ["prefill_tok_s", *(f"prefill_tok_s_{label}" for label in labels)]
    for name in (*names, "decode_tok_s_b1", "decode_tok_s_b16"):
        result[f"ratio_{name}"] = result[f"ours_{name}"] / result[f"hf_{name}"]
    for label in labels:  # what a token of a long prompt costs against one of 512 (1: no more)
        for side in sides:
            result[f"{side}_prefill_cost_per_token_{label}_vs_512"] = (
                result[f"{side}_prefill_tok_s"] / result[f"{side}_prefill_tok_s_{label}"]
            )
        # The same for everything but attention, whose work per token grows with the position:
        # near 1 says attention alone makes long prompts dearer.
        outside_512 = 1 - result["ours_prefill_attention_share"]
        if outside_512 > 0:  # (a profile can put all of a short prefill in attention)
            result[f"ours_prefill_cost_per_token_{label}_vs_512_outside_attention"] = (
                result[f"ours_prefill_cost_per_token_{label}_vs_512"]
                * (1 - result[f"ours_prefill_attention_share_{label}"])
                / outside_512
            )
    print_result(result, output)
    return 0
