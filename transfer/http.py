"""The control plane's HTTP conventions, server side: msgpack bodies in and out, errors as
``ErrorBody`` with their status, frame streams, and noticing a caller that went away. Torch-free;
the workers use it now, the gateway's internal routes may later."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import uvicorn
import uvloop
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from transfer.errors import FairgateError, InvalidWorkerRequest
from transfer.messages import (
    MSGPACK_CONTENT_TYPE,
    STREAM_CONTENT_TYPE,
    ErrorFrame,
    Frame,
    decode_message,
    encode_frame,
    encode_message,
)

__all__ = [
    "SERVER_SHUTDOWN_S",
    "CallerDisconnected",
    "FrameStreamResponse",
    "caller_disconnected_response",
    "error_response",
    "http_server",
    "message_response",
    "read_message",
    "serve_on",
    "until_disconnected",
]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20


async def read_message(request: Request, message_type: type[_T]) -> _T:
    """The request's msgpack body as ``message_type``; ``InvalidWorkerRequest`` if it is not."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise InvalidWorkerRequest(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return decode_message(body, message_type)
    except msgspec.MsgspecError as exc:
        raise InvalidWorkerRequest(f"not a valid {message_type.__name__}: {exc}") from exc


def message_response(message: msgspec.Struct, status_code: int = 200) -> Response:
    return Response(encode_message(message), status_code, media_type=MSGPACK_CONTENT_TYPE)


def error_response(error: FairgateError) -> Response:
    return message_response(error.to_body(), error.status)


class FrameStreamResponse(Response):
    """Frames as a chunked body; an error raised after the stream began becomes its last frame.
    A caller that disconnects stops the stream, and the frames' generator is closed in every
    case (its clean-up aborts the request).

    Not Starlette's ``StreamingResponse``: that one spends an anyio task group, its cancel scopes
    and a second task on every response, a large share of a decode worker's CPU per request.
    Here one plain task watches for the disconnect and cancels the streaming task."""

    media_type = STREAM_CONTENT_TYPE

    def __init__(self, frames: AsyncGenerator[Frame]) -> None:
        self.frames = frames
        self.status_code = 200
        self.background = None
        self.init_headers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        caller_left = False

        async def watch() -> None:
            nonlocal caller_left
            await _until_disconnect(receive)
            caller_left = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            # Ours (the caller left): the response just ends. Anyone else's: it goes on up.
            if not caller_left or task.uncancel() > 0:
                raise
        finally:
            watcher.cancel()
            await self.frames.aclose()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for frame in self.frames:
                await send(
                    {"type": "http.response.body", "body": encode_frame(frame), "more_body": True}
                )
        except FairgateError as exc:
            await send(
                {
                    "type": "http.response.body",
                    "body": encode_frame(ErrorFrame(exc.to_body())),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive) -> None:
    """Return when the caller disconnects (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class CallerDisconnected(Exception):
    """The caller went away before its answer was ready (``until_disconnected``). Not an error
    of the server's: the route's answer goes nowhere (``caller_disconnected_response``), and it
    is logged as the route chooses, never as an exception in the application."""


def caller_disconnected_response(request: Request, exc: Exception) -> Response:
    """The exception handler for ``CallerDisconnected``: an empty answer (nginx's 499, "client
    closed request"), which the server drops since nobody is there to read it."""
    return Response(status_code=499)


async def until_disconnected(
    request: Request, work: Awaitable[_T], on_disconnect: Callable[[], Any] | None = None
) -> _T:
    """Await ``work``; if the caller disconnects first, cancel it and wait for its clean-up, call
    ``on_disconnect`` and raise ``CallerDisconnected``. If this wait itself is cancelled, the work
    is cancelled and its clean-up awaited before the cancellation goes on. Either way the work
    has ended when this returns or raises, so whatever it was iterating is free for the caller
    (an async generator it drove can be closed). The body must have been read already."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work_task.cancel()
        await _until_done(work_task)
        raise
    finally:
        watch_task.cancel()
    if work_task in done:
        return work_task.result()
    work_task.cancel()
    await _until_done(work_task)
    if on_disconnect is not None:
        on_disconnect()
    raise CallerDisconnected("the caller disconnected")


async def _until_done(task: asyncio.Future[Any]) -> None:
    """Wait for a cancelled task to end (its outcome is moot), even if this wait is cancelled
    too: that cancellation is raised once the task has ended."""
    is_cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            is_cancelled = True
    if is_cancelled:
        raise asyncio.CancelledError


# An idle keep-alive connection is closed by its client before its server does: a server that
# closes first races the client's next request on it, which then fails. Our clients (the
# gateway's worker pool) keep idle connections ``CLIENT_KEEP_ALIVE_S`` (``transfer.client``);
# proxies in front of the gateway commonly keep them 60 s.
SERVER_KEEP_ALIVE_S = 75
# On shutdown, after the app's own drain: how long uvicorn waits for connections before it
# cancels what runs.
SERVER_SHUTDOWN_S = 5


class _DrainingServer(uvicorn.Server):
    """On shutdown, first stops taking connections and requests (idle keep-alive connections
    close, busy ones close after their answer), then awaits ``drain`` (the app finishing or
    ending what it runs), then does uvicorn's own shutdown: its wait for connections is short,
    since drained requests have answered. A second Ctrl-C (SIGINT, uvicorn's ``force_exit``)
    stops waiting."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        draining = asyncio.ensure_future(self._drain())
        while not draining.done() and not self.force_exit:
            await asyncio.wait({draining}, timeout=0.1)
        if not draining.done():
            draining.cancel()
            await asyncio.wait({draining})
        elif draining.exception() is not None:
            logger.error("draining failed", exc_info=draining.exception())
        await super().shutdown(sockets)


def http_server(
    app: ASGIApp, *, drain: Callable[[], Awaitable[None]] | None = None
) -> uvicorn.Server:
    """A uvicorn server for a worker or the gateway (httptools, no access log: the services log
    requests themselves, without their content). ``drain``: awaited on shutdown once no new
    request can arrive, before the server waits ``timeout_graceful_shutdown`` for what is left
    and then cancels it."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=SERVER_SHUTDOWN_S,
        timeout_keep_alive=SERVER_KEEP_ALIVE_S,
        http="httptools",
    )
    return uvicorn.Server(config) if drain is None else _DrainingServer(config, drain)


def serve_on(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve until the server exits, on a uvloop event loop (``server.serve`` alone would keep
    whatever loop ``asyncio.run`` makes: uvicorn picks its loop only in ``uvicorn.run``)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(server.serve(sockets=[sock]))
