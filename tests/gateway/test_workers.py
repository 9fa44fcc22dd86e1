"""``WorkerRegistry``'s load polling, with the worker calls replaced by canned answers: prefix
-cache evictions reach ``on_evicted`` (not those from before the gateway first saw the worker),
and the reading position moves with each report; a refresh waits for the poll in flight, so an
older report never lands after a newer one."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import yarl
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import workers as gateway_workers
from gateway.errors import ClientError, Conflict
from gateway.workers import WorkerHandle, WorkerRegistry, WorkerState, check_worker_url
from tests.gateway.test_dispatch import make_ready
from transfer.errors import FairgateError, WorkerUnreachable
from transfer.messages import MSGPACK_CONTENT_TYPE, WorkerInfo, WorkerLoad, encode_message
from transfer.registration import WORKER_URL_PATTERN, is_worker_url

PREFILL_URL = "http://127.0.0.1:9/prefill"


@pytest.fixture
async def registry() -> AsyncIterator[tuple[WorkerRegistry, list[tuple[str, list[bytes]]]]]:
    evicted: list[tuple[str, list[bytes]]] = []
    workers = WorkerRegistry(
        [PREFILL_URL], [], on_evicted=lambda worker_id, hashes: evicted.append((worker_id, hashes))
    )
    try:
        yield workers, evicted
    finally:
        await workers.stop()


async def prefill_info() -> WorkerInfo:
    """The worker's ``/v1/info``, as a poll reads it."""
    return WorkerInfo("p0", "instance-1", "prefill", "model", 16, 100, 4096, 49152)


