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
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

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
    TransferError,
    TransferTimeout,
)
from transfer.failpoints import failpoint
from transfer.http import message_response, read_message, until_disconnected
from transfer.kv_layout import layout_of
from transfer.kv_sender import KvSender, SenderConfig, TransferJob, TransferResult
from transfer.messages import (
    KvTarget,
    PrefillRequest,
    PrefillResult,
    PrefillTarget,
    PrefillTargetResult,
)
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


@dataclass(frozen=True, slots=True)
class _HeldKv:
    """A handed-off request's KV, as the transfer needs it once its target is known."""

    request_id: str
    src_block_ids: list[int]
    num_tokens: int  # earlier output of a resumption included
    first_token_id: int
    seed: int
    num_cached_tokens: int
    span: SpanRecord | None

    def job(self, target: KvTarget) -> TransferJob:
        num_blocks = len(self.src_block_ids)
        return TransferJob(
            request_id=self.request_id,
            target=msgspec.structs.replace(target, block_ids=target.block_ids[:num_blocks]),
            src_block_ids=self.src_block_ids,
            num_tokens=self.num_tokens,
            first_token_id=self.first_token_id,
            seed=self.seed,
            num_cached_tokens=self.num_cached_tokens,
        )


# expecting: the target came first; prefilling: the prompt is computing (the target may be
# here); held: the KV waits for its target; shipping: a transfer owns the KV.
_HandOffState = Literal["expecting", "prefilling", "held", "shipping"]


