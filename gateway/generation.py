"""One admitted request, run on its workers: wait for a placement, drive the prefill and decode
workers (``gateway.worker_transport``), turn token ids into text with stop strings applied, and
end with the usage. The OpenAI routes (``gateway.openai_routes``) format what this yields; this
module knows nothing of HTTP bodies.

    Generation.events():   str (text delta) … str, Finished

What happens on the workers is reported to the dispatcher, which keeps the request's ledger
(``gateway.ledger``): first token, tokens, the pair left. When the workers fail (one dies, hangs,
restarts or drops the stream; the decode worker had no room after all), the dispatcher decides:
the request goes back to the queue at its arrival and continues on another pair from its output
so far, prompt plus output re-prefilled with ``num_prior_output_tokens`` and the same sampling
seed (every request has one: the gateway picks it when the client did not), so its output is
what it would have been; the client's stream only pauses. That happens at most
``gateway.max_migrations`` times; then, or for a failure of the request's own, it ends with the
error. A decode worker that hands a request back (recompute preemption) sends it the same way.
A worker found lost while the request runs there (``Dispatcher.worker_lost``) stops the run at
once: the task waiting on it is cancelled, and the run fails with the registry's error.
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
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
from opentelemetry.util.types import AttributeValue

from engine.tokenizer import Tokenizer
from gateway.dispatch import Dispatcher
from gateway.ledger import RequestLedger, WorkerPair
from gateway.metrics import GatewayMetrics, worker_labels
from gateway.scheduler import QueuedRequest
from gateway.streaming import TextStream
from gateway.workers import WorkerRegistry
from transfer.client import DecodeClient, run_disaggregated
from transfer.errors import FairgateError, WorkerUnreachable
from transfer.messages import GenerateRequest, Preempted, Priority, SamplingSpec, TokenFrame
from transfer.telemetry import SpanRecord, start_child, traceparent_of

__all__ = ["Finished", "Generation", "TokenUsage"]

logger = logging.getLogger(__name__)

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
        if sampling.seed is None:
            # A seed of its own, so that a resumption elsewhere samples what this one would
            # have (``engine.sampler``: a token's randomness is a function of seed and position).
            sampling = msgspec.structs.replace(sampling, seed=secrets.randbits(63))
        self.sampling = sampling
        self.text = TextStream(tokenizer, stop)
        self.dispatcher = dispatcher
        self.registry = registry
        self.cache_salt = cache_salt
        self.flush_interval_s = flush_interval_s
        self.output_token_ids: list[int] = []  # every output token so far, over preemptions
        self.num_preemptions = 0  # hand-backs by a decode worker
        self.num_resumptions = 0  # those, and requests a decode worker did not take
        self._num_sent_tokens = 0  # the tokens the current placement sent its workers
        self._is_prompt_served = False  # its prompt counted in the metrics' service
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
        self._lost: FairgateError | None = None  # set by ``_on_lost``, until the run fails
        self._lost_cancelled = False  # ``_on_lost`` cancelled ``_task``
        self._is_on_pair = False  # inside ``_run_on``: a lost worker may cancel the task

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
        if self.metrics is not None and not self.queued.demoted:
            # The weight its policy takes from it (``FairPolicy.enqueue``), for the metrics.
            self.metrics.tenant_weight(self.queued.tenant_id, self.queued.weight)
        ledger = self.dispatcher.open(
            self.queued, received=self.timing.received, on_lost=self._on_lost
        )
        try:
            requeue = False
            for attempt in itertools.count(1):
                pair = await self._submit(ledger, requeue)
                self.pair = pair
                if self.timing.placed is None:
                    self.timing.placed = time.monotonic()
                try:
                    async with contextlib.aclosing(self._run_on(ledger, pair)) as events:
                        async for event in events:
                            yield event
                    return
                except _Preempted as exc:
                    # Handed back by the decode worker (recompute): back to the queue at its
                    # original arrival, then re-prefilled with its output so far (its prompt
                    # found in the prefill worker's prefix cache); the client's stream pauses.
                    self._resume_after(exc.preempted)
                    logger.info(
                        "request %s: preempted after %d tokens, queued again",
                        self.queued.request_id,
                        exc.preempted.num_output_tokens,
                    )
                except asyncio.CancelledError:
                    lost = self._take_lost()
                    if lost is None:
                        raise
                    self._move(ledger, lost)
                except FairgateError as exc:
                    self._move(ledger, exc)
                requeue = True
                logger.info(
                    "request %s: placing again (attempt %d)", self.queued.request_id, attempt + 1
                )
        finally:
            self.dispatcher.close(ledger)

    def _on_lost(self, error: FairgateError) -> None:
        """The dispatcher found the request's worker lost: stop the run there (it fails with
        ``error`` and moves). Cancels the iterating task when it waits on the workers; at a
        yield, the run raises it when it resumes (``_run_on``)."""
        if self._lost is not None:
            return
        self._lost = error
        task = self._task
        # Only inside the run: placed but not yet there (the placement's future resolved, the
        # task not yet resumed), the run raises it as it starts instead.
        if self._is_on_pair and self._is_running and task is not None and not task.done():
            self._lost_cancelled = True
            task.cancel()

    def _take_lost(self) -> FairgateError | None:
        """After a ``CancelledError`` in the run: the lost-worker error it stands for, if
        ``_on_lost`` cancelled the task and nobody else did; else None (re-raise it)."""
        error, self._lost = self._lost, None
        if error is None or not self._lost_cancelled:
            return None
        self._lost_cancelled = False
        task = self._task
        if task is None or task.uncancel() > 0:
            return None  # cancelled by someone else as well: that one wins
        return error

    def _move(self, ledger: RequestLedger, error: FairgateError) -> None:
        """The run failed with ``error``: the dispatcher says whether the request goes on
        elsewhere (then it resumes from its output so far) or ends (raises)."""
        self._lost = None
        final = self.dispatcher.failed(ledger, error)
        if final is not None:
            raise final
        self._resume_from_output()

    async def _submit(self, ledger: RequestLedger, requeue: bool) -> WorkerPair:
        """Wait for workers; traced as a ``queue`` span under the request's span (made once
        the wait is over, with what it found; nothing is built for an unsampled request)."""
        if self.span is None or not self.span.is_recording:
            return await self.dispatcher.submit(ledger, requeue=requeue)
        queued = self.queued
        attributes: dict[str, AttributeValue] = {
            "fairgate.tenant_id": queued.tenant_id,
            "fairgate.slo_class": queued.slo_class,
            "fairgate.model": queued.model,
            "fairgate.policy": self.dispatcher.policy.name,
            "fairgate.requeued": requeue,
        }
        started_ns = time.time_ns()
        try:
            pair = await self.dispatcher.submit(ledger, requeue=requeue)
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

    async def _run_on(
        self, ledger: RequestLedger, pair: WorkerPair
    ) -> AsyncGenerator[str | Finished]:
        """The request on one pair, reported to the dispatcher as it goes; whatever happens,
        it has left the pair when this ends (handed back, to go on elsewhere, unless it
        finished or its client went away). Raises ``_Preempted`` when the decode worker hands
        the request back, and the workers' error when they fail."""
        handed_back = True
        started = time.monotonic()
        self._is_on_pair = True
        try:
            if self._lost is not None:
                raise self._lost  # its worker was found lost before the run began
            async with contextlib.aclosing(self._frames(ledger, pair)) as frames:
                async for frame in frames:
                    if isinstance(frame, Preempted):
                        raise _Preempted(frame)
                    if ledger.stage == "prefill":
                        if self.metrics is not None:
                            # On the worker that ran the prefill: what it was sent (a
                            # resumption's prompt and output so far), and found cached of it.
                            self.metrics.worker_prefilled(
                                worker_labels(pair.prefill or pair.decode),
                                self._num_sent_tokens,
                                frame.num_cached_tokens,
                            )
                        self.dispatcher.first_token(ledger, frame.num_cached_tokens)
                        if self.timing.first_token is None:
                            self.timing.first_token = time.monotonic()
                            if self.span is not None:
                                self.span.add_event("first_token")
                    self.dispatcher.tokens(ledger, len(frame.token_ids))
                    if self.metrics is not None:
                        # The prompt once, at the first token (a resumption's is computed
                        # again at nobody's charge); as the policy charges it (``served``).
                        is_first = not self._is_prompt_served
                        self._is_prompt_served = True
                        num_prompt = self.usage.prompt_tokens if is_first else 0
                        self.metrics.served(
                            self.queued.tenant_id,
                            self.queued.weight,
                            num_prompt - frame.num_cached_tokens if is_first else 0,
                            len(frame.token_ids),
                            num_prompt_tokens=num_prompt,
                            cost_factor=self.queued.cost_factor,
                        )
                    if self.num_resumptions == 0:  # a resumption's prompt is not the client's
                        self.usage.cached_tokens = frame.num_cached_tokens
                    self.usage.completion_tokens = frame.num_output_tokens
                    self.output_token_ids += frame.token_ids
                    text = self.text.push(frame.token_ids)
                    if text:
                        handed_back = False  # (a client gone at the yield: the request ends)
                        yield text
                        handed_back = True
                        ends = frame.finish_reason is not None or self.text.is_stopped
                        if self._lost is not None and not ends:
                            raise self._lost  # its worker was found lost meanwhile
                    if self.text.is_stopped:
                        handed_back = False
                        self.finish_reason = "stop"
                        yield Finished("stop", self.usage)
                        return
                    if frame.finish_reason is not None:
                        handed_back = False
                        tail = self.text.finish()
                        if tail:
                            yield tail
                        reason = "length" if frame.finish_reason == "length" else "stop"
                        self.finish_reason = reason
                        yield Finished(reason, self.usage)
                        return
            raise WorkerUnreachable(
                "the workers' stream ended without a finish reason", worker_url=pair.decode.url
            )
        except asyncio.CancelledError:
            if self._lost is None or not self._lost_cancelled:
                handed_back = False  # cancelled from outside: the request ends
            raise
        finally:
            self._is_on_pair = False
            self.timing.worker_s += time.monotonic() - started
            self.dispatcher.left(ledger, handed_back=handed_back)
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
        self.num_preemptions += 1
        if self.num_preemptions > MAX_PREEMPTIONS:
            raise WorkerUnreachable(
                f"{self.queued.request_id} was preempted {self.num_preemptions} times; giving up"
            )
        self.sampling = msgspec.structs.replace(self.sampling, seed=preempted.seed)
        self._resume_from_output()

    def _resume_from_output(self) -> None:
        """What the next placement sends: the prompt with the output so far (the sampling seed
        is the request's own, so it goes on token for token), and the queue entry to match
        (same arrival, so it keeps its place)."""
        if self.sampling.seed is None:
            raise AssertionError("a request is resumed only with a seed (``__init__``)")
        if not self.output_token_ids:
            return  # nothing yet: it starts over as it came
        self.num_resumptions += 1
        resumed = [*self.prompt_token_ids, *self.output_token_ids]
        self.queued.prompt_token_ids = resumed
        self.queued.num_prompt_tokens = len(resumed)
        self.queued.num_output_tokens = len(self.output_token_ids)

    def _priority(self, pair: WorkerPair) -> Priority:
        """What the workers order and preempt by: its class, its tenant's counter when it was
        placed, its arrival."""
        return Priority(rank=self.queued.rank, counter=pair.counter, arrival=self.queued.arrival)

    async def _frames(
        self, ledger: RequestLedger, pair: WorkerPair
    ) -> AsyncGenerator[TokenFrame | Preempted]:
        # Each placement after the first has an id of its own on the workers: what the last
        # one left there (a KV still being shipped to a dead decode worker, say) is not in its
        # way, and ends by its own timeout or abort.
        request_id = self.queued.request_id
        if ledger.num_placements > 1:
            request_id = f"{request_id}.{ledger.num_placements}"
        prompt = self.queued.prompt_token_ids or self.prompt_token_ids
        self._num_sent_tokens = len(prompt)
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
        decode_client = pair.decode.decode_client
        # The hand-off between the two is HTTP's own (``gateway.worker_transport``).
        assert isinstance(decode_client, DecodeClient), "a disaggregated pair is reached by HTTP"
        frames = run_disaggregated(
            pair.prefill.prefill_client,
            decode_client,
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
