"""Disaggregation inside one process: a prefill-only engine hands requests off after their first
token, their KV blocks are copied into another engine's reservations, and decoding continues
there. The output must equal one engine doing it all; no block may leak on either side."""

from __future__ import annotations

import random

import pytest
import torch

from engine.engine import EngineConfig, LLMEngine
from engine.runner import ModelRunner
from engine.sequence import SamplingParams, SequenceStatus, StepOutput
from tests.engine.tiny_engines import BLOCK_SIZE, VOCAB_SIZE, tiny_runner


def _engine(
    weights: dict[str, torch.Tensor], *, num_blocks: int = 128, max_num_seqs: int = 64
) -> tuple[LLMEngine, ModelRunner]:
    runner = tiny_runner(weights, num_blocks=num_blocks)
    return LLMEngine(runner, EngineConfig(max_num_seqs=max_num_seqs)), runner


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(2, 30))] for _ in range(count)]


def _disaggregated(
    weights: dict[str, torch.Tensor], prompts: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    prefill, prefill_runner = _engine(weights)
    decode, decode_runner = _engine(weights, num_blocks=200)
    outputs: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        prefill.add_request(str(index), prompt, params, prefill_only=True)
    first_outputs: list[StepOutput] = []
    while prefill.has_unfinished():
        first_outputs.extend(prefill.step())
    assert not prefill.running and not prefill.waiting
    for output in first_outputs:
        request_id = output.request_id
        outputs[request_id] = list(output.new_token_ids)
        if not output.is_handed_off:  # the first token already ended it
            assert output.finish_reason is not None
            continue
        seq = prefill.handed_off[request_id]
        assert seq.status is SequenceStatus.HANDED_OFF
        reserved = decode.reserve(request_id, seq.num_prompt_tokens + 1)
        assert reserved is not None
        # The "transfer": every layer's keys and values of the prompt's blocks.
        src = torch.tensor(seq.block_table)
        dst = torch.tensor(reserved[: len(seq.block_table)])
        decode_runner.kv_cache[:, :, dst] = prefill_runner.kv_cache[:, :, src]
        decode.add_prefilled(
            request_id,
            seq.prompt_token_ids,
            seq.output_token_ids[0],
            params,
            num_cached_tokens=seq.num_cached_tokens,
        )
        assert prefill.release_handed_off(request_id)
    while decode.has_unfinished():
        for output in decode.step():
            outputs[output.request_id].extend(output.new_token_ids)
    for engine in (prefill, decode):
        assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
        assert not engine.sequences and not engine.reservations and not engine.handed_off
        engine.blocks.check_invariants()
    return [outputs[str(index)] for index in range(len(prompts))]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
    ],
    ids=["greedy", "seeded-sampling", "one-token"],
)
def test_handoff_equals_one_engine(
    weights: dict[str, torch.Tensor], params: SamplingParams
) -> None:
    prompts = _prompts(8, seed=5)
    together, _ = _engine(weights)
    assert _disaggregated(weights, prompts, params) == together.generate(prompts, params)


def test_first_token_that_stops_is_not_handed_off(weights: dict[str, torch.Tensor]) -> None:
    prompt = _prompts(1, seed=6)[0]
    engine, _ = _engine(weights)
    [expected] = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    engine.add_request(
        "r",
        prompt,
        SamplingParams(max_tokens=5, temperature=0, stop_token_ids=frozenset(expected)),
        prefill_only=True,
    )
    [output] = engine.step()
    assert output.finish_reason == "stop" and not output.is_handed_off
    assert not engine.handed_off and engine.blocks.num_free_blocks == engine.blocks.num_total_blocks


def test_reservations_count_against_blocks_and_batch_slots(
    weights: dict[str, torch.Tensor],
) -> None:
    engine, _ = _engine(weights, num_blocks=10, max_num_seqs=2)
    assert engine.reserve("a", 4 * BLOCK_SIZE) is not None
    assert engine.reserve("b", 7 * BLOCK_SIZE) is None  # 6 blocks left
    assert engine.blocks.num_free_blocks == 6
    assert engine.reserve("b", 6 * BLOCK_SIZE) is not None
    assert engine.reserve("c", 1) is None  # both batch slots are taken
    with pytest.raises(ValueError, match="already in the engine"):
        engine.reserve("a", 1)
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("b", [1, 2], SamplingParams())
    assert engine.cancel_reservation("a") and not engine.cancel_reservation("a")
    assert engine.abort("b")
    assert engine.blocks.num_free_blocks == 10
    engine.blocks.check_invariants()


def test_add_prefilled_checks_its_reservation(weights: dict[str, torch.Tensor]) -> None:
    engine, _ = _engine(weights)
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="no reservation"):
        engine.add_prefilled("x", [1, 2, 3], 4, params)
    assert engine.reserve("x", 4) == engine.reservations["x"]
    with pytest.raises(ValueError, match="do not hold"):
        engine.add_prefilled("x", list(range(8)), 4, params)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_prefilled("x", [1, 2, 3], VOCAB_SIZE, params)
    assert "x" in engine.reservations  # a refused admission keeps the reservation


def test_abort_of_handed_off_request_frees_its_blocks(weights: dict[str, torch.Tensor]) -> None:
    engine, _ = _engine(weights)
    engine.add_request("r", list(range(9)), SamplingParams(temperature=0), prefill_only=True)
    [output] = engine.step()
    assert output.is_handed_off and "r" in engine.handed_off
    assert engine.blocks.num_free_blocks < engine.blocks.num_total_blocks
    assert engine.abort("r")
    assert not engine.handed_off and not engine.sequences
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
    assert not engine.release_handed_off("r")


def test_waiting_behind_held_blocks_is_not_a_stall(weights: dict[str, torch.Tensor]) -> None:
    engine, _ = _engine(weights, num_blocks=4)
    engine.add_request("a", list(range(12)), SamplingParams(temperature=0), prefill_only=True)
    engine.step()
    engine.add_request("b", list(range(20, 32)), SamplingParams(temperature=0), prefill_only=True)
    assert engine.step() == [] and engine.num_scheduled_runs == 0  # "a" holds 3 of 4 blocks
    engine.release_handed_off("a")
    [output] = engine.step()
    assert output.request_id == "b" and output.is_handed_off
