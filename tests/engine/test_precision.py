"""The precision plan: chosen per use from timings, and carried out by row count."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from engine.loader import probe_dtype, resolve_precision
from engine.model import EXACT_TOP_LOGITS, Linear
from engine.precision import (
    MAX_DECODE_ROWS,
    PrecisionPlan,
    ProbeTimings,
    choose_plan,
    host_kv_dtype,
)
from engine.runner import ModelRunner
from engine.tiny import tiny_config, tiny_state_dict

F32, BF16 = torch.float32, torch.bfloat16


def _timings(high: dict[str, float], low: dict[str, float]) -> ProbeTimings:
    return ProbeTimings(high_s=high, low_s=low)


def test_each_use_takes_the_dtype_that_ran_faster_by_a_margin() -> None:
    timings = _timings(
        high={"single_row": 10.0, "decode": 10.0, "prefill": 10.0},
        # bf16 wins batch 1 and prefill clearly and ties batched decode (within MIN_GAIN).
        low={"single_row": 4.0, "decode": 9.5, "prefill": 2.5},
    )
    plan = choose_plan(F32, BF16, timings, F32)
    assert plan == PrecisionPlan(F32, single_row=BF16, decode=F32, prefill=BF16, attention=F32)
    assert plan.low_dtype == BF16
    # Attention, the KV cache's dtype, is the host's rule, not a timing.
    assert choose_plan(F32, BF16, timings, BF16).attention == BF16
    # Where fp32 wins everywhere no product needs a weight copy.
    swapped = choose_plan(F32, BF16, _timings(timings.low_s, timings.high_s), F32)
    assert swapped == PrecisionPlan.uniform(F32) and swapped.low_dtype is None
    # A use the probe had no time left for stays in the model's dtype.
    cut_short = _timings({"decode": 10.0}, {"decode": 2.0})
    assert choose_plan(F32, BF16, cut_short, F32) == PrecisionPlan(
        F32, single_row=F32, decode=BF16, prefill=F32, attention=F32
    )
    slow = _timings(timings.high_s, dict.fromkeys(timings.high_s, 100.0))
    assert choose_plan(F32, BF16, slow, F32) == PrecisionPlan.uniform(F32)


def test_auto_times_bf16_on_every_cpu_and_named_dtypes_are_taken_as_they_are() -> None:
    # Before, auto ran bf16 only where the CPU has AMX-BF16 (not on AVX-512 BF16 alone).
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == F32 and probe_dtype("auto", cpu) == BF16
    assert resolve_precision("float32", cpu) == F32
    assert probe_dtype("float32", cpu) is None
    assert resolve_precision("bfloat16", cpu) == BF16
    assert probe_dtype("bfloat16", cpu) is None


def _linear(bias: bool) -> Linear:
    linear = Linear(32, 48, bias=bias)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 32, generator=generator))
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(48, generator=generator))
    return linear


@pytest.mark.parametrize("bias", [False, True])
def test_linear_runs_each_row_count_in_its_uses_dtype(bias: bool) -> None:
    linear = _linear(bias)
    plan = PrecisionPlan(F32, single_row=F32, decode=BF16, prefill=F32, attention=F32)
    linear.apply_plan(plan)
    assert linear.low_weight is not None and linear.low_uses == {"decode"}
    weight = linear.weight.detach()
    low_weight = weight.to(BF16)
    bias_f32 = None if linear.bias is None else linear.bias.detach()
    bias_low = None if bias_f32 is None else bias_f32.to(BF16)
    with torch.inference_mode():
        for rows in (1, 2, 16, MAX_DECODE_ROWS, MAX_DECODE_ROWS + 1, 200):
            x = torch.randn(rows, 32)
            fp32 = torch.nn.functional.linear(x, weight, bias_f32)
            bf16 = torch.nn.functional.linear(x.to(BF16), low_weight, bias_low).float()
            assert not torch.allclose(fp32, bf16, atol=1e-4, rtol=0)  # the two are told apart
            expected = bf16 if 2 <= rows <= MAX_DECODE_ROWS else fp32
            torch.testing.assert_close(linear(x), expected, atol=1e-4, rtol=1e-3)
            assert linear(x).dtype == F32
        # The batch-1 entry point of the lean decode path follows the same plan.
        x = torch.randn(32)
        torch.testing.assert_close(
            linear.row_product(x), torch.nn.functional.linear(x, weight, bias_f32)
        )
    # A plan with no low use drops the copy.
    linear.apply_plan(PrecisionPlan.uniform(F32))
    assert linear.low_weight is None and not linear.low_uses


def test_a_measured_plan_is_carried_out_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    config = tiny_config(256)
    with caplog.at_level(logging.INFO, logger="engine.runner"):
        runner = ModelRunner(
            config, tiny_state_dict(config), num_blocks=8, block_size=4, precision=BF16
        )
    lines = [r.getMessage() for r in caplog.records if "precision by measurement" in r.message]
    assert len(lines) == 1 and runner.plan.describe() in lines[0]
    plan = runner.plan
    assert runner.kv_cache.dtype == plan.attention
    low = {use for use in ("single_row", "decode", "prefill") if plan.of(use) == BF16}
    for module in runner.model.modules():
        if isinstance(module, Linear):
            assert module.low_uses == low
            assert (module.low_weight is None) == (not low)
    assert runner.model.lm_head.low_uses == low


def test_the_reference_path_has_no_low_copies() -> None:
    config = tiny_config(256)
    runner = ModelRunner(config, tiny_state_dict(config), num_blocks=8, block_size=4)
    assert runner.plan == PrecisionPlan.uniform(F32)
    assert runner.kv_cache.dtype == F32
    assert all(m.low_weight is None for m in runner.model.modules() if isinstance(m, Linear))


def test_the_kv_dtype_is_the_hosts_rule_not_a_timing(caplog: pytest.LogCaptureFixture) -> None:
    """Every worker of a model must hold its KV in one dtype: attention's is not measured (two
    workers timing it on a busy machine could disagree, and the pool would refuse one)."""
    config = tiny_config(256)
    for _ in range(2):
        runner = ModelRunner(
            config, tiny_state_dict(config), num_blocks=8, block_size=4, precision=BF16
        )
        assert runner.plan.attention == host_kv_dtype(F32, BF16)
        assert runner.kv_cache.dtype == host_kv_dtype(F32, BF16)


def test_a_plan_is_measured_once_per_host_and_read_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers of one model on one host (a prefill and a decode worker, a restarted one) run
    the plan the first of them measured: the same arithmetic, so disaggregated output is the
    colocated one."""
    config = tiny_config(256)

    def runner() -> ModelRunner:
        return ModelRunner(
            config,
            tiny_state_dict(config),
            num_blocks=8,
            block_size=4,
            precision=BF16,
            plan_cache_dir=tmp_path,
        )

    with caplog.at_level(logging.INFO, logger="engine.runner"):
        first = runner()
        [saved] = list(tmp_path.glob("*.json"))
        # Another plan on file (as if measured so): the next runner takes it, measuring nothing.
        forced = {"single_row": "bfloat16", "decode": "float32", "prefill": "bfloat16"}
        saved.write_text(json.dumps({**forced, "attention": "float32"}))
        second = runner()
    measured = [r for r in caplog.records if "precision by measurement" in r.getMessage()]
    read = [r for r in caplog.records if "measured earlier on this host" in r.getMessage()]
    assert len(measured) == 1 and len(read) == 1
    assert first.plan.attention == second.plan.attention == host_kv_dtype(F32, BF16)
    assert (second.plan.single_row, second.plan.decode, second.plan.prefill) == (BF16, F32, BF16)
    # An unreadable file is measured again, and replaced.
    saved.write_text("{not json")
    third = runner()
    assert json.loads(saved.read_text())["single_row"] in ("float32", "bfloat16")
    assert third.plan.attention == host_kv_dtype(F32, BF16)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rows", [1, 16])
