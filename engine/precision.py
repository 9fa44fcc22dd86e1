"""The precision plan: which dtype each kind of product runs in, chosen by timing them at load.

A CPU's flags do not say whether bf16 pays. With AMX tiles bf16 products of many rows run several
times faster than fp32 while a bf16 single-row product is compute-bound; on an AMD EPYC with
AVX-512 BF16 and no AMX the model's bf16 products (oneDNN-packed) ran 3.9x fp32 at 16 rows, 4.4x
at 512 and, streaming all 30 layers' weights, 3.1x at one row; an AVX2-only CPU has no bf16
arithmetic at all. So ``engine.runner.measure_plan`` times the model's own products, in the
model's dtype and in the low one, once per use:

- ``single_row``: batch-1 decode, memory-bound: the weights of enough layers to stream them from
  memory (``SINGLE_ROW_PROBE_LAYERS``);
- ``decode``: batched decode, up to ``MAX_DECODE_ROWS`` rows (timed at 16);
- ``prefill``: prompt chunks and mixed steps, more rows (timed at 128);

and ``choose_plan`` (pure) keeps the faster dtype for each (the model's where the low one is
within noise of it or was not timed). Attention, and so the KV cache, is not timed: its dtype is
the CPU kind's rule (``host_kv_dtype``). The probe, copies included, takes ~0.2-0.3 s on
SmolLM2-135M on 2 quiet cores, and starts no new use after ``PROBE_BUDGET_S`` on a busy machine.
The plan is the single place that decides: ``engine.model.Linear`` picks its kernel from it by
row count (the output projection too), ``engine.runner.ModelRunner`` the KV cache's dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

__all__ = [
    "MAX_DECODE_ROWS",
    "USES",
    "PrecisionPlan",
    "ProbeTimings",
    "Product",
    "Use",
    "choose_plan",
    "dtype_name",
    "host_kv_dtype",
    "measure",
    "use_of_rows",
]

Use = Literal["single_row", "decode", "prefill"]
USES: tuple[Use, ...] = get_args(Use)

# Products of up to this many rows are batched decode; more is a prompt chunk or a mixed step.
MAX_DECODE_ROWS = 64
DECODE_PROBE_ROWS = 16
PREFILL_PROBE_ROWS = 128
SINGLE_ROW_PROBE_LAYERS = 16
# Wall time after which no further use is started: quiet, the probe takes ~0.2-0.3 s on
# SmolLM2-135M and 2 cores; with every core busy each call can wait a scheduler quantum, and
# the whole probe took 6.5 s.
PROBE_BUDGET_S = 0.5
# A choice of the low dtype must win by this much: within noise, the model's dtype (exact
# reference arithmetic, no extra copies) is kept.
MIN_GAIN = 1.1


def host_kv_dtype(dtype: torch.dtype, low_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's (and attention's) dtype on this CPU: ``low_dtype`` where the CPU has
    AMX-BF16, else ``dtype``. Not measured, unlike the products: every worker of a model must
    hold its KV in one dtype to exchange blocks, and independent timings, each on a machine as
    busy as it happens to be while its workers start, cannot be made to agree (a worker on the
    other dtype is refused as incompatible, and the first one a pool admits locks the others
    out). A rule of the CPU's kind gives the same answer on every worker of that kind (bf16
    attention measured ~2.5x fp32 with AMX, 0.35-0.45x on AVX-512 BF16 without it)."""
    capability: dict[str, object] = torch._C._cpu._get_cpu_capability()
    return low_dtype if capability.get("amx_bf16", False) else dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def use_of_rows(num_rows: int) -> Use:
    """Which use a product of ``num_rows`` rows is."""
    if num_rows == 1:
        return "single_row"
    return "decode" if num_rows <= MAX_DECODE_ROWS else "prefill"


@dataclass(frozen=True, slots=True)
class PrecisionPlan:
    """The dtype of each use's products and of attention (and so of the KV cache). The model's
    weights, activations and residual stream stay in ``dtype``; a use in another dtype runs on a
    copy of the weights in it, its activations cast in and the results cast back."""

    dtype: torch.dtype
    single_row: torch.dtype
    decode: torch.dtype
    prefill: torch.dtype
    attention: torch.dtype

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> PrecisionPlan:
        return cls(dtype, dtype, dtype, dtype, dtype)

    def of(self, use: Use) -> torch.dtype:
        return {"single_row": self.single_row, "decode": self.decode, "prefill": self.prefill}[use]

    @property
    def low_dtype(self) -> torch.dtype | None:
        """The dtype of the weight copies some use needs (None: every product runs on the
        model's own weights)."""
        lows = {self.single_row, self.decode, self.prefill} - {self.dtype}
        assert len(lows) <= 1, f"one low dtype at most, got {lows}"
        return next(iter(lows), None)

    def describe(self) -> str:
        return (
            f"batch-1 decode {dtype_name(self.single_row)}, "
            f"batched decode {dtype_name(self.decode)}, prefill {dtype_name(self.prefill)}, "
            f"attention {dtype_name(self.attention)}"
        )


