"""Priorities and preemption in the engine loop: the victim order, the prefill chunk order,
hand-back and resumption with earlier output, swap to the host pool, and room held by
``make_room``. The order tests run on the null engine; the output tests on the tiny model."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from engine.engine import EngineConfig, LLMEngine
from engine.engine_thread import EngineThread
from engine.null_engine import NullEngineConfig, NullRunner, create_null_engine
from engine.runner import ModelRunner
from engine.sequence import Priority, SamplingParams, StepOutput
from engine.swap import block_runs
from engine.tiny import tiny_config
from tests.engine.tiny_engines import BLOCK_SIZE, VOCAB_SIZE
from transfer.errors import FairgateError

HAND_BACK = EngineConfig(hand_back_preempted=True)
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=4321, ignore_eos=True)


def _null_engine(
    config: EngineConfig, *, num_blocks: int = 64, block_size: int = 16, num_host_blocks: int = 0
) -> LLMEngine:
    null_config = NullEngineConfig(
        num_blocks=num_blocks, block_size=block_size, num_host_blocks=num_host_blocks
    )
    return create_null_engine(null_config, config, sleep=lambda s: None)


def _tiny_engine(
    weights: dict[str, torch.Tensor],
    config: EngineConfig | None = None,
    *,
    num_blocks: int = 256,
    num_host_blocks: int = 0,
) -> LLMEngine:
    runner = ModelRunner(
        tiny_config(VOCAB_SIZE),
        weights,
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        num_host_blocks=num_host_blocks,
    )
    return LLMEngine(runner, config)


def _prompts(count: int, seed: int, min_len: int = 10, max_len: int = 14) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(min_len, max_len))]
        for _ in range(count)
    ]


def _run(engine: LLMEngine) -> tuple[dict[str, list[int]], list[StepOutput]]:
    """Step to the end: every request's new tokens, and the hand-backs in order."""
    tokens: dict[str, list[int]] = {}
    handed_back: list[StepOutput] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.is_preempted:
                handed_back.append(output)
    return tokens, handed_back


def _assert_no_blocks_held(engine: LLMEngine) -> None:
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
    engine.blocks.check_invariants()
    if engine.swap_space is not None:
        host_blocks = engine.swap_space.host_blocks
        assert host_blocks.num_free_blocks == host_blocks.num_total_blocks
    assert not (engine.sequences or engine.running or engine.waiting or engine.swapped)


# ---- orders --------------------------------------------------------------------------------


def test_make_room_takes_lowest_rank_then_highest_counter_then_latest_arrival() -> None:
    engine = _null_engine(HAND_BACK)
    priorities = {
        "a": Priority(rank=0, counter=1.0, arrival=1.0),
        "b": Priority(rank=0, counter=5.0, arrival=2.0),
        "c": Priority(rank=0, counter=5.0, arrival=3.0),
        "d": Priority(rank=1, counter=9.0, arrival=4.0),
        "e": Priority(rank=2, counter=0.0, arrival=5.0),  # as important as the newcomer
        "f": Priority(rank=3, counter=9.0, arrival=6.0),
    }
    params = SamplingParams(max_tokens=50, seed=1, ignore_eos=True)
    for request_id, priority in priorities.items():
        engine.add_request(request_id, [7] * 20, params, priority=priority)
    engine.step()
    engine.step()
    assert len(engine.running) == 6
    newcomer = Priority(rank=2, counter=0.0, arrival=5.0)
    free_tokens, num_preempted = engine.make_room(10_000, newcomer)
    assert num_preempted == 4
    assert free_tokens == engine.blocks.num_free_blocks * 16
    handed_back = [output for output in engine.step() if output.is_preempted]
    assert [output.request_id for output in handed_back] == ["c", "b", "a", "d"]
    assert all(output.num_output_tokens == 2 and not output.new_token_ids for output in handed_back)
    assert sorted(seq.request_id for seq in engine.running) == ["e", "f"]
    # Nothing less important than the newcomer is left: a second call preempts nothing.
    assert engine.make_room(10_000, newcomer)[1] == 0


def test_make_room_stops_once_the_room_is_free() -> None:
    engine = _null_engine(HAND_BACK, num_blocks=8)
    params = SamplingParams(max_tokens=30, seed=1, ignore_eos=True)
    for index in range(4):  # two blocks each (20 tokens and growing)
        engine.add_request(str(index), [7] * 20, params, priority=Priority(arrival=index))
    engine.step()
    assert engine.blocks.num_free_blocks == 0
    free_tokens, num_preempted = engine.make_room(32, Priority(rank=1))
    assert (free_tokens, num_preempted) == (32, 1)
    assert [output.request_id for output in engine.step() if output.is_preempted] == ["3"]


