"""The engine thread: commands between steps, outputs to sinks, idling without spinning, a
request that fails alone, and a dead engine failing everyone who waits on it and saying so (null
engine: no model, real loop)."""

from __future__ import annotations

import threading

import pytest

from engine.block_manager import block_hashes
from engine.engine import EngineConfig, LLMEngine
from engine.engine_thread import DecodeSpeed, EngineThread, EvictionLog
from engine.null_engine import NullEngineConfig, create_null_engine
from engine.sequence import SamplingParams, StepOutput
from transfer.errors import EngineFailed, FairgateError, RequestFailed, RequestTimeout

FAST = NullEngineConfig(prefill_tok_s=1e9, decode_step_s=0.0, num_blocks=64, block_size=4)


def _collect(
    thread: EngineThread, request_id: str, prompt: list[int], max_tokens: int, salt: bytes = b""
) -> list:
    """Add a request through a command and wait for all of its outputs."""
    outputs: list[StepOutput | FairgateError] = []
    done = threading.Event()

    def sink(output: StepOutput | FairgateError) -> None:
        outputs.append(output)
        if isinstance(output, FairgateError) or output.finish_reason is not None:
            done.set()

    def add(engine: LLMEngine) -> None:
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens), salt=salt)
        thread.watch(request_id, sink)

    thread.submit(add).result(timeout=10)
    assert done.wait(10)
    return outputs


def test_commands_outputs_and_load() -> None:
    thread = EngineThread(create_null_engine(FAST))
    thread.start()
    try:
        outputs = _collect(thread, "a", [5, 6, 7], max_tokens=4)
        assert [o.num_output_tokens for o in outputs] == [1, 2, 3, 4]
        assert outputs[-1].finish_reason == "length"
        # A command's own error goes to its caller; the engine lives on.
        with pytest.raises(ValueError, match="no tokens"):
            thread.submit(lambda engine: engine.add_request("b", [], SamplingParams())).result(10)
        assert thread.is_alive
        load = thread.submit(lambda engine: engine.blocks.num_free_blocks).result(10)
        assert load == FAST.num_blocks == thread.load.num_free_blocks
    finally:
        thread.stop()
    assert not thread.is_alive


def test_an_idle_engine_blocks_instead_of_stepping() -> None:
    engine = create_null_engine(FAST)
    thread = EngineThread(engine)
    thread.start()
    try:
        _collect(thread, "a", [1, 2], max_tokens=2)
        steps = engine.runner.num_steps  # type: ignore[attr-defined]
        # Blocks held by a reservation leave a waiting request unschedulable: no busy loop.
        thread.submit(lambda e: e.reserve("held", FAST.num_blocks * FAST.block_size)).result(10)
        stuck = SamplingParams(max_tokens=4)
        thread.submit(lambda e: e.add_request("stuck", [1, 2, 3], stuck)).result(10)
        threading.Event().wait(0.3)
        assert engine.runner.num_steps == steps  # type: ignore[attr-defined]
        assert thread.load.num_waiting == 1 and thread.load.num_reserved == 1
        thread.submit(lambda e: e.cancel_reservation("held")).result(10)
        thread.submit(lambda e: e.abort("stuck")).result(10)
    finally:
        thread.stop()


async def test_call_times_out() -> None:
    thread = EngineThread(create_null_engine(FAST))
    thread.start()
    try:
        gate = threading.Event()
        blocked = thread.submit(lambda e: gate.wait(10))
        with pytest.raises(RequestTimeout):
            await thread.call(lambda e: None, timeout_s=0.05)
        gate.set()
        blocked.result(10)
    finally:
        thread.stop()


def test_a_failing_step_fails_its_request_and_repeated_it_kills_the_engine() -> None:
    """A runner that raises fails the request it ran (its sink hears why: ``RequestFailed``)
    and the engine goes on; the third step in a row in which everything failed kills it: every
    sink and later command gets ``EngineFailed``, and ``on_death`` hears of it once."""
    engine = create_null_engine(FAST)
    deaths: list[EngineFailed] = []
    thread = EngineThread(engine, on_death=deaths.append)
    thread.start()

    def explode(runs: object) -> list[int]:
        raise RuntimeError("device lost")

    engine.runner.step = explode  # type: ignore[method-assign]
    for request_id in ("victim-1", "victim-2"):  # of two tenants: the runner's fault
        [error] = _collect(thread, request_id, [1, 2, 3], max_tokens=3, salt=request_id.encode())
        assert isinstance(error, RequestFailed)
        assert error.message == (
            f"request {request_id} failed: the engine failed computing it "
            "(RuntimeError: device lost)"
        )
        assert thread.is_alive and not deaths
        thread.submit(lambda e: None).result(10)  # a loop turn after the step: load measured
        assert thread.load.num_free_blocks == FAST.num_blocks and thread.load.num_running == 0
    [error] = _collect(thread, "victim-3", [1, 2, 3], max_tokens=3, salt=b"victim-3")
    assert isinstance(error, EngineFailed) and "3 steps in a row" in error.message
    assert "device lost" in error.message
    assert thread.error is error and not thread.is_alive
    assert deaths == [error]
    with pytest.raises(EngineFailed):
        thread.submit(lambda e: None).result(10)


