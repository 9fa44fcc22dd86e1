"""The engine loop on the tiny random model: batching, prefix cache, preemption, abort, sampling."""

from __future__ import annotations

import random

import pytest
import torch

from engine.engine import EngineConfig, LLMEngine
from engine.sequence import SamplingParams, StepOutput
from tests.engine.tiny_engines import VOCAB_SIZE, tiny_runner


def _engine(
    weights: dict[str, torch.Tensor],
    *,
    num_blocks: int = 256,
    config: EngineConfig | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> LLMEngine:
    runner = tiny_runner(weights, num_blocks=num_blocks)
    return LLMEngine(runner, config, eos_token_ids=eos_token_ids)


def _prompts(count: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(min_len, max_len))]
        for _ in range(count)
    ]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_batched_equals_one_at_a_time(weights: dict[str, torch.Tensor]) -> None:
    prompts = _prompts(8, seed=1)
    alone = [_engine(weights).generate([p], GREEDY)[0] for p in prompts]
    together = _engine(weights).generate(prompts, GREEDY)
    assert together == alone
    assert all(len(out) == GREEDY.max_tokens for out in together)


def test_decodes_of_unlike_lengths_are_attended_in_groups_with_the_same_tokens(
    weights: dict[str, torch.Tensor],
) -> None:
    """One long context among short ones: its decodes go in their own padded call (the short
    ones would otherwise each pay its length), and every sequence gets the tokens it gets
    alone."""
    long_prompt = _prompts(1, seed=3, min_len=200, max_len=200)[0]
    prompts = [long_prompt, *_prompts(5, seed=4, min_len=3, max_len=8)]
    alone = [_engine(weights).generate([p], GREEDY)[0] for p in prompts]
    engine = _engine(weights)
    runner = engine.runner
    tables = [list(range(n)) for n in (2, 3, 2, 52)]
    groups = runner._decode_groups(tables, [8, 11, 7, 205])
    assert [None if g.rows is None else g.rows.tolist() for g in groups] == [[0, 2, 1], [3]]
    assert [g.max_context_len for g in groups] == [11, 205]
    (alike,) = runner._decode_groups([[0, 1], [2, 3, 4]], [7, 10])
    assert alike.rows is None and alike.block_tables.shape == (2, 3)
    assert engine.generate(prompts, GREEDY) == alone


def test_chunked_scheduling_equals_whole_prompts(weights: dict[str, torch.Tensor]) -> None:
    prompts = _prompts(6, seed=2, min_len=20, max_len=60)
    whole = _engine(weights).generate(prompts, GREEDY)
    small = EngineConfig(max_num_batched_tokens=24, prefill_chunk_size=7)
    assert _engine(weights, config=small).generate(prompts, GREEDY) == whole


def test_a_time_capped_step_plan_gives_the_same_tokens(weights: dict[str, torch.Tensor]) -> None:
    """Prompts cut into two-block chunks by the time cap (100 tok/s for 0.08 s: 8 tokens a
    step) give the greedy tokens of uncapped steps, with prefix-cache hits and for a request
    resumed with its earlier output."""
    shared = _prompts(1, seed=10, min_len=24, max_len=24)[0]
    prompts = [*_prompts(4, seed=11, min_len=20, max_len=50), [*shared, 7], [*shared, 8, 9]]
    uncapped = _engine(weights, config=EngineConfig(max_prefill_step_s=None))
    capped = _engine(weights, config=EngineConfig(max_prefill_step_s=0.08))
    uncapped.prefill_tok_s = capped.prefill_tok_s = 100.0
    assert capped.max_step_prompt_tokens() == 8
    expected = uncapped.generate(prompts, GREEDY)
    assert capped.generate(prompts, GREEDY) == expected
    # The shared prefix is cached now: 6 blocks hit, then 15 tokens in one or two chunks.
    resumed = [*shared, *range(1, 11), *expected[4][:5]]
    for engine in (capped, uncapped):
        engine.add_request("resumed", resumed, GREEDY, num_prior_output_tokens=5)
    capped_outputs, uncapped_outputs = _drain(capped), _drain(uncapped)
    capped_tokens = [t for output in capped_outputs for t in output.new_token_ids]
    assert capped_tokens == [t for output in uncapped_outputs for t in output.new_token_ids]
    assert len(capped_tokens) == GREEDY.max_tokens - 5
    assert capped_outputs[0].num_cached_tokens == uncapped_outputs[0].num_cached_tokens == 24
    assert (capped_outputs[0].num_prefill_chunks, uncapped_outputs[0].num_prefill_chunks) == (2, 1)
    capped.blocks.check_invariants()


