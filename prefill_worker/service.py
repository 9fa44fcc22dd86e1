"""The prefill worker: computes prompts, answers with the first token at once, and ships the KV.

``POST /v1/prefill`` (``PrefillRequest`` → ``PrefillResult``): the request joins the engine as
prefill-only (chunked prefill, prefix-cache reuse under its ``cache_salt``; between chunks the
most important ready prompt goes first, by its ``priority``). A request resumed after a
preemption brings its earlier output at the end of its prompt (``num_prior_output_tokens``):
all of it is computed and shipped, and its first token here is its next output token. When its
first token is sampled the caller gets it straight away; the request is handed off, its blocks
held, and a transfer to the decode worker named in ``target`` goes to the KV sender. When the
transfer ends, landed or failed, the blocks are released. A first token that already ends the
request (EOS, a stop token, ``max_tokens`` reached) is answered with its finish reason and nothing
is shipped.

Pairing with a decode worker not met before runs beside the prefill; if the decode worker
refuses (an incompatible KV layout, named in the error) or cannot be reached, the request fails
with that error instead of answering. A caller that disconnects before the first token aborts the
request. Once a transfer has started
its blocks belong to the transfer: an abort then changes nothing, the transfer's end frees them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from functools import partial

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from engine.engine import LLMEngine
from engine.engine_thread import EngineThread
from engine.loader import LoadedEngine
from engine.sequence import StepOutput
from engine.serving import WorkerService
from transfer.errors import (
    FairgateError,
    InvalidWorkerRequest,
    RequestAborted,
    RequestTimeout,
    TransferTimeout,
)
from transfer.http import message_response, read_message, until_disconnected
from transfer.kv_layout import layout_of
from transfer.kv_sender import KvSender, SenderConfig, TransferJob, TransferResult
from transfer.messages import PrefillRequest, PrefillResult
from transfer.telemetry import (
    TRACEPARENT_HEADER,
    SpanRecord,
    start_child,
    start_span,
)

__all__ = ["PrefillService"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _TracedTransfer:
    """A transfer of a traced request: its ``kv_transfer`` span is made when it ends."""

    parent: SpanRecord  # the request's prefill span
    started_ns: int
    num_blocks: int


class PrefillService(WorkerService):
    role = "prefill"

    def on_loaded(self, loaded: LoadedEngine, thread: EngineThread) -> None:
        kv_cache = loaded.kv_cache
        self._thread = thread
        self._transferring: set[str] = set()  # engine thread only
        self.sender = KvSender(
            kv_cache,
            layout_of(kv_cache, loaded.model_id),
            self.worker_id,
            SenderConfig(host=self.config.kv_host, timeout_s=self.config.kv_timeout_s),
        )

    def on_stop(self) -> None:
        if self.loaded is not None:
            self.sender.stop()

    def routes(self) -> list[BaseRoute]:
        async def prefill(request: Request) -> Response:
            body = await read_message(request, PrefillRequest)
            span = start_span(
                "prefill",
                {
                    "fairgate.request_id": body.request_id,
                    "fairgate.prompt_tokens": len(body.prompt_token_ids),
                    "fairgate.resumed_output_tokens": body.num_prior_output_tokens,
                },
                traceparent=request.headers.get(TRACEPARENT_HEADER),
            )
            try:
                result = await until_disconnected(
                    request, self.prefill(body, span), lambda: self._abort_soon(body.request_id)
                )
            except BaseException as exc:
                if span is not None:
                    span.end(exc)
                raise
            if span is not None:
                span.set_attributes(
                    {
                        "fairgate.cached_tokens": result.num_cached_tokens,
                        "fairgate.computed_tokens": result.num_prompt_tokens
                        + body.num_prior_output_tokens
                        - result.num_cached_tokens,
                        "fairgate.prefill_chunks": result.num_prefill_chunks,
                    }
                )
                span.end()
            return message_response(result)

        return [Route("/v1/prefill", prefill, methods=["POST"])]

    # ---- prefill ----------------------------------------------------------------------------

    async def prefill(
        self, request: PrefillRequest, span: SpanRecord | None = None
    ) -> PrefillResult:
        """``span``: the request's ``prefill`` span (tracing on); its KV transfer is traced as
        a ``kv_transfer`` child."""
        thread = self.ready_thread()
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        try:
            params = sampling.to_params(seed=seed)
        except ValueError as exc:
            raise InvalidWorkerRequest(str(exc)) from exc
        target = request.target
        block_size = thread.engine.block_size
        # The earlier output of a resumed request is shipped too: all of prompt_token_ids.
        num_prompt_blocks = -(-len(request.prompt_token_ids) // block_size)
        if target is not None and len(target.block_ids) < num_prompt_blocks:
            raise InvalidWorkerRequest(
                f"the target reserved {len(target.block_ids)} blocks; the prompt needs "
                f"{num_prompt_blocks}"
            )
        # Pairing runs beside the prefill (a no-op once paired); a decode worker that refuses us
        # or cannot be reached fails the request instead of its transfer.
        paired = None if target is None else asyncio.wrap_future(self.sender.connect(target))
        loop = asyncio.get_running_loop()
        result: asyncio.Future[PrefillResult] = loop.create_future()

        def resolve(outcome: PrefillResult | FairgateError) -> None:
            if result.done():
                return
            if isinstance(outcome, FairgateError):
                result.set_exception(outcome)
            else:
                result.set_result(outcome)

        def sink(output: StepOutput | FairgateError) -> None:  # on the engine thread
            if isinstance(output, FairgateError):
                loop.call_soon_threadsafe(resolve, output)
                return
            will_transfer = output.is_handed_off and self._hand_off(request, output, seed, span)
            answer = PrefillResult(
                request_id=request.request_id,
                first_token_id=output.new_token_ids[0],
                finish_reason=output.finish_reason,
                num_prompt_tokens=output.num_prompt_tokens,
                num_cached_tokens=output.num_cached_tokens,
                seed=seed,
                will_transfer=will_transfer,
                num_prefill_chunks=output.num_prefill_chunks,
            )
            loop.call_soon_threadsafe(resolve, answer)

        def add(engine: LLMEngine) -> None:
            engine.add_request(
                request.request_id,
                request.prompt_token_ids,
                params,
                salt=request.cache_salt,
                prefill_only=True,
                priority=request.priority.to_priority(),
                num_prior_output_tokens=request.num_prior_output_tokens,
            )
            thread.watch(request.request_id, sink)

        try:
            await thread.call(add)
        except ValueError as exc:
            raise InvalidWorkerRequest(str(exc)) from exc
        try:
            answer = await asyncio.wait_for(result, self.config.request_timeout_s)
        except TimeoutError as exc:
            self._abort_soon(request.request_id)
            timeout_s = self.config.request_timeout_s
            raise RequestTimeout(
                f"no first token for {request.request_id} within {timeout_s:g} s"
            ) from exc
        if paired is not None and target is not None:
            # Its stages (connect, hello, process group) each wait up to kv_timeout_s.
            try:
                await asyncio.wait_for(paired, 3 * self.config.kv_timeout_s)
            except TimeoutError as exc:
                raise TransferTimeout(
                    f"pairing with decode worker {target.worker_id} timed out"
                ) from exc
        return answer

    def _hand_off(
        self, request: PrefillRequest, output: StepOutput, seed: int, span: SpanRecord | None
    ) -> bool:
        """On the engine thread: ship a handed-off request's KV, or release it when there is
        nowhere to ship it. True when a transfer was started."""
        engine = self._thread.engine
        seq = engine.handed_off[request.request_id]
        target = request.target
        if target is None:
            engine.release_handed_off(request.request_id)
            return False
        num_blocks = len(seq.block_table)
        job = TransferJob(
            request_id=request.request_id,
            target=msgspec.structs.replace(target, block_ids=target.block_ids[:num_blocks]),
            src_block_ids=list(seq.block_table),
            num_tokens=len(request.prompt_token_ids),  # earlier output of a resumption included
            first_token_id=output.new_token_ids[0],
            seed=seed,
            num_cached_tokens=seq.num_cached_tokens,
        )
        self._transferring.add(request.request_id)
        traced = None if span is None else _TracedTransfer(span, time.time_ns(), num_blocks)
        self.sender.submit(job, partial(self._transfer_done, traced))
        return True

    def _transfer_done(self, traced: _TracedTransfer | None, result: TransferResult) -> None:
        """On a KV link thread: the blocks go back, whatever the outcome (first, so that
        nothing the metrics or the span do can keep them)."""

        def release(engine: LLMEngine) -> None:
            self._transferring.discard(result.request_id)
            engine.release_handed_off(result.request_id)

        self._thread.submit(release)
        self.metrics.transfer_sent(result.num_bytes, result.seconds, is_ok=result.error is None)
        if traced is not None:
            span = start_child(
                traced.parent,
                "kv_transfer",
                {
                    "fairgate.request_id": result.request_id,
                    "fairgate.kv.blocks": traced.num_blocks,
                    "fairgate.kv.bytes": result.num_bytes,
                    "fairgate.kv.seconds": result.seconds,
                    "fairgate.kv.backend": self.sender.layout.backend,
                },
                traced.started_ns,
            )
            span.end(result.error)
        if result.error is None:
            logger.debug(
                "shipped %s: %d bytes in %.1f ms",
                result.request_id,
                result.num_bytes,
                result.seconds * 1e3,
            )

    # ---- abort ------------------------------------------------------------------------------

    def _abort_on_engine(self, engine: LLMEngine, request_id: str) -> bool:
        if request_id in self._transferring:
            return False  # the transfer owns the blocks now and releases them when it ends
        sink = self._thread.unwatch(request_id)
        aborted = engine.abort(request_id)
        if sink is not None:
            sink(RequestAborted(f"request {request_id} was aborted"))
        return aborted

    def _abort_soon(self, request_id: str) -> None:
        self._thread.submit(lambda engine: self._abort_on_engine(engine, request_id))

    async def abort(self, request_id: str) -> bool:
        thread = self.ready_thread()
        return await thread.call(lambda engine: self._abort_on_engine(engine, request_id))
