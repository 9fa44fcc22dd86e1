"""A lean HTTP/1.1 client for load generators. The load generator shares two cores with the
stack it measures, so it must cost little: a general-purpose client (httpx) spends more CPU per
request than the gateway does, and under a flood its own backlog shows up as latency.

``ConnectionPool.post`` sends JSON and reads a ``Content-Length`` answer; ``post_stream`` reads a
chunked answer (SSE) and reports when the first chunk matching a predicate arrived. Keep-alive
connections the server has closed are dropped before reuse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["ConnectionPool", "HttpError"]


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, path: str, body: bytes, headers: bytes) -> None:
        self.writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nhost: bench\r\ncontent-type: "
            b"application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n"
            + headers
            + b"\r\n"
            + body
        )

    async def head(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        return int(head[9:12]), head

    async def sized_body(self, head: bytes) -> bytes:
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        return await self.reader.readexactly(length)

    async def chunks(self, on_chunk: Callable[[bytes], None]) -> None:
        """Every chunk of a chunked body, to the end."""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            on_chunk((await self.reader.readexactly(size + 2))[:-2])

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Keep-alive connections to one server."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self._idle: list[_Connection] = []

    async def _take(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.reader.at_eof():
                return connection
            connection.close()
        return _Connection(*await asyncio.open_connection(*self.address))

    async def post(self, path: str, body: bytes, headers: bytes) -> tuple[int, bytes, bytes]:
        """(status, header block, body) of a ``Content-Length`` answer."""
        connection = await self._take()
        connection.send(path, body, headers)
        status, head = await connection.head()
        answer = await connection.sized_body(head)
        self._idle.append(connection)
        return status, head, answer

    async def post_stream(
        self, path: str, body: bytes, headers: bytes, is_first: Callable[[bytes], bool]
    ) -> float | None:
        """Send, read the chunked answer to its end; the ``perf_counter`` time the first chunk
        for which ``is_first`` holds arrived (None if none did). ``HttpError`` unless 200."""
        connection = await self._take()
        connection.send(path, body, headers)
        status, head = await connection.head()
        if status != 200:
            answer = await connection.sized_body(head)
            self._idle.append(connection)
            raise HttpError(status, answer)
        first: float | None = None

        def on_chunk(chunk: bytes) -> None:
            nonlocal first
            if first is None and is_first(chunk):
                first = time.perf_counter()

        await connection.chunks(on_chunk)
        self._idle.append(connection)
        return first

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
