"""The caller's side of the worker control plane, and one request driven through a prefill and a
decode worker. Torch-free: the gateway uses it.

The transport is aiohttp: the gateway makes two worker calls per request and reads a frame per
generated token, and measured on 2 cores httpx spent ~10 ms of CPU per such request where
aiohttp's C parser spends a fraction (``fairgate bench gateway``). Every client of one process
can share one connection pool (``Connections``), created on first use inside the event loop.

Errors arrive as ``FairgateError``s: a worker's ``ErrorBody`` (status ≠ 2xx, or an
``ErrorFrame`` ending a stream) becomes its class again (``error_from_body``); a worker that does
not answer, or whose stream breaks off before the request finished, is ``WorkerUnreachable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Self, TypeVar

import aiohttp
import msgspec

from transfer.errors import (
    EngineFailed,
    ErrorBody,
    FairgateError,
    WorkerUnreachable,
    error_from_body,
)
from transfer.messages import (
    MSGPACK_CONTENT_TYPE,
    AbortRequest,
    AbortResult,
    DecodeRequest,
    ErrorFrame,
    FrameDecoder,
    GenerateRequest,
    KvTarget,
    MakeRoomRequest,
    MakeRoomResult,
    Preempted,
    PrefillRequest,
    PrefillResult,
    PrefillTarget,
    PrefillTargetResult,
    Priority,
    Reserved,
    SamplingSpec,
    TokenFrame,
    TokenizerSpec,
    WorkerInfo,
    WorkerLoad,
    decode_message,
    encode_message,
)
from transfer.telemetry import TRACEPARENT_HEADER

__all__ = [
    "Connections",
    "DecodeClient",
    "FrameStream",
    "PrefillClient",
    "WorkerClient",
    "run_disaggregated",
]

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # the longest a worker may stay silent mid-answer (a long prefill)
# Idle connections are dropped here before the workers drop them (``SERVER_KEEP_ALIVE_S`` in
# ``transfer.http``), so a request never goes out on a connection its server is closing.
CLIENT_KEEP_ALIVE_S = 30.0
_HEADERS = {"content-type": MSGPACK_CONTENT_TYPE}
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, asyncio.TimeoutError)
_DEFAULT_PRIORITY = Priority()
# Clean-up calls after a hand-off went wrong (dropping or aborting a held KV): short, since the
# prefill worker's own timeout frees the KV anyway if they fail.
CLEANUP_TIMEOUT_S = 5.0


class Connections:
    """A pool of keep-alive connections to any number of workers, shared by the clients given
    it. Created lazily: an ``aiohttp.ClientSession`` belongs to the event loop it is made in."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._is_closed = False

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._is_closed:
            # A call after ``aclose`` (a clean-up task outliving its client) would open a
            # session no one closes.
            raise WorkerUnreachable("the connections to the workers are closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, enable_cleanup_closed=True, keepalive_timeout=CLIENT_KEEP_ALIVE_S
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
                ),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def aclose(self) -> None:
        self._is_closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


def _headers(traceparent: str | None) -> dict[str, str]:
    if traceparent is None:
        return _HEADERS
    return {**_HEADERS, TRACEPARENT_HEADER: traceparent}


def _error_of(worker_url: str, url: str, status: int, body: bytes) -> FairgateError:
    try:
        return _worker_error(worker_url, url, decode_message(body, ErrorBody))
    except msgspec.MsgspecError:
        text = body[:200].decode("utf-8", "replace")
        return WorkerUnreachable(f"{url}: HTTP {status}: {text}", worker_url=worker_url)


def _worker_error(worker_url: str, url: str, body: ErrorBody) -> FairgateError:
    """The error a worker answered with, carrying the worker's identity (``worker_url``). One
    that says the worker itself cannot go on (``EngineFailed``) names it in its text too, as
    ``WorkerUnreachable`` does, for the logs."""
    error = error_from_body(body)
    if isinstance(error, EngineFailed):
        error = EngineFailed(f"{url}: {error.message}")
    error.worker_url = worker_url
    return error


