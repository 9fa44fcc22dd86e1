"""The tenant-facing, OpenAI-compatible routes: ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``.

A request goes: key → tenant, body → ``GenerationRequest`` (``gateway.openai_api``), model and
SLO class checked, prompt tokenized and its length checked, quotas reserved, then queued and run
(``gateway.generation``). Everything that can be refused is refused before anything is queued, with
OpenAI's error body. Streaming answers wait for the first token before sending headers, so an
error up to then (no worker, no room) still gets its status; after that, an error is the last
``data:`` event. Whatever happens, the quota reservation is settled with the real usage, the
usage ledger gets its record and one log line says how the request ended (never its text).
Torch-free.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec
from opentelemetry.util.types import AttributeValue
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.admin import json_response
from gateway.errors import (
    ClassNotAllowed,
    ClientError,
    ContextLengthExceeded,
    ModelNotFound,
    RequestTooLarge,
    ShuttingDown,
    openai_error_body,
    public_error,
)
from gateway.gatekeeper import (
    SLO_CLASS_HEADER,
    Seen,
    class_rank,
    end_span,
    outcome_of,
    refused,
    server_span,
)
from gateway.generation import Finished, Generation, TokenUsage
from gateway.metrics import CLIENT_DISCONNECTED, RequestRecord
from gateway.openai_api import (
    SSE_DONE,
    SSE_KEEPALIVE,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    GenerationRequest,
    ModelList,
    new_completion_id,
    parse_chat_request,
    parse_completion_request,
)
from gateway.openapi import Endpoint
from gateway.prompts import is_long_prompt
from gateway.quotas import Admission
from gateway.scheduler import QueuedRequest
from gateway.tenants import Tenant, UsageDelta
from transfer.errors import FairgateError
from transfer.http import CallerDisconnected, caller_disconnected_response, until_disconnected
from transfer.messages import SamplingSpec
from transfer.telemetry import trace_id_of

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["openai_endpoints"]

logger = logging.getLogger("fairgate.requests")

DEMOTED_WEIGHT_FACTOR = 0.01
LARGE_BODY_BYTES = 64 << 10  # read and decoded one at a time per tenant

_T = TypeVar("_T")
_Parse = Callable[[bytes], GenerationRequest]  # a route's body parser


@dataclass(slots=True)
class _Run:
    """One accepted request, from admission to its last record."""

    request: GenerationRequest
    tenant: Tenant
    slo_class: str
    admission: Admission
    generation: Generation
    completion_id: str
    created: int
    is_finished: bool = False
    # What reached the client (the billing rule, ``_billed``): a whole answer, or the
    # completion tokens generated up to the last text event a stream sent.
    is_delivered: bool = False
    num_delivered_tokens: int = 0


def openai_endpoints(gateway: Gateway) -> list[Endpoint]:
    async def chat_completions(request: Request) -> Response:
        return await _serve(gateway, request, parse_chat_request)

    async def completions(request: Request) -> Response:
        return await _serve(gateway, request, parse_completion_request)

    async def models(request: Request) -> Response:
        await gateway.auth.tenant(request)
        return json_response(ModelList.of(_served_models(gateway)))

    return [
        Endpoint(
            "POST",
            "/v1/chat/completions",
            chat_completions,
            "Create a chat completion",
            "openai",
            request_body=_body_type("chat"),
            response=ChatCompletion,
            streams=ChatCompletionChunk,
            errors=(400, 401, 403, 404, 413, 429, 503),
        ),
        Endpoint(
            "POST",
            "/v1/completions",
            completions,
            "Create a completion",
            "openai",
            request_body=_body_type("completion"),
            response=Completion,
            streams=CompletionChunk,
            errors=(400, 401, 403, 404, 413, 429, 503),
        ),
        Endpoint(
            "GET",
            "/v1/models",
            models,
            "List the served models",
            "openai",
            response=ModelList,
            errors=(401, 403),
        ),
    ]


def _body_type(kind: str) -> Any:
    from gateway import openai_api

    return openai_api.ChatCompletionRequest if kind == "chat" else openai_api.CompletionRequest


def _served_models(gateway: Gateway) -> list[str]:
    model_id = gateway.registry.model_id
    return [] if model_id is None else [model_id]


# ---- one request ---------------------------------------------------------------------------


async def _serve(gateway: Gateway, request: Request, parse: _Parse) -> Response:
    """A request the gatekeeper let through (``gateway.gatekeeper``): tenant known, counted."""
    seen = Seen.take(request)
    try:
        assert seen.tenant is not None
        generation_request = await _parsed_body(gateway, request, seen.tenant, parse)
        run = await _admit(gateway, request, seen, generation_request)
    except BaseException as exc:
        refused(gateway, seen, exc)
        if isinstance(exc, CallerDisconnected | ClientDisconnect):
            return caller_disconnected_response(request, exc)
        raise
    gateway.requests_in_flight.add(run.generation)
    if gateway.is_ending:  # the grace period ended while this one was being admitted
        run.generation.interrupt(ShuttingDown("the gateway is shutting down; retry"))
    events = run.generation.events()
    error: BaseException | None = None
    is_streaming = False
    try:
        if generation_request.stream:
            # Wait for the first event before answering, so queueing errors keep their status.
            first = await until_disconnected(request, anext(events))
            is_streaming = True  # the stream ends the run (``_sse``, ``_close``)
            return _DisconnectAwareStream(
                _sse(gateway, run, first, events),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": run.completion_id},
                on_close=partial(_close, gateway, run, events),
                keepalive_s=gateway.config.gateway.sse_keepalive_s,
            )
        answer = await until_disconnected(request, _collect(events))
    except BaseException as exc:
        error = exc
        if isinstance(exc, CallerDisconnected):
            return caller_disconnected_response(request, exc)
        if isinstance(exc, FairgateError):
            raise public_error(exc, run.completion_id) from None
        raise
    finally:
        if not is_streaming:
            try:
                await events.aclose()  # the generation's clean-up: worker accounting, timings
            finally:
                run.is_delivered = error is None
                _finish(gateway, run, error)
    return _complete_response(run, answer)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``max_bytes``: from its
    ``Content-Length`` before any of it is read, else while it streams in."""
    too_large = RequestTooLarge(f"the request body is larger than {max_bytes} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _is_large(request: Request) -> bool:
    """A body over ``LARGE_BODY_BYTES``, or one of unknown size."""
    length = request.headers.get("content-length")
    return length is None or not length.isdigit() or int(length) > LARGE_BODY_BYTES


async def _parsed_body(
    gateway: Gateway, request: Request, tenant: Tenant, parse: _Parse
) -> GenerationRequest:
    """The body read and decoded; a large one in its tenant's turn (``gateway.prompts``), since
    both hold the event loop for milliseconds per megabyte."""
    max_bytes = gateway.config.gateway.max_body_bytes
    if not _is_large(request):
        return parse(await _read_body(request, max_bytes))
    async with gateway.body_turns.turn(tenant.tenant_id):
        return parse(await _read_body(request, max_bytes))


async def _admit(
    gateway: Gateway,
    request: Request,
    seen: Seen,
    body: GenerationRequest,
) -> _Run:
    tenant = seen.tenant
    assert tenant is not None
    gateway.dispatcher.check_can_serve()
    if body.model not in _served_models(gateway):
        raise ModelNotFound(
            f"model {body.model!r} is not served here; GET /v1/models lists the served models",
            param="model",
        )
    # Named after the model once it is one we serve: a client's model string is its own text.
    span = seen.span = server_span(seen, body)
    slo_class = seen.slo_class = _slo_class(gateway, request, tenant, body)
    # Cheap refusals first: a tenant whose queue is full or standing is told so before its
    # prompt costs any tokenizing.
    gateway.dispatcher.check_backlog(tenant.tenant_id, class_rank(gateway, slo_class))
    max_model_len = gateway.registry.max_model_len
    encoding = gateway.prompts.encode(tenant.tenant_id, body, max_model_len)
    # A long prompt's wait (its tenant's turn, a thread) ends if its client leaves.
    if is_long_prompt(body):
        prompt_token_ids = await until_disconnected(request, encoding)
    else:
        prompt_token_ids = await encoding
    prompt_param = "messages" if body.kind == "chat" else "prompt"
    if len(prompt_token_ids) >= max_model_len:
        raise ContextLengthExceeded(
            f"the prompt has {len(prompt_token_ids)} tokens; this model's context length is "
            f"{max_model_len}",
            param=prompt_param,
        )
    max_tokens = body.max_tokens or max_model_len - len(prompt_token_ids)
    if len(prompt_token_ids) + max_tokens > max_model_len:
        raise ContextLengthExceeded(
            f"this model's context length is {max_model_len} tokens; the prompt has "
            f"{len(prompt_token_ids)} and max_tokens asks for {max_tokens} more",
            param="max_tokens",
        )
    admission = await gateway.quotas.admit(
        tenant, estimated_tokens=len(prompt_token_ids) + max_tokens
    )
    completion_id = new_completion_id(body.kind)
    if admission.demoted:
        slo_class = seen.slo_class = gateway.config.lowest_class.name
    gateway.metrics.tenant_seen(tenant.tenant_id, tenant.name)
    if span is not None:
        span.set_attributes(
            {
                "gen_ai.response.id": completion_id,
                "gen_ai.usage.input_tokens": len(prompt_token_ids),
                "fairgate.slo_class": slo_class,
            }
        )
    cache_salt = _cache_salt(tenant)
    queued = QueuedRequest(
        request_id=completion_id,
        tenant_id=tenant.tenant_id,
        slo_class=slo_class,
        weight=tenant.weight * (DEMOTED_WEIGHT_FACTOR if admission.demoted else 1.0),
        arrival=seen.received,
        num_prompt_tokens=len(prompt_token_ids),
        max_tokens=max_tokens,
        prompt_token_ids=prompt_token_ids,
        demoted=admission.demoted,
        cache_salt=cache_salt,
        rank=class_rank(gateway, slo_class),
        tpot_target_s=(
            gateway.config.slo_class(slo_class) or gateway.config.lowest_class
        ).tpot_target_s,
    )
    sampling = SamplingSpec(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
    )
    generation = Generation(
        queued,
        prompt_token_ids,
        sampling,
        body.stop,
        tokenizer=gateway.tokenizer,
        dispatcher=gateway.dispatcher,
        registry=gateway.registry,
        cache_salt=cache_salt,
        received=seen.received,
        flush_interval_s=0.0 if body.stream else gateway.config.gateway.unstreamed_flush_s,
        span=span,
        metrics=gateway.metrics,
    )
    return _Run(body, tenant, slo_class, admission, generation, completion_id, int(time.time()))


def _slo_class(gateway: Gateway, request: Request, tenant: Tenant, body: GenerationRequest) -> str:
    name = request.headers.get(SLO_CLASS_HEADER) or body.slo_class or tenant.default_class
    if gateway.config.slo_class(name) is None:
        known = [c.name for c in gateway.config.slo_classes]
        raise ClientError(f"unknown SLO class {name!r}; known: {known}", param="fairgate_class")
    if name not in tenant.allowed_classes:
        raise ClassNotAllowed(
            f"this tenant may not use SLO class {name!r} (allowed: {tenant.allowed_classes})",
            param="fairgate_class",
        )
    return name


def _cache_salt(tenant: Tenant) -> bytes:
    """Scopes the workers' prefix cache to the tenant (chosen here, never by a client)."""
    return hashlib.sha256(b"fairgate-prefix-cache\0" + tenant.tenant_id.encode()).digest()[:16]


async def _collect(events: AsyncGenerator[str | Finished]) -> tuple[str, Finished]:
    parts: list[str] = []
    async for event in events:
        if isinstance(event, Finished):
            return "".join(parts), event
        parts.append(event)
    raise FairgateError("the request ended without a result")


# ---- answers --------------------------------------------------------------------------------


def _complete_response(run: _Run, answer: tuple[str, Finished]) -> Response:
    text, finished = answer
    usage = finished.usage
    if run.request.kind == "chat":
        body: Any = ChatCompletion.of(
            run.completion_id,
            run.created,
            run.request.model,
            text,
            finished.finish_reason,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
        )
    else:
        body = Completion.of(
            run.completion_id,
            run.created,
            run.request.model,
            text,
            finished.finish_reason,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
        )
    response = json_response(body)
    response.headers["server-timing"] = _server_timing(run)
    response.headers["x-request-id"] = run.completion_id
    return response


def _server_timing(run: _Run) -> str:
    timing = run.generation.timing
    end = timing.finished or time.monotonic()
    total_ms = (end - timing.received) * 1e3
    queue_ms = ((timing.placed or end) - timing.received) * 1e3
    worker_ms = timing.worker_s * 1e3
    return f"queue;dur={queue_ms:.3f}, worker;dur={worker_ms:.3f}, total;dur={total_ms:.3f}"


async def _sse(
    gateway: Gateway, run: _Run, first: str | Finished, events: AsyncGenerator[str | Finished]
) -> AsyncGenerator[bytes]:
    chunk = ChatCompletionChunk if run.request.kind == "chat" else CompletionChunk
    args = (run.completion_id, run.created, run.request.model)
    usage = run.generation.usage
    error: BaseException | None = None
    try:
        if run.request.kind == "chat":
            yield ChatCompletionChunk.role(*args)
        event: str | Finished = first
        while True:
            if isinstance(event, Finished):
                run.is_delivered = True  # every text event went out before this one
                yield chunk.finish(*args, event.finish_reason)
                if run.request.include_usage:
                    yield chunk.usage_only(
                        *args, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
                    )
                break
            yield chunk.text(*args, event)
            # Resumed: the server took the event, so the client has the text of every token
            # generated so far (the generation waits while we send).
            run.num_delivered_tokens = usage.completion_tokens
            event = await anext(events)
        yield SSE_DONE
    except FairgateError as exc:
        error = exc
        public = public_error(exc, run.completion_id)
        yield b"data: " + msgspec.json.encode(openai_error_body(public)) + b"\n\n"
    except BaseException as exc:
        error = exc
        raise
    finally:
        _finish(gateway, run, error)
        await events.aclose()


async def _close(gateway: Gateway, run: _Run, events: AsyncGenerator[str | Finished]) -> None:
    """After a streamed answer, however it ended (even before its body began)."""
    await events.aclose()
    _finish(gateway, run, CallerDisconnected("the client disconnected"))


def _billed(run: _Run) -> TokenUsage:
    """What the request is billed (the README's rule): all of it when the whole answer was
    delivered; after a failure or a client that left, its prompt and the completion tokens that
    reached the client, and nothing when none did."""
    usage = run.generation.usage
    if run.is_delivered:
        return usage
    if run.num_delivered_tokens == 0:
        return TokenUsage()
    return TokenUsage(usage.prompt_tokens, usage.cached_tokens, run.num_delivered_tokens)


def _work_done(generation: Generation) -> int:
    """The tokens a request cost the workers, whoever received them: its prompt once computed
    and every token generated. Quotas count this, so a client that hangs up before its answer
    (billed nothing) does not get around its rate limits or budget."""
    usage = generation.usage
    prompt_tokens = usage.prompt_tokens if generation.timing.first_token is not None else 0
    return prompt_tokens + usage.completion_tokens


def _finish(gateway: Gateway, run: _Run, error: BaseException | None) -> None:
    """Settle the quota with the work done, record the usage billed, count it in the metrics,
    end its span and log its one line. Only the first call counts."""
    if run.is_finished:
        return
    run.is_finished = True
    generation = run.generation
    gateway.requests_in_flight.discard(generation)
    gateway.load_guard.leave(run.tenant.tenant_id)
    if generation.interrupted is not None and outcome_of(error) == CLIENT_DISCONNECTED:
        error = generation.interrupted  # the gateway cut it: that is its outcome
    usage = _billed(run)
    gateway.quotas.settle(run.admission, actual_tokens=_work_done(generation))
    if usage.total_tokens:
        gateway.usage.add(
            UsageDelta(
                tenant_id=run.tenant.tenant_id,
                at=time.time(),
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens,
                completion_tokens=usage.completion_tokens,
            )
        )
    timing = generation.timing
    now = time.monotonic()
    outcome = outcome_of(error)
    if error is not None and not isinstance(error, ClientError) and outcome != CLIENT_DISCONNECTED:
        # The tenant was told less (``public_error``); this line has the cause, by request id.
        logger.warning("request %s failed: %s", run.completion_id, _error_text(error))
    queue_s = None if timing.placed is None else timing.placed - timing.received
    ttft_s = None if timing.first_token is None else timing.first_token - timing.received
    gateway.metrics.finished(
        RequestRecord(
            tenant=run.tenant.name,
            slo_class=run.slo_class,
            outcome=outcome,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            queue_s=queue_s,
            ttft_s=ttft_s,
            e2e_s=now - timing.received,
            num_preemptions=generation.num_preemptions,
        )
    )
    span = generation.span
    if span is not None and span.is_recording:
        ended: dict[str, AttributeValue] = {
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "fairgate.cached_tokens": usage.cached_tokens,
            "fairgate.preemptions": generation.num_preemptions,
        }
        if generation.finish_reason is not None:
            ended["gen_ai.response.finish_reasons"] = (generation.finish_reason,)
        if run.admission.demoted:
            ended["fairgate.demoted"] = True
        span.set_attributes(ended)
        end_span(span, outcome, error)
    if logger.isEnabledFor(logging.INFO):  # built only when read (benchmarks log warnings)
        fields = {
            "request_id": run.completion_id,
            "tenant": run.tenant.name,
            "slo_class": run.slo_class,
            "outcome": outcome,
            "finish_reason": generation.finish_reason,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
            "completion_tokens": usage.completion_tokens,
            "queue_ms": None if queue_s is None else round(queue_s * 1e3, 1),
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1e3, 1),
            "latency_ms": round((now - timing.received) * 1e3, 1),
            "preemptions": generation.num_preemptions,
            "trace_id": trace_id_of(span),
        }
        logger.info(
            "request %s",
            " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items()),
            extra={"fields": fields},
        )


def _error_text(error: BaseException) -> str:
    if isinstance(error, FairgateError):
        return f"{error.message} ({error.code})"
    return repr(error)


class _DisconnectAwareStream(StreamingResponse):
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
