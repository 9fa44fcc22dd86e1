"""The gateway process: its parts, wired together, and the Starlette app that serves them.

    Gateway
    ├── store       TenantStore (SQLite)      tenants, keys, usage ledger
    ├── auth        Authenticator             bearer key → tenant (cached), admin token
    ├── quotas      QuotaManager              reserve at admission, settle at finish
    ├── registry    WorkerRegistry            workers polled for state and load
    ├── policy      SchedulingPolicy          the queue and placement decisions
    ├── dispatcher  Dispatcher                carries decisions out, requests wait there
    ├── usage       UsageRecorder             finished requests' usage, batched to the store
    └── tokenizer   Tokenizer                 chat template, encode, incremental decode

Routes: ``gateway.api`` (OpenAI-compatible, tenant keys), ``gateway.admin`` (admin token),
``/healthz``, ``/readyz``, ``/openapi.json``. One lifespan starts and stops everything.
Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.model_store import resolve_model, tokenizer_path
from engine.process_events import emit_event
from engine.process_heap import freeze_startup_heap
from engine.tokenizer import Tokenizer
from gateway.admin import admin_endpoints, json_response
from gateway.api import openai_endpoints
from gateway.auth import Authenticator
from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import ClientError, NoWorkerAvailable, openai_error_body, retry_after_header
from gateway.metrics import GatewayMetrics
from gateway.openapi import Endpoint, openapi_document, routes_of
from gateway.policies import PolicySettings, make_policy
from gateway.quotas import QuotaManager
from gateway.scheduler import SchedulingPolicy
from gateway.store import SQLiteStore
from gateway.tenants import TenantStore
from gateway.usage import UsageRecorder
from gateway.workers import WorkerRegistry
from transfer.errors import FairgateError
from transfer.http import http_server, serve_on
from transfer.telemetry import setup_tracing, shutdown_tracing

__all__ = ["Gateway", "create_app", "policy_from_config", "run_gateway"]

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
METRICS_SAMPLE_S = 1.0


def policy_from_config(config: Config) -> SchedulingPolicy:
    """The ``[scheduler]`` section's policy, with its settings and the SLO classes."""
    section = config.scheduler
    settings = PolicySettings(
        slo_classes=list(config.slo_classes),
        w_in=section.w_in,
        w_out=section.w_out,
        quantum_tokens=section.quantum_tokens,
        worker_quantum_tokens=section.worker_quantum_tokens,
        block_size=section.block_size,
        prefix_index_blocks=section.prefix_index_blocks,
        hot_spot_ratio=section.hot_spot_ratio,
        hot_spot_margin_tokens=section.hot_spot_margin_tokens,
        default_prefill_tok_s=section.default_prefill_tok_s,
        max_borrow_tokens=section.max_borrow_tokens,
        forget_idle_after_s=section.forget_idle_after_s,
    )
    name = section.policy
    if name == "auto":
        name = "d2lpm" if len(config.gateway.prefill_workers) > 1 else "dlpm"
    return make_policy(name, settings)


@dataclass(frozen=True, slots=True)
class _Started:
    """The parts that exist only once the gateway started (they need the loop or the disk)."""

    store: SQLiteStore
    auth: Authenticator
    quotas: QuotaManager
    usage: UsageRecorder
    tokenizer: Tokenizer


