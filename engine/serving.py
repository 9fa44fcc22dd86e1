"""What both worker processes share around their engine: configuration, start-up (the model
loads in the background while ``/healthz`` already answers), the health, readiness, info,
tokenizer and load routes, and serving with uvicorn.

A role (``prefill_worker.service``, ``decode_worker.service``) subclasses ``WorkerService`` and
adds its routes; ``run_worker`` binds the port, serves until SIGTERM/SIGINT, and announces
``ready`` on stdout (``engine.process_events``) once the model is loaded. A model that fails to
load ends the process with status 1 (``EXIT_LOAD_FAILED``), an engine that dies later (see
``engine.engine_thread``: a request that fails alone does not kill it) with status 3
(``EXIT_ENGINE_FAILED``), so that a supervisor restarts it: a worker never lives on without a
working engine. Either way a ``failed`` event with the reason goes to stdout, the reason to
stderr, and ``/healthz``, ``/readyz`` and the load report's ``ready`` say so until the process
is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from engine.engine import EngineConfig
from engine.engine_thread import EngineThread
from engine.loader import LoadedEngine, Precision, load_engine
from engine.preemption import PreemptionMode
from engine.process_events import emit_event
from engine.process_heap import freeze_startup_heap
from engine.worker_metrics import WorkerMetrics
from transfer.errors import EngineFailed, FairgateError, InvalidWorkerRequest, WorkerNotReady
from transfer.http import (
    CallerDisconnected,
    caller_disconnected_response,
    error_response,
    http_server,
    message_response,
    read_message,
    serve_on,
)
from transfer.messages import (
    MSGPACK_CONTENT_TYPE,
    AbortRequest,
    AbortResult,
    KvLayoutInfo,
    WorkerInfo,
    WorkerLoad,
    WorkerRole,
    encode_message,
    tokenizer_digest,
)
from transfer.telemetry import setup_tracing, shutdown_tracing

__all__ = ["EXIT_ENGINE_FAILED", "EXIT_LOAD_FAILED", "WorkerConfig", "WorkerService", "run_worker"]

logger = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 1  # the model did not load: restarting as is will not help
EXIT_ENGINE_FAILED = 3  # the engine died after start-up: a restart may


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker process is started with (the CLI flags of ``fairgate *-worker``)."""

    role: WorkerRole
    worker_id: str = ""  # default: ROLE-HOSTNAME-PORT
    model: str = "default"
    device: str = "cpu"
    precision: Precision = "auto"
    host: str = "127.0.0.1"  # HTTP bind address
    port: int = 0  # 0: any free port (announced in the ready event)
    kv_host: str = "127.0.0.1"  # address peers reach the KV data plane at (store and gloo)
    kv_port: int = 0  # decode: the KV store's port; 0: any free port
    block_size: int = 16
    num_blocks: int | None = None  # default: as many as kv_cache_gib holds
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int = 512
    # Prompt tokens of one step: at most what the measured prefill speed computes in this long,
    # so priority between chunks acts often on a slow backend (None: max_num_batched_tokens only).
    max_prefill_step_s: float | None = EngineConfig().max_prefill_step_s
    num_threads: int | None = None  # torch intra-op threads (default: torch's choice)
    kv_timeout_s: float = 30.0  # any single wait of the KV data plane
    kv_wait_timeout_s: float = 120.0  # decode: how long a reservation waits for its KV
    request_timeout_s: float = 600.0  # how long a caller waits for the next result of a request
    # Decode and colocated: how a preempted request gives its blocks up. ``recompute`` hands it
    # back to the caller (a ``Preempted`` frame); ``swap`` parks its KV in a host pool of
    # ``swap_space_gib`` (None: 1 GiB or the device cache's size, whichever is smaller).
    preemption: PreemptionMode = "recompute"
    swap_space_gib: float | None = None


