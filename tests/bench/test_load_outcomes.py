"""``bench.lean_http`` and ``bench.outcomes``: what the overload and prompt-flood benchmarks count,
against a small real HTTP server on loopback whose answers each test chooses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import pytest

from bench.lean_http import ConnectionPool
from bench.outcomes import Outcome, summarize, timed_post


class _Server:
    """HTTP/1.1 keep-alive server: ``/ok`` 200, ``/full`` 429 ``queue_full`` with Retry-After,
    ``/hang`` reads the request and never answers. Counts connections, and when each one's client
    closed it."""

    def __init__(self) -> None:
        self.num_connections = 0
        self.closed_by_client = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client.set()
                    return
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/hang":
                    if not await reader.read(1):  # nothing comes, unless the client leaves
                        self.closed_by_client.set()
                    return
                if path == b"/full":
                    body = json.dumps({"error": {"code": "queue_full"}}).encode()
                    status = b"429 Too Many Requests\r\nretry-after: 1"
                else:
                    body = b"{}"
                    status = b"200 OK\r\nserver-timing: queue;dur=1.5, worker;dur=2, total;dur=4"
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\ncontent-length: "
                    + str(len(body)).encode()
                    + b"\r\ncontent-type: application/json\r\n\r\n"
                    + body
                )
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[_Server, ConnectionPool]]:
    state = _Server()
    listener = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    pool = ConnectionPool("127.0.0.1", port)
    try:
        yield state, pool
    finally:
        pool.close()
        listener.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await listener.wait_closed()


async def test_a_refusal_is_counted_with_its_code_and_retry_after(
    server: tuple[_Server, ConnectionPool],
) -> None:
    state, pool = server
    ok = await timed_post(pool, "/ok", b"{}", b"", timeout_s=5)
    refused = await timed_post(pool, "/full", b"{}", b"", timeout_s=5)
    assert (ok.kind, ok.reason) == ("ok", "200")
    assert (ok.server_queue_s, ok.server_total_s) == (0.0015, 0.004)
    assert (refused.kind, refused.reason, refused.has_retry_after) == (
        "refused",
        "429 queue_full",
        True,
    )
    assert state.num_connections == 1  # answers of any status leave the connection reusable


async def test_a_client_timeout_closes_its_connection(
    server: tuple[_Server, ConnectionPool],
) -> None:
    state, pool = server
    outcome = await timed_post(pool, "/hang", b"{}", b"", timeout_s=0.2)
    assert outcome.kind == "timeout"
    assert 0.2 <= outcome.latency_s < 2.0
    # The server sees the client go (as the gateway must, to drop the request's work) ...
    async with asyncio.timeout(2):
        await state.closed_by_client.wait()
    # ... and the connection, whose answer may still come, serves no other request.
    assert (await timed_post(pool, "/ok", b"{}", b"", timeout_s=5)).kind == "ok"
    assert state.num_connections == 2


async def test_a_refused_connection_is_an_error_not_a_timeout() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = await timed_post(ConnectionPool("127.0.0.1", port), "/ok", b"{}", b"", timeout_s=5)
    assert (outcome.kind, outcome.reason) == ("error", "ConnectionRefusedError")


def _outcome(kind: str, reason: str, sent: float, ended: float, retry: bool = False) -> Outcome:
    return Outcome(kind, reason, sent, sent, ended, has_retry_after=retry)  # type: ignore[arg-type]


def test_summarize_counts_what_ended_in_the_windows() -> None:
    windows = [(0.0, 1.0), (10.0, 11.0)]  # two phases of one kind, 2 s in all
    outcomes = [
        _outcome("ok", "200", 0.1, 0.2),
        _outcome("ok", "200", 0.9, 1.5),  # ended after its window: not in completed_rps
        _outcome("ok", "200", 10.0, 10.5),
        _outcome("refused", "429 queue_full", 10.1, 10.11, retry=True),
        _outcome("refused", "503 queue_timeout", 10.2, 10.3),
        _outcome("timeout", "TimeoutError", 10.3, 20.3),
    ]
    figures = summarize(outcomes, windows)
    assert figures["num_requests"] == 6
    assert figures["sent_rps"] == 3.0
    assert figures["completed_rps"] == 1.0
    assert figures["share"] == {"ok": 0.5, "refused": 0.3333, "timeout": 0.1667}
    assert figures["answers"] == {
        "200": 3,
        "429 queue_full": 1,
        "503 queue_timeout": 1,
        "TimeoutError": 1,
    }
    assert figures["refused_with_retry_after"] == 0.5
    assert figures["refused_p99_ms"] == 100.0
    assert figures["num_timeouts"] == 1
    assert figures["answered_p99_ms"] == 600.0  # the timeout is no answer


def test_summarize_measures_how_late_the_generator_sent() -> None:
    late = Outcome("ok", "200", intended_at=1.0, started_at=1.25, ended_at=1.3)
    on_time = Outcome("ok", "200", intended_at=2.0, started_at=2.0, ended_at=2.1)
    figures = summarize([late, on_time], [(0.0, 10.0)])
    assert figures["send_lag_p99_ms"] == 250.0
    assert figures["sent_rps"] == 0.2
