"""The caller's side of the worker control plane (httpx), and one request driven through a
prefill and a decode worker. Torch-free: the gateway uses it.

Errors arrive as ``FairgateError``s: a worker's ``ErrorBody`` (status ≠ 2xx, or an
``ErrorFrame`` ending a stream) becomes its class again (``error_from_body``); a worker that does
not answer, or whose stream breaks off before the request finished, is ``WorkerUnreachable``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Self, TypeVar

import httpx
import msgspec

from transfer.errors import ErrorBody, FairgateError, WorkerUnreachable, error_from_body
from transfer.messages import (
    MSGPACK_CONTENT_TYPE,
    AbortRequest,
    AbortResult,
    DecodeRequest,
    ErrorFrame,
    FrameDecoder,
    GenerateRequest,
    KvTarget,
    PrefillRequest,
    PrefillResult,
    Reserved,
    SamplingSpec,
    TokenFrame,
    WorkerInfo,
    WorkerLoad,
    decode_message,
    encode_message,
)

__all__ = ["DecodeClient", "FrameStream", "PrefillClient", "WorkerClient", "run_disaggregated"]

_T = TypeVar("_T")

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)


def _error_of(response: httpx.Response, body: bytes) -> FairgateError:
    try:
        return error_from_body(decode_message(body, ErrorBody))
    except msgspec.MsgspecError:
        text = body[:200].decode("utf-8", "replace")
        return WorkerUnreachable(f"{response.url}: HTTP {response.status_code}: {text}")


class WorkerClient:
    """Calls to any worker. Owns its ``httpx.AsyncClient`` unless one is passed in."""

    def __init__(self, base_url: str, *, client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
        self._owns_client = client is None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def info(self) -> WorkerInfo:
        return await self._call("GET", "/v1/info", None, WorkerInfo)

    async def load(self) -> WorkerLoad:
        return await self._call("GET", "/v1/load", None, WorkerLoad)

    async def abort(self, request_id: str) -> bool:
        result = await self._call("POST", "/v1/abort", AbortRequest(request_id), AbortResult)
        return result.aborted

    async def _call(
        self, method: str, path: str, message: msgspec.Struct | None, result_type: type[_T]
    ) -> _T:
        content = None if message is None else encode_message(message)
        try:
            response = await self._client.request(
                method,
                self.base_url + path,
                content=content,
                headers={"content-type": MSGPACK_CONTENT_TYPE},
            )
        except httpx.HTTPError as exc:
            raise WorkerUnreachable(f"{self.base_url}{path}: {exc!r}") from exc
        if not response.is_success:
            raise _error_of(response, response.content)
        try:
            return decode_message(response.content, result_type)
        except msgspec.MsgspecError as exc:
            raise WorkerUnreachable(f"{self.base_url}{path}: unreadable answer: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _stream(self, path: str, message: msgspec.Struct) -> AsyncIterator[FrameStream]:
        url = self.base_url + path
        try:
            async with self._client.stream(
                "POST",
                url,
                content=encode_message(message),
                headers={"content-type": MSGPACK_CONTENT_TYPE},
            ) as response:
                if not response.is_success:
                    raise _error_of(response, await response.aread())
                yield FrameStream(url, response)
        except httpx.HTTPError as exc:
            raise WorkerUnreachable(f"{url}: {exc!r}") from exc


class FrameStream:
    """The frames of one streamed request. Iterating yields ``Reserved`` and ``TokenFrame``s,
    raises the error an ``ErrorFrame`` carries, and raises ``WorkerUnreachable`` when the stream
    ends before a frame with a finish reason. Leaving the ``async with`` closes the connection,
    which aborts the request on the worker."""

    def __init__(self, url: str, response: httpx.Response) -> None:
        self.url = url
        self._response = response
        self._frames = self._iterate()

    def __aiter__(self) -> AsyncIterator[Reserved | TokenFrame]:
        return self._frames

    async def next(self) -> Reserved | TokenFrame:
        try:
            return await anext(self._frames)
        except StopAsyncIteration:
            raise WorkerUnreachable(f"{self.url}: the stream ended early") from None

    async def _iterate(self) -> AsyncIterator[Reserved | TokenFrame]:
        decoder = FrameDecoder()
        try:
            async for chunk in self._response.aiter_raw():
                for frame in decoder.feed(chunk):
                    if isinstance(frame, ErrorFrame):
                        raise error_from_body(frame.error)
                    yield frame
                    if isinstance(frame, TokenFrame) and frame.finish_reason is not None:
                        return
        except (httpx.HTTPError, msgspec.MsgspecError, ValueError) as exc:
            raise WorkerUnreachable(f"{self.url}: the stream broke: {exc!r}") from exc
        raise WorkerUnreachable(f"{self.url}: the stream ended before the request finished")


class PrefillClient(WorkerClient):
    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        return await self._call("POST", "/v1/prefill", request, PrefillResult)


class DecodeClient(WorkerClient):
    def decode(self, request: DecodeRequest) -> contextlib.AbstractAsyncContextManager[FrameStream]:
        """The first frame is ``Reserved``; ``NoRoomError`` is raised on entry when there is no
        room."""
        return self._stream("/v1/decode", request)

    def generate(
        self, request: GenerateRequest
    ) -> contextlib.AbstractAsyncContextManager[FrameStream]:
        return self._stream("/v1/generate", request)


async def run_disaggregated(
    prefill: PrefillClient,
    decode: DecodeClient,
    request_id: str,
    prompt_token_ids: list[int],
    sampling: SamplingSpec,
    *,
    cache_salt: bytes = b"",
) -> AsyncGenerator[TokenFrame]:
    """One request through a prefill and a decode worker: reserve on the decode worker, prefill
    with its blocks as the target, yield the first token as soon as the prefill answers, then the
    decode worker's frames. Leaving early (or any error) closes the decode stream, which frees
    the reservation."""
    async with decode.decode(
        DecodeRequest(request_id, prompt_token_ids, sampling, cache_salt)
    ) as stream:
        reserved = await stream.next()
        if not isinstance(reserved, Reserved):
            raise WorkerUnreachable(f"{stream.url}: expected a Reserved frame, got {reserved!r}")
        target = KvTarget(
            reserved.worker_id, reserved.kv_host, reserved.kv_port, reserved.block_ids
        )
        result = await prefill.prefill(
            PrefillRequest(request_id, prompt_token_ids, sampling, cache_salt, target)
        )
        yield TokenFrame(
            token_ids=[result.first_token_id],
            finish_reason=result.finish_reason,
            num_prompt_tokens=result.num_prompt_tokens,
            num_cached_tokens=result.num_cached_tokens,
            num_output_tokens=1,
        )
        if result.finish_reason is not None:
            return
        async for frame in stream:
            if isinstance(frame, TokenFrame):
                yield frame