class WorkerService:
    """A worker's state: the loaded model, its engine thread, identity. Subclasses add their role's
    work in ``on_loaded`` / ``on_stop`` and their routes in ``routes``."""

    role: ClassVar[WorkerRole]

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.instance_id = uuid.uuid4().hex
        self.worker_id = config.worker_id
        self.http_url = ""
        self.loaded: LoadedEngine | None = None
        # Set once the model is loaded, before the worker is ready: the tokenizer's
        # ``TokenizerSpec`` as ``GET /v1/tokenizer`` answers it (encoded once: 1.5 MB for
        # SmolLM2) and its digest; the KV layout, by the roles that have a KV data plane.
        self._tokenizer_spec_body = b""
        self.tokenizer_digest = ""
        self.kv_layout: KvLayoutInfo | None = None
        self.engine_thread: EngineThread | None = None
        self.load_error: str | None = None
        self.engine_failure: EngineFailed | None = None  # set when the engine died of a failure
        self._load_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_fatal: Any = None
        self._before_ready: Callable[[], None] | None = None
        self.metrics = WorkerMetrics(
            lambda: None if self.engine_thread is None else self.engine_thread.load
        )

    # ---- life cycle -------------------------------------------------------------------------

    def bind(
        self, http_port: int, on_fatal: Any = None, before_ready: Callable[[], None] | None = None
    ) -> None:
        """Learn the HTTP port (and so the default worker id); ``on_fatal()`` stops the server
        (called on the event loop, when the model fails to load or the engine dies),
        ``before_ready()`` runs once the model is loaded, before the worker says it is ready."""
        host = self.config.host
        advertised = self.config.kv_host if host in ("0.0.0.0", "::", "") else host
        self.http_url = f"http://{advertised}:{http_port}"
        if not self.worker_id:
            self.worker_id = f"{self.role}-{socket.gethostname()}-{http_port}"
        self._on_fatal = on_fatal
        self._before_ready = before_ready

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._load_task = asyncio.create_task(self._load_and_announce())

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task  # loading cannot be interrupted; let it finish
        self.on_stop()
        if self.engine_thread is not None:
            self.engine_thread.stop()

    async def _load_and_announce(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("%s could not start: %s", self.role, self.load_error)
            emit_event("failed", role=self.role, reason=self.load_error)
            if self._on_fatal is not None:
                self._on_fatal()
            return
        if self._before_ready is not None:
            self._before_ready()
        emit_event("ready", **self.ready_fields())
        logger.info("%s %s ready at %s", self.role, self.worker_id, self.http_url)

    def _load(self) -> None:
        config = self.config
        if config.num_threads is not None:
            import torch

            torch.set_num_threads(config.num_threads)
        # A prefill worker never decodes, so never preempts; decode and colocated workers have
        # a caller to hand a recompute victim back to (it re-prefills on the prefill pool).
        is_swapping = self.role != "prefill" and config.preemption == "swap"
        loaded = load_engine(
            config.model,
            device=config.device,
            precision=config.precision,
            block_size=config.block_size,
            num_blocks=config.num_blocks,
            kv_cache_gib=config.kv_cache_gib,
            engine_config=EngineConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                prefill_chunk_size=config.prefill_chunk_size,
                max_prefill_step_s=config.max_prefill_step_s,
                preemption_mode="swap" if is_swapping else "recompute",
                hand_back_preempted=self.role != "prefill",
            ),
            swap_space_gib=config.swap_space_gib if is_swapping else 0.0,
        )
        self._tokenizer_spec_body = encode_message(loaded.tokenizer.to_spec())
        self.tokenizer_digest = tokenizer_digest(self._tokenizer_spec_body)
        thread = EngineThread(
            loaded.engine, name=f"{self.role}-engine", on_death=self._on_engine_death
        )
        thread.start()
        self.loaded = loaded
        try:
            self.on_loaded(loaded, thread)
        except BaseException:
            thread.stop()
            raise
        self.engine_thread = thread  # from here on the worker is ready

    def _on_engine_death(self, error: EngineFailed) -> None:
        """On the dead engine's thread: say so, and stop serving (the process then exits with
        ``EXIT_ENGINE_FAILED``)."""
        self.engine_failure = error
        logger.error("%s %s: the engine died (%s); exiting", self.role, self.worker_id, error)
        emit_event("failed", role=self.role, worker_id=self.worker_id, reason=error.message)
        if self._on_fatal is not None and self._loop is not None:
            # A closed loop means the server is stopping already.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_fatal)

    def on_loaded(self, loaded: LoadedEngine, thread: EngineThread) -> None:
        """Role set-up once the model is loaded (runs in the loading thread, before the worker
        counts as ready). A role with a KV data plane sets ``kv_layout`` here."""

    def on_stop(self) -> None:
        """Role tear-down, before the engine thread stops."""

    # ---- state ------------------------------------------------------------------------------

    def ready_thread(self) -> EngineThread:
        """The engine thread, or the error that says why there is none to use."""
        thread = self.engine_thread
        if thread is None:
            raise WorkerNotReady(
                f"{self.role} worker is not ready: {self.load_error or 'the model is loading'}"
            )
        if not thread.is_alive:
            reason = "it stopped" if thread.error is None else thread.error.message
            raise EngineFailed(f"{self.role} worker's engine died: {reason}")
        return thread

    def ready_fields(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "worker_id": self.worker_id,
            "instance_id": self.instance_id,
            "http_url": self.http_url,
            "pid": os.getpid(),
        }

    @property
    def model_id(self) -> str:
        """The served model's id ("" until it is loaded)."""
        return "" if self.loaded is None else self.loaded.model_id

    def info(self) -> WorkerInfo:
        self.ready_thread()
        loaded = self.loaded
        assert loaded is not None
        return WorkerInfo(
            worker_id=self.worker_id,
            instance_id=self.instance_id,
            role=self.role,
            model_id=loaded.model_id,
            block_size=loaded.engine.block_size,
            num_total_blocks=loaded.engine.blocks.num_total_blocks,
            max_model_len=loaded.engine.max_model_len,
            vocab_size=loaded.tokenizer.vocab_size,
            max_num_seqs=loaded.engine.config.max_num_seqs,
            tokenizer_digest=self.tokenizer_digest,
            kv_layout=self.kv_layout,
            precision=loaded.runner.precision,
        )

    def tokenizer_spec(self) -> bytes:
        """The encoded ``TokenizerSpec`` whose digest ``info()`` announces."""
        self.ready_thread()
        return self._tokenizer_spec_body

    def load_report(self, evictions_since: int | None = None) -> WorkerLoad:
        """The load; with ``evictions_since``, the prefix-cache evictions from that number on
        (without, only the number the next one will get: where a new reader starts)."""
        thread = self.engine_thread
        if thread is None or not thread.is_alive:
            return WorkerLoad(worker_id=self.worker_id, role=self.role, ready=False)
        load, progress = thread.load, thread.progress  # (progress: read live, for hang checks)
        evicted: list[bytes] = []
        eviction_seq, missed = thread.evictions.next_seq, False
        if evictions_since is not None:
            evicted, eviction_seq, missed = thread.evictions.since(evictions_since)
        return WorkerLoad(
            worker_id=self.worker_id,
            role=self.role,
            ready=True,
            num_waiting=load.num_waiting,
            num_running=load.num_running,
            num_reserved=load.num_reserved,
            num_queued_tokens=load.num_queued_tokens,
            num_running_tokens=load.num_running_tokens,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            num_pending_transfers=load.num_handed_off,
            num_preemptions=load.num_preemptions,
            prefill_tok_s=load.prefill_tok_s,
            decode_base_s=load.decode_base_s,
            decode_token_s=load.decode_token_s,
            evicted_block_hashes=evicted,
            eviction_seq=eviction_seq,
            evictions_missed=missed,
            num_swapped_out=load.num_swapped_out,
            num_handed_back=load.num_handed_back,
            num_swapped=load.num_swapped,
            num_steps=progress.num_steps,
            has_work=progress.has_work,
            since_step_s=progress.since_step_s,
            max_step_s=progress.max_step_s,
        )

    async def abort(self, request_id: str) -> bool:
        raise NotImplementedError

    def routes(self) -> list[BaseRoute]:
        return []