def _drain(engine: LLMEngine) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_requests_join_and_leave_between_steps(weights: dict[str, torch.Tensor]) -> None:
    prompts = _prompts(4, seed=3)
    expected = [_engine(weights).generate([p], GREEDY)[0] for p in prompts]
    engine = _engine(weights)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:  # a newcomer every third step
            index, prompt = pending.pop(0)
            engine.add_request(str(index), prompt, GREEDY)
            outputs[str(index)] = []
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        steps += 1
    assert [outputs[str(i)] for i in range(len(prompts))] == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
    engine.blocks.check_invariants()


def test_prefix_cache_hits_and_same_output(weights: dict[str, torch.Tensor]) -> None:
    shared = _prompts(1, seed=4, min_len=33, max_len=33)[0]
    first, second = [*shared, 1, 2, 3], [*shared, 4, 5]
    engine = _engine(weights)
    expected = _engine(weights, config=EngineConfig(enable_prefix_cache=False)).generate(
        [second], GREEDY
    )
    engine.generate([first], GREEDY)
    engine.add_request("again", second, GREEDY)
    tokens: list[int] = []
    cached = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
            cached = out.num_cached_tokens
    assert cached == 32  # the 8 full blocks of the shared prefix
    assert [tokens] == expected


def test_prefix_cache_is_salted(weights: dict[str, torch.Tensor]) -> None:
    prompt = _prompts(1, seed=5, min_len=20, max_len=20)[0]
    engine = _engine(weights)
    engine.add_request("a", prompt, GREEDY, salt=b"tenant-a")
    while engine.has_unfinished():
        engine.step()
    seq = engine.add_request("b", prompt, GREEDY, salt=b"tenant-b")
    engine.step()
    assert seq.num_cached_tokens == 0
    seq = engine.add_request("c", prompt, GREEDY, salt=b"tenant-a")
    engine.step()
    assert seq.num_cached_tokens == 16


def test_preemption_by_recompute_keeps_output(weights: dict[str, torch.Tensor]) -> None:
    prompts = _prompts(6, seed=6, min_len=10, max_len=14)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = _engine(weights).generate(prompts, params)
    # 6 requests of up to 34 tokens need up to 54 blocks; 24 forces preemptions.
    engine = _engine(weights, num_blocks=24)
    assert engine.generate(prompts, params) == expected
    assert engine.num_preemptions > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
    engine.blocks.check_invariants()


def test_abort_frees_blocks(weights: dict[str, torch.Tensor]) -> None:
    engine = _engine(weights)
    for index, prompt in enumerate(_prompts(3, seed=7)):
        engine.add_request(str(index), prompt, GREEDY)
    engine.step()
    engine.step()
    assert engine.abort("1")
    assert not engine.abort("1")
    while engine.has_unfinished():
        assert all(out.request_id != "1" for out in engine.step())
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
    engine.blocks.check_invariants()


def test_stop_token_and_eos(weights: dict[str, torch.Tensor]) -> None:
    prompt = _prompts(1, seed=8)[0]
    free_run = _engine(weights).generate([prompt], GREEDY)[0]
    stop_at = free_run[4]
    cut = free_run[: free_run.index(stop_at) + 1]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=frozenset({stop_at}))
    assert _engine(weights).generate([prompt], params)[0] == cut
    eos_params = SamplingParams(max_tokens=12, temperature=0)
    assert _engine(weights, eos_token_ids=(stop_at,)).generate([prompt], eos_params)[0] == cut


def test_seeded_sampling_is_reproducible_and_batch_independent(
    weights: dict[str, torch.Tensor],
) -> None:
    prompts = _prompts(4, seed=9)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = _engine(weights).generate(prompts[:1], params)[0]
    together = _engine(weights).generate(prompts, params)[0]
    assert alone == together
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=99)
    assert _engine(weights).generate(prompts[:1], other_seed)[0] != alone


def test_rejects_requests_that_cannot_fit(weights: dict[str, torch.Tensor]) -> None:
    engine = _engine(weights, num_blocks=4)
    with pytest.raises(ValueError, match="never fit"):
        engine.add_request("big", list(range(10)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="no tokens"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("oov", [VOCAB_SIZE], GREEDY)
