"""The decode worker: reserves KV blocks, lands the prefill worker's KV in them, decodes.

``POST /v1/decode`` (``DecodeRequest`` → frame stream): blocks for the prompt and the first token
are reserved at once, or the call fails with 503 ``no_room``. The stream's first frame,
``Reserved``, names them; the caller hands them to the prefill worker. When the KV lands
(``KvDestination.landed``, on a KV pair thread) the request joins the continuous-batching decode
loop and every step's tokens go out as ``TokenFrame``s, the last with its finish reason. If the
KV does not come within ``kv_wait_timeout_s``, or its transfer fails, the blocks go back and the
stream ends with an ``ErrorFrame``.

A colocated worker (role ``colocated``) also takes ``POST /v1/generate``: prompt in, every token
out, no transfer. A caller that disconnects aborts its request; blocks a transfer is still
landing in are given back when the landing ends, never under it.

A request's state, guarded by ``_lock`` (the event loop, the engine thread and KV pair threads
all touch it)::

    waiting ──claim──▶ landing ──landed──▶ decoding ──finish──▶ (gone)
       │                  │  └───failed──▶ (gone, error frame)
       └─ timeout/abort   └─ abort: cancelled, released when the landing ends
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from engine.engine import LLMEngine
from engine.engine_thread import EngineThread
from engine.loader import LoadedEngine
from engine.sequence import SamplingParams, StepOutput
from engine.serving import WorkerService
from transfer.errors import (
    FairgateError,
    InvalidWorkerRequest,
    NoRoomError,
    RequestAborted,
    RequestTimeout,
    TransferError,
    WrongRole,
)
from transfer.http import frame_stream_response, read_message
from transfer.kv_layout import layout_of
from transfer.kv_receiver import KvReceiver, ReceiverConfig
from transfer.messages import (
    DecodeRequest,
    Frame,
    GenerateRequest,
    Reserved,
    TokenFrame,
    TransferHeader,
    WorkerInfo,
    WorkerRole,
)

__all__ = ["ColocatedService", "DecodeService"]

logger = logging.getLogger(__name__)

_State = Literal["waiting", "landing", "decoding", "done"]

MAX_FLUSH_INTERVAL_S = 1.0
_Event = StepOutput | FairgateError


@dataclass(slots=True)
class _Stream:
    """One request streaming to its caller."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: bytes
    flush_interval_s: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    block_ids: list[int] = field(default_factory=list)
    state: _State = "waiting"
    is_cancelled: bool = False  # the caller left while the KV was landing
    is_finished: bool = False
    expiry: asyncio.TimerHandle | None = None  # gives the reservation up if no KV comes

    def deliver(self, event: _Event) -> None:
        """Thread-safe: hand an event to the stream's coroutine."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class DecodeService(WorkerService):
    role: ClassVar[WorkerRole] = "decode"

    def on_loaded(self, loaded: LoadedEngine, thread: EngineThread) -> None:
        kv_cache = loaded.kv_cache
        self._thread = thread
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self.receiver = KvReceiver(
            kv_cache,
            layout_of(kv_cache, loaded.model_id),
            self,
            ReceiverConfig(
                host=self.config.kv_host,
                port=self.config.kv_port,
                timeout_s=self.config.kv_timeout_s,
            ),
        )
        self.receiver.start()

    def on_stop(self) -> None:
        if self.loaded is not None:
            self.receiver.stop()

    def ready_fields(self) -> dict[str, object]:
        fields = super().ready_fields()
        fields |= {"kv_host": self.config.kv_host, "kv_port": self.receiver.port}
        return fields

    def info(self) -> WorkerInfo:
        return msgspec.structs.replace(
            super().info(), kv_host=self.config.kv_host, kv_port=self.receiver.port
        )

    def routes(self) -> list[BaseRoute]:
        async def decode(request: Request) -> Response:
            body = await read_message(request, DecodeRequest)
            return frame_stream_response(await self.decode(body))

        async def generate(request: Request) -> Response:
            body = await read_message(request, GenerateRequest)
            return frame_stream_response(await self.generate(body))

        return [
            Route("/v1/decode", decode, methods=["POST"]),
            Route("/v1/generate", generate, methods=["POST"]),
        ]

    # ---- requests ---------------------------------------------------------------------------

    def _new_stream(
        self, request: DecodeRequest | GenerateRequest, *, seed: int | None = None
    ) -> _Stream:
        thread = self.ready_thread()
        prompt = request.prompt_token_ids
        vocab_size = thread.engine.runner.vocab_size
        if not prompt or any(not 0 <= token_id < vocab_size for token_id in prompt):
            raise InvalidWorkerRequest(f"the prompt must be token ids in [0, {vocab_size})")
        try:
            params = request.sampling.to_params(seed=seed)
        except ValueError as exc:
            raise InvalidWorkerRequest(str(exc)) from exc
        if not 0.0 <= request.flush_interval_s <= MAX_FLUSH_INTERVAL_S:
            raise InvalidWorkerRequest(f"flush_interval_s must be in [0, {MAX_FLUSH_INTERVAL_S:g}]")
        return _Stream(
            request.request_id,
            list(prompt),
            params,
            request.cache_salt,
            request.flush_interval_s,
            asyncio.get_running_loop(),
        )

    async def decode(self, request: DecodeRequest) -> AsyncGenerator[Frame]:
        """Reserve now (or raise ``NoRoomError``); the frames follow as the KV lands."""
        stream = self._new_stream(request)
        num_tokens = len(stream.prompt_token_ids) + 1  # the prompt and the first token
        try:
            block_ids = await self._thread.call(
                lambda engine: engine.reserve(request.request_id, num_tokens)
            )
        except ValueError as exc:
            raise InvalidWorkerRequest(str(exc)) from exc
        if block_ids is None:
            load = self._thread.load
            raise NoRoomError(
                f"decode worker {self.worker_id} has no room for {num_tokens} tokens: "
                f"{load.num_free_blocks} of {load.num_total_blocks} blocks free, "
                f"{load.num_running + load.num_reserved} of {self.config.max_num_seqs} "
                "batch slots taken"
            )
        stream.block_ids = block_ids
        with self._lock:
            self._streams[stream.request_id] = stream
        # The expiry does not depend on anyone reading the stream: a response that never starts
        # (its caller gone at once) must not hold blocks for good.
        stream.expiry = stream.loop.call_later(self.config.kv_wait_timeout_s, self._expire, stream)
        reserved = Reserved(self.worker_id, self.config.kv_host, self.receiver.port, block_ids)
        return self._frames(stream, first=reserved)

    def _expire(self, stream: _Stream) -> None:
        """On the event loop, ``kv_wait_timeout_s`` after the reservation: give up on KV that
        has not started landing."""
        with self._lock:
            if stream.state != "waiting":
                return
            stream.state = "done"
            self._streams.pop(stream.request_id, None)
        self._thread.submit(lambda engine: engine.cancel_reservation(stream.request_id))
        stream.deliver(
            RequestTimeout(
                f"the KV of {stream.request_id} did not arrive within "
                f"{self.config.kv_wait_timeout_s:g} s"
            )
        )

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Frame]:
        """Colocated: prefill and decode here."""
        if self.role != "colocated":
            raise WrongRole(
                f"{self.worker_id} is a decode worker: prompts go to a prefill worker first "
                "(start it with --colocated to serve whole requests)"
            )
        stream = self._new_stream(request)
        thread = self._thread

        def add(engine: LLMEngine) -> None:
            engine.add_request(
                stream.request_id, stream.prompt_token_ids, stream.params, salt=stream.cache_salt
            )
            thread.watch(stream.request_id, stream.deliver)

        try:
            await thread.call(add)
        except ValueError as exc:
            raise InvalidWorkerRequest(str(exc)) from exc
        stream.state = "decoding"
        with self._lock:
            self._streams[stream.request_id] = stream
        return self._frames(stream, first=None)

    async def _frames(self, stream: _Stream, *, first: Frame | None) -> AsyncGenerator[Frame]:
        """The stream's frames. Steps that queued up while the loop was busy go out as one
        frame, and so do those of the ``flush_interval_s`` after a frame's first step: fewer
        writes and frames on both ends."""
        try:
            if first is not None:
                yield first
            events = stream.events
            loop = stream.loop
            while True:
                event = await self._next_event(stream)
                if isinstance(event, FairgateError):
                    raise event
                token_ids = list(event.new_token_ids)
                error: FairgateError | None = None
                flush_at = loop.time() + stream.flush_interval_s
                while event.finish_reason is None:
                    if not events.empty():
                        later = events.get_nowait()
                    elif (wait_s := flush_at - loop.time()) > 0:
                        try:
                            async with asyncio.timeout(wait_s):
                                later = await events.get()
                        except TimeoutError:
                            break
                    else:
                        break
                    if isinstance(later, FairgateError):
                        error = later  # after the tokens that came before it
                        break
                    token_ids += later.new_token_ids
                    event = later
                stream.is_finished = event.finish_reason is not None
                yield TokenFrame(
                    token_ids=token_ids,
                    finish_reason=event.finish_reason,
                    num_prompt_tokens=event.num_prompt_tokens,
                    num_cached_tokens=event.num_cached_tokens,
                    num_output_tokens=event.num_output_tokens,
                )
                if stream.is_finished:
                    return
                if error is not None:
                    raise error
        finally:
            self._close(stream)

    async def _next_event(self, stream: _Stream) -> _Event:
        """The next event; a stream still waiting for its KV hears of its expiry from
        ``_expire``, so its own timeout only guards against a stalled engine."""
        timeout_s = self.config.request_timeout_s
        if stream.state == "waiting":
            timeout_s += self.config.kv_wait_timeout_s
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: a task per token
                return await stream.events.get()
        except TimeoutError:
            raise RequestTimeout(
                f"{stream.request_id} made no progress in {timeout_s:g} s"
            ) from None

    def _close(self, stream: _Stream) -> None:
        """The stream ended (finished, failed, or its caller left): free what is left."""
        request_id = stream.request_id
        if stream.expiry is not None:
            stream.expiry.cancel()
        with self._lock:
            if stream.state == "landing":
                stream.is_cancelled = True  # landed/failed release the blocks
                return
            self._streams.pop(request_id, None)
            state, stream.state = stream.state, "done"
        if stream.is_finished:
            return
        thread = self._thread

        def abort(engine: LLMEngine) -> None:
            thread.unwatch(request_id)
            engine.abort(request_id)

        if state != "done" or stream.block_ids:
            thread.submit(abort)

    async def abort(self, request_id: str) -> bool:
        self.ready_thread()
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return False
        stream.deliver(RequestAborted(f"request {request_id} was aborted"))
        return True

    # ---- KvDestination (called on KV pair threads) ------------------------------------------

    def claim(self, header: TransferHeader) -> None:
        with self._lock:
            stream = self._streams.get(header.request_id)
            if stream is None or stream.state != "waiting":
                raise TransferError(
                    f"no reservation waits for the KV of {header.request_id} on "
                    f"{self.worker_id} (aborted, timed out, or never made)"
                )
            num_blocks = len(header.dst_block_ids)
            if (
                header.num_tokens != len(stream.prompt_token_ids)
                or header.dst_block_ids != stream.block_ids[:num_blocks]
            ):
                raise TransferError(
                    f"the KV of {header.request_id} ({header.num_tokens} tokens in blocks "
                    f"{header.dst_block_ids[:8]}...) does not match its reservation"
                )
            stream.state = "landing"

    def landed(self, header: TransferHeader) -> None:
        stream = self._end_landing(header.request_id, "decoding")
        if stream is None:
            return
        params = dataclasses.replace(stream.params, seed=header.seed)
        thread = self._thread

        def admit(engine: LLMEngine) -> None:
            try:
                engine.add_prefilled(
                    stream.request_id,
                    stream.prompt_token_ids,
                    header.first_token_id,
                    params,
                    salt=stream.cache_salt,
                    num_cached_tokens=header.num_cached_tokens,
                )
            except ValueError as exc:
                engine.cancel_reservation(stream.request_id)
                stream.deliver(TransferError(f"bad KV hand-off: {exc}"))
                return
            thread.watch(stream.request_id, stream.deliver)

        thread.submit(admit)

    def failed(self, header: TransferHeader, error: TransferError) -> None:
        stream = self._end_landing(header.request_id, "done")
        if stream is not None:
            stream.deliver(error)

    def _end_landing(self, request_id: str, next_state: _State) -> _Stream | None:
        """Leave ``landing``; if the caller left meanwhile, give the blocks back and return
        None."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                return None
            if stream.is_cancelled:
                del self._streams[request_id]
                stream.state = "done"
            else:
                stream.state = next_state
                return stream
        self._thread.submit(lambda engine: engine.cancel_reservation(request_id))
        return None


class ColocatedService(DecodeService):
    """Prefill and decode in one engine: takes whole requests on ``/v1/generate`` (and KV from a
    prefill worker on ``/v1/decode``, like any decode worker)."""

    role: ClassVar[WorkerRole] = "colocated"