# ---- HTTP ---------------------------------------------------------------------------------------


def _common_routes(service: WorkerService) -> list[BaseRoute]:
    async def healthz(request: Request) -> Response:
        """Alive: 200 while the model loads and while the engine runs; 500 once either failed
        (the process is on its way out)."""
        thread = service.engine_thread
        reason = service.load_error
        if thread is not None and not thread.is_alive:
            reason = "the engine stopped" if thread.error is None else thread.error.message
        if reason is not None:
            return JSONResponse({"status": "failed", "reason": reason}, 500)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            service.ready_thread()
        except FairgateError as exc:
            return JSONResponse({"status": "not_ready", "reason": exc.message}, 503)
        return JSONResponse({"status": "ready"})

    async def info(request: Request) -> Response:
        return message_response(service.info())

    async def tokenizer(request: Request) -> Response:
        return Response(service.tokenizer_spec(), media_type=MSGPACK_CONTENT_TYPE)

    async def load(request: Request) -> Response:
        since = request.query_params.get("evictions_since")
        if since is None:
            return message_response(service.load_report())
        if not since.isdigit():
            raise InvalidWorkerRequest("evictions_since must be a non-negative integer")
        return message_response(service.load_report(int(since)))

    async def abort(request: Request) -> Response:
        body = await read_message(request, AbortRequest)
        return message_response(AbortResult(aborted=await service.abort(body.request_id)))

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/info", info),
        Route("/v1/tokenizer", tokenizer),
        Route("/v1/load", load),
        Route("/v1/abort", abort, methods=["POST"]),
        Route("/metrics", metrics),
    ]


def create_app(service: WorkerService) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            # Here, not after serving: uvicorn re-raises SIGTERM once it has stopped.
            shutdown_tracing()

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FairgateError)
        return error_response(exc)

    return Starlette(
        routes=[*_common_routes(service), *service.routes()],
        lifespan=lifespan,
        exception_handlers={
            FairgateError: on_error,
            CallerDisconnected: caller_disconnected_response,
        },
    )


def run_worker(service: WorkerService) -> int:
    """Serve ``service`` until SIGTERM/SIGINT, or until its model fails to load or its engine
    dies; the exit status (0, ``EXIT_LOAD_FAILED`` or ``EXIT_ENGINE_FAILED``)."""
    sock = socket.create_server((service.config.host, service.config.port))
    server = http_server(create_app(service))

    def stop_server() -> None:
        server.should_exit = True

    service.bind(sock.getsockname()[1], on_fatal=stop_server, before_ready=freeze_startup_heap)
    setup_tracing(service.role)
    try:
        serve_on(server, sock)
    finally:
        shutdown_tracing()
    if service.load_error:
        return EXIT_LOAD_FAILED
    if service.engine_failure is not None:
        return EXIT_ENGINE_FAILED
    return 0
