"""The first look at a generation request (``POST /v1/chat/completions``, ``/v1/completions``):
the cheap refusals, made before Starlette routes it and before its body is read.

Under overload most requests are refused, so a refusal must cost far less than serving: made
here, in the app's middleware, it is about a third of what the same answer costs from the route
(measured: 0.03 against 0.09–0.12 ms of the gateway's CPU on this project's 2-core machine). In
order:

1. the gateway is stopping: 503 ``shutting_down``;
2. the key: 401 ``invalid_api_key`` / 403 ``key_revoked``;
3. the gateway itself is overloaded and this tenant holds its share of it: 503 ``overloaded``
   (``gateway.overload``);
4. the tenant's queue for workers is full, or (where one model is served) standing in the class
   its header names (else its default class): 429 ``queue_full`` (``gateway.dispatch``).

Every answer to a request whose key is known, these refusals and the route's answers alike
(streams included, 429s above all), carries OpenAI's ``x-ratelimit-*`` headers
(``gateway.rate_limit_headers``): from the quota the route reserved or was refused by, else from
a look at the quota state that reserves nothing (``QuotaManager.peek``). They are added as the
answer's headers go out, in this middleware.

What passes goes on to the route (``gateway.openai_routes``) with its ``Seen``, the record of what
is known of it so far, in ``scope["state"]``. The route takes it over; a request refused here or
there is counted in the metrics and its span ended by ``refused``. The gatekeeper takes the parts
of the gateway it uses (``GatekeeperParts``). Torch-free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import anyio
from opentelemetry.util.types import AttributeValue
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.admin import json_response
from gateway.auth import Authenticator
from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import ShuttingDown, openai_error_body, retry_after_header
from gateway.in_flight import RequestsInFlight
from gateway.metrics import CLIENT_DISCONNECTED, UNAUTHENTICATED, GatewayMetrics
from gateway.openai_requests import GenerationRequest
from gateway.overload import LoadGuard, Overloaded
from gateway.quotas import QuotaManager
from gateway.quotas_backend import NO_RATE_LIMIT, RateLimitState
from gateway.rate_limit_headers import rate_limit_headers
from gateway.tenants import ApiKey, Tenant
from transfer.errors import FairgateError
from transfer.http import CallerDisconnected
from transfer.telemetry import SpanRecord, is_tracing, start_span

__all__ = [
    "GENERATION_ROUTES",
    "SLO_CLASS_HEADER",
    "Gatekeeper",
    "GatekeeperParts",
    "Seen",
    "class_rank",
    "end_span",
    "error_response",
    "outcome_of",
    "refused",
    "server_span",
]

SLO_CLASS_HEADER = "x-fairgate-class"
# The routes whose requests pass here, with their ``gen_ai.operation.name``.
GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}
_SEEN = "fairgate.seen"  # the key of a request's ``Seen`` in its ``scope["state"]``

logger = logging.getLogger(__name__)
# The longest an answer waits for its rate-limit headers when nothing was reserved (a Redis
# round trip; the quota backend's own timeout is longer).
PEEK_TIMEOUT_S = 0.5
# An answer that reserved nothing reuses the state an answer of the same key showed this
# recently rather than looking again: a flood of refused requests costs the shared quota state
# at most one look per key per this long.
RECENT_LIMITS_S = 1.0
MAX_RECENT_LIMITS = 10_000  # keys remembered (least recently shown dropped first)


@dataclass(slots=True)
class Seen:
    """What is known of a request while it is admitted: for the metrics, and for its span
    (made once its model is known, or when it is refused, from ``received_ns`` on)."""

    received: float  # monotonic
    received_ns: int  # 0 while tracing is off
    operation: str  # gen_ai.operation.name
    tenant: Tenant | None = None
    key: ApiKey | None = None  # the tenant's key the request came with
    slo_class: str = ""
    model_id: str = ""  # the model its name means, once resolved
    span: SpanRecord | None = None
    is_counted: bool = False  # in ``gateway.load_guard``'s count of requests
    is_taken: bool = False  # the route took it over (``take``)
    # What the quota reserved for it, or the limit that refused it (its x-ratelimit-* headers),
    # and when (monotonic): its resets count down from then until the headers go out.
    rate_limit: RateLimitState | None = None
    rate_limit_at: float = 0.0

    def limits_known(self, state: RateLimitState | None) -> None:
        if state is not None:
            self.rate_limit, self.rate_limit_at = state, time.monotonic()

    @classmethod
    def take(cls, request: Request) -> Seen:
        """The route's side: the request's record, now the route's to finish."""
        seen: Seen = request.scope["state"][_SEEN]
        seen.is_taken = True
        return seen