def test_a_block_shortage_preempts_the_least_important_not_the_latest() -> None:
    # Three one-block prompts whose first decode needs a second block; five blocks: one must go.
    params = SamplingParams(max_tokens=4, seed=3, ignore_eos=True)
    for ranks, expected in (((0, 1, 2), "a"), ((0, 0, 0), "c"), ((2, 0, 1), "b")):
        engine = _null_engine(HAND_BACK, num_blocks=5)
        for request_id, rank in zip("abc", ranks, strict=True):
            engine.add_request(request_id, [7] * 16, params, priority=Priority(rank=rank))
        _, handed_back = _run(engine)
        assert handed_back[0].request_id == expected, ranks
        _assert_no_blocks_held(engine)


def _first_token_steps(
    ranks: tuple[int, int], *, prefill_only: bool
) -> tuple[int | None, int | None]:
    """The step at which a 2000-token prompt (added first) and a 100-token one (added after its
    first chunk) get their first tokens, one 512-token chunk budget per step."""
    config = EngineConfig(max_num_batched_tokens=512, prefill_chunk_size=512)
    engine = _null_engine(config, num_blocks=512)
    params = SamplingParams(max_tokens=2, seed=1, ignore_eos=True)
    engine.add_request(
        "batch", [5] * 2000, params, priority=Priority(rank=ranks[0]), prefill_only=prefill_only
    )
    first: dict[str, int] = {}
    step = 0
    while engine.has_unfinished() and step < 20:
        if step == 1:
            engine.add_request(
                "interactive",
                [6] * 100,
                params,
                priority=Priority(rank=ranks[1], arrival=1.0),
                prefill_only=prefill_only,
            )
        for output in engine.step():
            first.setdefault(output.request_id, step)
            if output.is_handed_off:
                engine.release_handed_off(output.request_id)
        step += 1
    return first.get("batch"), first.get("interactive")


@pytest.mark.parametrize("prefill_only", [True, False])
def test_the_most_important_ready_chunk_goes_first(prefill_only: bool) -> None:
    # Equal priority (one tenant, one class): the short prompt goes between the long one's
    # chunks (engine.preemption.prefill_order), which ends a step later.
    batch_step, interactive_step = _first_token_steps((0, 0), prefill_only=prefill_only)
    assert interactive_step == 1 and batch_step == 4
    # More important: it runs at the next step, between the long prompt's chunks.
    batch_step, interactive_step = _first_token_steps((0, 1), prefill_only=prefill_only)
    assert interactive_step == 1 and batch_step == 4


def test_block_runs_group_consecutive_pairs() -> None:
    assert block_runs([]) == []
    assert block_runs([(4, 0), (5, 1), (6, 2), (9, 3), (10, 4), (11, 9)]) == [
        (4, 0, 3),
        (9, 3, 2),
        (11, 9, 1),
    ]


# ---- resumption and hand-back (tiny model) -------------------------------------------------


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_resumed_request_continues_token_for_token(
    weights: dict[str, torch.Tensor], params: SamplingParams
) -> None:
    [prompt] = _prompts(1, seed=1)
    [expected] = _tiny_engine(weights).generate([prompt], params)
    for num_prior in (1, 7, params.max_tokens - 1):
        engine = _tiny_engine(weights)
        engine.add_request(
            "r", prompt + expected[:num_prior], params, num_prior_output_tokens=num_prior
        )
        outputs: list[StepOutput] = []
        while engine.has_unfinished():
            outputs.extend(engine.step())
        assert [t for output in outputs for t in output.new_token_ids] == expected[num_prior:]
        assert [output.num_output_tokens for output in outputs] == list(
            range(num_prior + 1, params.max_tokens + 1)
        )
        assert all(output.num_prompt_tokens == len(prompt) for output in outputs)
        assert outputs[-1].finish_reason == "length"
        _assert_no_blocks_held(engine)