def test_a_sink_that_raises_loses_its_request_only() -> None:
    engine = create_null_engine(FAST)
    deaths: list[EngineFailed] = []
    thread = EngineThread(engine, on_death=deaths.append)
    thread.start()
    try:

        def broken(output: StepOutput | FairgateError) -> None:
            raise ValueError("a bug in the sink")

        def add(engine: LLMEngine) -> None:
            engine.add_request("broken", [1, 2, 3], SamplingParams(max_tokens=50))
            thread.watch("broken", broken)

        thread.submit(add).result(10)
        # The next request is served, and by then the broken one is gone with its blocks.
        assert len(_collect(thread, "next", [4, 5], max_tokens=3)) == 3
        assert thread.submit(lambda e: e.sequences.keys()).result(10) == set()
        assert thread.load.num_free_blocks == FAST.num_blocks
        assert thread.is_alive and not deaths
    finally:
        thread.stop()
    assert not deaths  # a stop is not a death


def test_the_eviction_log_reads_from_a_number_and_says_what_it_missed() -> None:
    log = EvictionLog(max_entries=3)
    assert log.since(0) == ([], 0, False)
    log.extend([b"a", b"b"])
    assert log.since(0) == ([b"a", b"b"], 2, False)
    assert log.since(1) == ([b"b"], 2, False)
    assert log.since(2) == ([], 2, False)
    log.extend([b"c", b"d"])  # "a" falls out
    assert log.next_seq == 4
    assert log.since(0) == ([b"b", b"c", b"d"], 4, True)
    assert log.since(1) == ([b"b", b"c", b"d"], 4, False)
    assert log.since(3) == ([b"d"], 4, False)
    # A number from a previous life of the worker (it restarted): everything, and "missed".
    assert log.since(10) == ([b"b", b"c", b"d"], 4, True)


def test_the_load_reports_prefill_speed_and_the_log_gets_the_evictions() -> None:
    """A 64-block cache of 4-token blocks: prompts of 40 blocks each push the previous one's
    cached blocks out, and the hashes the block manager evicted come out of the log."""
    engine = create_null_engine(
        NullEngineConfig(prefill_tok_s=1e6, decode_step_s=0.0, num_blocks=64, block_size=4)
    )
    thread = EngineThread(engine)
    thread.start()
    try:
        first_prompt = list(range(1000, 1160))
        _collect(thread, "a", first_prompt, max_tokens=1)
        assert thread.load.prefill_tok_s > 0
        first_hashes = set(block_hashes(first_prompt, 4, b""))
        _collect(thread, "b", list(range(2000, 2160)), max_tokens=1)
        thread.submit(lambda engine: None).result(10)  # a loop turn after b's last step
        evicted, next_seq, missed = thread.evictions.since(0)
        assert evicted and set(evicted) <= first_hashes and not missed
        assert next_seq == len(evicted)
    finally:
        thread.stop()


class _FakeTime:
    """A clock that moves only when the null runner 'sleeps': step times are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.mark.parametrize(("max_prefill_step_s", "num_chunks"), [(0.128, 5), (None, 2)])
def test_the_measured_speed_caps_later_steps(
    max_prefill_step_s: float | None, num_chunks: int
) -> None:
    """A 1000 tok/s backend: the first chunk is the prefill chunk size's 512 tokens (no speed
    yet: the step budget is the token budget, 2048);
    it measures 1000 tok/s, so with a 0.128 s cap the other 488 tokens go 128 a step."""
    fake = _FakeTime()
    engine = create_null_engine(
        NullEngineConfig(prefill_tok_s=1000.0, decode_step_s=0.01, num_blocks=128, block_size=16),
        EngineConfig(max_prefill_step_s=max_prefill_step_s),
        sleep=fake.sleep,
    )
    thread = EngineThread(engine, clock=fake.clock)
    thread.start()
    try:
        outputs = _collect(thread, "a", list(range(1000)), max_tokens=2)
        assert outputs[0].num_prefill_chunks == num_chunks
        assert engine.prefill_tok_s == pytest.approx(1000.0)
        thread.submit(lambda engine: None).result(10)  # a loop turn after the last step
        assert thread.load.prefill_tok_s == pytest.approx(1000.0)
    finally:
        thread.stop()


def test_decode_speed_fits_base_and_per_token_time() -> None:
    """A pure decode step's time as a line in the tokens its batch holds: the gateway predicts
    what more requests do to a decode worker's time per token from it."""
    speed = DecodeSpeed()
    assert speed.line() is None
    for _ in range(200):
        for context in (1000, 3000, 5000):
            speed.note(context, 0.02 + 1e-5 * context)
    line = speed.line()
    assert line is not None
    base_s, token_s = line
    assert base_s == pytest.approx(0.02, rel=0.05)
    assert token_s == pytest.approx(1e-5, rel=0.05)


def test_decode_speed_without_spread_charges_everything_to_the_context() -> None:
    """One batch size only: no slope to fit, so the whole step counts per token (an
    overestimate of what more costs: the gateway errs towards keeping TPOT)."""
    speed = DecodeSpeed()
    for _ in range(50):
        speed.note(2000, 0.04)
    assert speed.line() == pytest.approx((0.0, 0.04 / 2000))