@dataclass(slots=True)
class _HandOff:
    """The two halves of a request sent with ``target_follows``: its KV (at hand-off) and its
    target (``PrefillTarget``), which come in either order. In ``PrefillService._hand_offs``
    under its lock until ``outcome`` is settled (``_settle``); the target call awaits that."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    outcome: asyncio.Future[PrefillTargetResult]  # set on ``loop`` only
    state: _HandOffState
    has_target: bool = False
    target: KvTarget | None = None  # with has_target: None drops the KV
    held: _HeldKv | None = None
    expiry: asyncio.TimerHandle | None = None  # a half that waits too long for the other


_Outcome = PrefillTargetResult | FairgateError


class PrefillService(WorkerService):
    role = "prefill"

    def on_loaded(self, loaded: LoadedEngine, thread: EngineThread) -> None:
        kv_cache = loaded.kv_cache
        self._thread = thread
        # Both under _lock: the event loop, the engine thread and KV link threads touch them.
        self._lock = threading.Lock()
        self._transferring: set[str] = set()  # requests whose blocks a transfer owns
        self._hand_offs: dict[str, _HandOff] = {}
        self.kv_layout = layout_of(kv_cache, loaded.model_id)  # also announced by info()
        self.sender = KvSender(
            kv_cache,
            self.kv_layout,
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
                    "gen_ai.request.model": self.model_id,
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

        async def target(request: Request) -> Response:
            body = await read_message(request, PrefillTarget)
            return message_response(await self.receive_target(body))

        return [
            Route("/v1/prefill", prefill, methods=["POST"]),
            Route("/v1/prefill/target", target, methods=["POST"]),
        ]

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
        if target is not None and request.target_follows:
            raise InvalidWorkerRequest("a request with a target cannot have one follow")
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
        hand_off = (
            await self._expect_hand_off(request.request_id) if request.target_follows else None
        )

        def resolve(outcome: PrefillResult | FairgateError) -> None:
            if result.done():
                return
            if isinstance(outcome, FairgateError):
                result.set_exception(outcome)
            else:
                result.set_result(outcome)

        def sink(output: StepOutput | FairgateError) -> None:  # on the engine thread
            if isinstance(output, FairgateError):
                if hand_off is not None:
                    self._settle(hand_off, output)
                loop.call_soon_threadsafe(resolve, output)
                return
            will_transfer = output.is_handed_off and self._hand_off(
                request, hand_off, output, seed, span
            )
            if hand_off is not None and not output.is_handed_off:
                self._settle(hand_off, PrefillTargetResult(request.request_id, "finished"))
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
        except (ValueError, FairgateError) as exc:
            error = InvalidWorkerRequest(str(exc)) if isinstance(exc, ValueError) else exc
            if hand_off is not None:
                self._settle(hand_off, error)
            if isinstance(exc, ValueError):
                raise error from exc
            raise
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
        self,
        request: PrefillRequest,
        hand_off: _HandOff | None,
        output: StepOutput,
        seed: int,
        span: SpanRecord | None,
    ) -> bool:
        """On the engine thread: ship a handed-off request's KV, hold it for a target that
        follows, or release it when there is nowhere to ship it. True when it is shipped or
        held."""
        engine = self._thread.engine
        seq = engine.handed_off[request.request_id]
        held = _HeldKv(
            request_id=request.request_id,
            src_block_ids=list(seq.block_table),
            num_tokens=len(request.prompt_token_ids),
            first_token_id=output.new_token_ids[0],
            seed=seed,
            num_cached_tokens=seq.num_cached_tokens,
            span=span,
        )
        if request.target is not None:
            with self._lock:
                self._transferring.add(request.request_id)
            self._ship(held, request.target, None)
            return True
        if hand_off is None:
            engine.release_handed_off(request.request_id)
            return False
        with self._lock:
            if self._hand_offs.get(request.request_id) is not hand_off:
                engine.release_handed_off(request.request_id)  # settled already (aborted)
                return False
            hand_off.held = held
            if not hand_off.has_target:
                hand_off.state = "held"
                hand_off.loop.call_soon_threadsafe(self._arm_expiry, hand_off)
                return True
        self._use_target(hand_off, engine)
        return True

    def _ship(self, held: _HeldKv, target: KvTarget, hand_off: _HandOff | None) -> None:
        """Start the transfer; the caller has put the request in ``_transferring``."""
        num_blocks = len(held.src_block_ids)
        span = held.span
        traced = None if span is None else _TracedTransfer(span, time.time_ns(), num_blocks)
        self.sender.submit(held.job(target), partial(self._transfer_done, traced, hand_off))

    def _transfer_done(
        self, traced: _TracedTransfer | None, hand_off: _HandOff | None, result: TransferResult
    ) -> None:
        """On a KV link thread: the blocks go back, whatever the outcome (first, so that
        nothing the metrics or the span do can keep them)."""

        def release(engine: LLMEngine) -> None:
            with self._lock:
                self._transferring.discard(result.request_id)
            engine.release_handed_off(result.request_id)

        self._thread.submit(release)
        if hand_off is not None:
            outcome = PrefillTargetResult(result.request_id, "shipped")
            self._settle(hand_off, outcome if result.error is None else result.error)
        self.metrics.transfer_sent(result.num_bytes, result.seconds, is_ok=result.error is None)
        if traced is not None:
            span = start_child(
                traced.parent,
                "kv_transfer",
                {
                    "fairgate.request_id": result.request_id,
                    "gen_ai.request.model": self.model_id,
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

    # ---- targets that follow ----------------------------------------------------------------

    async def _after_earlier_hand_off(self, request_id: str) -> None:
        """On the event loop: wait while the same request's earlier hand-off is still ending.
        A request resumed after a preemption on the decode worker comes back with its id, and
        that can be before this worker has read its last transfer's ack: its blocks are
        released first (the release is queued on the engine thread before it settles)."""
        while True:
            with self._lock:
                earlier = self._hand_offs.get(request_id)
                if earlier is None or earlier.state != "shipping":
                    return
            try:
                await asyncio.wait_for(asyncio.shield(earlier.outcome), self.config.kv_timeout_s)
            except FairgateError:
                pass  # how it ended is its own caller's business: it has ended
            except TimeoutError as exc:
                raise InvalidWorkerRequest(
                    f"request id {request_id!r} is still being shipped"
                ) from exc

    async def _expect_hand_off(self, request_id: str) -> _HandOff:
        """On the event loop: the hand-off of a prefill whose target follows; adopts one whose
        target came first."""
        await self._after_earlier_hand_off(request_id)
        loop = asyncio.get_running_loop()
        with self._lock:
            hand_off = self._hand_offs.get(request_id)
            if hand_off is not None and hand_off.state != "expecting":
                raise InvalidWorkerRequest(f"request id {request_id!r} is already here")
            if hand_off is None:
                hand_off = _HandOff(request_id, loop, loop.create_future(), "prefilling")
                self._hand_offs[request_id] = hand_off
            hand_off.state = "prefilling"
        if hand_off.expiry is not None:
            hand_off.expiry.cancel()
            hand_off.expiry = None
        return hand_off

    async def receive_target(self, body: PrefillTarget) -> PrefillTargetResult:
        """``POST /v1/prefill/target``: see ``PrefillTarget``."""
        self.ready_thread()
        request_id = body.request_id
        try:
            failpoint("prefill.target_arrived")
        except TransferError as exc:
            self._drop(request_id, exc)
            raise
        await self._after_earlier_hand_off(request_id)
        loop = asyncio.get_running_loop()
        with self._lock:
            hand_off = self._hand_offs.get(request_id)
            if hand_off is None:  # its prefill call is still on its way
                hand_off = _HandOff(request_id, loop, loop.create_future(), "expecting")
                self._hand_offs[request_id] = hand_off
            elif hand_off.has_target:
                raise InvalidWorkerRequest(f"the target of {request_id!r} came already")
            hand_off.has_target = True
            hand_off.target = body.target
            state = hand_off.state
        if state == "expecting":
            self._arm_expiry(hand_off)
        elif state == "held":
            self._use_target(hand_off, None)
        elif body.target is not None:
            # Pair now, beside the prefill (a no-op once paired). A peer that refuses or cannot
            # be reached fails the transfer itself, which reports it: the future can be dropped.
            self.sender.connect(body.target)
        try:
            return await asyncio.wait_for(
                asyncio.shield(hand_off.outcome), self.config.request_timeout_s
            )
        except TimeoutError as exc:
            raise RequestTimeout(f"the hand-off of {request_id} did not end in time") from exc

    def _use_target(self, hand_off: _HandOff, engine: LLMEngine | None) -> None:
        """Both halves are here: ship the held KV, or release it (dropped, or a target too
        small). ``engine`` when on the engine thread, else the release is a command."""
        held, target = hand_off.held, hand_off.target
        assert held is not None and hand_off.has_target
        error: FairgateError | None = None
        with self._lock:
            if self._hand_offs.get(held.request_id) is not hand_off or hand_off.state == "shipping":
                return  # settled meanwhile (timed out, aborted)
            if target is not None and len(target.block_ids) < len(held.src_block_ids):
                error = InvalidWorkerRequest(
                    f"the target reserved {len(target.block_ids)} blocks; the prompt needs "
                    f"{len(held.src_block_ids)}"
                )
            if target is not None and error is None:
                hand_off.state = "shipping"
                self._transferring.add(held.request_id)
            else:  # off the table before the blocks go: nothing else may use them
                del self._hand_offs[held.request_id]
        if target is not None and error is None:
            self._ship(held, target, hand_off)
            return
        outcome = error or PrefillTargetResult(held.request_id, "dropped")
        self._release_then_settle(hand_off, outcome, engine)

    def _release_then_settle(
        self, hand_off: _HandOff, outcome: _Outcome, engine: LLMEngine | None
    ) -> None:
        """Give a held KV's blocks back (full ones stay in the prefix cache), then settle: a
        caller that hears "dropped" may resubmit the same request id at once."""

        def release(engine: LLMEngine) -> None:
            engine.release_handed_off(hand_off.request_id)
            self._settle(hand_off, outcome)

        if engine is not None:
            release(engine)
        else:
            self._thread.submit(release)

    def _drop(self, request_id: str, error: FairgateError) -> None:
        """End a hand-off with ``error``, its held KV released (a target that cannot be used)."""
        with self._lock:
            hand_off = self._hand_offs.get(request_id)
            if hand_off is None or hand_off.state == "shipping":
                return
            state = hand_off.state
            if state == "prefilling":  # its KV is released at hand-off, as for a dropped target
                hand_off.has_target = True
                hand_off.target = None
                return
            del self._hand_offs[request_id]
        if state == "held":
            self._release_then_settle(hand_off, error, None)
        else:
            self._settle(hand_off, error)

    def _arm_expiry(self, hand_off: _HandOff) -> None:
        """On the event loop: a half that waits ``kv_timeout_s`` for the other gives up."""
        if hand_off.expiry is None and not hand_off.outcome.done():
            timeout_s = self.config.kv_timeout_s
            hand_off.expiry = hand_off.loop.call_later(timeout_s, self._expire, hand_off)

    def _expire(self, hand_off: _HandOff) -> None:
        with self._lock:
            state = hand_off.state
            if self._hand_offs.get(hand_off.request_id) is not hand_off or state not in (
                "held",
                "expecting",
            ):
                return
            del self._hand_offs[hand_off.request_id]
        timeout_s = self.config.kv_timeout_s
        if state == "held":
            error = TransferTimeout(
                f"no target for the KV of {hand_off.request_id} within {timeout_s:g} s"
            )
            self._release_then_settle(hand_off, error, None)
        elif state == "expecting":
            error = TransferTimeout(f"no prefill of {hand_off.request_id} within {timeout_s:g} s")
            self._settle(hand_off, error)

    def _settle(self, hand_off: _HandOff, outcome: _Outcome) -> None:
        """Thread-safe: the hand-off is over (its KV is shipped or released by now, or is being
        released by a command already queued); its target call hears ``outcome``."""
        with self._lock:
            if self._hand_offs.get(hand_off.request_id) is hand_off:
                del self._hand_offs[hand_off.request_id]

        def resolve() -> None:
            if hand_off.expiry is not None:
                hand_off.expiry.cancel()
            if hand_off.outcome.done():
                return
            if isinstance(outcome, FairgateError):
                hand_off.outcome.set_exception(outcome)
                hand_off.outcome.exception()  # nobody may await it (no target came): not lost
            else:
                hand_off.outcome.set_result(outcome)

        hand_off.loop.call_soon_threadsafe(resolve)

    # ---- abort ------------------------------------------------------------------------------

    def _abort_on_engine(self, engine: LLMEngine, request_id: str) -> bool:
        with self._lock:
            if request_id in self._transferring:
                return False  # the transfer owns the blocks now and releases them when it ends
            # Off the table first: a target arriving now must not ship blocks about to go.
            hand_off = self._hand_offs.pop(request_id, None)
        sink = self._thread.unwatch(request_id)
        aborted = engine.abort(request_id)  # a held KV's blocks too
        error = RequestAborted(f"request {request_id} was aborted")
        if sink is not None:
            sink(error)
        if hand_off is not None:
            self._settle(hand_off, error)
        return aborted

    def _abort_soon(self, request_id: str) -> None:
        self._thread.submit(lambda engine: self._abort_on_engine(engine, request_id))

    async def abort(self, request_id: str) -> bool:
        thread = self.ready_thread()
        return await thread.call(lambda engine: self._abort_on_engine(engine, request_id))
