"""Workers in the test's own process, behind the interfaces the gateway calls real ones through
(``gateway.worker_transport``): a colocated worker that answers its load and identity polls as
a ready worker does and each request with the frames the test scripted (``Answer``), so that
everything from the routes to the generation runs as it does in production, without processes.

Only the worker's side is scripted; the registry polls it, the dispatcher places on it and the
generation reads its frames with the gateway's own code. A request with no answer scripted
fails with ``RequestFailed``, which the test sees as a 500."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from gateway.worker_transport import DecodeCalls, FrameSource, WorkerCalls
from transfer.errors import FairgateError, RequestFailed, WorkerUnreachable
from transfer.messages import (
    FinishReasonWire,
    GenerateRequest,
    MakeRoomResult,
    Priority,
    TokenFrame,
    TokenizerSpec,
    WorkerInfo,
    WorkerLoad,
    WorkerRole,
    encode_message,
    tokenizer_digest,
)

__all__ = ["Answer", "ScriptedTransport", "ScriptedWorker"]

BLOCK_SIZE = 16
NUM_BLOCKS = 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """A worker's answer to one request: ``token_ids`` one frame each, the last with
    ``finish_reason``; or, with ``error``, that error after them (the stream breaks off)."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReasonWire = "stop"
    num_cached_tokens: int = 0
    error: FairgateError | None = None


class ScriptedWorker:
    """A ready colocated worker (``DecodeCalls``) answering requests from ``answers``, in order;
    ``requests`` holds what it was sent, ``num_unfinished`` the streams left before their end (a
    client that went away, say)."""

    def __init__(
        self,
        url: str,
        model_id: str,
        *,
        max_model_len: int = 2048,
        tokenizer: TokenizerSpec | None = None,
        worker_id: str | None = None,
    ) -> None:
        """``tokenizer``: the one it announces and serves (None: it announces none)."""
        self.url = url
        self.tokenizer_spec = tokenizer
        self.num_tokenizer_calls = 0
        self.info_answer = WorkerInfo(
            worker_id=worker_id or f"scripted-{len(url)}",
            instance_id="instance-1",
            role="colocated",
            model_id=model_id,
            block_size=BLOCK_SIZE,
            num_total_blocks=NUM_BLOCKS,
            max_model_len=max_model_len,
            vocab_size=49152,
            tokenizer_digest=""
            if tokenizer is None
            else tokenizer_digest(encode_message(tokenizer)),
        )
        self.answers: deque[Answer] = deque()
        self.requests: list[GenerateRequest] = []
        self.num_unfinished = 0

    def reset(self) -> None:
        self.answers.clear()
        self.requests.clear()
        self.num_unfinished = 0

    async def load(
        self, *, timeout_s: float | None = None, evictions_since: int | None = None
    ) -> WorkerLoad:
        return WorkerLoad(
            self.info_answer.worker_id,
            "colocated",
            True,
            num_free_blocks=NUM_BLOCKS,
            num_total_blocks=NUM_BLOCKS,
        )

    async def info(self) -> WorkerInfo:
        return self.info_answer

    async def tokenizer(self, *, timeout_s: float | None = None) -> TokenizerSpec:
        self.num_tokenizer_calls += 1
        await asyncio.sleep(0)  # an answer comes later than the call: callers may overlap
        if self.tokenizer_spec is None:
            raise WorkerUnreachable("it serves no tokenizer", worker_url=self.url)
        return self.tokenizer_spec

    async def make_room(self, num_tokens: int, priority: Priority) -> MakeRoomResult:
        return MakeRoomResult(num_free_tokens=NUM_BLOCKS * BLOCK_SIZE, num_preempted=0)

    def generate(
        self, request: GenerateRequest, *, traceparent: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[FrameSource]:
        self.requests.append(request)
        answer = self.answers.popleft() if self.answers else None
        return self._stream(request, answer)

    @contextlib.asynccontextmanager
    async def _stream(
        self, request: GenerateRequest, answer: Answer | None
    ) -> AsyncIterator[FrameSource]:
        frames = self._frames(request, answer)
        try:
            yield frames
        finally:
            await frames.aclose()  # as the HTTP client closes the connection of a stream left

    async def _frames(
        self, request: GenerateRequest, answer: Answer | None
    ) -> AsyncGenerator[TokenFrame]:
        if answer is None:
            raise self._named(RequestFailed("no answer was scripted for this request"))
        num_prompt_tokens = len(request.prompt_token_ids) - request.num_prior_output_tokens
        num_output_tokens = request.num_prior_output_tokens
        for index, token_id in enumerate(answer.token_ids):
            num_output_tokens += 1
            is_last = index == len(answer.token_ids) - 1 and answer.error is None
            try:
                yield TokenFrame(
                    [token_id],
                    answer.finish_reason if is_last else None,
                    num_prompt_tokens,
                    answer.num_cached_tokens,
                    num_output_tokens,
                )
            except GeneratorExit:
                if not is_last:  # closed before its end: the request is aborted here
                    self.num_unfinished += 1
                raise
        if answer.error is not None:
            raise self._named(answer.error)

    def _named(self, error: FairgateError) -> FairgateError:
        """As ``transfer.client`` raises a worker's error: naming the worker."""
        error.worker_url = self.url
        return error


class ScriptedTransport:
    """The ``WorkerTransport`` of ``ScriptedWorker``s, by URL."""

    def __init__(self, *workers: ScriptedWorker) -> None:
        self.workers = {worker.url: worker for worker in workers}
        self.is_closed = False

    def connect(self, url: str, role: WorkerRole) -> WorkerCalls:
        assert role == "colocated", "scripted workers are colocated ones"
        worker: DecodeCalls = self.workers[url]
        return worker

    async def aclose(self) -> None:
        self.is_closed = True


def _digest(spec: TokenizerSpec) -> str:
    return tokenizer_digest(encode_message(spec))
