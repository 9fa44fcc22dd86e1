"""The tenant-facing, OpenAI-compatible routes: ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``.

A request goes: key → tenant (``gateway.gatekeeper``), body → ``GenerationRequest``
(``gateway.openai_requests``), then admission (``gateway.admission``: model, SLO class, the
tenant's backlog, the prompt tokenized and its length checked, quotas reserved), which answers
with a plain ``Admitted`` that the route acts on: it queues a ``Generation``
(``gateway.generation``) and answers with its events (``gateway.openai_responses``). Everything
that can be refused is refused before anything is queued, with OpenAI's error body. Streaming
answers wait for the first token before sending headers, so an error up to then (no worker, no
room) still gets its status; after that, an error is the last ``data:`` event. Whatever happens,
the request ends through ``gateway.settlement``: its quota reservation is settled with the real
usage, the usage ledger gets its record and one log line says how it ended (never its text).

The routes take the parts of the gateway they use (``OpenAIParts``), bound to them when the app
is built (``openai_endpoints``). Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.admin import json_response
from gateway.admission import AdmissionControl, Admitted
from gateway.auth import Authenticator
from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import RateLimited, RequestTooLarge, openai_error_body, public_error
from gateway.gatekeeper import SLO_CLASS_HEADER, Seen, refused, server_span
from gateway.generation import Finished, Generation
from gateway.in_flight import RequestsInFlight
from gateway.metrics import GatewayMetrics
from gateway.model_catalog import ModelCatalog
from gateway.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_chat_request,
    parse_completion_request,
)
from gateway.openai_responses import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelList,
    new_completion_id,
)
from gateway.openapi_document import Endpoint
from gateway.overload import LoadGuard
from gateway.prompts import TenantTurns
from gateway.scheduler import QueuedRequest
from gateway.settlement import Run, Settlement
from gateway.sse_response import DisconnectAwareStream
from gateway.tenants import Tenant
from gateway.workers import WorkerRegistry
from transfer.errors import FairgateError
from transfer.http import CallerDisconnected, caller_disconnected_response, until_disconnected
from transfer.messages import SamplingSpec

__all__ = ["OpenAIParts", "openai_endpoints"]

LARGE_BODY_BYTES = 64 << 10  # read and decoded one at a time per tenant

_Parse = Callable[[bytes], GenerationRequest]  # a route's body parser


@dataclass(frozen=True, slots=True)
class OpenAIParts:
    """What the OpenAI routes use of the gateway."""

    config: Config  # body limit, flush and keep-alive intervals
    auth: Authenticator  # GET /v1/models (the generation routes' keys: the gatekeeper's)
    admission: AdmissionControl
    dispatcher: Dispatcher  # where a generation waits for its workers
    registry: WorkerRegistry
    catalog: ModelCatalog  # GET /v1/models
    body_turns: TenantTurns  # a tenant's large bodies, one at a time
    in_flight: RequestsInFlight
    settlement: Settlement  # how each request admitted ends
    load_guard: LoadGuard  # the gatekeeper counted the request in: out when it is refused
    metrics: GatewayMetrics


def openai_endpoints(parts: OpenAIParts) -> list[Endpoint]:
    return [
        Endpoint(
            "POST",
            "/v1/chat/completions",
            partial(_serve, parts, parse_chat_request),
            "Create a chat completion",
            "openai",
            request_body=ChatCompletionRequest,
            response=ChatCompletion,
            streams=ChatCompletionChunk,
            errors=(400, 401, 403, 404, 413, 429, 503),
        ),
        Endpoint(
            "POST",
            "/v1/completions",
            partial(_serve, parts, parse_completion_request),
            "Create a completion",
            "openai",
            request_body=CompletionRequest,
            response=Completion,
            streams=CompletionChunk,
            errors=(400, 401, 403, 404, 413, 429, 503),
        ),
        Endpoint(
            "GET",
            "/v1/models",
            partial(_models, parts),
            "List the served models",
            "openai",
            response=ModelList,
            errors=(401, 403),
        ),
    ]


async def _models(parts: OpenAIParts, request: Request) -> Response:
    """The models and aliases the tenant may use, each with its model's context length."""
    _, tenant = await parts.auth.tenant(request)
    names = parts.catalog.names(tenant.allowed_models)
    return json_response(
        ModelList.of([(n.name, n.model_id, _context_length(parts, n.model_id)) for n in names])
    )


def _context_length(parts: OpenAIParts, model_id: str) -> int:
    pool = parts.registry.pools.get(model_id)
    ready = parts.registry.max_model_len(model_id)
    return ready or (0 if pool is None else pool.reference.max_model_len)


# ---- one request ---------------------------------------------------------------------------