def test_a_low_output_projection_keeps_the_top_logits_exact(rows: int, tied: bool) -> None:
    """The output projection on its bf16 copy: the logits that decide a token (the greedy
    choice, the likeliest top-k/top-p candidates) are the fp32 projection's; only the tail
    keeps bf16's rounding. Tied, the projection is the embedding table; untied, its own."""
    config = dataclasses.replace(tiny_config(1024), tie_word_embeddings=tied)
    state_dict = tiny_state_dict(config)
    if not tied:
        state_dict["lm_head.weight"] = torch.randn(config.vocab_size, config.hidden_size) * 0.1
    plan = PrecisionPlan(F32, single_row=BF16, decode=BF16, prefill=BF16, attention=F32)
    runner = ModelRunner(config, state_dict, num_blocks=8, block_size=4, precision=plan)
    model = runner.model
    if not tied:
        assert model.lm_head.weight is not model.embed_tokens.weight
        torch.testing.assert_close(model.lm_head.weight, state_dict["lm_head.weight"])
    hidden = torch.randn(rows, config.hidden_size, generator=torch.Generator().manual_seed(rows))
    exact = hidden.double() @ model.lm_head.weight.double().T
    logits = model.compute_logits(hidden)
    assert logits.dtype == F32 and logits.shape == exact.shape
    # A step whose runs all end inside their prompt samples nothing.
    assert model.compute_logits(hidden[:0]).shape == (0, config.vocab_size)
    # The exact top half of them: rounding may swap the ones ranked near the cut.
    top = exact.topk(EXACT_TOP_LOGITS // 2, dim=-1).indices
    torch.testing.assert_close(
        logits.gather(-1, top).double(), exact.gather(-1, top), atol=1e-5, rtol=0
    )
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    # The tail is the bf16 product's, off by bf16's rounding.
    tail = torch.ones_like(exact, dtype=torch.bool).scatter_(
        -1, exact.topk(2 * EXACT_TOP_LOGITS, dim=-1).indices, False
    )
    error = (logits.double() - exact).abs()[tail]
    assert error.max() < 0.05 * exact.abs().max() and error.max() > 1e-5


def test_a_projection_all_in_bf16_frees_its_fp32_weight() -> None:
    config = tiny_config(256)
    plan = PrecisionPlan(F32, single_row=BF16, decode=BF16, prefill=BF16, attention=F32)
    runner = ModelRunner(
        config, tiny_state_dict(config), num_blocks=8, block_size=4, precision=plan
    )
    layer_linears = [m for m in runner.model.layers.modules() if isinstance(m, Linear)]
    assert layer_linears and all(m.weight.is_meta for m in layer_linears)
    # The output projection keeps its weight: the exact top logits read it.
    assert not runner.model.lm_head.weight.is_meta
    # A plan that would need a freed weight again is refused, not run on nothing: the model's
    # dtype for some use, or another low dtype (a copy the freed weight cannot make).
    with pytest.raises(ValueError, match="released"):
        layer_linears[0].apply_plan(PrecisionPlan.uniform(F32))
    fp16 = PrecisionPlan(F32, torch.float16, torch.float16, torch.float16, attention=F32)
    with pytest.raises(ValueError, match="released"):
        layer_linears[0].apply_plan(fp16)
    # Half the plan in bf16: both weights stay.
    half = PrecisionPlan(F32, single_row=BF16, decode=F32, prefill=BF16, attention=F32)
    runner = ModelRunner(
        config, tiny_state_dict(config), num_blocks=8, block_size=4, precision=half
    )
    assert not any(m.weight.is_meta for m in runner.model.modules() if isinstance(m, Linear))
