"""A streaming answer that notices its client leave: what the OpenAI routes stream server-sent
events with (``gateway.openai_routes``). Starlette's ``StreamingResponse`` sees a disconnect only
when it next writes; a request waiting for its next token (or back in the queue after its
worker failed) writes nothing for a while, and its workers would go on computing for nobody.
Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.openai_responses import SSE_KEEPALIVE

__all__ = ["DisconnectAwareStream"]


class DisconnectAwareStream(StreamingResponse):
    """A streaming response that stops (cancelling its body, which aborts the request on the
    workers) as soon as the client disconnects, even while no token is being written; then, in
    every case, closes its body and calls ``on_close``. While nothing has been written for
    ``keepalive_s`` (the request waits in the queue again after its worker failed, say), an SSE
    comment line goes out, so proxies and clients with idle timeouts keep the stream open;
    clients ignore comments."""

    def __init__(
        self,
        content: AsyncGenerator[bytes],
        *,
        media_type: str,
        headers: dict[str, str],
        on_close: Callable[[], Awaitable[None]],
        keepalive_s: float,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._content = content
        self._on_close = on_close
        self._keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lock = anyio.Lock()
        started = anyio.Event()
        last_sent = [time.monotonic()]
        is_done = [False]

        async def send_one(message: Message) -> None:
            # One writer at a time: the body and the keep-alive comments share the stream.
            async with lock:
                if is_done[0]:
                    return
                await send(message)
                last_sent[0] = time.monotonic()
                if message["type"] == "http.response.start":
                    started.set()
                elif not message.get("more_body", False):
                    is_done[0] = True

        async def keep_alive() -> None:
            await started.wait()
            while True:
                await anyio.sleep(last_sent[0] + self._keepalive_s - time.monotonic())
                if time.monotonic() - last_sent[0] >= self._keepalive_s:
                    keepalive = {"type": "http.response.body", "body": SSE_KEEPALIVE}
                    await send_one({**keepalive, "more_body": True})

        try:
            async with anyio.create_task_group() as task_group:

                async def stream_then_stop() -> None:
                    await self.stream_response(send_one)
                    task_group.cancel_scope.cancel()

                async def listen_then_stop() -> None:
                    await self.listen_for_disconnect(receive)
                    task_group.cancel_scope.cancel()

                task_group.start_soon(stream_then_stop)
                task_group.start_soon(keep_alive)
                await listen_then_stop()
        finally:
            with anyio.CancelScope(shield=True):
                await self._content.aclose()
                await self._on_close()
