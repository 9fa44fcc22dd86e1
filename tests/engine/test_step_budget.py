"""The time cap on a step's prompt tokens (``EngineConfig.max_prefill_step_s``): the plan of each
step, over the null runner (no model, no sleeping), with the measured speed set directly."""

from __future__ import annotations

import pytest

from engine.engine import EngineConfig, LLMEngine
from engine.null_engine import NullEngineConfig, NullRunner
from engine.sequence import Priority, SamplingParams, ScheduledRun, StepOutput

BLOCK_SIZE = 16
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)
INTERACTIVE = Priority(rank=2)
BATCH = Priority(rank=0)


class RecordingRunner(NullRunner):
    """A null runner that keeps each step's plan: ``(request id, start, num_tokens)`` per run."""

    def __init__(self) -> None:
        super().__init__(
            NullEngineConfig(num_blocks=1024, block_size=BLOCK_SIZE), sleep=lambda _: None
        )
        self.plans: list[list[tuple[str, int, int]]] = []

    def step(self, runs: list[ScheduledRun]) -> list[int]:
        self.plans.append([(run.seq.request_id, run.start, run.num_tokens) for run in runs])
        return super().step(runs)


def _engine(
    config: EngineConfig | None = None, prefill_tok_s: float | None = None
) -> tuple[LLMEngine, RecordingRunner]:
    runner = RecordingRunner()
    engine = LLMEngine(runner, config)
    engine.prefill_tok_s = prefill_tok_s
    return engine, runner


def _prompt(num_tokens: int, first: int = 1000) -> list[int]:
    return list(range(first, first + num_tokens))


def _run(engine: LLMEngine) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_the_measured_speed_caps_a_steps_prompt_tokens() -> None:
    """1000 tok/s for 0.128 s: 128 tokens a step, in chunks that continue where the last ended
    and sample the first token only when the prompt is done."""
    engine, runner = _engine(EngineConfig(max_prefill_step_s=0.128), prefill_tok_s=1000.0)
    assert engine.max_step_prompt_tokens() == 128
    engine.add_request("long", _prompt(1000), PARAMS)
    outputs = _run(engine)
    prefill_plans = runner.plans[:8]
    assert prefill_plans == [[("long", start, 128)] for start in range(0, 896, 128)] + [
        [("long", 896, 104)]
    ]
    assert runner.plans[8:] == [[("long", n, 1)] for n in range(1000, 1003)]
    assert [output.num_output_tokens for output in outputs] == [1, 2, 3, 4]
    assert outputs[0].num_prefill_chunks == 8


def test_decodes_are_not_capped() -> None:
    """Decodes take their share of the token budget but not of the time cap."""
    engine, runner = _engine(EngineConfig(max_prefill_step_s=0.032), prefill_tok_s=1000.0)
    for index in range(3):
        engine.add_request(f"short-{index}", _prompt(8, first=index * 10), PARAMS)
    engine.step()  # three 8-token prompts, within the 32-token cap
    engine.add_request("long", _prompt(100), PARAMS)
    engine.step()
    assert runner.plans[-1] == [
        ("short-0", 8, 1),
        ("short-1", 8, 1),
        ("short-2", 8, 1),
        ("long", 0, 32),
    ]


def test_waiting_prompts_share_the_budget_most_important_first() -> None:
    engine, runner = _engine(EngineConfig(max_prefill_step_s=0.128), prefill_tok_s=1000.0)
    engine.add_request("batch", _prompt(300), PARAMS, priority=BATCH)
    engine.step()
    assert runner.plans[-1] == [("batch", 0, 128)]
    # An interactive request that arrives between steps gets the next step's budget first.
    engine.add_request("chat", _prompt(100, first=5000), PARAMS, priority=INTERACTIVE)
    engine.step()
    assert runner.plans[-1] == [("chat", 0, 100), ("batch", 128, 28)]
    engine.step()
    assert runner.plans[-1] == [("chat", 100, 1), ("batch", 156, 128)]
    # Two waiting prompts: the more important one first, the other gets what is left.
    engine.add_request("chat-2", _prompt(120, first=7000), PARAMS, priority=INTERACTIVE)
    engine.add_request("batch-2", _prompt(50, first=9000), PARAMS, priority=BATCH)
    engine.step()
    assert runner.plans[-1] == [("chat", 101, 1), ("chat-2", 0, 120), ("batch", 284, 8)]


