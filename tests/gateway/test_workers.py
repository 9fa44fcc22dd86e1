"""``WorkerRegistry``'s load polling, with the worker calls replaced by canned answers: prefix
-cache evictions reach ``on_evicted`` (not those from before the gateway first saw the worker),
and the reading position moves with each report."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.workers import WorkerRegistry
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

    async def load(*, timeout_s: float | None = None, evictions_since: int | None = None):
        asked.append(evictions_since)
        return answers.pop(0)

    async def info() -> WorkerInfo:
        return WorkerInfo("p0", "instance-1", "prefill", "model", 16, 100, 4096, 49152)

    monkeypatch.setattr(handle.client, "load", load)
    monkeypatch.setattr(handle.client, "info", info)
    for _ in range(3):
        await workers.poll_once()
    assert asked == [None, 1, 3]  # nothing from before the gateway knew the worker
    assert evicted == [("p0", [b"x", b"y"])]
    assert handle.prefill_tok_s() == 1234.0