async def _serve(parts: OpenAIParts, parse: _Parse, request: Request) -> Response:
    """A request the gatekeeper let through (``gateway.gatekeeper``): tenant known, counted."""
    seen = Seen.take(request)
    try:
        assert seen.tenant is not None
        generation_request = await _parsed_body(parts, request, seen.tenant, parse)
        run = await _admit(parts, request, seen, generation_request)
    except BaseException as exc:
        if isinstance(exc, RateLimited):
            seen.limits_known(exc.rate_limit)  # the limit that refused it, in its headers
        refused(parts.load_guard, parts.metrics, seen, exc)
        if isinstance(exc, CallerDisconnected | ClientDisconnect):
            return caller_disconnected_response(request, exc)
        raise
    parts.in_flight.admitted(run.generation)
    events = run.generation.events()
    error: BaseException | None = None
    is_streaming = False
    try:
        if generation_request.stream:
            # Wait for the first event before answering, so queueing errors keep their status.
            first = await until_disconnected(request, anext(events))
            is_streaming = True  # the stream ends the run (``_sse``, ``_close``)
            return DisconnectAwareStream(
                _sse(parts, run, first, events),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": run.completion_id},
                on_close=partial(_close, parts, run, events),
                keepalive_s=parts.config.gateway.sse_keepalive_s,
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
                parts.settlement.finish(run, error)
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
    parts: OpenAIParts, request: Request, tenant: Tenant, parse: _Parse
) -> GenerationRequest:
    """The body read and decoded; a large one in its tenant's turn (``gateway.prompts``), since
    both hold the event loop for milliseconds per megabyte."""
    max_bytes = parts.config.gateway.max_body_bytes
    if not _is_large(request):
        return parse(await _read_body(request, max_bytes))
    async with parts.body_turns.turn(tenant.tenant_id):
        return parse(await _read_body(request, max_bytes))


async def _admit(parts: OpenAIParts, request: Request, seen: Seen, body: GenerationRequest) -> Run:
    """Admission's steps, with what each establishes noted in the request's ``Seen``; then the
    request queued as admission decided."""
    tenant = seen.tenant
    assert tenant is not None
    admission = parts.admission
    model = admission.check_servable(tenant, body)
    seen.model_id = model.model_id
    # Named after the model once it is one we serve: a client's model string is its own text.
    seen.span = server_span(seen, body, model.model_id)
    seen.slo_class = admission.slo_class(tenant, request.headers.get(SLO_CLASS_HEADER), body)
    # A long prompt's wait (its tenant's turn, a thread) ends if its client leaves.
    admitted = await admission.admit(
        tenant,
        body,
        seen.slo_class,
        model,
        wait_long=lambda work: until_disconnected(request, work),
        key=seen.key,
    )
    seen.limits_known(admitted.quota.rate_limit)  # its x-ratelimit-* headers
    seen.slo_class = admitted.slo_class  # the lowest class when demoted
    return _start(parts, seen, tenant, body, admitted)


def _start(
    parts: OpenAIParts, seen: Seen, tenant: Tenant, body: GenerationRequest, admitted: Admitted
) -> Run:
    """The generation of an admitted request, queued once its events are iterated."""
    prompt_token_ids = admitted.prompt_token_ids
    completion_id = new_completion_id(body.kind)
    parts.metrics.tenant_seen(tenant.tenant_id, tenant.name)
    span = seen.span
    if span is not None:
        span.set_attributes(
            {
                "gen_ai.response.id": completion_id,
                "gen_ai.usage.input_tokens": len(prompt_token_ids),
                "fairgate.slo_class": admitted.slo_class,
            }
        )
    queued = QueuedRequest(
        request_id=completion_id,
        tenant_id=tenant.tenant_id,
        slo_class=admitted.slo_class,
        weight=admitted.weight,
        arrival=seen.received,
        num_prompt_tokens=len(prompt_token_ids),
        max_tokens=admitted.max_tokens,
        prompt_token_ids=prompt_token_ids,
        demoted=admitted.is_demoted,
        cache_salt=admitted.cache_salt,
        rank=admitted.rank,
        tpot_target_s=admitted.tpot_target_s,
        model=admitted.model.model_id,
        cost_factor=admitted.cost_factor,
    )
    sampling = SamplingSpec(
        max_tokens=admitted.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    generation = Generation(
        queued,
        prompt_token_ids,
        sampling,
        body.stop,
        tokenizer=admitted.tokenizer,
        dispatcher=parts.dispatcher,
        registry=parts.registry,
        cache_salt=admitted.cache_salt,
        received=seen.received,
        flush_interval_s=0.0 if body.stream else parts.config.gateway.unstreamed_flush_s,
        span=span,
        metrics=parts.metrics,
    )
    return Run(body, tenant, admitted, generation, completion_id, int(time.time()))


async def _collect(events: AsyncGenerator[str | Finished]) -> tuple[str, Finished]:
    texts: list[str] = []
    async for event in events:
        if isinstance(event, Finished):
            return "".join(texts), event
        texts.append(event)
    raise FairgateError("the request ended without a result")


# ---- answers --------------------------------------------------------------------------------


def _complete_response(run: Run, answer: tuple[str, Finished]) -> Response:
    text, finished = answer
    usage = finished.usage
    answer_type = ChatCompletion if run.request.kind == "chat" else Completion
    body = answer_type.of(
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


def _server_timing(run: Run) -> str:
    timing = run.generation.timing
    end = timing.finished or time.monotonic()
    total_ms = (end - timing.received) * 1e3
    queue_ms = ((timing.placed or end) - timing.received) * 1e3
    worker_ms = timing.worker_s * 1e3
    return f"queue;dur={queue_ms:.3f}, worker;dur={worker_ms:.3f}, total;dur={total_ms:.3f}"


async def _sse(
    parts: OpenAIParts,
    run: Run,
    first: str | Finished,
    events: AsyncGenerator[str | Finished],
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
        parts.settlement.finish(run, error)
        await events.aclose()


async def _close(parts: OpenAIParts, run: Run, events: AsyncGenerator[str | Finished]) -> None:
    """After a streamed answer, however it ended (even before its body began)."""
    await events.aclose()
    parts.settlement.finish(run, CallerDisconnected("the client disconnected"))