class WorkerClient:
    """Calls to any worker. Owns its connections unless ``connections`` are passed in."""

    def __init__(self, base_url: str, *, connections: Connections | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._connections = connections or Connections()
        self._owns_connections = connections is None

    async def aclose(self) -> None:
        if self._owns_connections:
            await self._connections.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def info(self) -> WorkerInfo:
        return await self._call("GET", "/v1/info", None, WorkerInfo)

    async def tokenizer(self, *, timeout_s: float | None = None) -> TokenizerSpec:
        """What the worker's tokenizer is built from (``Tokenizer.from_spec`` rebuilds it); its
        digest is ``info().tokenizer_digest``. About 1.5 MB for SmolLM2: fetch it once per
        digest."""
        return await self._call("GET", "/v1/tokenizer", None, TokenizerSpec, timeout_s=timeout_s)

    async def load(
        self, *, timeout_s: float | None = None, evictions_since: int | None = None
    ) -> WorkerLoad:
        """The worker's load; with ``evictions_since``, its prefix-cache evictions from that
        number on (``WorkerLoad.eviction_seq`` is the number to ask from next time)."""
        path = (
            "/v1/load" if evictions_since is None else f"/v1/load?evictions_since={evictions_since}"
        )
        return await self._call("GET", path, None, WorkerLoad, timeout_s=timeout_s)

    async def abort(self, request_id: str) -> bool:
        result = await self._call("POST", "/v1/abort", AbortRequest(request_id), AbortResult)
        return result.aborted

    async def _call(
        self,
        method: str,
        path: str,
        message: msgspec.Struct | None,
        result_type: type[_T],
        *,
        timeout_s: float | None = None,
        traceparent: str | None = None,
    ) -> _T:
        url = self.base_url + path
        data = None if message is None else encode_message(message)
        timeout = None if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._connections.session.request(
                method, url, data=data, headers=_headers(traceparent), timeout=timeout
            ) as response:
                body = await response.read()
                status = response.status
        except _TRANSPORT_ERRORS as exc:
            raise WorkerUnreachable(f"{url}: {exc!r}", worker_url=self.base_url) from exc
        if not 200 <= status < 300:
            raise _error_of(self.base_url, url, status, body)
        try:
            return decode_message(body, result_type)
        except msgspec.MsgspecError as exc:
            raise WorkerUnreachable(
                f"{url}: unreadable answer: {exc}", worker_url=self.base_url
            ) from exc

    @contextlib.asynccontextmanager
    async def _stream(
        self, path: str, message: msgspec.Struct, traceparent: str | None = None
    ) -> AsyncIterator[FrameStream]:
        url = self.base_url + path
        try:
            response = await self._connections.session.post(
                url, data=encode_message(message), headers=_headers(traceparent)
            )
        except _TRANSPORT_ERRORS as exc:
            raise WorkerUnreachable(f"{url}: {exc!r}", worker_url=self.base_url) from exc
        try:
            if not 200 <= response.status < 300:
                try:
                    body = await response.read()
                except _TRANSPORT_ERRORS as exc:
                    raise WorkerUnreachable(f"{url}: {exc!r}", worker_url=self.base_url) from exc
                raise _error_of(self.base_url, url, response.status, body)
            stream = FrameStream(self.base_url, url, response)
            yield stream
            if stream.is_finished:  # read the body's end, so the connection can be reused
                with contextlib.suppress(*_TRANSPORT_ERRORS):
                    await response.read()
        finally:
            # An unfinished stream's connection is closed, never reused: that is what tells the
            # worker to abort the request.
            if response.content.is_eof():
                response.release()
            else:
                response.close()


class FrameStream:
    """The frames of one streamed request. Iterating yields ``Reserved``, ``TokenFrame``s and,
    for a request the worker preempted by recompute, a last ``Preempted``; raises the error an
    ``ErrorFrame`` carries, and raises ``WorkerUnreachable`` when the stream ends before a frame
    with a finish reason or ``Preempted``. Leaving the ``async with`` closes the connection,
    which aborts the request on the worker."""

    def __init__(self, worker_url: str, url: str, response: aiohttp.ClientResponse) -> None:
        self.worker_url = worker_url
        self.url = url
        self.is_finished = False  # a frame with a finish reason, or Preempted, arrived
        self._response = response
        self._frames = self._iterate()

    def __aiter__(self) -> AsyncIterator[Reserved | TokenFrame | Preempted]:
        return self._frames

    def close(self) -> None:
        """Break the stream off (the request is aborted on the worker): its iteration raises
        ``WorkerUnreachable`` from now on."""
        self._response.close()

    async def next(self) -> Reserved | TokenFrame | Preempted:
        try:
            return await anext(self._frames)
        except StopAsyncIteration:
            raise WorkerUnreachable(
                f"{self.url}: the stream ended early", worker_url=self.worker_url
            ) from None

    async def _iterate(self) -> AsyncIterator[Reserved | TokenFrame | Preempted]:
        decoder = FrameDecoder()
        try:
            async for chunk in self._response.content.iter_any():
                for frame in decoder.feed(chunk):
                    if isinstance(frame, ErrorFrame):
                        raise _worker_error(self.worker_url, self.url, frame.error)
                    if isinstance(frame, Preempted) or (
                        isinstance(frame, TokenFrame) and frame.finish_reason is not None
                    ):
                        self.is_finished = True
                        yield frame
                        return
                    yield frame
        except (*_TRANSPORT_ERRORS, msgspec.MsgspecError, ValueError) as exc:
            raise WorkerUnreachable(
                f"{self.url}: the stream broke: {exc!r}", worker_url=self.worker_url
            ) from exc
        raise WorkerUnreachable(
            f"{self.url}: the stream ended before the request finished",
            worker_url=self.worker_url,
        )


class PrefillClient(WorkerClient):
    async def prefill(
        self, request: PrefillRequest, *, traceparent: str | None = None
    ) -> PrefillResult:
        """``traceparent``: the W3C trace context the worker's spans join (tracing on)."""
        return await self._call(
            "POST", "/v1/prefill", request, PrefillResult, traceparent=traceparent
        )

    async def send_target(
        self,
        target: PrefillTarget,
        *,
        timeout_s: float | None = None,
        traceparent: str | None = None,
    ) -> PrefillTargetResult:
        """Where the KV of a request sent with ``target_follows`` goes (or None: drop it);
        answered when its hand-off has ended (``PrefillTarget``)."""
        return await self._call(
            "POST",
            "/v1/prefill/target",
            target,
            PrefillTargetResult,
            timeout_s=timeout_s,
            traceparent=traceparent,
        )


class DecodeClient(WorkerClient):
    def decode(
        self, request: DecodeRequest, *, traceparent: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[FrameStream]:
        """The first frame is ``Reserved``; ``NoRoomError`` is raised on entry when there is no
        room."""
        return self._stream("/v1/decode", request, traceparent)

    def generate(
        self, request: GenerateRequest, *, traceparent: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[FrameStream]:
        return self._stream("/v1/generate", request, traceparent)

    async def make_room(self, num_tokens: int, priority: Priority) -> MakeRoomResult:
        """Preempt requests less important than ``priority`` until ``num_tokens`` KV token
        slots are free or none is left (``MakeRoomRequest``); the slots free now and how many
        requests were preempted."""
        return await self._call(
            "POST", "/v1/make_room", MakeRoomRequest(num_tokens, priority), MakeRoomResult
        )


async def run_disaggregated(
    prefill: PrefillClient,
    decode: DecodeClient,
    request_id: str,
    prompt_token_ids: list[int],
    sampling: SamplingSpec,
    *,
    cache_salt: bytes = b"",
    flush_interval_s: float = 0.0,
    priority: Priority = _DEFAULT_PRIORITY,
    num_prior_output_tokens: int = 0,
    traceparent: str | None = None,
) -> AsyncGenerator[TokenFrame | Preempted]:
    """One request through a prefill and a decode worker. The prefill starts at once and the
    reservation on the decode worker runs beside it (``PrefillRequest.target_follows``): the
    first token is yielded as soon as the prefill answers, whatever the decode worker is doing.
    The reserved blocks go to the prefill worker (``PrefillTarget``) as soon as ``Reserved``
    comes, usually before the first token, so the KV ships at hand-off; then the decode
    worker's frames follow. Leaving early (or any error) closes the decode stream, which frees
    the reservation, and cancels or aborts what the prefill worker still does or holds.

    When the workers fail after the first token went out (the decode worker has no room or
    cannot be reached, its engine or the prefill worker died before the KV landed, the transfer
    failed, the decode stream broke off), the error is raised, naming the worker at fault
    (``FairgateError.worker_url``) where one is: the caller resumes the request from the tokens
    yielded so far, as after a ``Preempted``; a decode worker without room gets a ``PrefillTarget``
    without a target first, so the prefill worker drops the KV (the prompt's full blocks stay in
    its prefix cache, where the resumption finds them).

    When the decode worker preempts the request by recompute, the last thing yielded is a
    ``Preempted`` (and the generator ends): resume the request with ``prompt_token_ids`` plus
    every token yielded so far after the prompt, ``num_prior_output_tokens =
    Preempted.num_output_tokens`` and ``Preempted.seed`` as ``sampling.seed``. Its counts are
    those of the tokens yielded here (the first token included, which the decode worker may not
    have seen) and its seed is the one the prefill worker sampled with.

    A resumed request (``num_prior_output_tokens`` = k > 0) yields its frames as the original
    would have from there on: ``num_output_tokens`` counts the k earlier tokens, and
    ``num_prompt_tokens`` is the prompt without them.

    ``traceparent`` goes with every call: the workers' spans join the caller's trace."""
    hand_off = _HandOff(prefill, decode, request_id, traceparent)
    prefilling = asyncio.ensure_future(
        prefill.prefill(
            PrefillRequest(
                request_id,
                prompt_token_ids,
                sampling,
                cache_salt,
                None,
                priority,
                num_prior_output_tokens,
                target_follows=True,
            ),
            traceparent=traceparent,
        )
    )
    hand_off.start(
        DecodeRequest(
            request_id,
            prompt_token_ids,
            sampling,
            cache_salt,
            flush_interval_s,
            priority,
            num_prior_output_tokens,
        )
    )
    try:
        result = await prefilling
        hand_off.prefill_result = result
        num_output_tokens = num_prior_output_tokens + 1
        yield TokenFrame(
            token_ids=[result.first_token_id],
            finish_reason=result.finish_reason,
            num_prompt_tokens=result.num_prompt_tokens,
            num_cached_tokens=result.num_cached_tokens,
            num_output_tokens=num_output_tokens,
        )
        if result.finish_reason is not None:
            return
        try:
            stream = await hand_off.reserved()
        except FairgateError:
            await hand_off.drop()
            raise
        try:
            async for frame in stream:
                if isinstance(frame, TokenFrame):
                    hand_off.landed = True  # a failing target call no longer matters
                    num_output_tokens = frame.num_output_tokens
                    yield frame
                elif isinstance(frame, Preempted):
                    yield Preempted(num_output_tokens, result.seed)
                    return
        except WorkerUnreachable:
            failure = hand_off.failure()  # the stream was broken off for it
            if failure is None:
                raise
            raise failure from None  # the hand-off's own (the prefill worker's, the transfer's)
    finally:
        # What needs no await first: a caller cancelled inside an anyio cancel scope (the
        # gateway's SSE response when its client leaves) has every later await cancelled too,
        # and the decode worker must hear of it all the same.
        prefilling.cancel()  # aborts a prefill still computing
        hand_off.break_off()
        await asyncio.gather(prefilling, return_exceptions=True)
        await hand_off.aclose()


class _HandOff:
    """``run_disaggregated``'s decode half: the reservation, then the target sent on to the
    prefill worker, in one task beside the prefill; and the clean-up of both halves."""

    def __init__(
        self,
        prefill: PrefillClient,
        decode: DecodeClient,
        request_id: str,
        traceparent: str | None,
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self.request_id = request_id
        self.traceparent = traceparent
        self.prefill_result: PrefillResult | None = None
        self._exits = contextlib.AsyncExitStack()
        self._stream: asyncio.Future[FrameStream] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[PrefillTargetResult] | None = None
        self._is_settled = False  # the prefill worker shipped or dropped the KV
        self.landed = False  # the decode worker sent tokens: the KV is there
        self._opened: FrameStream | None = None  # the decode stream, once its call answered

    def start(self, request: DecodeRequest) -> None:
        self._task = asyncio.ensure_future(self._reserve_and_target(request))
        self._task.add_done_callback(self._on_done)

    async def _reserve_and_target(self, request: DecodeRequest) -> PrefillTargetResult:
        stream = await self._exits.enter_async_context(
            self.decode.decode(request, traceparent=self.traceparent)
        )
        self._opened = stream
        reserved = await stream.next()
        if not isinstance(reserved, Reserved):
            raise WorkerUnreachable(
                f"{stream.url}: expected a Reserved frame, got {reserved!r}",
                worker_url=stream.worker_url,
            )
        self._stream.set_result(stream)
        target = KvTarget(
            reserved.worker_id, reserved.kv_host, reserved.kv_port, reserved.block_ids
        )
        result = await self.prefill.send_target(
            PrefillTarget(self.request_id, target), traceparent=self.traceparent
        )
        self._is_settled = True
        return result

    def _on_done(self, task: asyncio.Task[PrefillTargetResult]) -> None:
        """A hand-off that failed after the reservation (the prefill worker died, its transfer
        failed) breaks the decode stream off: the caller stops waiting on KV that will not
        come, and the decode worker frees the reservation now."""
        if task.cancelled() or task.exception() is None or self.landed:
            return
        if self._stream.done():
            self._stream.result().close()

    async def reserved(self) -> FrameStream:
        """The decode stream once the blocks are reserved; the reservation's error if not."""
        assert self._task is not None
        waiting: set[asyncio.Future[Any]] = {self._stream, self._task}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not self._stream.done():
            self._task.result()  # it failed before the reservation: raises its error
        return self._stream.result()

    def failure(self) -> FairgateError | None:
        """The hand-off's error, if it failed (the decode stream was broken off for it)."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        error = task.exception()
        if error is None or isinstance(error, FairgateError):
            return error
        raise error  # not ours to translate: a bug

    async def drop(self) -> None:
        """The decode worker cannot take the request: the prefill worker drops its KV."""
        try:
            await self.prefill.send_target(
                PrefillTarget(self.request_id, None),
                timeout_s=CLEANUP_TIMEOUT_S,
                traceparent=self.traceparent,
            )
        except FairgateError as exc:  # its own timeout frees the KV
            logger.warning("dropping the KV of %s failed: %s", self.request_id, exc)
        else:
            self._is_settled = True

    def break_off(self) -> None:
        """Close an unfinished decode stream now, without awaiting anything: its connection
        closing aborts the request on the decode worker (and frees its reservation). A
        finished stream is left for ``aclose``, which reads its end so the connection is
        reused."""
        if self._task is not None:
            self._task.cancel()
        stream = self._opened
        if stream is not None and not stream.is_finished:
            stream.close()

    async def aclose(self) -> None:
        """Stop the hand-off; close the decode stream (freeing the reservation); abort a KV the
        prefill worker holds for a target that now will not come."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._exits.aclose()
        result = self.prefill_result
        if result is not None and result.will_transfer and not self._is_settled:
            try:
                await asyncio.wait_for(self.prefill.abort(self.request_id), CLEANUP_TIMEOUT_S)
            except (FairgateError, TimeoutError) as exc:
                logger.warning("aborting %s on the prefill worker failed: %s", self.request_id, exc)
