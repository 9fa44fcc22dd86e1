"""One admitted request, run on its workers: wait for a placement, drive the prefill and decode
workers (``transfer.client``), turn token ids into text with stop strings applied, and end with
the usage. The OpenAI routes (``gateway.api``) format what this yields; this module knows nothing
of HTTP bodies.

    Generation.events():   str (text delta) … str, Finished

A decode worker with no room after all (the gateway's view of it was a report old) is marked
full and the request goes back to the head of the queue, as often as it takes within the queue
timeout. Since the prefill does not wait for the decode worker's reservation, that usually comes
after the prefill's first token went out: the request then goes back as a resumption (a
``Preempted`` with ``error``, ``run_disaggregated``), and its prefill finds the prompt in the
prefill worker's prefix cache. A worker that cannot be reached, or whose engine died, is marked
dead; if it had not sent the request a token yet (or, a decode worker, had not taken it), the
request is placed again, up to ``MAX_PLACEMENTS`` times. After a token, a failure ends the
request with its error.
Leaving the iteration early (a client that went away) closes the worker streams, which aborts
the request on both workers.

``interrupt(error)`` ends a request from outside (the gateway stopping): the next event, or the
wait in progress (for a placement or for the workers, by cancelling the task iterating), raises
``error`` instead, after the same clean-up. Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
from opentelemetry.util.types import AttributeValue

from engine.tokenizer import Tokenizer
from gateway.dispatch import Dispatcher, WorkerPair
from gateway.metrics import GatewayMetrics
from gateway.scheduler import QueuedRequest
from gateway.streaming import TextStream
from gateway.workers import WorkerRegistry
from transfer.client import run_disaggregated
from transfer.errors import (
    EngineFailed,
    ErrorBody,
    FairgateError,
    NoRoomError,
    WorkerUnreachable,
    error_from_body,
)
from transfer.messages import GenerateRequest, Preempted, Priority, SamplingSpec, TokenFrame
from transfer.telemetry import SpanRecord, start_child, traceparent_of

__all__ = ["Finished", "Generation", "TokenUsage"]

logger = logging.getLogger(__name__)

MAX_PLACEMENTS = 3  # placements on unreachable workers before the error is final
MAX_PREEMPTIONS = 64  # hand-backs of one request before it ends with an error


class _Preempted(Exception):
    """Raised out of a placement whose decode worker handed the request back."""

    def __init__(self, preempted: Preempted) -> None:
        super().__init__(f"preempted after {preempted.num_output_tokens} tokens")
        self.preempted = preempted


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
        span: SpanRecord | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        """``span``: the request's server span when it is traced; the queue waits become its
        children, and the workers' spans join it through ``traceparent``."""
        self.queued = queued
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.text = TextStream(tokenizer, stop)
        self.dispatcher = dispatcher
        self.registry = registry
        self.cache_salt = cache_salt
        self.flush_interval_s = flush_interval_s
        self.output_token_ids: list[int] = []  # every output token so far, over preemptions
        self.num_preemptions = 0  # hand-backs by a decode worker
        self.num_resumptions = 0  # those, and requests a decode worker did not take
        self.usage = TokenUsage(prompt_tokens=len(prompt_token_ids))
        self.timing = Timing(received=received)
        self.pair: WorkerPair | None = None
        self.span = span
        self.finish_reason: str | None = None
        self.metrics = metrics
        self.traceparent = None if span is None else traceparent_of(span)
        self.interrupted: FairgateError | None = None  # set by ``interrupt``
        # The task iterating ``events`` and whether it is inside it (not parked at a yield).
        self._task: asyncio.Task[Any] | None = None
        self._is_running = False
        self._was_cancelled = False  # ``interrupt`` cancelled ``_task``

    def interrupt(self, error: FairgateError) -> None:
        """End the request with ``error`` (see the module docstring). Safe at any time, once."""
        if self.interrupted is not None:
            return
        self.interrupted = error
        task = self._task
        if self._is_running and task is not None and not task.done():
            self._was_cancelled = True
            task.cancel()

    def _resume(self) -> None:
        if self.interrupted is not None:
            raise self.interrupted
        self._task = asyncio.current_task()
        self._is_running = True

    async def events(self) -> AsyncGenerator[str | Finished]:
        self._resume()
        try:
            async with contextlib.aclosing(self._events()) as events:
                async for event in events:
                    self._is_running = False
                    yield event
                    self._resume()
        except asyncio.CancelledError:
            task = self._task
            if self.interrupted is None or not self._was_cancelled or task is None:
                raise
            self._was_cancelled = False
            if task.uncancel() > 0:
                raise  # cancelled by someone else as well: that one wins
            raise self.interrupted from None
        finally:
            self._is_running = False

    async def _events(self) -> AsyncGenerator[str | Finished]:
        requeue = False
        num_unreachable = 0
        for attempt in itertools.count(1):
            pair = await self._submit(requeue)
            self.pair = pair
            if self.timing.placed is None:
                self.timing.placed = time.monotonic()
            # Tokens from this placement (held back or sent): a resumption from them would need
            # the prompt and the text stream brought up to date, as ``_resume_after`` does.
            num_tokens_before = len(self.output_token_ids)
            try:
                async with contextlib.aclosing(self._run_on(pair)) as events:
                    async for event in events:
                        yield event
                return
            except _Preempted as exc:
                # Handed back by the decode worker (recompute), or not taken by it after the
                # prefill's first token went out (``Preempted.error``): back to the queue at its
                # original arrival, then re-prefilled with its output so far (its prompt found
                # in the prefill worker's prefix cache); the client's stream just pauses.
                try:
                    if exc.preempted.error is not None:
                        num_unreachable = self._not_taken(
                            pair, exc.preempted.error, num_unreachable
                        )
                    self._resume_after(exc.preempted)
                except FairgateError:
                    self.dispatcher.given_up(self.queued, len(self.output_token_ids))
                    raise
                logger.info(
                    "request %s: preempted after %d tokens, queued again",
                    self.queued.request_id,
                    exc.preempted.num_output_tokens,
                )
            except NoRoomError:
                # The gateway's view of the decode worker was stale: it is marked full until
                # it frees something, and the request waits its turn again, within the time a
                # request may wait for workers at all.
                self.registry.mark_full(pair.decode)
                waited_s = time.monotonic() - self.timing.received
                if waited_s > self.dispatcher.queue_timeout_s:
                    raise
            except (WorkerUnreachable, EngineFailed) as exc:
                # The worker is gone, or its engine is (it exits, to be restarted): not the
                # request's fault, so it may go elsewhere while it has no token from there.
                self._mark_unreachable(pair, exc)
                num_unreachable += 1
                got_tokens = len(self.output_token_ids) > num_tokens_before
                if got_tokens or num_unreachable == MAX_PLACEMENTS:
                    raise
            requeue = True
            logger.info("request %s: placing again (attempt %d)", self.queued.request_id, attempt)

    def _not_taken(self, pair: WorkerPair, body: ErrorBody, num_unreachable: int) -> int:
        """The hand-off did not happen after the first token (the decode worker had no room or
        could not be reached, or the prefill worker died): handle why as for the same error
        before any token, raising it if the request may not go on. Returns the number of
        placements on unreachable workers so far."""
        error = error_from_body(body)
        if isinstance(error, NoRoomError):
            self.registry.mark_full(pair.decode)
            if time.monotonic() - self.timing.received > self.dispatcher.queue_timeout_s:
                raise error
            return num_unreachable
        if isinstance(error, WorkerUnreachable | EngineFailed):
            self._mark_unreachable(pair, error)
            if num_unreachable + 1 == MAX_PLACEMENTS:
                raise error
            return num_unreachable + 1
        raise error

    async def _submit(self, requeue: bool) -> WorkerPair:
        """Wait for workers; traced as a ``queue`` span under the request's span (made once
        the wait is over, with what it found; nothing is built for an unsampled request)."""
        if self.span is None or not self.span.is_recording:
            return await self.dispatcher.submit(self.queued, requeue=requeue)
        queued = self.queued
        attributes: dict[str, AttributeValue] = {
            "fairgate.tenant_id": queued.tenant_id,
            "fairgate.slo_class": queued.slo_class,
            "fairgate.policy": self.dispatcher.policy.name,
            "fairgate.requeued": requeue,
        }
        started_ns = time.time_ns()
        try:
            pair = await self.dispatcher.submit(queued, requeue=requeue)
        except BaseException as exc:
            start_child(self.span, "queue", attributes, started_ns).end(exc)
            raise
        attributes |= {
            "fairgate.counter": pair.counter,
            "fairgate.prefix_match_tokens": pair.num_expected_cached_tokens,
            "fairgate.decode_worker": pair.decode.worker_id,
        }
        if pair.prefill is not None:
            attributes["fairgate.prefill_worker"] = pair.prefill.worker_id
        start_child(self.span, "queue", attributes, started_ns).end()
        return pair

    async def _run_on(self, pair: WorkerPair) -> AsyncGenerator[str | Finished]:
        """The request on one pair; the dispatcher's accounting is settled whatever happens.
        Raises ``_Preempted`` when the decode worker hands the request back."""
        prefill_pending = True
        preempted = False
        started = time.monotonic()
        try:
            async with contextlib.aclosing(self._frames(pair)) as frames:
                async for frame in frames:
                    if isinstance(frame, Preempted):
                        preempted = True
                        raise _Preempted(frame)
                    if prefill_pending:
                        prefill_pending = False
                        self.dispatcher.prefill_done(pair, self.queued, frame.num_cached_tokens)
                        if self.timing.first_token is None:
                            self.timing.first_token = time.monotonic()
                            if self.span is not None:
                                self.span.add_event("first_token")
                    self.dispatcher.tokens_generated(self.queued, len(frame.token_ids))
                    if self.metrics is not None:
                        # A resumption's prompt is computed again at nobody's charge.
                        is_first = not self.output_token_ids
                        self.metrics.served(
                            self.queued.tenant_id,
                            self.queued.weight,
                            self.usage.prompt_tokens - frame.num_cached_tokens if is_first else 0,
                            len(frame.token_ids),
                        )
                    if self.num_resumptions == 0:  # a resumption's prompt is not the client's
                        self.usage.cached_tokens = frame.num_cached_tokens
                    self.usage.completion_tokens = frame.num_output_tokens
                    self.output_token_ids += frame.token_ids
                    text = self.text.push(frame.token_ids)
                    if text:
                        yield text
                    if self.text.is_stopped:
                        self.finish_reason = "stop"
                        yield Finished("stop", self.usage)
                        return
                    if frame.finish_reason is not None:
                        tail = self.text.finish()
                        if tail:
                            yield tail
                        reason = "length" if frame.finish_reason == "length" else "stop"
                        self.finish_reason = reason
                        yield Finished(reason, self.usage)
                        return
            raise WorkerUnreachable("the workers' stream ended without a finish reason")
        finally:
            self.timing.worker_s += time.monotonic() - started
            if prefill_pending:
                self.dispatcher.prefill_done(pair, self.queued)
            self.dispatcher.decode_done(
                pair, self.queued, self.usage.completion_tokens, finished=not preempted
            )
            self.timing.finished = time.monotonic()

    def _resume_after(self, preempted: Preempted) -> None:
        """Make the request what its resumption sends: the prompt with the output so far, the
        seed sampling used, and the queue entry to match (same arrival, so it keeps its place)."""
        if preempted.num_output_tokens != len(self.output_token_ids):
            raise WorkerUnreachable(
                f"the decode worker preempted {self.queued.request_id} after "
                f"{preempted.num_output_tokens} tokens; the gateway got "
                f"{len(self.output_token_ids)}"
            )
        self.num_resumptions += 1
        # One the decode worker never took is no preemption; ``_not_taken`` bounds those.
        if preempted.error is None:
            self.num_preemptions += 1
        if self.num_preemptions > MAX_PREEMPTIONS:
            raise WorkerUnreachable(
                f"{self.queued.request_id} was preempted {self.num_preemptions} times; giving up"
            )
        self.sampling = msgspec.structs.replace(self.sampling, seed=preempted.seed)
        resumed = [*self.prompt_token_ids, *self.output_token_ids]
        self.queued.prompt_token_ids = resumed
        self.queued.num_prompt_tokens = len(resumed)
        self.queued.num_output_tokens = len(self.output_token_ids)

    def _priority(self, pair: WorkerPair) -> Priority:
        """What the workers order and preempt by: its class, its tenant's counter when it was
        placed, its arrival."""
        return Priority(rank=self.queued.rank, counter=pair.counter, arrival=self.queued.arrival)

    async def _frames(self, pair: WorkerPair) -> AsyncGenerator[TokenFrame | Preempted]:
        request_id = self.queued.request_id
        prompt = self.queued.prompt_token_ids or self.prompt_token_ids
        num_prior = len(self.output_token_ids)
        if pair.prefill is None:
            request = GenerateRequest(
                request_id,
                prompt,
                self.sampling,
                self.cache_salt,
                self.flush_interval_s,
                self._priority(pair),
                num_prior,
            )
            async with pair.decode.decode_client.generate(
                request, traceparent=self.traceparent
            ) as stream:
                async for frame in stream:
                    if isinstance(frame, TokenFrame | Preempted):
                        yield frame
            return
        frames = run_disaggregated(
            pair.prefill.prefill_client,
            pair.decode.decode_client,
            request_id,
            prompt,
            self.sampling,
            cache_salt=self.cache_salt,
            flush_interval_s=self.flush_interval_s,
            priority=self._priority(pair),
            num_prior_output_tokens=num_prior,
            traceparent=self.traceparent,
        )
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    def _mark_unreachable(self, pair: WorkerPair, error: FairgateError) -> None:
        for handle in (pair.prefill, pair.decode):
            if handle is not None and error.message.startswith(handle.url):
                self.registry.mark_dead(handle, error)
