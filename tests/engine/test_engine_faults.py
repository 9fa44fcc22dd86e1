"""Requests that make the engine fail: each fails alone with an error naming it, its blocks come
back, the requests beside it finish as if it had never been there, and the engine goes on. A
runner that fails every run, step after step, stops the engine (issue 16)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from engine.engine import NON_FINITE_LOGITS, EngineConfig, LLMEngine
from engine.null_engine import NullEngineConfig, NullRunner
from engine.runner import ModelRunner
from engine.sequence import SamplingParams, ScheduledRun, StepOutput
from engine.tiny import tiny_config
from tests.engine.tiny_engines import BLOCK_SIZE, VOCAB_SIZE, tiny_runner

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = {
    "a": list(range(20, 25)),
    "b": list(range(30, 43)),
    "c": list(range(50, 71)),
    "doomed": list(range(80, 89)),
}


class FailingRunner:
    """A real runner that raises on every step computing a request of ``doomed_ids`` once it has
    ``after_tokens`` output tokens: a request of death, as a kernel bug would make it. The
    requests of ``non_finite_ids`` get no token, as if their logits were not finite."""

    def __init__(
        self,
        inner: Any,
        doomed_ids: set[str],
        after_tokens: int = 0,
        non_finite_ids: frozenset[str] = frozenset(),
    ) -> None:
        self.inner = inner
        self.doomed_ids = doomed_ids
        self.after_tokens = after_tokens
        self.non_finite_ids = non_finite_ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, runs: list[ScheduledRun]) -> Any:
        for run in runs:
            seq = run.seq
            if seq.request_id in self.doomed_ids and len(seq.output_token_ids) >= self.after_tokens:
                raise RuntimeError("illegal memory access")
        sampling = [run.seq.request_id for run in runs if run.samples_next_token]
        tokens = self.inner.step(runs)
        pairs = zip(sampling, tokens, strict=True)
        return [None if request_id in self.non_finite_ids else t for request_id, t in pairs]


def _drive(
    engine: LLMEngine, prompts: dict[str, list[int]]
) -> tuple[dict[str, list[int]], dict[str, str], list[list[StepOutput]]]:
    """Add every prompt, step until done: (tokens per request, errors, each step's outputs)."""
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, GREEDY)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    errors: dict[str, str] = {}
    steps: list[list[StepOutput]] = []
    while engine.has_unfinished():
        outputs = engine.step()
        steps.append(outputs)
        for output in outputs:
            tokens[output.request_id] += output.new_token_ids
            if output.error is not None:
                errors[output.request_id] = output.error
    return tokens, errors, steps


def _assert_empty(engine: LLMEngine) -> None:
    assert not engine.sequences and not engine.running and not engine.waiting
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
    engine.blocks.check_invariants()


def test_a_request_the_runner_fails_on_fails_alone_and_the_engine_goes_on(
    weights: dict[str, torch.Tensor],
) -> None:
    reference, _, _ = _drive(LLMEngine(tiny_runner(weights, num_blocks=64)), PROMPTS)
    later = {"d": list(range(100, 111))}
    reference |= _drive(LLMEngine(tiny_runner(weights, num_blocks=64)), later)[0]

    runner = FailingRunner(tiny_runner(weights, num_blocks=64), {"doomed"}, after_tokens=3)
    engine = LLMEngine(runner)
    tokens, errors, steps = _drive(engine, PROMPTS)

    assert errors == {
        "doomed": "request doomed failed: the engine failed computing it "
        "(RuntimeError: illegal memory access)"
    }
    assert tokens["doomed"] == reference["doomed"][:3]
    for request_id in ("a", "b", "c"):
        assert tokens[request_id] == reference[request_id]
    # The step it failed in still gave the others their token: they did not wait for a retry.
    [failed_step] = [s for s in steps if any(o.error is not None for o in s)]
    assert {o.request_id for o in failed_step if o.new_token_ids} == {"a", "b", "c"}
    assert engine.num_failed_requests == 1 and engine.num_failed_steps_in_a_row == 0
    _assert_empty(engine)
    # And it serves the next request as any engine would.
    assert _drive(engine, later)[0] == {"d": reference["d"]}


