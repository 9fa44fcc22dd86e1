"""``WorkerRegistry``'s load polling, with the worker calls replaced by canned answers: prefix
-cache evictions reach ``on_evicted`` (not those from before the gateway first saw the worker),
and the reading position moves with each report; a refresh waits for the poll in flight, so an
older report never lands after a newer one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.workers import WorkerRegistry
from transfer.errors import WorkerUnreachable
from transfer.messages import WorkerInfo, WorkerLoad

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
