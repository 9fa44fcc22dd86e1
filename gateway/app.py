"""The gateway process: its parts, wired together, and the Starlette app that serves them.

    Gateway
    ├── store       GatewayStore              tenants, keys, usage ledger: SQLite or PostgreSQL
    ├── auth        Authenticator             bearer key → tenant (cached), admin token
    ├── quotas      QuotaManager              reserve at admission, settle at finish (in
    │                                         memory, or in Redis with leases)
    ├── registry    WorkerRegistry            workers: membership, state, load, hung ones
    ├── policy      SchedulingPolicy          the queue and placement decisions
    ├── dispatcher  Dispatcher                carries decisions out, requests wait there
    ├── usage       UsageRecorder             finished requests' usage, batched to the store
    ├── catalog     ModelCatalog              a request's model name → the model (ids, aliases)
    ├── costs       CostBook                  each model's cost factor: admin's or measured
    ├── tokenizers  TokenizerCache            one per tokenizer the models' workers announce
    ├── prompts     PromptEncoder             prompts tokenized off the loop, per tenant
    ├── load_guard  LoadGuard                 the loop's lag; who is refused when it lags
    ├── in_flight   RequestsInFlight          admitted requests; how far a shutdown has gone
    ├── metrics     GatewayMetrics            what /metrics and the dashboard show
    └── fairness    FairnessHistory           per-tenant service over the last hour: the
                                              dashboard's charts, the fairness receipts

Routes: ``gateway.openai_routes`` (OpenAI-compatible, tenant keys; the cheap refusals of a
generation request come first, in ``gateway.gatekeeper``'s middleware, which also adds the
``x-ratelimit-*`` headers), ``gateway.admin`` and its siblings ``admin_keys``, ``admin_models``,
``admin_audit``, ``admin_fairness`` (admin token; every change audited, ``gateway.audit``; and
the workers' self-registration, with the registration token), ``/healthz``, ``/readyz``,
``/openapi.json`` (``gateway.openapi_document``), ``/metrics``, ``/dashboard``
(``gateway.dashboard``: its own login form and session). Each takes the parts
it uses, not the ``Gateway``. Some parts exist only once the gateway has started (the store, the
tokenizer: they need the loop or the disk), so the app that serves them is built in the
lifespan, right after ``Gateway.start`` and before the server takes its first request
(``GatewayApp``). One lifespan starts and stops everything. The workers are reached through
``gateway.worker_transport`` (HTTP unless the ``Gateway`` is given another transport).

A worker the registry finds lost (dead, hung, restarted, removed) is handed to the dispatcher
(``Dispatcher.worker_lost``), which stops the requests running there so that they move on.

Stopping (SIGTERM): the server stops taking connections and requests, ``/readyz`` says
``draining``, and ``Gateway.drain`` lets the requests in flight finish for up to
``gateway.shutdown_grace_s``; what is still running then ends with 503 ``shutting_down`` (an
error event on a stream), billed what its client received. Then the lifespan ends: usage is
written, tracing flushed. Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from engine.model_store import resolve_model, tokenizer_path
from engine.process_events import emit_event
from engine.process_heap import freeze_startup_heap
from engine.tokenizer import Tokenizer
from gateway.admin import (
    AdminParts,
    add_other_successes,
    admin_endpoints,
    json_response,
    registration_routes,
    routing_path,
)
from gateway.admin_audit import audit_endpoints
from gateway.admin_fairness import FairnessParts, fairness_endpoints, gap_bound
from gateway.admin_keys import key_admin_endpoints
from gateway.admin_models import (
    MODEL_ADMIN_OTHER_SUCCESSES,
    ModelAdminParts,
    model_admin_endpoints,
    model_routing_path,
)
from gateway.admission import AdmissionControl
from gateway.auth import Authenticator
from gateway.config import Config
from gateway.dashboard import DashboardParts, dashboard_routes
from gateway.discovery import DnsDiscovery
from gateway.dispatch import Dispatcher
from gateway.errors import ClientError, MethodNotAllowed, NotFound, ShuttingDown
from gateway.fairness_history import FairnessHistory
from gateway.gatekeeper import Gatekeeper, GatekeeperParts, error_response
from gateway.in_flight import RequestsInFlight
from gateway.metrics import GatewayMetrics, WorkerSnapshot
from gateway.model_catalog import ModelCatalog
from gateway.model_costs import CostBook, ModelSpeed
from gateway.openai_routes import OpenAIParts, openai_endpoints
from gateway.openapi_document import Deployment, Endpoint, Handler, openapi_document, routes_of
from gateway.overload import LoadGuard
from gateway.policies import make_per_model_policy
from gateway.policies.per_model import PerModelPolicy
from gateway.prompts import PromptEncoder, TenantTurns
from gateway.quotas import QuotaManager
from gateway.quotas_memory import MemoryQuotaBackend
from gateway.quotas_redis import RedisQuotaBackend
from gateway.replica_sync import AdminChange, ReplicaSync
from gateway.settlement import Settlement
from gateway.stores import GatewayStore, open_store
from gateway.tokenizers import TokenizerCache
from gateway.usage import UsageRecorder
from gateway.worker_transport import WorkerTransport
from gateway.workers import WorkerHandle, WorkerRegistry
from transfer.errors import FairgateError
from transfer.http import (
    CallerDisconnected,
    caller_disconnected_response,
    http_server,
    serve_on,
)
from transfer.telemetry import setup_tracing, shutdown_tracing

__all__ = ["Gateway", "GatewayApp", "create_app", "policy_from_config", "run_gateway"]

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
METRICS_SAMPLE_S = 1.0
COST_MEASURE_S = 10.0  # how often the models' cost factors take the workers' speeds
# After the grace period: how long the requests ended then have to send their error.
DRAIN_END_S = 5.0


def policy_from_config(config: Config) -> PerModelPolicy:
    """The ``[scheduler]`` section's policy, one per model's pool, with the SLO classes
    (``gateway.policies.per_model``). Its KV block size is the workers' (``Dispatcher.submit``
    tells it)."""
    name = config.scheduler.policy
    if name == "auto":
        # Several prefill workers, or a pool found by DNS (which may grow): D²LPM.
        is_pool = len(config.gateway.prefill_workers) > 1 or bool(config.gateway.prefill_dns)
        name = "d2lpm" if is_pool else "dlpm"
    return make_per_model_policy(name, config.scheduler, config.slo_classes)


@dataclass(frozen=True, slots=True)
class _Started:
    """The parts that exist only once the gateway started (they need the loop or the disk)."""

    store: GatewayStore
    auth: Authenticator
    quotas: QuotaManager
    usage: UsageRecorder
    tokenizer: Tokenizer  # the gateway's own model's (``[model] name``)
    tokenizers: TokenizerCache
    catalog: ModelCatalog
    costs: CostBook
    prompts: PromptEncoder


class Gateway:
    """Everything one gateway process holds. ``start`` / ``stop`` run in the app's lifespan.
    ``transport``: how the workers are called (default: HTTP, ``gateway.worker_transport``)."""

    def __init__(
        self,
        config: Config,
        *,
        transport: WorkerTransport | None = None,
        quota_clock: Callable[[], float] = time.time,
    ) -> None:
        """``transport``: how workers are called (default HTTP); ``quota_clock``: the in-memory
        quota state's clock, seconds since the epoch (tests pass a fake one; with Redis the
        server's time counts)."""
        if not config.gateway.admin_token:
            raise ValueError(
                "no admin token: set gateway.admin_token in the config file or "
                "FAIRGATE_GATEWAY_ADMIN_TOKEN"
            )
        registration_token = config.gateway.registration_token
        if registration_token and len(registration_token) < 16:
            raise ValueError("the registration token must be at least 16 characters")
        self.config = config
        self._quota_clock = quota_clock
        self._parts: _Started | None = None  # from ``start`` on
        self.policy = policy_from_config(config)
        self.registry = WorkerRegistry(
            config.gateway.prefill_workers,
            config.gateway.decode_workers,
            config.gateway.colocated_workers,
            poll_interval_s=config.gateway.poll_interval_s,
            on_change=self._on_workers_changed,
            on_evicted=lambda worker_id, hashes: self.policy.on_evicted(worker_id, hashes),
            on_lost=self._on_worker_lost,
            progress_deadline_steps=config.gateway.progress_deadline_steps,
            min_progress_deadline_s=config.gateway.min_progress_deadline_s,
            unmeasured_progress_deadline_s=config.gateway.unmeasured_progress_deadline_s,
            transport=transport,
        )
        self.dispatcher = Dispatcher(
            self.policy,
            self.registry,
            max_prefill_inflight_tokens=config.scheduler.max_prefill_inflight_tokens,
            max_prefill_inflight_s=config.scheduler.max_prefill_inflight_s,
            queue_timeout_s=config.scheduler.queue_timeout_s,
            max_queued_per_tenant=config.scheduler.max_queued_per_tenant,
            max_queue_wait_s={c.rank: c.queue_wait_limit_s for c in config.slo_classes},
            max_migrations=config.gateway.max_migrations,
        )
        self.load_guard = LoadGuard(config.gateway.max_loop_lag_s)
        self.metrics = GatewayMetrics(
            config.slo_classes,
            self.policy.tenants,
            w_in=config.scheduler.w_in,
            w_out=config.scheduler.w_out,
            window_s=config.telemetry.metrics_window_s,
            requests_in_gateway=self.load_guard.requests_by_tenant,
            loop_lag_s=lambda: self.load_guard.lag_s,
            model_backlogs=self.policy.backlogs,
            cost_factors=self._cost_factors,
            queued_by_class=self._queued_by_class,
            workers=lambda: [WorkerSnapshot.of(h) for h in self.registry.handles],
            policy=self.policy.name,  # how service is measured: as the policy charges it
        )
        # Per-tenant samples over the last hour: the dashboard's charts, the fairness receipts.
        self.fairness = FairnessHistory()
        self._sampler: asyncio.Task[None] | None = None
        self.replica_sync: ReplicaSync | None = None  # with ``replicas.redis_url``
        self.discovery: DnsDiscovery | None = None  # with ``gateway.*_dns``
        self.body_turns = TenantTurns()  # a tenant's large bodies, one at a time
        self.in_flight = RequestsInFlight()  # for ``drain``
        self._reloads: set[asyncio.Task[None]] = set()  # models' settings, tenants' names
        self._reload_lock = asyncio.Lock()

    @property
    def started(self) -> _Started:
        assert self._parts is not None, "the gateway is not started"
        return self._parts

    async def start(self) -> None:
        spec = resolve_model(self.config.model.name, pull=False)
        tokenizer = await asyncio.to_thread(Tokenizer.load, tokenizer_path(spec))
        tokenizers = TokenizerCache()
        tokenizers.add(tokenizer)
        store = await open_store(self.config.store)
        usage = UsageRecorder(store)
        replicas = self.config.replicas
        self._parts = _Started(
            store=store,
            auth=Authenticator(
                store,
                self.config.gateway.admin_token,
                max_age_s=replicas.admin_sync_s if replicas.redis_url else None,
            ),
            quotas=QuotaManager(
                store.total_tokens,
                RedisQuotaBackend(replicas.redis_url, lease_s=replicas.reservation_lease_s)
                if replicas.redis_url
                else MemoryQuotaBackend(clock=self._quota_clock),
                model_budget_usage=store.total_tokens,
                key_budget_usage=store.total_tokens,
            ),
            usage=usage,
            tokenizer=tokenizer,
            tokenizers=tokenizers,
            catalog=ModelCatalog(self.registry.model_ids),
            # The gateway's own model's token is the unit (a single-model gateway: 1.0).
            costs=CostBook(
                spec.model_id, w_in=self.config.scheduler.w_in, w_out=self.config.scheduler.w_out
            ),
            prompts=PromptEncoder(),
        )
        await self.load_model_settings()
        await usage.start()
        await self._parts.quotas.start()  # with Redis: PING (unreachable: no start), renewals
        if replicas.redis_url:
            self.replica_sync = ReplicaSync(
                replicas.redis_url,
                self.policy,
                on_admin_change=self.apply_admin_change,
                sync_interval_s=replicas.sync_interval_s,
                admin_sync_s=replicas.admin_sync_s,
            )
            await self.replica_sync.start()
        gateway = self.config.gateway
        if gateway.prefill_dns or gateway.decode_dns:
            self.discovery = DnsDiscovery(
                self.registry,
                {"prefill": gateway.prefill_dns, "decode": gateway.decode_dns},
                refresh_s=gateway.dns_refresh_s,
            )
            await self.discovery.start()
        await self.registry.start()
        await self.load_guard.start()
        self._sampler = asyncio.create_task(self._sample_forever(), name="metrics-sampler")

    async def _sample_forever(self) -> None:
        """The metrics' windows see who is backlogged about once a second; the models' cost
        factors take the workers' measured speeds every ``COST_MEASURE_S``."""
        num_samples = 0
        replicas = self.config.replicas
        reload_every = max(1, round(replicas.admin_sync_s / METRICS_SAMPLE_S))
        while True:
            await asyncio.sleep(METRICS_SAMPLE_S)
            self.metrics.sample()
            self.fairness.sample(self.metrics.fairness_points())
            num_samples += 1
            if num_samples % round(COST_MEASURE_S / METRICS_SAMPLE_S) == 0:
                self.measure_costs()
            if replicas.redis_url and num_samples % reload_every == 0:
                # Another replica's alias or factor, should its message have been lost.
                await self._reload_model_settings()

    def _cost_factors(self) -> dict[str, float]:
        if self._parts is None:
            return {}
        return {m: self._parts.costs.factor(m) for m in self.registry.model_ids()}

    def _queued_by_class(self) -> dict[tuple[str, str], int]:
        """By (tenant id, class name): its requests waiting for workers, for the metrics."""
        names = {c.rank: c.name for c in self.config.slo_classes}
        return {
            (tenant_id, names.get(rank, str(rank))): count
            for (tenant_id, rank), count in self.dispatcher.waiting_by_rank().items()
        }

    def measure_costs(self) -> None:
        """Each model's pool's ready workers' speeds, into the cost book."""
        costs = self.started.costs
        for model in self.registry.model_ids():
            speeds = [
                ModelSpeed.of(h.load)
                for role in ("prefill", "decode", "colocated")
                for h in self.registry.ready(role, model)
                if h.load is not None
            ]
            costs.measure(model, speeds)

    async def _reload_model_settings(self) -> None:
        """``load_model_settings``, one at a time (a slow one finishing after a newer one would
        bring old aliases back); a failure is logged, and the next reload tries again."""
        async with self._reload_lock:
            try:
                await self.load_model_settings()
            except FairgateError as exc:
                logger.warning("models' aliases and cost factors not reloaded: %s", exc.message)
            except Exception as exc:  # the sampler and the cost measures must go on
                # The type only: a driver's text may hold the store's URL.
                logger.warning("models' aliases and cost factors not reloaded: %s", type(exc))

    async def load_model_settings(self) -> None:
        """The admins' aliases and cost factors, from the store (at start, and when another
        replica changed them)."""
        started = self.started
        aliases = await started.store.list_aliases()
        started.catalog.set_aliases({a.alias: a.model_id for a in aliases})
        settings = await started.store.list_model_settings()
        for model_id in started.costs.admin_models():
            started.costs.set_admin(model_id, None)
        for setting in settings:
            if setting.cost_factor is not None:
                started.costs.set_admin(setting.model_id, setting.cost_factor)

    async def drain(self) -> None:
        """Stop admitting; let the requests in the gateway (admitted, or past the gatekeeper
        and being admitted) finish within ``gateway.shutdown_grace_s``; end the rest (module
        docstring)."""
        self.in_flight.is_draining = True
        guard = self.load_guard
        loop = asyncio.get_running_loop()
        grace_s = self.config.gateway.shutdown_grace_s
        if guard.num_requests:
            logger.info(
                "stopping: %d requests in flight, %g s to finish", guard.num_requests, grace_s
            )
        deadline = loop.time() + grace_s
        while guard.num_requests and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.in_flight.is_ending = True
        if not guard.num_requests:
            return
        logger.warning(
            "stopping: ending %d requests still running after %g s", guard.num_requests, grace_s
        )
        self.in_flight.end_all(
            ShuttingDown("the gateway is shutting down and could not finish this request in time")
        )
        deadline = loop.time() + DRAIN_END_S
        while guard.num_requests and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.in_flight.is_draining = self.in_flight.is_ending = True
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for task in list(self._reloads):
            task.cancel()
        await asyncio.gather(*self._reloads, return_exceptions=True)
        await self.load_guard.stop()
        await self.dispatcher.stop()
        self.dispatcher.fail_all(ShuttingDown("the gateway is shutting down"))
        if self.discovery is not None:
            await self.discovery.stop()
        await self.registry.stop()
        if self.replica_sync is not None:
            await self.replica_sync.stop()
        if self._parts is not None:
            self._parts.prompts.close()
            await self._parts.usage.stop()
            await self._parts.quotas.close()  # stop renewing, land the last settles
            await self._parts.store.close()

    def _on_workers_changed(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop yet (first poll in start)
            self.dispatcher.wake()

    def _on_worker_lost(self, handle: WorkerHandle, error: FairgateError) -> None:
        self.dispatcher.worker_lost(handle, error)

    async def admin_changed(self, change: AdminChange) -> None:
        """An admin route changed a tenant or key: apply it here, then on the other replicas."""
        self.apply_admin_change(change)
        if self.replica_sync is not None:
            try:
                await self.replica_sync.publish_admin(change)
            except RedisError as exc:
                # The change is in the store: the other replicas' key caches expire within
                # ``admin_sync_s`` and their next request of the tenant carries its weight.
                logger.warning("admin change not sent to the other replicas: %r", exc)

    def apply_admin_change(self, change: AdminChange) -> None:
        """Drop what this replica holds of the tenant or key (``gateway.replica_sync``); read
        the models' aliases and cost factors again."""
        auth = self.started.auth
        if change.kind == "models":
            task = asyncio.create_task(self._reload_model_settings(), name="model-settings")
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
            return
        if change.kind == "key":
            auth.forget_key(change.key_id)
            return
        auth.forget_tenant(change.tenant_id)
        if change.kind == "tenant":
            self.policy.update_tenant(change.tenant_id, change.weight)
            self.metrics.tenant_weight(change.tenant_id, change.weight)
            # Its name may have changed: the change does not say, the store does.
            task = asyncio.create_task(self._rename_in_metrics(change.tenant_id), name="rename")
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
        else:
            self.started.quotas.forget(change.tenant_id)
            # Its series go with it (a new tenant may take its name).
            self.metrics.forget_tenant(change.tenant_id)

    async def _rename_in_metrics(self, tenant_id: str) -> None:
        """The metrics' series of the tenant take its name in the store (gone: nothing)."""
        try:
            tenant = await self.started.store.get_tenant(tenant_id)
        except FairgateError as exc:
            if exc.status != 404:
                logger.warning("tenant %s's name not read again: %s", tenant_id, exc.message)
            return
        except Exception as exc:  # a store's driver: the type only (its text may hold a URL)
            logger.warning("tenant %s's name not read again: %s", tenant_id, type(exc))
            return
        if tenant.tenant_id == tenant_id:  # (not another tenant named as its id)
            self.metrics.rename_tenant(tenant_id, tenant.name)


def create_app(gateway: Gateway, *, on_started: Callable[[], None] | None = None) -> GatewayApp:
    """The gateway's app; ``on_started`` is called once it serves."""
    return GatewayApp(gateway, on_started=on_started)


class GatewayApp:
    """The gateway's ASGI app (module docstring). Its lifespan starts the gateway and then builds
    the Starlette app that serves every request (``serving``); there is none before."""

    def __init__(self, gateway: Gateway, *, on_started: Callable[[], None] | None = None) -> None:
        self.gateway = gateway
        self.serving: Starlette | None = None
        self._on_started = on_started
        self._lifespan = Router(lifespan=lambda app: self.lifespan())  # the ASGI lifespan protocol

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Start the gateway and build ``serving``; at the end, stop the gateway."""
        await self.gateway.start()
        self.serving = _serving_app(self.gateway)
        if self._on_started is not None:
            self._on_started()
        try:
            yield
        finally:
            await self.gateway.stop()
            # Here, not after serving: uvicorn re-raises SIGTERM once it has stopped.
            shutdown_tracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        serving = self.serving
        assert serving is not None, "the gateway is not started"
        await serving(scope, receive, send)


def _serving_app(gateway: Gateway) -> Starlette:
    """Every route, bound to the parts of the started gateway it uses, behind the gatekeeper."""
    started = gateway.started
    config = gateway.config
    openai = OpenAIParts(
        config=config,
        auth=started.auth,
        admission=AdmissionControl(
            config,
            gateway.registry,
            gateway.dispatcher,
            started.catalog,
            started.tokenizers,
            started.costs,
            started.prompts,
            started.quotas,
            own_tokenizer=started.tokenizer,
        ),
        dispatcher=gateway.dispatcher,
        registry=gateway.registry,
        catalog=started.catalog,
        body_turns=gateway.body_turns,
        in_flight=gateway.in_flight,
        settlement=Settlement(
            gateway.in_flight, gateway.load_guard, started.quotas, started.usage, gateway.metrics
        ),
        load_guard=gateway.load_guard,
        metrics=gateway.metrics,
    )
    admin = AdminParts(
        config,
        started.auth,
        started.store,
        started.usage,
        gateway.registry,
        gateway.admin_changed,
        aliases=started.catalog.aliases,
    )
    models = ModelAdminParts(
        auth=started.auth,
        store=started.store,
        registry=gateway.registry,
        catalog=started.catalog,
        costs=started.costs,
        backlogs=gateway.policy.backlogs,
        admin_changed=gateway.admin_changed,
    )
    endpoints = [
        *openai_endpoints(openai),
        *admin_endpoints(admin),
        *key_admin_endpoints(admin),
        *audit_endpoints(admin),
        *model_admin_endpoints(models),
        *fairness_endpoints(
            FairnessParts(
                auth=started.auth,
                store=started.store,
                history=gateway.fairness,
                bound=lambda: gap_bound(
                    gateway.policy.name, config.scheduler, gateway.registry, started.costs
                ),
            )
        ),
    ]
    deployment = Deployment(
        slo_classes=[c.name for c in config.slo_classes], vocab_size=started.tokenizer.vocab_size
    )
    gatekeeper = GatekeeperParts(
        config,
        gateway.in_flight,
        started.auth,
        gateway.load_guard,
        gateway.dispatcher,
        gateway.metrics,
        started.quotas,
    )
    return Starlette(
        routes=[
            Route("/healthz", _healthz),
            Route("/readyz", partial(_readyz, gateway.in_flight, gateway.registry)),
            Route("/openapi.json", _openapi_route(endpoints, deployment)),
            Route("/metrics", partial(_metrics, started.auth, gateway.metrics)),
            # The live dashboard: its own login and session (``gateway.dashboard``).
            *dashboard_routes(
                DashboardParts.of(
                    config.gateway.admin_token,
                    gateway.metrics,
                    [c.name for c in config.slo_classes],
                    history=gateway.fairness.series,
                    is_stopping=lambda: gateway.in_flight.is_draining,
                )
            ),
            *routes_of(
                [
                    dataclasses.replace(e, path=routing_path(model_routing_path(e.path)))
                    for e in endpoints
                ]
            ),
            *registration_routes(
                config.gateway.registration_token, gateway.registry, started.store
            ),
        ],
        middleware=[Middleware(Gatekeeper, parts=gatekeeper)],
        exception_handlers={
            HTTPException: _on_http_error,
            FairgateError: _on_error,
            CallerDisconnected: caller_disconnected_response,
            Exception: _on_unexpected,
        },
    )


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _readyz(
    in_flight: RequestsInFlight, registry: WorkerRegistry, request: Request
) -> Response:
    if in_flight.is_draining:
        return JSONResponse({"status": "draining"}, 503)
    if registry.can_serve():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not_ready", "workers": registry.summary()}, 503)


def _openapi_route(endpoints: list[Endpoint], deployment: Deployment) -> Handler:
    document: dict[str, Any] = {}  # made on the first request

    async def openapi(request: Request) -> Response:
        if not document:
            document.update(openapi_document(endpoints, version=VERSION, deployment=deployment))
            add_other_successes(document)
            add_other_successes(document, MODEL_ADMIN_OTHER_SUCCESSES)
        return json_response(document)

    return openapi


async def _metrics(auth: Authenticator, metrics: GatewayMetrics, request: Request) -> Response:
    await auth.require_admin(request)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _on_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FairgateError)
    if not isinstance(exc, ClientError):
        logger.warning("request failed: %s (%s)", exc.message, exc.code)
    return error_response(exc)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: the client gets OpenAI's error body, the log the traceback (Starlette's
    server-error middleware logged it before calling this)."""
    return error_response(FairgateError("the gateway failed to handle this request"))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    """No route for the path (or not for the method): OpenAI's error body, as every other
    answer of the gateway's, never Starlette's plain text."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        response = error_response(MethodNotAllowed(f"{request.method} is not allowed here"))
    elif exc.status_code == 404:
        response = error_response(NotFound("no such route"))
    else:
        response = error_response(ClientError(str(exc.detail)))
    response.headers.update(exc.headers or {})  # 405's Allow (RFC 9110)
    return response


def run_gateway(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; announces ``ready`` (with its URL) on stdout once started."""
    gateway = Gateway(config)
    sock = socket.create_server((config.gateway.host, config.gateway.port))
    host, port = sock.getsockname()[:2]
    http_url = f"http://{host}:{port}"

    def announce() -> None:
        freeze_startup_heap()  # the process's, so not in create_app (tests make many apps)
        emit_event("ready", role="gateway", http_url=http_url, pid=os.getpid())

    server = http_server(create_app(gateway, on_started=announce), drain=gateway.drain)
    telemetry = config.telemetry
    setup_tracing(
        "gateway",
        otlp_endpoint=telemetry.otlp_endpoint or None,
        sampling_ratio=telemetry.sampling_ratio,
    )
    try:
        serve_on(server, sock)
    finally:
        shutdown_tracing()
    return 0
