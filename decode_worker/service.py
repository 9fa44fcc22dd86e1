"""The decode worker: reserves KV blocks, lands the prefill worker's KV in them, decodes.

``POST /v1/decode`` (``DecodeRequest`` → frame stream): blocks for the prompt and the first token
are reserved at once, or the call fails with 503 ``no_room``. The stream's first frame,
``Reserved``, names them; the caller hands them to the prefill worker (which by then is computing
the prompt: the caller sends both calls at once). When the KV lands (``KvDestination.landed``, on
a KV pair thread) the request joins the continuous-batching decode loop and every step's tokens
go out as ``TokenFrame``s, the last with its finish reason. If the KV does not come within
``kv_wait_timeout_s``, or its transfer fails, the blocks go back and the stream ends with an
``ErrorFrame``; a caller that knows the prefill died closes the stream, which frees them at once.
Failpoint ``decode.reserved``: after the reservation, before ``Reserved`` goes out (on the event
loop: ``pause`` wedges the worker).

A colocated worker (role ``colocated``) also takes ``POST /v1/generate``: prompt in, every token
out, no transfer. A caller that disconnects aborts its request; blocks a transfer is still
landing in are given back when the landing ends, never under it.

Preemption (``--preemption``). When blocks run short, or ``POST /v1/make_room`` asks for room for
a more important request, the least important request gives its blocks up. By ``swap`` its KV
goes to host memory and its stream just pauses until it is swapped back in. By ``recompute`` its
stream sends the tokens it has and ends with ``Preempted``: the caller resumes it elsewhere (a
re-prefill of prompt and output so far). ``make_room`` also preempts reservations whose KV has not
landed: a waiting one at once; a landing one is marked, and its blocks go back, and its stream
ends with ``Preempted``, when the landing ends (landed or failed), exactly once.

A request's state, guarded by ``_lock`` (the event loop, the engine thread and KV pair threads
all touch it)::

    waiting ──claim──▶ landing ──landed──▶ decoding ──finish──▶ (gone)
       │                  │  └───failed──▶ (gone, error frame)
       │                  ├─ abort: cancelled, released when the landing ends
       │                  └─ make_room: preempted, released (Preempted frame) when it ends
       └─ timeout/abort/make_room (gone at once)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, TypeVar

import msgspec
from opentelemetry.util.types import AttributeValue
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from engine.engine import LLMEngine
from engine.engine_thread import EngineThread
from engine.loader import LoadedEngine
from engine.sequence import DEFAULT_PRIORITY, Priority, SamplingParams, StepOutput
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
from transfer.failpoints import failpoint
from transfer.http import FrameStreamResponse, message_response, read_message
from transfer.kv_layout import layout_of
from transfer.kv_receiver import KvReceiver, ReceiverConfig
from transfer.messages import (
    DecodeRequest,
    Frame,
    GenerateRequest,
    MakeRoomRequest,
    MakeRoomResult,
    Preempted,
    Reserved,
    TokenFrame,
    TransferHeader,
    WorkerInfo,
    WorkerRole,
)
from transfer.telemetry import TRACEPARENT_HEADER, is_tracing, start_span

__all__ = ["ColocatedService", "DecodeService"]

logger = logging.getLogger(__name__)

_State = Literal["waiting", "landing", "decoding", "done"]

MAX_FLUSH_INTERVAL_S = 1.0
_Event = StepOutput | FairgateError
_T = TypeVar("_T")


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
    priority: Priority = DEFAULT_PRIORITY
    num_prior_output_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    state: _State = "waiting"
    is_cancelled: bool = False  # the caller left while the KV was landing
    is_preempted: bool = False  # make_room took it while the KV was landing
    is_finished: bool = False  # its last frame (finish reason or Preempted) is out
    expiry: asyncio.TimerHandle | None = None  # gives the reservation up if no KV comes
    trace: _Trace | None = None  # while tracing is on: its span is made when it ends

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
        self.kv_layout = layout_of(kv_cache, loaded.model_id)  # also announced by info()
        self.receiver = KvReceiver(
            kv_cache,
            self.kv_layout,
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
            trace = _Trace.of("decode", body, request, self.model_id)
            return FrameStreamResponse(await _ending_on_error(trace, self.decode(body, trace)))

        async def generate(request: Request) -> Response:
            body = await read_message(request, GenerateRequest)
            trace = _Trace.of("generate", body, request, self.model_id)
            return FrameStreamResponse(await _ending_on_error(trace, self.generate(body, trace)))

        async def make_room(request: Request) -> Response:
            body = await read_message(request, MakeRoomRequest)
            return message_response(await self.make_room(body))

        return [
            Route("/v1/decode", decode, methods=["POST"]),
            Route("/v1/generate", generate, methods=["POST"]),
            Route("/v1/make_room", make_room, methods=["POST"]),
        ]

    # ---- requests ---------------------------------------------------------------------------

    def _new_stream(
        self,
        request: DecodeRequest | GenerateRequest,
        *,
        seed: int | None = None,
        trace: _Trace | None = None,
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
        num_prior = request.num_prior_output_tokens
        if not 0 <= num_prior < len(prompt) or num_prior >= params.max_tokens:
            raise InvalidWorkerRequest(
                f"num_prior_output_tokens must be in [0, {len(prompt)}) (the prompt's length) "
                f"and below max_tokens ({params.max_tokens}), got {num_prior}"
            )
        return _Stream(
            request.request_id,
            list(prompt),
            params,
            request.cache_salt,
            request.flush_interval_s,
            asyncio.get_running_loop(),
            priority=request.priority.to_priority(),
            num_prior_output_tokens=num_prior,
            trace=trace,
        )

    async def decode(
        self, request: DecodeRequest, trace: _Trace | None = None
    ) -> AsyncGenerator[Frame]:
        """Reserve now (or raise ``NoRoomError``); the frames follow as the KV lands.
        ``trace``: the request is traced (its span is made when the stream ends)."""
        stream = self._new_stream(request, trace=trace)
        num_tokens = len(stream.prompt_token_ids) + 1  # the prompt and the first token
        try:
            block_ids = await self._thread.call(
                lambda engine: engine.reserve(
                    request.request_id, num_tokens, priority=stream.priority
                )
            )
        except ValueError as exc:
            raise InvalidWorkerRequest(str(exc)) from exc
        if block_ids is None:
            load = self._thread.load
            raise NoRoomError(
                f"decode worker {self.worker_id} has no room for {num_tokens} tokens: "
                f"{load.num_free_blocks} of {load.num_total_blocks} blocks free, "
                f"{load.num_running + load.num_reserved} of {self.config.max_num_seqs} "
                f"batch slots taken, {load.num_swapped} swapped-out requests waiting"
            )
        try:
            failpoint("decode.reserved")
        except TransferError:
            self._thread.submit(lambda engine: engine.cancel_reservation(request.request_id))
            raise
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
            self._forget(stream)
        self._thread.submit(lambda engine: engine.cancel_reservation(stream.request_id))
        stream.deliver(
            RequestTimeout(
                f"the KV of {stream.request_id} did not arrive within "
                f"{self.config.kv_wait_timeout_s:g} s"
            )
        )

    async def generate(
        self, request: GenerateRequest, trace: _Trace | None = None
    ) -> AsyncGenerator[Frame]:
        """Colocated: prefill and decode here."""
        if self.role != "colocated":
            raise WrongRole(
                f"{self.worker_id} is a decode worker: prompts go to a prefill worker first "
                "(start it with --colocated to serve whole requests)"
            )
        stream = self._new_stream(request, trace=trace)
        thread = self._thread

        def add(engine: LLMEngine) -> None:
            engine.add_request(
                stream.request_id,
                stream.prompt_token_ids,
                stream.params,
                salt=stream.cache_salt,
                priority=stream.priority,
                num_prior_output_tokens=stream.num_prior_output_tokens,
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
        writes and frames on both ends. A hand-back goes out after the tokens before it."""
        last: StepOutput | None = None
        error_out: BaseException | None = None
        try:
            if first is not None:
                yield first
            events = stream.events
            loop = stream.loop
            while True:
                event = await self._next_event(stream)
                if isinstance(event, FairgateError):
                    raise event
                last = event
                if event.is_preempted:
                    stream.is_finished = True
                    yield Preempted(event.num_output_tokens, event.seed)
                    return
                token_ids = list(event.new_token_ids)
                error: FairgateError | None = None
                preempted: StepOutput | None = None
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
                    if later.is_preempted:
                        preempted = later
                        break
                    token_ids += later.new_token_ids
                    event = last = later
                stream.is_finished = event.finish_reason is not None or preempted is not None
                yield TokenFrame(
                    token_ids=token_ids,
                    finish_reason=event.finish_reason,
                    num_prompt_tokens=event.num_prompt_tokens,
                    num_cached_tokens=event.num_cached_tokens,
                    num_output_tokens=event.num_output_tokens,
                )
                if preempted is not None:
                    last = preempted
                    yield Preempted(preempted.num_output_tokens, preempted.seed)
                    return
                if stream.is_finished:
                    return
                if error is not None:
                    raise error
        except BaseException as exc:
            error_out = exc
            raise
        finally:
            self._close(stream)
            if stream.trace is not None:
                stream.trace.end(last, error_out)

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
            self._forget(stream)
            state, stream.state = stream.state, "done"
        if stream.is_finished:
            return
        thread = self._thread

        def abort(engine: LLMEngine) -> None:
            thread.unwatch(request_id)
            engine.abort(request_id)

        if state != "done" or stream.block_ids:
            thread.submit(abort)

    def _forget(self, stream: _Stream) -> None:
        """Under ``_lock``: drop the stream from the table, unless a newer request with the same
        id (a resumption after a hand-back) has taken its place."""
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    # ---- preemption -------------------------------------------------------------------------

    async def make_room(self, request: MakeRoomRequest) -> MakeRoomResult:
        """Preempt less important requests until ``num_tokens`` slots are free (see
        ``LLMEngine.make_room``); reservations are preempted by ``_preempt_reservation``."""
        thread = self.ready_thread()
        if request.num_tokens < 0:
            raise InvalidWorkerRequest(f"num_tokens must be >= 0, got {request.num_tokens}")
        priority = request.priority.to_priority()

        def make_room(engine: LLMEngine) -> MakeRoomResult:
            num_free_tokens, num_preempted = engine.make_room(
                request.num_tokens, priority, preempt_reservation=self._preempt_reservation
            )
            return MakeRoomResult(num_free_tokens, num_preempted)

        return await thread.call(make_room)

    def _preempt_reservation(self, request_id: str) -> bool:
        """On the engine thread: preempt a reservation whose KV has not landed. A waiting one
        gives its blocks back now; a landing one when the landing ends (``_end_landing``). False
        for one about to decode (landed, not yet admitted) or already gone."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or stream.state not in ("waiting", "landing"):
                return False
            if stream.state == "landing":
                if stream.is_preempted or stream.is_cancelled:
                    return False  # its blocks are already on their way back
                stream.is_preempted = True
                return True
            stream.state = "done"
            self._forget(stream)
        if stream.expiry is not None:
            stream.loop.call_soon_threadsafe(stream.expiry.cancel)
        self._thread.engine.cancel_reservation(request_id)
        stream.block_ids = []
        stream.deliver(self._hand_back_event(stream, None))
        return True

    def _hand_back_event(self, stream: _Stream, header: TransferHeader | None) -> StepOutput:
        """The ``Preempted`` of a request preempted before it decoded here: its first token
        (and the seed the prefill worker chose) known only if its KV landed (``header``)."""
        num_output_tokens = stream.num_prior_output_tokens
        seed = stream.params.seed if stream.params.seed is not None else 0
        if header is not None:
            num_output_tokens += 1
            seed = header.seed
        return StepOutput(
            request_id=stream.request_id,
            new_token_ids=[],
            finish_reason=None,
            num_prompt_tokens=len(stream.prompt_token_ids) - stream.num_prior_output_tokens,
            num_cached_tokens=0,
            num_output_tokens=num_output_tokens,
            is_preempted=True,
            seed=seed,
        )

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
        self.metrics.transfer_landed(is_ok=True)
        stream = self._end_landing(header, "decoding", is_landed=True)
        if stream is None:
            return
        if stream.trace is not None:
            stream.trace.landed_ns = time.time_ns()
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
                    num_prior_output_tokens=stream.num_prior_output_tokens,
                )
            except ValueError as exc:
                engine.cancel_reservation(stream.request_id)
                stream.deliver(TransferError(f"bad KV hand-off: {exc}"))
                return
            thread.watch(stream.request_id, stream.deliver)

        thread.submit(admit)

    def failed(self, header: TransferHeader, error: TransferError) -> None:
        self.metrics.transfer_landed(is_ok=False)
        stream = self._end_landing(header, "done", is_landed=False)
        if stream is not None:
            stream.deliver(error)

    def _end_landing(
        self, header: TransferHeader, next_state: _State, *, is_landed: bool
    ) -> _Stream | None:
        """Leave ``landing``; if the caller left or ``make_room`` preempted the request
        meanwhile, give the blocks back (the one place that does for a landing request), hand a
        preempted one back, and return None."""
        request_id = header.request_id
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                return None
            if not (stream.is_cancelled or stream.is_preempted):
                stream.state = next_state
                return stream
            self._forget(stream)
            stream.state = "done"
        self._thread.submit(lambda engine: engine.cancel_reservation(request_id))
        if stream.is_preempted and not stream.is_cancelled:
            stream.block_ids = []
            stream.deliver(self._hand_back_event(stream, header if is_landed else None))
        return None


class ColocatedService(DecodeService):
    """Prefill and decode in one engine: takes whole requests on ``/v1/generate`` (and KV from a
    prefill worker on ``/v1/decode``, like any decode worker)."""

    role: ClassVar[WorkerRole] = "colocated"


# ---- traces -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Trace:
    """A traced request's ``decode`` (or ``generate``) span, made in one call when its stream
    ends: the SDK's cost is per call and attribute."""

    name: str
    traceparent: str | None
    attributes: dict[str, AttributeValue]
    started_ns: int
    landed_ns: int | None = None  # when its KV landed (an event)

    @classmethod
    def of(
        cls, name: str, body: DecodeRequest | GenerateRequest, request: Request, model_id: str
    ) -> _Trace | None:
        if not is_tracing():
            return None
        attributes: dict[str, AttributeValue] = {
            "fairgate.request_id": body.request_id,
            "gen_ai.request.model": model_id,
            "fairgate.prompt_tokens": len(body.prompt_token_ids),
            "fairgate.resumed_output_tokens": body.num_prior_output_tokens,
        }
        return cls(name, request.headers.get(TRACEPARENT_HEADER), attributes, time.time_ns())

    def end(self, last: StepOutput | None, error: BaseException | None) -> None:
        attributes = self.attributes
        if last is not None:
            attributes["fairgate.output_tokens"] = last.num_output_tokens
            attributes["fairgate.swap_outs"] = last.num_swap_outs
            attributes["fairgate.handed_back"] = last.is_preempted
            if last.finish_reason is not None:
                attributes["gen_ai.response.finish_reasons"] = (last.finish_reason,)
        if isinstance(error, GeneratorExit | asyncio.CancelledError):
            attributes["fairgate.outcome"] = "caller_left"  # it aborted the request
            error = None
        span = start_span(
            self.name, attributes, traceparent=self.traceparent, start_time_ns=self.started_ns
        )
        if span is None:
            return
        if self.landed_ns is not None:
            span.add_event("kv_landed", self.landed_ns)
        span.end(error)


async def _ending_on_error(trace: _Trace | None, opening: Awaitable[_T]) -> _T:
    """``opening`` (the reservation or the admission); a traced request that fails there gets
    its span now (otherwise its stream's end makes it)."""
    try:
        return await opening
    except BaseException as exc:
        if trace is not None:
            trace.end(None, exc)
        raise
