"""A lean HTTP/1.1 client for load generators. The load generator shares two cores with the
stack it measures, so it must cost little: a general-purpose client (httpx) spends more CPU per
request than the gateway does, and under a flood its own backlog shows up as latency.

``ConnectionPool.post`` sends JSON and reads a ``Content-Length`` answer, whatever its status;
``post_stream`` reads a chunked answer (SSE) and reports when the first chunk matching a
predicate arrived. Keep-alive connections the server has closed, or said it will close, are
not reused. A request that fails or is cancelled midway (a client timeout: the caller's
``asyncio.timeout``) closes its connection: the answer may still come, so the connection cannot
serve another request, and the server sees the client go as it would a real one's. Each
request in flight holds a connection of its own: an open loop holds as many as it has requests
outstanding (mind ``ulimit -n``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["ConnectionPool", "HttpError", "header"]


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


def header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in an answer's header block, if it has one."""
    marker = b"\r\n" + name + b":"
    start = head.lower().find(marker)
    if start < 0:
        return None
    start += len(marker)
    return head[start : head.index(b"\r\n", start)].strip()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.is_reusable = True

    def send(self, path: str, body: bytes, headers: bytes) -> None:
        self.writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nhost: bench\r\ncontent-type: "
            b"application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n"
            + headers
            + b"\r\n"
        )
        self.writer.write(body)  # not joined to the head: a large body is not copied again

    async def head(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        if header(head, b"connection") == b"close":
            self.is_reusable = False
        return int(head[9:12]), head

    async def sized_body(self, head: bytes) -> bytes:
        length = header(head, b"content-length")
        if length is None:  # no length: the body runs to the connection's end
            self.is_reusable = False
            return await self.reader.read()
        return await self.reader.readexactly(int(length))

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

    def _give_back(self, connection: _Connection) -> None:
        if connection.is_reusable:
            self._idle.append(connection)
        else:
            connection.close()

    async def post(self, path: str, body: bytes, headers: bytes) -> tuple[int, bytes, bytes]:
        """(status, header block, body) of a ``Content-Length`` answer."""
        connection = await self._take()
        try:
            connection.send(path, body, headers)
            status, head = await connection.head()
            answer = await connection.sized_body(head)
        except BaseException:
            connection.close()
            raise
        self._give_back(connection)
        return status, head, answer

    async def post_stream(
        self, path: str, body: bytes, headers: bytes, is_first: Callable[[bytes], bool]
    ) -> float | None:
        """Send, read the chunked answer to its end; the ``perf_counter`` time the first chunk
        for which ``is_first`` holds arrived (None if none did). ``HttpError`` unless 200."""
        connection = await self._take()
        first: float | None = None

        def on_chunk(chunk: bytes) -> None:
            nonlocal first
            if first is None and is_first(chunk):
                first = time.perf_counter()

        try:
            connection.send(path, body, headers)
            status, head = await connection.head()
            if status != 200:
                answer = await connection.sized_body(head)
                self._give_back(connection)
                raise HttpError(status, answer)
            await connection.chunks(on_chunk)
        except HttpError:
            raise
        except BaseException:
            connection.close()
            raise
        self._give_back(connection)
        return first

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