def test_stop_tokens_apply_to_new_tokens_only(weights: dict[str, torch.Tensor]) -> None:
    [prompt] = _prompts(1, seed=2)
    [expected] = _tiny_engine(weights).generate([prompt], GREEDY)
    stop_at = expected[3]
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=frozenset({stop_at}))
    engine = _tiny_engine(weights)
    # The earlier output holds the stop token (the caller decided to go on): not checked again.
    engine.add_request("r", prompt + expected[:4], params, num_prior_output_tokens=4)
    tokens, _ = _run(engine)
    cut = expected[4:]
    if stop_at in cut:
        cut = cut[: cut.index(stop_at) + 1]
    assert tokens["r"] == cut


def test_num_prior_output_tokens_is_checked(weights: dict[str, torch.Tensor]) -> None:
    engine = _tiny_engine(weights)
    with pytest.raises(ValueError, match=r"num_prior_output_tokens must be in \[0, 3\)"):
        engine.add_request("r", [1, 2, 3], GREEDY, num_prior_output_tokens=3)
    with pytest.raises(ValueError, match="must be below max_tokens"):
        engine.add_request("r", list(range(40)), GREEDY, num_prior_output_tokens=20)
    with pytest.raises(ValueError, match=r"must be in \[0, 3\)"):
        engine.add_request("r", [1, 2, 3], GREEDY, num_prior_output_tokens=-1)


@pytest.mark.parametrize("seed", [None, 99])
def test_hand_back_then_resume_elsewhere_equals_uninterrupted(
    weights: dict[str, torch.Tensor], seed: int | None
) -> None:
    [prompt] = _prompts(1, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=seed, ignore_eos=True)
    engine = _tiny_engine(weights, HAND_BACK)
    engine.add_request("r", prompt, params)
    tokens: list[int] = []
    for _ in range(6):
        tokens += [t for output in engine.step() for t in output.new_token_ids]
    assert engine.make_room(10_000, Priority(rank=1)) == (256 * BLOCK_SIZE, 1)
    [handed_back] = engine.step()
    assert handed_back.is_preempted and handed_back.num_output_tokens == len(tokens) == 6
    assert seed is None or handed_back.seed == seed
    _assert_no_blocks_held(engine)
    # The caller resumes it with the tokens so far and the seed it was sampled with.
    resumed_params = SamplingParams(
        max_tokens=20, temperature=0.8, seed=handed_back.seed, ignore_eos=True
    )
    other = _tiny_engine(weights)
    other.add_request("r", prompt + tokens, resumed_params, num_prior_output_tokens=6)
    rest, _ = _run(other)
    [expected] = _tiny_engine(weights).generate([prompt], resumed_params)
    assert tokens + rest["r"] == expected