class Gateway:
    """Everything one gateway process holds. ``start`` / ``stop`` run in the app's lifespan."""

    def __init__(self, config: Config) -> None:
        if not config.gateway.admin_token:
            raise ValueError(
                "no admin token: set gateway.admin_token in the config file or "
                "FAIRGATE_GATEWAY_ADMIN_TOKEN"
            )
        self.config = config
        self.policy = policy_from_config(config)
        self.registry = WorkerRegistry(
            config.gateway.prefill_workers,
            config.gateway.decode_workers,
            config.gateway.colocated_workers,
            poll_interval_s=config.gateway.poll_interval_s,
            on_change=self._on_workers_changed,
            on_evicted=lambda worker_id, hashes: self.policy.on_evicted(worker_id, hashes),
        )
        self.dispatcher = Dispatcher(
            self.policy,
            self.registry,
            max_prefill_inflight_tokens=config.scheduler.max_prefill_inflight_tokens,
            max_prefill_inflight_s=config.scheduler.max_prefill_inflight_s,
            queue_timeout_s=config.scheduler.queue_timeout_s,
            make_room_for_higher_classes=config.scheduler.make_room_for_higher_classes,
        )
        self.metrics = GatewayMetrics(
            config.slo_classes,
            self.policy.tenants,
            w_in=config.scheduler.w_in,
            w_out=config.scheduler.w_out,
            window_s=config.telemetry.metrics_window_s,
        )
        self._sampler: asyncio.Task[None] | None = None
        self._parts: _Started | None = None

    @property
    def started(self) -> _Started:
        assert self._parts is not None, "the gateway is not started"
        return self._parts

    @property
    def store(self) -> TenantStore:
        return self.started.store

    @property
    def auth(self) -> Authenticator:
        return self.started.auth

    @property
    def quotas(self) -> QuotaManager:
        return self.started.quotas

    @property
    def usage(self) -> UsageRecorder:
        return self.started.usage

    @property
    def tokenizer(self) -> Tokenizer:
        return self.started.tokenizer

    async def start(self) -> None:
        spec = resolve_model(self.config.model.name, pull=False)
        tokenizer = await asyncio.to_thread(Tokenizer.load, tokenizer_path(spec))
        store = await SQLiteStore.open(self.config.store.path)
        usage = UsageRecorder(store)
        self._parts = _Started(
            store=store,
            auth=Authenticator(store, self.config.gateway.admin_token),
            quotas=QuotaManager(store.total_tokens),
            usage=usage,
            tokenizer=tokenizer,
        )
        await usage.start()
        await self.registry.start()
        self._sampler = asyncio.create_task(self._sample_forever(), name="metrics-sampler")

    async def _sample_forever(self) -> None:
        """The metrics' windows see who is backlogged about once a second."""
        while True:
            await asyncio.sleep(METRICS_SAMPLE_S)
            self.metrics.sample()

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        self.dispatcher.fail_all(NoWorkerAvailable("the gateway is shutting down"))
        await self.registry.stop()
        if self._parts is not None:
            await self.usage.stop()
            await self._parts.store.close()

    def _on_workers_changed(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop yet (first poll in start)
            self.dispatcher.wake()

    def endpoints(self) -> list[Endpoint]:
        return [*openai_endpoints(self), *admin_endpoints(self)]


def create_app(gateway: Gateway, *, on_started: Callable[[], None] | None = None) -> Starlette:
    endpoints = gateway.endpoints()
    document = openapi_document(endpoints, version=VERSION)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await gateway.stop()
            # Here, not after serving: uvicorn re-raises SIGTERM once it has stopped.
            shutdown_tracing()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if gateway.registry.can_serve():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not_ready", "workers": gateway.registry.summary()}, 503)

    async def openapi(request: Request) -> Response:
        return json_response(document)

    async def metrics(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FairgateError)
        if not isinstance(exc, ClientError):
            logger.warning("request failed: %s (%s)", exc.message, exc.code)
        response = json_response(openai_error_body(exc), exc.status)
        response.headers.update(retry_after_header(exc))
        return response

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/openapi.json", openapi),
            Route("/metrics", metrics),
            *routes_of(endpoints),
        ],
        lifespan=lifespan,
        exception_handlers={FairgateError: on_error},
    )


def run_gateway(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; announces ``ready`` (with its URL) on stdout once started."""
    gateway = Gateway(config)
    sock = socket.create_server((config.gateway.host, config.gateway.port))
    host, port = sock.getsockname()[:2]
    http_url = f"http://{host}:{port}"

    def announce() -> None:
        freeze_startup_heap()  # the process's, so not in create_app (tests make many apps)
        emit_event("ready", role="gateway", http_url=http_url, pid=os.getpid())

    server = http_server(create_app(gateway, on_started=announce))
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