def test_a_request_whose_output_is_not_finite_fails_alone_and_poisons_no_block(
    weights: dict[str, torch.Tensor],
) -> None:
    """A model whose embedding of one token is NaN (untied, so the other tokens' logits stay
    finite): a prompt holding it gets NaN KV and logits. It fails alone; the blocks it leaves
    are zeroed, or the requests that reuse them next would read the NaN through the slots their
    batched decode masks (0 x NaN is NaN); and its prompt again fails the same way, rather than
    reading the zeroed blocks from the prefix cache as if they held its KV."""
    poison_token = 7
    config = dataclasses.replace(tiny_config(VOCAB_SIZE), tie_word_embeddings=False)
    poisoned = dict(weights)
    poisoned["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    poisoned["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    poisoned["model.embed_tokens.weight"][poison_token] = float("nan")

    def engine() -> LLMEngine:
        runner = ModelRunner(config, poisoned, num_blocks=64, block_size=BLOCK_SIZE)
        # One block per chunk: the bad prompt's first blocks reach the prefix cache before its
        # last chunk samples from NaN logits.
        return LLMEngine(runner, EngineConfig(prefill_chunk_size=BLOCK_SIZE))

    bad = {"bad": [poison_token, *range(3, 14)]}
    first, second = {"a": PROMPTS["a"], "b": PROMPTS["b"]}, {"c": PROMPTS["c"], "d": [9, 8, 6]}
    reference, reference_errors, _ = _drive(engine(), first | second)
    assert not reference_errors

    llm = engine()
    tokens, errors, _ = _drive(llm, bad | first)
    assert errors == {"bad": f"request bad failed: {NON_FINITE_LOGITS}"}
    assert tokens == {"bad": []} | {k: reference[k] for k in first}
    # c and d take the blocks bad left (the lowest ids) and decode as a batch.
    tokens, errors, _ = _drive(llm, second)
    assert not errors and tokens == {k: reference[k] for k in second}
    tokens, errors, _ = _drive(llm, {"bad-again": bad["bad"]})
    assert errors == {"bad-again": f"request bad-again failed: {NON_FINITE_LOGITS}"}
    _assert_empty(llm)


def test_a_tiny_temperature_is_greedy_through_the_engine(
    weights: dict[str, torch.Tensor],
) -> None:
    """temperature=1e-39 is within the API's range; it once failed the step (issue 16)."""
    prompts = [PROMPTS["a"], PROMPTS["c"]]
    greedy = LLMEngine(tiny_runner(weights, num_blocks=64)).generate(prompts, GREEDY)
    tiny = dataclasses.replace(GREEDY, temperature=1e-39, seed=-(2**63))
    assert LLMEngine(tiny_runner(weights, num_blocks=64)).generate(prompts, tiny) == greedy


def _null_engine(
    doomed_ids: set[str],
    max_failed_steps_in_a_row: int = 3,
    non_finite_ids: frozenset[str] = frozenset(),
) -> LLMEngine:
    inner = NullRunner(NullEngineConfig(num_blocks=64, block_size=4), sleep=lambda _: None)
    return LLMEngine(
        FailingRunner(inner, doomed_ids, non_finite_ids=non_finite_ids),
        EngineConfig(max_failed_steps_in_a_row=max_failed_steps_in_a_row),
    )


def _step_one(engine: LLMEngine, request_id: str, salt: bytes | None = None) -> list[StepOutput]:
    """One request alone in a step; of its own tenant (cache salt: its id) unless told."""
    params = dataclasses.replace(GREEDY, max_tokens=1)
    engine.add_request(
        request_id, [1, 2, 3], params, salt=request_id.encode() if salt is None else salt
    )
    return engine.step()


def test_a_runner_raising_on_every_run_step_after_step_stops_the_engine() -> None:
    """Steps in which the runner raised on every run, of several tenants: a success in between
    starts the count again; the third in a row raises, and by then the failed requests are out
    and their blocks free."""
    engine = _null_engine({"x1", "x2", "x3", "x4", "x5"})
    for request_id in ("x1", "x2"):
        [output] = _step_one(engine, request_id)
        assert output.error is not None and request_id in output.error
    assert engine.num_failed_steps_in_a_row == 2
    [output] = _step_one(engine, "fine")
    assert output.error is None and output.finish_reason == "length"
    assert engine.num_failed_steps_in_a_row == 0
    for request_id in ("x3", "x4"):
        _step_one(engine, request_id)
    with pytest.raises(RuntimeError, match="failed every run in 3 steps in a row"):
        _step_one(engine, "x5")
    _assert_empty(engine)


def test_one_tenants_requests_of_death_take_ten_times_as_long_to_stop_the_engine() -> None:
    """They may be that tenant's doing, not the runner's: one tenant must not restart a worker
    every third request; a runner broken while one tenant alone uses it still ends."""
    doomed = {f"x{i}" for i in range(30)}
    engine = _null_engine(doomed)
    for index in range(29):
        [output] = _step_one(engine, f"x{index}", salt=b"one tenant")
        assert output.error is not None
    assert engine.num_failed_steps_in_a_row == 29
    with pytest.raises(RuntimeError, match="failed every run in 30 steps in a row"):
        _step_one(engine, "x29", salt=b"one tenant")
    _assert_empty(engine)


def test_a_step_with_some_runs_left_is_not_a_failed_step() -> None:
    engine = _null_engine({f"x{i}" for i in range(8)}, max_failed_steps_in_a_row=1)
    for index in range(8):
        engine.add_request(f"x{index}", [1, 2, 3], GREEDY)
    engine.add_request("fine", [4, 5, 6], GREEDY)
    outputs = engine.step()
    assert sorted(o.request_id for o in outputs if o.error is not None) == [
        f"x{i}" for i in range(8)
    ]
    assert [o.request_id for o in outputs if o.error is None] == ["fine"]
    assert engine.num_failed_steps_in_a_row == 0


def test_logits_that_are_not_finite_never_stop_the_engine() -> None:
    """The runner computed them: the request's doing, however often it comes back alone."""
    engine = _null_engine(set(), max_failed_steps_in_a_row=1, non_finite_ids=frozenset({"nan"}))
    for attempt in range(3):
        [output] = _step_one(engine, "nan")
        assert output.error == f"request nan failed: {NON_FINITE_LOGITS}", attempt
        assert engine.num_failed_steps_in_a_row == 0
    _assert_empty(engine)