@dataclass(frozen=True, slots=True)
class GatekeeperParts:
    """What the gatekeeper uses of the gateway."""

    config: Config  # the SLO classes
    in_flight: RequestsInFlight  # whether the gateway drains
    auth: Authenticator
    load_guard: LoadGuard
    dispatcher: Dispatcher  # the tenants' queues
    metrics: GatewayMetrics
    quotas: QuotaManager  # the rate-limit headers of answers that reserved nothing


class Gatekeeper:
    """ASGI middleware in front of the routes: see the module docstring."""

    def __init__(self, app: ASGIApp, parts: GatekeeperParts) -> None:
        self.app = app
        self.parts = parts
        # (tenant id, key id, model id) -> the last rate-limit state an answer showed, and when.
        self._recent: OrderedDict[tuple[str, str, str], tuple[RateLimitState, float]] = (
            OrderedDict()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = None
        if scope["type"] == "http" and scope["method"] == "POST":
            operation = GENERATION_ROUTES.get(scope["path"])
        if operation is None:
            await self.app(scope, receive, send)
            return
        seen = Seen(time.monotonic(), time.time_ns() if is_tracing() else 0, operation)

        may_look = True

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                limits = await self._limits(seen, may_look=may_look)
                extra = [(k.encode(), v.encode()) for k, v in limits.items()]
                if extra:
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            await self._check(seen, Request(scope))
        except FairgateError as exc:
            refused(self.parts.load_guard, self.parts.metrics, seen, exc)
            # Shedding load or stopping: no wait for the quota state, only what is known.
            may_look = not isinstance(exc, Overloaded | ShuttingDown)
            await error_response(exc)(scope, receive, send_with_limits)
            return
        scope.setdefault("state", {})[_SEEN] = seen
        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            if not seen.is_taken:  # the route never ran (its body never came): not counted
                never_came = CallerDisconnected("the request never reached us")
                refused(self.parts.load_guard, self.parts.metrics, seen, never_came)

    async def _check(self, seen: Seen, request: Request) -> None:
        parts = self.parts
        if parts.in_flight.is_draining:
            raise ShuttingDown("the gateway is shutting down; try another replica or retry")
        key, tenant = await parts.auth.tenant(request)
        seen.tenant, seen.key = tenant, key
        parts.metrics.tenant_seen(tenant.tenant_id, tenant.name)  # its series by its name
        parts.load_guard.enter(tenant.tenant_id, tenant.weight)
        seen.is_counted = True
        # The body may name another class: the route checks that one. The model is in the body
        # too: a standing queue refuses here, unread, only where one model is served (with
        # several, the tenant's queue for one says nothing of its request for another; the
        # route checks the model's, after reading the body and before tokenizing it).
        slo_class = request.headers.get(SLO_CLASS_HEADER) or tenant.default_class
        models = parts.dispatcher.registry.model_ids()
        only_model = models[0] if len(models) == 1 else None
        rank = class_rank(parts.config, slo_class)
        parts.dispatcher.check_backlog(tenant.tenant_id, rank, only_model)

    async def _limits(self, seen: Seen, *, may_look: bool) -> dict[str, str]:
        """The request's x-ratelimit-* headers: what its quota reserved or was refused by, else
        what an answer of the same key showed within ``RECENT_LIMITS_S``, else (``may_look``)
        a look that reserves nothing. None without a known key, or when the state cannot be
        read in time: the answer goes out without them rather than waiting or failing. Resets
        count down from when the state was read."""
        tenant, key = seen.tenant, seen.key
        if tenant is None or key is None:
            return {}
        now = time.monotonic()
        recent_key = (tenant.tenant_id, key.key_id, seen.model_id)
        if seen.rate_limit is not None:
            state, at = seen.rate_limit, seen.rate_limit_at
        else:
            recent = self._recent.get(recent_key)
            if recent is not None and now - recent[1] <= RECENT_LIMITS_S:
                state, at = recent
            elif may_look:
                looked = await self._look(seen)
                if looked is None:
                    return {}
                state, at = looked, time.monotonic()
            else:
                return {}
        self._recent[recent_key] = (state, at)
        self._recent.move_to_end(recent_key)
        if len(self._recent) > MAX_RECENT_LIMITS:
            self._recent.popitem(last=False)
        return rate_limit_headers(_aged(state, time.monotonic() - at))

    async def _look(self, seen: Seen) -> RateLimitState | None:
        tenant, key = seen.tenant, seen.key
        assert tenant is not None and key is not None
        model_id = seen.model_id
        model_quotas = tenant.model_quotas.get(model_id) if model_id else None
        key_quotas = key.own_quotas()
        if not any(
            q is not None and (q.requests_per_minute is not None or q.tokens_per_minute is not None)
            for q in (tenant.quotas, model_quotas, key_quotas)
        ):
            return NO_RATE_LIMIT  # no per-minute limit anywhere: nothing to look at
        try:
            return await asyncio.wait_for(
                self.parts.quotas.peek(
                    tenant,
                    model_id=model_id,
                    model_quotas=model_quotas,
                    key_id=key.key_id,
                    key_quotas=key_quotas,
                ),
                PEEK_TIMEOUT_S,
            )
        except (FairgateError, TimeoutError) as exc:
            logger.debug("no rate-limit headers for tenant %s: %s", tenant.tenant_id, exc)
            return None


def _aged(state: RateLimitState, elapsed_s: float) -> RateLimitState:
    """``state`` as it stands ``elapsed_s`` later: its resets that much nearer (its remaining
    counts are what they were: the window's other requests are unknown here)."""
    if elapsed_s <= 0:
        return state
    return dataclasses.replace(
        state,
        reset_requests_s=None
        if state.reset_requests_s is None
        else max(0.0, state.reset_requests_s - elapsed_s),
        reset_tokens_s=None
        if state.reset_tokens_s is None
        else max(0.0, state.reset_tokens_s - elapsed_s),
    )


def error_response(error: FairgateError) -> Response:
    """OpenAI's error body with the error's status, and ``Retry-After`` when it has one."""
    response = json_response(openai_error_body(error), error.status)
    response.headers.update(retry_after_header(error))
    return response


def class_rank(config: Config, slo_class: str) -> int:
    """The rank of the class a request is served in (an unknown name: the lowest class's; the
    route refuses it)."""
    served_in = config.slo_class(slo_class)
    return (served_in or config.lowest_class).rank


def server_span(
    seen: Seen, body: GenerationRequest | None, model_id: str = ""
) -> SpanRecord | None:
    """The request's span (None while tracing is off), named ``{operation} {model}`` by the
    GenAI conventions (the name the client used); it began when the request arrived.
    ``model_id``: the model that name means (an alias's target), ``gen_ai.response.model``."""
    if not is_tracing():
        return None
    attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": seen.operation}
    if seen.tenant is not None:
        attributes["fairgate.tenant"] = seen.tenant.name
    name = seen.operation
    if body is not None:
        name = f"{seen.operation} {body.model}"
        attributes["gen_ai.request.model"] = body.model
        if body.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = body.max_tokens
    if model_id:
        attributes["gen_ai.response.model"] = model_id
        attributes["fairgate.model"] = model_id
    return start_span(name, attributes, start_time_ns=seen.received_ns)


def refused(
    load_guard: LoadGuard, metrics: GatewayMetrics, seen: Seen, error: BaseException
) -> None:
    """A request refused before it was queued: out of the load guard's count, counted in the
    metrics, its span ended."""
    if seen.is_counted:
        assert seen.tenant is not None
        seen.is_counted = False
        load_guard.leave(seen.tenant.tenant_id)
    reason = outcome_of(error)
    tenant_name = UNAUTHENTICATED if seen.tenant is None else seen.tenant.name
    metrics.rejected(tenant_name, seen.slo_class, reason, seen.model_id)
    span = seen.span or server_span(seen, None)
    if span is not None:
        if isinstance(error, FairgateError):
            span.set_attribute("http.response.status_code", error.status)
        end_span(span, reason, error)


def end_span(span: SpanRecord, outcome: str, error: BaseException | None) -> None:
    """A client that went away is no error of ours: the span says so and ends unset."""
    if outcome == CLIENT_DISCONNECTED:
        span.set_attribute("fairgate.outcome", CLIENT_DISCONNECTED)
        error = None
    span.end(error)


def outcome_of(error: BaseException | None) -> str:
    """How a request ended, for metrics, spans and its log line."""
    if error is None:
        return "ok"
    if isinstance(error, FairgateError):
        return error.code
    if isinstance(
        error,
        asyncio.CancelledError
        | CallerDisconnected
        | ClientDisconnect
        | GeneratorExit
        | anyio.get_cancelled_exc_class(),
    ):
        return CLIENT_DISCONNECTED
    return type(error).__name__