# ---- swap ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "enable_prefix_cache"),
    [(GREEDY, True), (SEEDED, False)],
    ids=["greedy-cache-reused", "seeded-all-copied"],
)
def test_swapping_keeps_output(
    weights: dict[str, torch.Tensor], params: SamplingParams, enable_prefix_cache: bool
) -> None:
    prompts = _prompts(6, seed=6)
    expected = _tiny_engine(weights).generate(prompts, params)
    # 6 requests of up to 34 tokens need up to 54 blocks; 24 forces preemptions.
    swap = EngineConfig(
        preemption_mode="swap", hand_back_preempted=True, enable_prefix_cache=enable_prefix_cache
    )
    engine = _tiny_engine(weights, swap, num_blocks=24, num_host_blocks=24)
    ids = [str(index) for index in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    tokens, handed_back = _run(engine)
    assert [tokens[request_id] for request_id in ids] == expected
    assert engine.num_swapped_out > 0 and not handed_back
    assert engine.num_preemptions == engine.num_swapped_out
    runner = engine.runner
    assert isinstance(runner, ModelRunner) and runner.num_swap_copies > 0
    _assert_no_blocks_held(engine)


def test_swap_copies_runs_of_blocks_not_single_blocks() -> None:
    # No prefix cache: the swapped-out blocks would still be there to reuse, nothing to copy.
    config = EngineConfig(preemption_mode="swap", enable_prefix_cache=False, room_hold_s=0.0)
    engine = _null_engine(config, num_blocks=64, block_size=4, num_host_blocks=64)
    params = SamplingParams(max_tokens=10, seed=1, ignore_eos=True)
    engine.add_request("long", [3] * 40, params)  # 10 blocks, consecutive
    engine.step()
    engine.make_room(64 * 4, Priority(rank=1))
    assert [seq.request_id for seq in engine.swapped] == ["long"]
    runner = engine.runner
    assert isinstance(runner, NullRunner)
    # Its 40 computed tokens: ten blocks in one copy.
    assert (runner.num_swap_copies, runner.num_swapped_blocks) == (1, 10)
    tokens, _ = _run(engine)
    assert len(tokens["long"]) == 9  # the first came before the swap
    assert (runner.num_swap_copies, runner.num_swapped_blocks) == (2, 20)  # in again: one run
    _assert_no_blocks_held(engine)


def test_a_full_host_pool_falls_back_to_recompute() -> None:
    engine = _null_engine(
        EngineConfig(preemption_mode="swap", hand_back_preempted=True),
        num_blocks=16,
        num_host_blocks=1,
    )
    params = SamplingParams(max_tokens=10, seed=1, ignore_eos=True)
    engine.add_request("small", [3] * 10, params, priority=Priority(arrival=0.0))
    engine.add_request("big", [3] * 40, params, priority=Priority(arrival=1.0))
    engine.step()
    assert engine.make_room(16 * 16, Priority(rank=1)) == (16 * 16, 2)
    # "big" (latest) needs three host blocks: handed back; "small" fits the one there is.
    assert [seq.request_id for seq in engine.swapped] == ["small"]
    assert [output.request_id for output in engine.step() if output.is_preempted] == ["big"]
    assert (engine.num_swapped_out, engine.num_handed_back) == (1, 1)


def test_room_made_is_held_from_less_important_requests() -> None:
    now = [0.0]
    null_config = NullEngineConfig(num_blocks=8, block_size=16, num_host_blocks=8)
    runner = NullRunner(null_config, sleep=lambda s: None)
    engine = LLMEngine(
        runner, EngineConfig(preemption_mode="swap", room_hold_s=2.0), clock=lambda: now[0]
    )
    params = SamplingParams(max_tokens=60, seed=1, ignore_eos=True)
    engine.add_request("low", [3] * 60, params)  # four blocks
    engine.step()
    assert engine.make_room(8 * 16, Priority(rank=1)) == (8 * 16, 1)
    engine.step()  # the hold keeps "low" out
    assert [seq.request_id for seq in engine.swapped] == ["low"]
    assert engine.seconds_until_change() == 2.0
    # A request sent after make_room is the caller's choice: it may take the room (and a
    # swapped-out request only refuses reservations no more important than itself).
    assert engine.reserve("other-low", 16, priority=Priority(rank=0, arrival=-1.0)) is not None
    engine.step()
    assert [seq.request_id for seq in engine.swapped] == ["low"]
    # The one the room was made for takes the hold over: "low" comes back in what is left.
    assert engine.reserve("high", 48, priority=Priority(rank=1)) is not None
    engine.step()
    assert [seq.request_id for seq in engine.running] == ["low"]
    assert engine.seconds_until_change() is None
    engine.cancel_reservation("high")
    engine.cancel_reservation("other-low")
    _run(engine)
    _assert_no_blocks_held(engine)
    # A hold nobody takes over expires.
    engine.add_request("low-2", [3] * 60, params)
    engine.step()
    engine.make_room(8 * 16, Priority(rank=1))
    engine.step()
    assert engine.swapped
    now[0] += 2.5
    assert engine.seconds_until_change() == 0.0
    engine.step()
    assert not engine.swapped
    _run(engine)
    _assert_no_blocks_held(engine)


def test_the_engine_thread_wakes_when_held_room_expires() -> None:
    """A swapped-out request held out by ``make_room`` comes back by itself once the hold
    expires: the idle engine thread waits with a timeout, not for the next command."""
    null_config = NullEngineConfig(
        num_blocks=16, block_size=4, num_host_blocks=16, decode_step_s=0.001
    )
    engine = create_null_engine(
        null_config,
        EngineConfig(preemption_mode="swap", room_hold_s=0.3),
        sleep=lambda s: None,
    )
    thread = EngineThread(engine)
    thread.start()
    try:
        done = threading.Event()
        outputs: list[StepOutput | FairgateError] = []

        def sink(output: StepOutput | FairgateError) -> None:
            outputs.append(output)
            if isinstance(output, FairgateError) or output.finish_reason is not None:
                done.set()

        def add_and_make_room(engine: LLMEngine) -> tuple[int, int]:
            engine.add_request("r", [3] * 8, SamplingParams(max_tokens=40, seed=1))
            thread.watch("r", sink)
            engine.step()
            return engine.make_room(16 * 4, Priority(rank=1))

        assert thread.submit(add_and_make_room).result(timeout=10) == (16 * 4, 1)
        assert done.wait(10)
        assert [o.num_output_tokens for o in outputs if isinstance(o, StepOutput)] == list(
            range(2, 41)
        )
        assert engine.num_swapped_out == 1
    finally:
        thread.stop()


# ---- batch slots ---------------------------------------------------------------------------

SLOT_CONFIGS = {
    "hand-back": EngineConfig(max_num_seqs=2, hand_back_preempted=True),
    "recompute-here": EngineConfig(max_num_seqs=2),
    "swap": EngineConfig(max_num_seqs=2, preemption_mode="swap"),
}


def _two_low_requests_in_two_slots(config: EngineConfig) -> LLMEngine:
    """Both batch slots taken by rank-0 decodes; most of the blocks free."""
    engine = _null_engine(config, num_host_blocks=64)
    params = SamplingParams(max_tokens=50, seed=1, ignore_eos=True)
    for index in range(2):
        engine.add_request(f"low-{index}", [7] * 20, params, priority=Priority(arrival=index))
    engine.step()
    engine.step()
    assert len(engine.running) == 2 and engine.num_free_slots() == 0
    return engine


@pytest.mark.parametrize("mode", list(SLOT_CONFIGS))
def test_make_room_frees_a_batch_slot_and_holds_it(mode: str) -> None:
    """Blocks are free but no batch slot is: ``make_room`` preempts the least important
    request for the slot, and holds it for the request it was made for."""
    engine = _two_low_requests_in_two_slots(SLOT_CONFIGS[mode])
    high = Priority(rank=1, arrival=5.0)
    assert engine.reserve("high", 32, priority=high) is None  # no slot
    free_tokens, num_preempted = engine.make_room(32, high)
    assert num_preempted == 1 and engine.num_free_slots() == 1
    assert free_tokens == engine.blocks.num_free_blocks * 16 > 32
    assert [seq.request_id for seq in engine.running] == ["low-0"]
    # Held: a less important reservation does not take the slot, even one sent after
    # make_room; nor does the victim come back in (swapped out, or waiting here).
    assert engine.reserve("later-low", 16, priority=Priority(arrival=6.0)) is None
    engine.step()
    assert engine.num_free_slots() == 1
    # The request it was made for takes it.
    assert engine.reserve("high", 32, priority=high) is not None
    assert engine.num_free_slots() == 0
    engine.cancel_reservation("high")
    _run(engine)
    _assert_no_blocks_held(engine)


def test_make_room_for_a_slot_preempts_only_less_important_requests() -> None:
    engine = _two_low_requests_in_two_slots(SLOT_CONFIGS["hand-back"])
    # Less important than both: nothing to preempt, and no slot, so no room (0 free tokens).
    assert engine.make_room(32, Priority(rank=0, arrival=5.0)) == (0, 0)
    assert len(engine.running) == 2
    # (That call held a slot for its priority, should one come free: it would not be
    # ``reserved-low``'s below.) A reservation takes a slot like a running request; make_room
    # preempts it (by the caller's callback) when it is the least important.
    engine = _two_low_requests_in_two_slots(SLOT_CONFIGS["hand-back"])
    engine.abort("low-1")
    assert engine.reserve("reserved-low", 32, priority=Priority(arrival=9.0)) is not None
    preempted: list[str] = []

    def preempt_reservation(request_id: str) -> bool:
        preempted.append(request_id)
        return engine.cancel_reservation(request_id)

    free_tokens, num_preempted = engine.make_room(
        32, Priority(rank=1), preempt_reservation=preempt_reservation
    )
    assert (num_preempted, preempted) == (1, ["reserved-low"])
    assert free_tokens > 0 and engine.num_free_slots() == 1
    assert [seq.request_id for seq in engine.running] == ["low-0"]


def test_a_swapped_out_request_takes_no_slot_until_it_is_back() -> None:
    engine = _two_low_requests_in_two_slots(
        EngineConfig(max_num_seqs=2, preemption_mode="swap", room_hold_s=0.0)
    )
    engine.make_room(32, Priority(rank=1))
    assert [seq.request_id for seq in engine.swapped] == ["low-1"]
    assert engine.num_free_slots() == 1
    # Another reservation takes the free slot: the swapped-out request stays out until one is
    # free again (it would be beyond max_num_seqs).
    assert engine.reserve("other", 32, priority=Priority(rank=1)) is not None
    engine.step()
    assert engine.swapped and len(engine.running) + len(engine.reservations) == 2
    engine.cancel_reservation("other")
    engine.step()
    assert not engine.swapped and len(engine.running) == 2
