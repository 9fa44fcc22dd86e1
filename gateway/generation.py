"""One admitted request, run on its workers: wait for a placement, drive the prefill and decode
workers (``transfer.client``), turn token ids into text with stop strings applied, and end with
the usage. The OpenAI routes (``gateway.api``) format what this yields; this module knows nothing
of HTTP bodies.

    Generation.events():   str (text delta) … str, Finished

Failures before any token reached the client are retried once on another placement (a decode
worker with no room after all is the common case: it is marked full and the request goes back
to the head of the queue). After the first token, a failure ends the request with its error.
Leaving the iteration early (a client that went away) closes the worker streams, which aborts
the request on both workers. Torch-free.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from engine.tokenizer import Tokenizer
from gateway.dispatch import Dispatcher, WorkerPair
from gateway.scheduler import QueuedRequest
from gateway.streaming import TextStream
from gateway.workers import WorkerRegistry
from transfer.client import run_disaggregated
from transfer.errors import FairgateError, NoRoomError, WorkerUnreachable
from transfer.messages import GenerateRequest, SamplingSpec, TokenFrame

__all__ = ["Finished", "Generation", "TokenUsage"]

logger = logging.getLogger(__name__)

MAX_PLACEMENTS = 3  # a request is placed at most this often before its error is final


@dataclass(slots=True)
class TokenUsage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event: why the request ended, and what it used."""

    finish_reason: str  # "stop" or "length"
    usage: TokenUsage


@dataclass(slots=True)
class Timing:
    """Where a request's time went (monotonic seconds), for the Server-Timing header, logs and
    metrics."""

    received: float
    placed: float | None = None
    first_token: float | None = None
    finished: float | None = None
    worker_s: float = 0.0  # time spent waiting on worker calls


class Generation:
    """One request's run. Iterate ``events()`` once."""

    def __init__(
        self,
        queued: QueuedRequest,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        stop: tuple[str, ...],
        *,
        tokenizer: Tokenizer,
        dispatcher: Dispatcher,
        registry: WorkerRegistry,
        cache_salt: bytes,
        received: float,
        flush_interval_s: float = 0.0,
    ) -> None:
        self.queued = queued
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.text = TextStream(tokenizer, stop)
        self.dispatcher = dispatcher
        self.registry = registry
        self.cache_salt = cache_salt
        self.flush_interval_s = flush_interval_s
        self.usage = TokenUsage(prompt_tokens=len(prompt_token_ids))
        self.timing = Timing(received=received)
        self.pair: WorkerPair | None = None

    async def events(self) -> AsyncGenerator[str | Finished]:
        requeue = False
        for attempt in range(1, MAX_PLACEMENTS + 1):
            pair = await self.dispatcher.submit(self.queued, requeue=requeue)
            self.pair = pair
            if self.timing.placed is None:
                self.timing.placed = time.monotonic()
            sent_any = False
            try:
                async with contextlib.aclosing(self._run_on(pair)) as events:
                    async for event in events:
                        sent_any = True
                        yield event
                return
            except NoRoomError:
                self.registry.mark_full(pair.decode)
                if attempt == MAX_PLACEMENTS:
                    raise
            except WorkerUnreachable as exc:
                self._mark_unreachable(pair, exc)
                if sent_any or attempt == MAX_PLACEMENTS:
                    raise
            requeue = True
            logger.info("request %s: placing again (attempt %d)", self.queued.request_id, attempt)

    async def _run_on(self, pair: WorkerPair) -> AsyncGenerator[str | Finished]:
        """The request on one pair; the dispatcher's accounting is settled whatever happens."""
        prefill_pending = True
        started = time.monotonic()
        try:
            async with contextlib.aclosing(self._frames(pair)) as frames:
                async for frame in frames:
                    if prefill_pending:
                        prefill_pending = False
                        self.dispatcher.prefill_done(pair, self.queued, frame.num_cached_tokens)
                        self.timing.first_token = time.monotonic()
                    self.dispatcher.tokens_generated(self.queued, len(frame.token_ids))
                    self.usage.cached_tokens = frame.num_cached_tokens
                    self.usage.completion_tokens = frame.num_output_tokens
                    text = self.text.push(frame.token_ids)
                    if text:
                        yield text
                    if self.text.is_stopped:
                        yield Finished("stop", self.usage)
                        return
                    if frame.finish_reason is not None:
                        tail = self.text.finish()
                        if tail:
                            yield tail
                        reason = "length" if frame.finish_reason == "length" else "stop"
                        yield Finished(reason, self.usage)
                        return
            raise WorkerUnreachable("the workers' stream ended without a finish reason")
        finally:
            self.timing.worker_s += time.monotonic() - started
            if prefill_pending:
                self.dispatcher.prefill_done(pair, self.queued)
            self.dispatcher.decode_done(pair, self.queued, self.usage.completion_tokens)
            self.timing.finished = time.monotonic()

    async def _frames(self, pair: WorkerPair) -> AsyncGenerator[TokenFrame]:
        request_id = self.queued.request_id
        if pair.prefill is None:
            request = GenerateRequest(
                request_id,
                self.prompt_token_ids,
                self.sampling,
                self.cache_salt,
                self.flush_interval_s,
            )
            async with pair.decode.decode_client.generate(request) as stream:
                async for frame in stream:
                    if isinstance(frame, TokenFrame):
                        yield frame
            return
        frames = run_disaggregated(
            pair.prefill.prefill_client,
            pair.decode.decode_client,
            request_id,
            self.prompt_token_ids,
            self.sampling,
            cache_salt=self.cache_salt,
            flush_interval_s=self.flush_interval_s,
        )
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    def _mark_unreachable(self, pair: WorkerPair, error: FairgateError) -> None:
        for handle in (pair.prefill, pair.decode):
            if handle is not None and error.message.startswith(handle.url):
                self.registry.mark_dead(handle, error)
