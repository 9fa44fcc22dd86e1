"""Our model and runner against transformers' LlamaForCausalLM on tiny random configs (fp32)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.config import ModelConfig, RopeScaling
from engine.precision import PrecisionPlan
from engine.runner import ModelRunner, ScheduledRun
from engine.sequence import SamplingParams, Sequence

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 128


def _hf_model(
    tie: bool, rope_scaling: dict[str, object] | None = None, qwen2: bool = False
) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    if qwen2:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        if rope_scaling is not None:
            common["rope_scaling"] = rope_scaling
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    # Random init leaves norms at 1; perturb everything so a wrong mapping cannot hide.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _our_config(hf: torch.nn.Module, rope_scaling: RopeScaling | None) -> ModelConfig:
    c = hf.config
    return ModelConfig(
        architecture="qwen2" if "qwen2" in c.model_type else "llama",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=10000.0,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_bias="qwen2" in c.model_type,
        rope_scaling=rope_scaling,
    )


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CASES = {
    "untied": (False, None, False),
    "tied": (True, None, False),
    "llama3_rope": (False, LLAMA3_SCALING, False),
    "qwen2_bias": (True, None, True),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, ModelRunner]:
    tie, scaling, qwen2 = CASES[request.param]
    hf = _hf_model(tie, scaling, qwen2)
    ours_scaling = None
    if scaling is not None:
        ours_scaling = RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    runner = ModelRunner(
        _our_config(hf, ours_scaling),
        hf.state_dict(),
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
    )
    return hf, runner


class _Blocks:
    """Hands out block ids in a shuffled order so sequences are not contiguous in the cache."""

    def __init__(self) -> None:
        self.free = list(range(NUM_BLOCKS))
        random.Random(1).shuffle(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) * BLOCK_SIZE < num_tokens:
            seq.block_table.append(self.free.pop())


def _hf_last_logits(hf: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0, -1]


def _new_seq(name: str, length: int, seed: int) -> Sequence:
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(length)]
    return Sequence(name, prompt, SamplingParams(temperature=0))


def _step(runner: ModelRunner, blocks: _Blocks, runs: list[ScheduledRun]) -> torch.Tensor:
    for run in runs:
        blocks.grow(run.seq, run.start + run.num_tokens)
    logits = runner.execute(runs)
    for run in runs:
        run.seq.num_computed_tokens += run.num_tokens
    return logits


def test_prefill_every_position_matches(pair: tuple[torch.nn.Module, ModelRunner]) -> None:
    hf, runner = pair
    seq = _new_seq("a", 23, seed=2)
    blocks = _Blocks()
    blocks.grow(seq, seq.num_tokens)
    batch, input_ids, positions, _ = runner._prepare([ScheduledRun(seq, seq.num_tokens)])
    with torch.inference_mode():
        hidden = runner.model(input_ids, positions, runner.kv_cache, batch)
        ours = runner.model.compute_logits(hidden)
        theirs = hf(torch.tensor([seq.prompt_token_ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_prefill_then_twenty_decode_steps(pair: tuple[torch.nn.Module, ModelRunner]) -> None:
    hf, runner = pair
    seq = _new_seq("a", 11, seed=3)
    blocks = _Blocks()
    logits = _step(runner, blocks, [ScheduledRun(seq, seq.num_tokens)])
    for _ in range(20):
        torch.testing.assert_close(logits[0], _hf_last_logits(hf, seq.token_ids), atol=ATOL, rtol=0)
        seq.output_token_ids.append(int(logits[0].argmax()))
        logits = _step(runner, blocks, [ScheduledRun(seq, 1)])
    torch.testing.assert_close(logits[0], _hf_last_logits(hf, seq.token_ids), atol=ATOL, rtol=0)


def test_mixed_length_batch_through_paged_cache(
    pair: tuple[torch.nn.Module, ModelRunner],
) -> None:
    hf, runner = pair
    blocks = _Blocks()
    seqs = [_new_seq(str(n), n, seed=n) for n in (1, 5, 17, 33)]
    logits = _step(runner, blocks, [ScheduledRun(s, s.num_tokens) for s in seqs])
    for _ in range(6):
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(
                logits[row], _hf_last_logits(hf, seq.token_ids), atol=ATOL, rtol=0
            )
            seq.output_token_ids.append(int(logits[row].argmax()))
        logits = _step(runner, blocks, [ScheduledRun(s, 1) for s in seqs])
    # A newcomer's prefill in the same step as the others' decodes (continuous batching).
    late = _new_seq("late", 9, seed=99)
    runs = [ScheduledRun(s, 1) for s in seqs] + [ScheduledRun(late, late.num_tokens)]
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(
            logits[row], _hf_last_logits(hf, seq.token_ids), atol=ATOL, rtol=0
        )
        seq.output_token_ids.append(int(logits[row].argmax()))
    logits = _step(runner, blocks, runs)
    for row, seq in enumerate([*seqs, late]):
        torch.testing.assert_close(
            logits[row], _hf_last_logits(hf, seq.token_ids), atol=ATOL, rtol=0
        )


def test_chunked_prefill_equals_unchunked(pair: tuple[torch.nn.Module, ModelRunner]) -> None:
    hf, runner = pair
    whole = _new_seq("whole", 41, seed=7)
    chunked = _new_seq("chunked", 41, seed=7)
    blocks = _Blocks()
    whole_logits = _step(runner, blocks, [ScheduledRun(whole, whole.num_tokens)])
    for size in (16, 13, 1, 11):  # chunk edges inside and on block boundaries
        logits = _step(runner, blocks, [ScheduledRun(chunked, size)])
    assert logits.shape[0] == 1  # only the last chunk samples
    torch.testing.assert_close(logits[0], whole_logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits[0], _hf_last_logits(hf, whole.prompt_token_ids), atol=ATOL, rtol=0
    )
    # The cached KV of both is the same too.
    whole_kv = runner.kv_cache[:, :, whole.block_table].flatten(2, 3)[:, :, :41]
    chunked_kv = runner.kv_cache[:, :, chunked.block_table].flatten(2, 3)[:, :, :41]
    torch.testing.assert_close(whole_kv, chunked_kv, atol=1e-5, rtol=0)


BF16_EVERYWHERE = PrecisionPlan(
    torch.float32,
    single_row=torch.bfloat16,
    decode=torch.bfloat16,
    prefill=torch.bfloat16,
    attention=torch.bfloat16,
)


def test_bf16_products_stay_close(pair: tuple[torch.nn.Module, ModelRunner]) -> None:
    """fp32 weights with every use's products, attention and the KV cache in bf16: the plan
    ``engine.precision`` makes where bf16 wins everywhere."""
    hf, fp32_runner = pair
    runner = ModelRunner(
        fp32_runner.config,
        hf.state_dict(),
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        precision=BF16_EVERYWHERE,
    )
    # Batch 1 reads every projection's bf16 copy, the output projection's included: half their
    # bytes in the reference path; the norms as they are.
    model = runner.model
    as_is = sum(p.numel() * 4 for name, p in model.named_parameters() if "norm" in name)
    assert runner.weights_bytes - as_is == (fp32_runner.weights_bytes - as_is) // 2
    assert model.lm_head.low_uses == {"single_row", "decode", "prefill"}
    low_weight = runner.model.layers[0].qkv_proj.low_weight
    assert low_weight is not None and low_weight.dtype == torch.bfloat16
    assert runner.kv_cache.dtype == torch.bfloat16
    blocks = _Blocks()
    seqs = [_new_seq(str(n), n, seed=n) for n in (9, 30)]
    logits = _step(runner, blocks, [ScheduledRun(s, s.num_tokens) for s in seqs])
    for _ in range(4):
        for row, seq in enumerate(seqs):
            reference = _hf_last_logits(hf, seq.token_ids)
            # bf16 keeps 8 bits of mantissa: logits of magnitude ~1 move by a few 1e-2.
            torch.testing.assert_close(logits[row], reference, atol=0.1, rtol=0.02)
            seq.output_token_ids.append(int(reference.argmax()))
        logits = _step(runner, blocks, [ScheduledRun(s, 1) for s in seqs])
    # Batch-1 decode (the lean path, engine.single_decode) on the bf16 copies.
    seq = seqs[0]
    for _ in range(4):
        reference = _hf_last_logits(hf, seq.token_ids)
        torch.testing.assert_close(logits[0], reference, atol=0.1, rtol=0.02)
        seq.output_token_ids.append(int(reference.argmax()))
        logits = _step(runner, blocks, [ScheduledRun(seq, 1)])