@dataclass(frozen=True, slots=True)
class ProbeTimings:
    """Best seconds of each use's probe, in the model's dtype and in the low dtype."""

    high_s: dict[str, float]  # keys: the ``Use``s timed
    low_s: dict[str, float]


def choose_plan(
    dtype: torch.dtype, low_dtype: torch.dtype, timings: ProbeTimings, kv_dtype: torch.dtype
) -> PrecisionPlan:
    """For each use, ``low_dtype`` where it ran at least ``MIN_GAIN`` times faster, else
    ``dtype``; attention in ``kv_dtype`` (``host_kv_dtype``)."""

    def pick(use: Use) -> torch.dtype:
        if use not in timings.high_s:  # not timed: the probe ran out of time
            return dtype
        return low_dtype if timings.high_s[use] >= MIN_GAIN * timings.low_s[use] else dtype

    return PrecisionPlan(
        dtype,
        single_row=pick("single_row"),
        decode=pick("decode"),
        prefill=pick("prefill"),
        attention=kv_dtype,
    )


Product = Callable[[torch.Tensor, Use, bool], torch.Tensor]


def measure(
    projections: list[list[Product]],
    in_features: list[int],
    dtype: torch.dtype,
    low_dtype: torch.dtype,
    *,
    rounds: int = 2,
    budget_s: float = PROBE_BUDGET_S,
) -> ProbeTimings:
    """Time each use both ways. ``projections[layer]``: the layer's products, each called as
    ``product(x, use, is_low)`` with ``x`` of ``in_features[i]`` columns.

    A use's time is the sum over its layers of each layer's best round, the two dtypes timed
    one after the other layer by layer: on a shared machine a busy spell then spoils one
    layer's figure in one round, not a whole dtype's. A use not started within ``budget_s``
    (a machine so busy that every call waits for a core) is left out of the timings, and so
    stays in the model's dtype; a use started runs all its rounds, so that each layer's two
    dtypes are timed in both orders (the budget bounds when the last use starts, not when the
    probe ends)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    high: dict[str, float] = {}
    low: dict[str, float] = {}

    def inputs(num_rows: int) -> list[torch.Tensor]:
        return [torch.randn(num_rows, n, generator=generator, dtype=dtype) for n in in_features]

    # The compute-bound uses time a few layers; batch 1 streams the weights of enough layers
    # to be read from memory, as in a decode step (SmolLM2-135M's 16: 113 MB in bf16, over three
    # times a 32 MB L3).
    plans: dict[Use, tuple[list[list[Product]], list[torch.Tensor]]] = {
        "decode": (projections[:4], inputs(DECODE_PROBE_ROWS)),
        "prefill": (projections[:2], inputs(PREFILL_PROBE_ROWS)),
        "single_row": (projections[:SINGLE_ROW_PROBE_LAYERS], inputs(1)),
    }
    for use, (layers, xs) in plans.items():
        if time.perf_counter() - start > budget_s:
            break
        for is_low in (False, True):  # warm-up: kernel selection, oneDNN primitive creation
            _run_layer(layers[0], xs, use, is_low)
        best = [[float("inf"), float("inf")] for _ in layers]
        for round_index in range(rounds):
            for layer, layer_best in zip(layers, best, strict=True):
                order = (False, True) if round_index % 2 == 0 else (True, False)
                for is_low in order:
                    seconds = _timed(lambda: _run_layer(layer, xs, use, is_low))  # noqa: B023
                    layer_best[is_low] = min(layer_best[is_low], seconds)
        high[use] = sum(pair[0] for pair in best)
        low[use] = sum(pair[1] for pair in best)
    return ProbeTimings(high_s=high, low_s=low)


def _run_layer(layer: list[Product], xs: list[torch.Tensor], use: Use, is_low: bool) -> None:
    for product, x in zip(layer, xs, strict=True):
        product(x, use, is_low)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