async def test_evictions_are_read_in_order_and_handed_on(
    registry: tuple[WorkerRegistry, list[tuple[str, list[bytes]]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workers, evicted = registry
    [handle] = workers.handles
    asked: list[int | None] = []
    answers = [
        WorkerLoad("p0", "prefill", True, eviction_seq=1),  # not asked: where the log stands
        WorkerLoad("p0", "prefill", True, evicted_block_hashes=[b"x", b"y"], eviction_seq=3),
        WorkerLoad("p0", "prefill", True, prefill_tok_s=1234.0, eviction_seq=3),
    ]

    async def load(
        *, timeout_s: float | None = None, evictions_since: int | None = None
    ) -> WorkerLoad:
        asked.append(evictions_since)
        return answers.pop(0)

    monkeypatch.setattr(handle.client, "load", load)
    monkeypatch.setattr(handle.client, "info", prefill_info)
    for _ in range(3):
        await workers.poll_once()
    assert asked == [None, 1, 3]  # nothing from before the gateway knew the worker
    assert evicted == [("p0", [b"x", b"y"])]
    assert handle.prefill_tok_s() == 1234.0


async def test_a_refresh_waits_for_the_poll_in_flight_so_the_newer_report_stands(
    registry: tuple[WorkerRegistry, list[tuple[str, list[bytes]]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workers, _ = registry
    [handle] = workers.handles
    older = WorkerLoad("p0", "prefill", True, prefill_tok_s=1000.0, eviction_seq=2)
    newer = WorkerLoad("p0", "prefill", True, prefill_tok_s=2000.0, eviction_seq=3)
    older_answer: asyncio.Future[WorkerLoad] = asyncio.get_running_loop().create_future()
    older_asked = asyncio.Event()
    asked: list[int | None] = []

    async def load(
        *, timeout_s: float | None = None, evictions_since: int | None = None
    ) -> WorkerLoad:
        asked.append(evictions_since)
        if len(asked) == 1:
            return WorkerLoad("p0", "prefill", True, eviction_seq=1)
        if len(asked) == 2:
            older_asked.set()
            return await older_answer  # held back until the refresh has started
        return newer

    monkeypatch.setattr(handle.client, "load", load)
    monkeypatch.setattr(handle.client, "info", prefill_info)
    async with asyncio.timeout(5.0):
        await workers.poll_once()  # the worker is ready
        polling = asyncio.create_task(workers.poll_once())
        await older_asked.wait()
        refreshing = asyncio.create_task(workers.refresh(handle))
        # One turn of the loop: the refresh runs until it must wait (for the poll in flight; a
        # refresh that did not wait would have asked and taken its answer by now).
        await asyncio.sleep(0)
        older_answer.set_result(older)
        await asyncio.gather(polling, refreshing)
    assert handle.load is newer
    assert asked == [None, 1, 2]  # the refresh asked after the older report, reading on from it
    assert handle.eviction_seq == 3


async def test_a_worker_one_call_marked_dead_is_polled_at_once_and_back_if_it_answers(
    registry: tuple[WorkerRegistry, list[tuple[str, list[bytes]]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One failed call may be a reset connection to a live worker: it is not left dead until
    the next round of polls (a long interval would fail the requests waiting for it)."""
    workers, _ = registry
    workers.poll_interval_s = 3600.0  # no round of polls during the test
    [handle] = workers.handles

    async def load(
        *, timeout_s: float | None = None, evictions_since: int | None = None
    ) -> WorkerLoad:
        return WorkerLoad("p0", "prefill", True, eviction_seq=0)

    monkeypatch.setattr(handle.client, "load", load)
    monkeypatch.setattr(handle.client, "info", prefill_info)
    await workers.start()
    assert handle.is_ready
    workers.mark_dead(handle, WorkerUnreachable("reset by peer"))
    assert handle.state == "dead"
    async with asyncio.timeout(5.0):
        while not handle.is_ready:
            await asyncio.sleep(0.01)


# ---- membership, losses and hung workers, against a scripted worker on loopback ---------------


class ScriptedWorker:
    """A real HTTP server on loopback answering ``/v1/load`` and ``/v1/info`` as a worker does
    (msgpack), from a script: the registry polls it through its real client. ``loads`` are
    answered in turn (then ``load`` for ever); ``delay_s`` holds every load answer back (a
    stopped process: the connection is accepted, no answer comes); ``down`` / ``up`` stop and
    restart the server at the same port."""

    def __init__(self, info: WorkerInfo) -> None:
        self.info = info
        self.load = WorkerLoad(info.worker_id, info.role, True)
        self.loads: list[WorkerLoad] = []
        self.delay_s = 0.0
        self.num_polls = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/load", self._load)
        app.router.add_get("/v1/info", self._info)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def then(self, *loads: WorkerLoad) -> None:
        self.loads.extend(loads)

    def restart(self, instance_id: str) -> None:
        """A new process at the same URL: another instance, its eviction log begun anew."""
        self.info = msgspec.structs.replace(self.info, instance_id=instance_id)

    async def _load(self, request: web.Request) -> web.Response:
        self.num_polls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        load = self.loads.pop(0) if self.loads else self.load
        return web.Response(body=encode_message(load), content_type=MSGPACK_CONTENT_TYPE)

    async def _info(self, request: web.Request) -> web.Response:
        return web.Response(body=encode_message(self.info), content_type=MSGPACK_CONTENT_TYPE)


def decode_info(worker_id: str = "d0", instance_id: str = "instance-1") -> WorkerInfo:
    return WorkerInfo(worker_id, instance_id, "decode", "model", 16, 100, 4096, 49152)


@pytest.fixture
async def decode_worker() -> AsyncIterator[ScriptedWorker]:
    worker = ScriptedWorker(decode_info())
    await worker.up()
    try:
        yield worker
    finally:
        await worker.down()


Lost = list[tuple[WorkerHandle, FairgateError]]


def state_of(handle: WorkerHandle) -> WorkerState:
    """The handle's state, read afresh (the registry changes it while a test awaits)."""
    return handle.state


@pytest.fixture
def now() -> list[float]:
    return [1000.0]


@pytest.fixture
async def members(now: list[float]) -> AsyncIterator[tuple[WorkerRegistry, Lost]]:
    """An empty registry on a clock the test moves, recording its ``on_lost`` calls (deadline:
    ``max(5 s, 50 steps)``)."""
    lost: Lost = []
    workers = WorkerRegistry(
        [],
        [],
        poll_interval_s=3600.0,  # the tests poll; none in the background
        on_lost=lambda handle, error: lost.append((handle, error)),
        progress_deadline_steps=50.0,
        min_progress_deadline_s=5.0,
        clock=lambda: now[0],
    )
    try:
        yield workers, lost
    finally:
        await workers.stop()


def working(num_steps: int, since_step_s: float = 0.0) -> WorkerLoad:
    """A decode worker's report while it has work (10 ms steps: a 5 s deadline)."""
    return WorkerLoad(
        "d0",
        "decode",
        True,
        num_running=1,
        num_steps=num_steps,
        has_work=True,
        since_step_s=since_step_s,
        max_step_s=0.01,
    )


IDLE = WorkerLoad("d0", "decode", True, num_steps=12)


async def test_a_worker_that_stops_stepping_is_ejected_once_and_back_after_healthy_polls(
    members: tuple[WorkerRegistry, Lost], decode_worker: ScriptedWorker, now: list[float]
) -> None:
    workers, lost = members
    handle, _ = workers.add(decode_worker.url, "decode")
    decode_worker.then(working(10), working(10, since_step_s=3.0))
    await workers.poll_once()
    assert state_of(handle) == "ready"
    now[0] += 3.0
    await workers.poll_once()
    assert state_of(handle) == "ready" and not lost  # stalled 3 s: within the deadline
    now[0] += 3.0
    decode_worker.then(working(10, since_step_s=6.0))
    await workers.poll_once()
    assert state_of(handle) == "ejected"
    assert workers.ready("decode") == [] and not workers.can_serve()
    assert handle.last_error is not None and "no engine step for 6.0 s" in handle.last_error
    [(lost_handle, error)] = lost
    assert lost_handle is handle and isinstance(error, WorkerUnreachable)
    assert decode_worker.url in error.message and "ejected" in error.message
    assert error.worker_url == decode_worker.url
    # Half-open: healthy polls (steps completed, or no work) must come RECOVERY_POLLS in a row.
    decode_worker.then(
        working(10, since_step_s=7.0),  # still stalled
        working(11),
        working(12),  # two steps: two healthy polls
        working(12, since_step_s=1.0),  # no step: the count starts over
        IDLE,
        IDLE,
    )
    for _ in range(6):
        now[0] += 1.0
        await workers.poll_once()
        assert state_of(handle) == "ejected"
    now[0] += 1.0
    decode_worker.then(IDLE)
    await workers.poll_once()
    assert state_of(handle) == "ready" and handle.last_error is None
    assert workers.ready("decode") == [handle]
    assert len(lost) == 1  # one loss, one call
    # Back with a fresh watch: a stall must last a whole deadline again, as the gateway sees it.
    decode_worker.then(working(12, since_step_s=60.0))
    now[0] += 1.0
    await workers.poll_once()
    assert state_of(handle) == "ready"


async def test_a_failed_call_is_no_loss_but_a_poll_that_times_out_is(
    members: tuple[WorkerRegistry, Lost],
    decode_worker: ScriptedWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One failed call may be a reset connection: the poll it triggers finds the same worker,
    which comes back and has lost nothing. A worker that answers no poll in time (a stopped
    process) is dead, and its requests are lost, once."""
    workers, lost = members
    monkeypatch.setattr(gateway_workers, "POLL_TIMEOUT_S", 0.2)
    handle, _ = workers.add(decode_worker.url, "decode")
    await workers.start()
    assert state_of(handle) == "ready"
    workers.mark_dead(handle, WorkerUnreachable("reset by peer"))
    assert state_of(handle) == "dead"
    async with asyncio.timeout(5.0):
        while state_of(handle) != "ready":
            await asyncio.sleep(0.01)
    assert not lost
    decode_worker.delay_s = 1.0
    await workers.poll_once()
    await workers.poll_once()
    assert state_of(handle) == "dead"
    [(_, error)] = lost
    assert "does not answer" in error.message and decode_worker.url in error.message
    decode_worker.delay_s = 0.0
    await workers.poll_once()
    assert state_of(handle) == "ready" and len(lost) == 1


async def test_a_restarted_worker_loses_what_ran_there(
    members: tuple[WorkerRegistry, Lost], decode_worker: ScriptedWorker
) -> None:
    workers, lost = members
    handle, _ = workers.add(decode_worker.url, "decode")
    decode_worker.load = WorkerLoad("d0", "decode", True, eviction_seq=5)
    await workers.poll_once()
    await workers.poll_once()
    assert state_of(handle) == "ready" and not lost
    # Restarted between two polls: its eviction log starts over, which sends the registry to
    # its identity, where the new instance shows.
    decode_worker.restart("instance-2")
    decode_worker.load = WorkerLoad("d0", "decode", True, eviction_seq=0, evictions_missed=True)
    await workers.poll_once()
    [(_, error)] = lost
    assert "restarted" in error.message
    assert state_of(handle) == "ready" and handle.info is not None
    assert handle.info.instance_id == "instance-2"
    # Down, then back as another instance: lost when its poll failed, not once more.
    await decode_worker.down()
    await workers.poll_once()
    assert state_of(handle) == "dead" and len(lost) == 2
    decode_worker.restart("instance-3")
    decode_worker.load = WorkerLoad("d0", "decode", True)
    await decode_worker.up()
    await workers.poll_once()
    assert state_of(handle) == "ready" and len(lost) == 2
    # The arithmetic the admin API shows is the running instance's announcement ("": not said).
    assert handle.status(0.0).precision is None
    plan = "float32 weights; batch-1 decode bfloat16, batched decode bfloat16, ..."
    await decode_worker.down()
    await workers.poll_once()
    decode_worker.info = msgspec.structs.replace(decode_worker.info, precision=plan)
    decode_worker.restart("instance-4")
    await decode_worker.up()
    await workers.poll_once()
    assert state_of(handle) == "ready" and handle.status(0.0).precision == plan


async def test_a_draining_worker_takes_nothing_new_and_is_drained_when_empty(
    members: tuple[WorkerRegistry, Lost], decode_worker: ScriptedWorker
) -> None:
    workers, lost = members
    handle, _ = workers.add(decode_worker.url, "decode")
    await workers.poll_once()
    handle.inflight_requests = 1  # the dispatcher placed a request there
    workers.drain(handle)
    assert state_of(handle) == "draining" and workers.ready("decode") == []
    running = WorkerLoad("d0", "decode", True, num_running=1)
    decode_worker.then(running, running)
    await workers.poll_once()
    assert state_of(handle) == "draining"
    handle.inflight_requests = 0  # the request ended, by the gateway's count…
    await workers.poll_once()
    assert state_of(handle) == "draining"  # …but the worker's report still holds it
    await workers.poll_once()
    assert state_of(handle) == "drained" and workers.ready("decode") == []
    workers.undrain(handle)
    assert state_of(handle) == "ready" and workers.ready("decode") == [handle]
    # A drain asked of a dead worker holds until it is back.
    await decode_worker.down()
    await workers.poll_once()
    workers.drain(handle)
    assert state_of(handle) == "dead" and handle.status(0.0).drain_requested
    await decode_worker.up()
    await workers.poll_once()
    assert state_of(handle) == "drained"
    assert len(lost) == 1  # the failed poll only: draining loses nothing


async def test_a_removed_worker_is_polled_no_more_and_loses_its_requests(
    members: tuple[WorkerRegistry, Lost], decode_worker: ScriptedWorker
) -> None:
    workers, lost = members
    handle, _ = workers.add(decode_worker.url, "decode")
    await workers.start()
    assert state_of(handle) == "ready"
    workers.remove(handle, reason="by the admin")
    assert workers.find(decode_worker.url) is None and workers.find("d0") is None
    [(_, error)] = lost
    assert "removed" in error.message
    num_polls = decode_worker.num_polls
    await workers.poll_once()
    workers.mark_dead(handle, WorkerUnreachable("late news of a call"))  # ignored: gone
    await asyncio.sleep(0.1)
    assert decode_worker.num_polls == num_polls
    # Removed by the admin: refused when it registers again, until the admin adds it.
    with pytest.raises(Conflict):
        workers.add(decode_worker.url, "decode", source="registered", heartbeat_s=1.0)
    again, is_new = workers.add(decode_worker.url, "decode")
    assert is_new and again is not handle and again.source == "admin"


async def test_adding_is_idempotent_and_checks_url_role_and_identity(
    members: tuple[WorkerRegistry, Lost], decode_worker: ScriptedWorker
) -> None:
    workers, _ = members
    handle, is_new = workers.add(decode_worker.url + "/", "decode")
    assert is_new and handle.url == decode_worker.url and state_of(handle) == "unknown"
    assert workers.add(decode_worker.url, "decode") == (handle, False)
    with pytest.raises(Conflict, match="already a decode worker"):
        workers.add(decode_worker.url, "prefill")
    for bad in ("ftp://x:1", "http://user@x:1", "http://x:65536", "http://[::1]:1", "x:1"):
        with pytest.raises(ClientError) as refused:
            workers.add(bad, "decode")
        assert refused.value.param == "url"
    # The same worker under another name (localhost) is refused: the policy counts by id.
    twin, _ = workers.add(f"http://localhost:{decode_worker.port}", "decode")
    # A decode worker added as a prefill worker serves nothing.
    prefill = ScriptedWorker(decode_info("d1"))
    await prefill.up()
    try:
        wrong, _ = workers.add(prefill.url, "prefill")
        await workers.poll_once()
    finally:
        await prefill.down()
    assert state_of(handle) == "ready"
    assert state_of(twin) == "incompatible" and "already known at" in (twin.last_error or "")
    assert state_of(wrong) == "incompatible"
    assert wrong.last_error == "added as a prefill worker but it is a decode worker"
    assert workers.ready("prefill") == [] and workers.ready("decode") == [handle]


async def test_a_registered_worker_that_stops_renewing_and_answering_is_forgotten(
    members: tuple[WorkerRegistry, Lost], decode_worker: ScriptedWorker, now: list[float]
) -> None:
    workers, lost = members
    handle, _ = workers.add(decode_worker.url, "decode", source="registered", heartbeat_s=1.0)
    await workers.poll_once()
    assert state_of(handle) == "ready" and handle.source == "registered"
    now[0] += 2.0
    workers.add(decode_worker.url, "decode", source="registered", heartbeat_s=1.0)  # renewed
    await decode_worker.down()
    now[0] += 2.0
    await workers.poll_once()  # its lease (3 heartbeats) holds: dead, not forgotten
    assert state_of(handle) == "dead" and workers.find_url(decode_worker.url) is handle
    now[0] += 2.0
    await workers.poll_once()
    assert workers.find_url(decode_worker.url) is None
    assert len(lost) == 1  # when its poll failed


@given(st.from_regex(WORKER_URL_PATTERN))
@settings(max_examples=300, deadline=None)
def test_every_url_the_pattern_takes_is_one_the_client_can_call(url: str) -> None:
    parsed = yarl.URL(url)  # what aiohttp makes of it; raises for what it cannot call
    assert parsed.scheme in ("http", "https") and parsed.host
    assert is_worker_url(url)
    assert check_worker_url(url) == url.rstrip("/")


async def test_a_worker_that_stopped_answering_does_not_hold_back_the_others_polls() -> None:
    """A stopped worker (SIGSTOP: its socket listens, nothing answers) takes each poll's whole
    timeout. Its lost requests each mark it dead: one check polls it, not one each, and a
    round of polls does not wait for a poll of it still under way, so the other workers'
    reports stay fresh (five checks in a row held every round for 10 s)."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(128)
    registry = WorkerRegistry([], [f"http://127.0.0.1:{hung.getsockname()[1]}"])
    [handle] = registry.handles
    make_ready(handle, "decode")
    await registry.start()
    try:
        for _ in range(5):  # five lost requests' Dispatcher.failed
            registry.mark_dead(handle, WorkerUnreachable("gone", worker_url=handle.url))
        await asyncio.sleep(0)
        assert len(registry._checks) == 1
        started = time.monotonic()
        await registry.poll_once()
        assert time.monotonic() - started < 1.0
    finally:
        await registry.stop()
        hung.close()