def test_without_a_measured_speed_the_token_budget_rules() -> None:
    config = EngineConfig(max_num_batched_tokens=256, max_prefill_step_s=0.001)
    engine, runner = _engine(config, prefill_tok_s=None)
    assert engine.max_step_prompt_tokens() == 256
    engine.add_request("a", _prompt(300), PARAMS)
    engine.add_request("b", _prompt(100, first=5000), PARAMS)
    engine.step()
    # One tenant, one class: the shorter prompt first (engine.preemption.prefill_order).
    assert runner.plans[-1] == [("b", 0, 100), ("a", 0, 156)]
    engine.step()
    assert runner.plans[-1] == [("b", 100, 1), ("a", 156, 144)]


def test_a_fast_backend_keeps_the_token_budget() -> None:
    engine, _ = _engine(EngineConfig(), prefill_tok_s=20_000.0)  # 10 000 tokens in 0.5 s
    assert engine.max_step_prompt_tokens() == EngineConfig().max_num_batched_tokens


@pytest.mark.parametrize(
    ("prefill_tok_s", "expected"),
    [
        (10.0, BLOCK_SIZE),  # 5 tokens in 0.5 s: the floor of one block
        (0.001, BLOCK_SIZE),
        (200.0, 96),  # 100 tokens: whole blocks only
        (224.0, 112),  # 112 tokens: exactly 7 blocks
    ],
)
def test_the_cap_is_whole_blocks_and_at_least_one(prefill_tok_s: float, expected: int) -> None:
    engine, runner = _engine(EngineConfig(max_prefill_step_s=0.5), prefill_tok_s=prefill_tok_s)
    assert engine.max_step_prompt_tokens() == expected
    engine.add_request("a", _prompt(300), PARAMS)
    engine.step()
    engine.step()
    assert runner.plans == [[("a", 0, expected)], [("a", expected, expected)]]


def test_the_token_budget_left_after_decodes_still_bounds_the_floor() -> None:
    config = EngineConfig(max_num_batched_tokens=10, max_prefill_step_s=0.5)
    engine, runner = _engine(config, prefill_tok_s=1.0)
    assert engine.max_step_prompt_tokens() == 10  # below one block: the token budget rules
    engine.add_request("a", _prompt(8), PARAMS)
    engine.step()
    engine.add_request("b", _prompt(40, first=5000), PARAMS)
    engine.step()
    assert runner.plans[-1] == [("a", 8, 1), ("b", 0, 9)]


def test_the_cap_off_plans_every_step_as_the_token_budget_alone() -> None:
    """``None`` ignores any measured speed: prompts of 600 and 300 tokens in 512-token chunks
    within 2048 tokens, exactly as before the cap existed (the shorter one first: one tenant,
    one class)."""
    engine, runner = _engine(EngineConfig(max_prefill_step_s=None), prefill_tok_s=1.0)
    assert engine.max_step_prompt_tokens() == 2048
    engine.add_request("a", _prompt(600), PARAMS)
    engine.add_request("b", _prompt(300, first=5000), PARAMS)
    _run(engine)
    assert runner.plans == [
        [("b", 0, 300), ("a", 0, 512)],
        [("b", 300, 1), ("a", 512, 88)],
        [("a", 600, 1), ("b", 301, 1)],
        [("a", 601, 1), ("b", 302, 1)],
        [("a", 602, 1)],
    ]


def test_prefix_cache_hits_are_not_charged_to_the_cap() -> None:
    engine, runner = _engine(EngineConfig(max_prefill_step_s=0.064), prefill_tok_s=1000.0)
    shared = _prompt(160)
    engine.add_request("first", shared, PARAMS)
    _run(engine)
    runner.plans.clear()
    engine.add_request("second", [*shared, 1, 2, 3, 4, 5], PARAMS)
    outputs = _run(engine)
    # 10 cached blocks; the 5 new tokens take one step and sample the first token.
    assert runner.plans[0] == [("second", 160, 5)]
    assert outputs[0].num_cached_tokens == 160 and outputs[0].num_prefill_chunks == 1


def test_a_resumed_request_recomputes_its_output_under_the_cap() -> None:
    """The earlier output of a resumed request is recomputed like prompt, in capped chunks;
    the next token is sampled after the last of them, numbered after the earlier output."""
    config = EngineConfig(max_prefill_step_s=0.032, enable_prefix_cache=False)
    engine, runner = _engine(config, prefill_tok_s=1000.0)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine.add_request("r", _prompt(50), params, num_prior_output_tokens=3)
    outputs = _run(engine)
    assert [plan[0][2] for plan in runner.plans[:2]] == [32, 18]
    assert [output.num_output_tokens for output in outputs] == [4, 5, 6]
    assert outputs[0].num_prompt_tokens == 47 and outputs[0].num_prefill_chunks == 2


def test_max_prefill_step_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_prefill_step_s"):
        EngineConfig(max_prefill_step_s=0.0)
    with pytest.raises(ValueError, match="max_prefill_step_s"):
        EngineConfig(max_prefill_step_s=-1.0)
