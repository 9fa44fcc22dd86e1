"""The engine's progress in a worker's load report (``num_steps``, ``has_work``,
``since_step_s``, ``max_step_s``), which the gateway's ``ProgressWatch`` judges (issue 18: hung
workers).

The engine thread's own account first (in-process, null engine: the real loop over a runner
that sleeps, or that wedges when the test says so); then real worker processes (tiny model): a
worker whose engine thread is wedged in a step (failpoint ``engine.forward=pause``) keeps
answering its polls while its step count stands still, and ``ProgressWatch`` names it on those
very reports; a busy healthy worker, and workers waiting for KV or for a target, it does not."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from deploy.launcher import WorkerProcess, WorkerSpec
from engine.engine import LLMEngine
from engine.engine_thread import EngineThread, StepProgress
from engine.null_engine import NullEngineConfig, create_null_engine
from engine.sequence import SamplingParams, StepOutput
from gateway.liveness import ProgressWatch
from tests.workers.conftest import TINY_ARGS, Launch, colocated, wait_for_idle
from transfer.client import DecodeClient, PrefillClient, WorkerClient
from transfer.errors import FairgateError
from transfer.messages import (
    DecodeRequest,
    PrefillRequest,
    PrefillTarget,
    Reserved,
    SamplingSpec,
    WorkerLoad,
)

NULL = NullEngineConfig(prefill_tok_s=1e6, decode_step_s=0.002, num_blocks=64, block_size=4)
PROMPT = list(range(1000, 1040))
DEADLINE_S = 1.0  # the watch's, for every kind of worker here: tests should not wait long
POLL_S = 0.1
WEDGED_STEPS = {"FAIRGATE_FAILPOINTS": "engine.forward=pause"}


def _eventually(
    read: Callable[[], StepProgress], ok: Callable[[StepProgress], bool]
) -> StepProgress:
    """The first progress ``ok`` holds for, within 10 s."""
    deadline = time.monotonic() + 10.0
    while True:
        progress = read()
        if ok(progress):
            return progress
        assert time.monotonic() < deadline, f"never: {progress}"
        time.sleep(0.01)


def _add(
    thread: EngineThread, request_id: str, max_tokens: int, *, prefill_only: bool = False
) -> threading.Event:
    """Add a request through a command; the event is set when its last output comes."""
    done = threading.Event()

    def sink(output: StepOutput | FairgateError) -> None:
        if isinstance(output, FairgateError) or output.finish_reason or output.is_handed_off:
            done.set()

    def add(engine: LLMEngine) -> None:
        engine.add_request(
            request_id, PROMPT, SamplingParams(max_tokens=max_tokens), prefill_only=prefill_only
        )
        thread.watch(request_id, sink)

    thread.submit(add).result(timeout=10)
    return done


# ---- the engine thread ------------------------------------------------------------------------


def test_steps_are_counted_and_an_engine_that_waits_for_a_command_has_no_work() -> None:
    thread = EngineThread(create_null_engine(NULL))
    assert thread.progress == StepProgress()
    thread.start()
    try:
        assert _add(thread, "a", max_tokens=5).wait(10)
        idle = _eventually(lambda: thread.progress, lambda p: not p.has_work)
        assert idle.num_steps == 5  # the prompt (and the first token), then four decodes
        assert idle.since_step_s == 0.0
        assert NULL.decode_step_s <= idle.max_step_s < 1.0
        time.sleep(0.2)
        assert thread.progress == idle  # idle: nothing moves
    finally:
        thread.stop()
    assert not thread.progress.has_work


def test_a_wedged_step_has_work_and_no_progress_until_it_ends() -> None:
    unwedge = threading.Event()

    def wedge(duration_s: float) -> None:  # the runner's sleep: blocks until the test says
        assert unwedge.wait(30)

    thread = EngineThread(create_null_engine(NULL, sleep=wedge))
    thread.start()
    try:
        time.sleep(1.0)  # idle first: the stall counts from when the work came, not before
        done = _add(thread, "stuck", max_tokens=3)
        first = _eventually(lambda: thread.progress, lambda p: p.has_work)
        assert first.since_step_s < 0.5
        time.sleep(0.3)
        later = thread.progress
        assert later.has_work and later.num_steps == first.num_steps == 0
        assert later.since_step_s >= first.since_step_s + 0.3
        assert later.max_step_s == 0.0  # no step ended: no step time yet
        unwedge.set()
        assert done.wait(10)
        after = _eventually(lambda: thread.progress, lambda p: not p.has_work)
        assert after.num_steps == 3 and after.max_step_s > 0.3  # the wedged step, measured
    finally:
        unwedge.set()
        thread.stop()


def test_requests_the_engine_cannot_step_are_no_work() -> None:
    """A reservation whose KV has not come, a waiting request no block is free for (the
    reservation holds them all), a handed-off prefill waiting for its target: the engine waits
    for a command, and says it has no work."""
    engine = create_null_engine(NULL)
    thread = EngineThread(engine)
    thread.start()
    try:
        everything = NULL.num_blocks * NULL.block_size
        assert thread.submit(lambda e: e.reserve("held", everything)).result(10) is not None
        admitted = _add(thread, "no-room", max_tokens=4)
        waiting = _eventually(lambda: thread.progress, lambda p: not p.has_work)
        # It stepped once, found nothing to run, and waits; a step that ran nothing says
        # nothing of how long one takes.
        assert waiting.num_steps == 1 and waiting.max_step_s == 0.0
        time.sleep(0.2)
        assert thread.progress == waiting
        assert thread.load.num_waiting == 1 and thread.load.num_reserved == 1
        thread.submit(lambda e: e.cancel_reservation("held")).result(10)
        assert admitted.wait(10)
        assert _add(thread, "handed-off", max_tokens=8, prefill_only=True).wait(10)
        handed_off = _eventually(lambda: thread.progress, lambda p: not p.has_work)
        assert list(engine.handed_off) == ["handed-off"]
        time.sleep(0.2)
        assert thread.progress == handed_off
    finally:
        thread.stop()


# ---- real worker processes --------------------------------------------------------------------


def _watch() -> ProgressWatch:
    return ProgressWatch(min_deadline_s=DEADLINE_S, unmeasured_deadline_s=DEADLINE_S)


async def _poll(
    worker: WorkerProcess, watch: ProgressWatch, *, until: Callable[[], bool]
) -> list[tuple[float, WorkerLoad, str | None]]:
    """Load reports every ``POLL_S`` until ``until()``, each handed to ``watch`` as the gateway's
    registry does: (when it came, the report, the watch's verdict)."""
    seen: list[tuple[float, WorkerLoad, str | None]] = []
    async with WorkerClient(worker.http_url) as client:
        while not until():
            load = await client.load(timeout_s=2.0)  # the registry's poll timeout
            now = time.monotonic()
            seen.append((now, load, watch.observe(load, now)))
            await asyncio.sleep(POLL_S)
    return seen


def _for(duration_s: float) -> Callable[[], bool]:
    end = time.monotonic() + duration_s
    return lambda: time.monotonic() >= end


async def test_a_wedged_engine_answers_its_polls_and_its_step_count_stands_still(
    launch: Launch,
) -> None:
    [wedged] = launch([WorkerSpec("colocated", "tiny", TINY_ARGS, env=WEDGED_STEPS)])
    watch = _watch()
    idle = await _poll(wedged, watch, until=_for(2 * DEADLINE_S))
    assert all(not load.has_work and reason is None for _, load, reason in idle)
    request = asyncio.ensure_future(
        colocated(wedged.http_url, "wedged", PROMPT, SamplingSpec(max_tokens=8, temperature=0))
    )
    try:
        await asyncio.to_thread(wedged.wait_event, "failpoint", 30)  # in its first step
        seen = await _poll(wedged, watch, until=_for(3 * DEADLINE_S))
        assert not request.done()
    finally:
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        wedged.kill()
    loads = [load for _, load, _ in seen]
    assert len(loads) >= 10  # every poll answered, within the poll timeout
    assert all(load.ready and load.has_work and load.num_steps == 0 for load in loads)
    since = [load.since_step_s for load in loads]
    assert since == sorted(since)
    assert since[-1] >= 2 * DEADLINE_S  # polled for 3 × DEADLINE_S after the wedge, by its clock
    stalled_at = [now for now, _, reason in seen if reason is not None]
    assert stalled_at, "the watch never named the wedged worker"
    # The watch sees the stall for itself: from the first report with work, a deadline's
    # worth, and at most a few polls more; then on every report.
    assert DEADLINE_S < stalled_at[0] - seen[0][0] < DEADLINE_S + 2.0
    assert len(stalled_at) == len([now for now, _, _ in seen if now >= stalled_at[0]])
    reason = next(reason for _, _, reason in seen if reason is not None)
    assert reason.startswith("no engine step for ") and "no step completed yet" in reason


async def test_a_busy_healthy_engine_counts_its_steps_and_is_not_named(launch: Launch) -> None:
    [healthy] = launch([WorkerSpec("colocated", "tiny", TINY_ARGS)])
    watch = _watch()
    sampling = SamplingSpec(max_tokens=1900, temperature=0, ignore_eos=True)
    requests = asyncio.gather(
        *(colocated(healthy.http_url, f"busy-{index}", PROMPT, sampling) for index in range(4))
    )
    seen = await _poll(healthy, watch, until=requests.done)
    assert [len(output) for output in await requests] == [1900] * 4
    busy = [(now, load) for now, load, _ in seen if load.has_work]
    assert busy[-1][0] - busy[0][0] > 1.5 * DEADLINE_S  # long enough to be named if it were
    assert [reason for _, _, reason in seen if reason is not None] == []
    steps = [load.num_steps for _, load in busy]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    async with WorkerClient(healthy.http_url) as client:
        deadline = time.monotonic() + 10.0
        while (after := await client.load()).has_work:
            assert time.monotonic() < deadline, after
            await asyncio.sleep(POLL_S)
    assert after.num_steps >= 1900 and 0.0 < after.max_step_s < DEADLINE_S
    assert after.since_step_s == 0.0


async def test_waiting_for_kv_or_for_a_target_is_no_work(launch: Launch) -> None:
    """A decode worker whose one request is a reservation waiting for its KV, and a prefill
    worker holding a finished prefill for a target that has not come: neither is stalled,
    however long it lasts."""
    prefill, decode = launch(
        [WorkerSpec("prefill", "tiny", TINY_ARGS), WorkerSpec("decode", "tiny", TINY_ARGS)]
    )
    async with (
        DecodeClient(decode.http_url) as decode_client,
        decode_client.decode(DecodeRequest("reserved", PROMPT)) as stream,
    ):
        assert isinstance(await stream.next(), Reserved)
        seen = await _poll(decode, _watch(), until=_for(2 * DEADLINE_S))
    assert all(load.num_reserved == 1 and not load.has_work for _, load, _ in seen)
    assert [reason for _, _, reason in seen if reason is not None] == []
    async with PrefillClient(prefill.http_url) as prefill_client:
        sampling = SamplingSpec(max_tokens=8, temperature=0, ignore_eos=True)
        result = await prefill_client.prefill(
            PrefillRequest("held", PROMPT, sampling, target_follows=True)
        )
        assert result.will_transfer
        seen = await _poll(prefill, _watch(), until=_for(2 * DEADLINE_S))
        await prefill_client.send_target(PrefillTarget("held", None))
    assert all(load.num_pending_transfers == 1 and not load.has_work for _, load, _ in seen)
    assert all(load.num_steps >= 1 for _, load, _ in seen)
    assert [reason for _, _, reason in seen if reason is not None] == []
    for worker in (prefill, decode):
        await wait_for_idle(worker, timeout_s=10)
