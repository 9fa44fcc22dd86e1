"""One thread that owns an ``LLMEngine``; everyone else talks to it with commands.

A worker's HTTP handlers (asyncio) and its KV threads never touch the engine. They ``submit`` a
command, a function of the engine that the engine thread runs between two steps, and get a
``Future`` of its result (``call`` awaits it from asyncio, with a timeout). A command may
``watch`` a request: its sink then gets every ``StepOutput`` of that request, on the engine
thread, until the request finishes, is handed off, or is preempted and handed back; sinks must
only hand the output on (to an asyncio loop, a queue, the KV sender), never block.

The loop: run the queued commands; step while there is work; when a step could schedule nothing
(blocks held by reservations or transfers) or there is no work, block until the next command,
since only a command can change that (or until room held by ``make_room`` expires, which the
engine tells with ``seconds_until_change``). Torch-free.

Failures. A request the engine fails alone (``StepOutput.error``: its logits were not finite, or
the runner raised on it; see ``engine.engine``) reaches its sink as ``RequestFailed`` naming it,
and the engine goes on. A sink that raises is a bug of its own request: that request is aborted
(its blocks come back; not those of a handed-off one, which a transfer may be reading) and the
engine goes on. Anything else that raises on this thread (a step that raises: the engine's own
bookkeeping failed, or its runner raised on every run several steps in a row) kills the engine:
every sink and every later command gets ``EngineFailed``, and ``on_death`` is called once, so
that the worker process can exit and be restarted rather than live on without an engine.
``stop`` ends the thread the same way, without ``on_death``. A command's own exception goes to
its caller and changes nothing else.

The thread times each step and keeps the engine's ``prefill_tok_s`` (a moving average of prompt
tokens per second) up to date: the engine caps a step's prompt tokens with it
(``EngineConfig.max_prefill_step_s``), and the load reports it.

Progress. ``progress`` says, at any moment and from any thread, whether the thread gets on with
its work: the steps it has completed, whether it has work it can do now (it is not waiting for a
command), how long it has had that work without completing a step, and the longest of its recent
steps. Unlike ``load``, a snapshot the thread takes after each step, it is read live, so a thread
wedged inside a step (or a command) shows as such: the worker's load report carries it, and the
gateway's hung-worker watch (``gateway.liveness``) ejects a worker whose engine has had work
and completed no step for many times its step time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.engine import LLMEngine
from engine.sequence import StepOutput
from transfer.errors import EngineFailed, FairgateError, RequestFailed, RequestTimeout

__all__ = [
    "EngineLoad",
    "EngineThread",
    "EvictionLog",
    "OutputSink",
    "StepProgress",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
OutputSink = Callable[[StepOutput | FairgateError], None]


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A snapshot of the engine's occupancy, taken by the engine thread after every step."""

    num_waiting: int = 0
    num_running: int = 0
    num_reserved: int = 0
    num_handed_off: int = 0
    num_queued_tokens: int = 0  # prompt tokens waiting or admitted but not yet computed
    num_running_tokens: int = 0  # tokens held in the cache by running requests
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_preemptions: int = 0
    prefill_tok_s: float = 0.0  # measured prompt throughput; 0 until a prompt was computed
    decode_base_s: float = 0.0  # a pure decode step: base + token_s × tokens held (DecodeSpeed)
    decode_token_s: float = 0.0
    num_swapped: int = 0  # requests whose KV waits in the host pool now
    num_swapped_out: int = 0  # preemptions by swap, since the start
    num_handed_back: int = 0  # preemptions by recompute handed back to the caller, since the start
    num_admitted_tokens: int = 0  # tokens of the requests admitted since the start
    num_admitted_cached_tokens: int = 0  # of those, found in the prefix cache


RECENT_STEPS = 32  # steps whose longest is ``StepProgress.max_step_s``


@dataclass(frozen=True, slots=True)
class StepProgress:
    """Whether the engine thread gets on with its work (``EngineThread.progress``), read live.

    "Work" is what the thread can do now without waiting for a command: a step or a command in
    progress, or requests the last step left runnable. A decode worker whose requests all wait
    for their KV (reservations), a prefill worker holding finished prefills for their target
    (handed off), requests no block is free for, swapped-out ones that cannot come back: none of
    these is work, since the engine cannot step them until a command changes something, and it
    waits for one."""

    num_steps: int = 0  # engine steps completed since the start
    has_work: bool = False
    # While it has work: seconds since it last completed a step or took the work up (left
    # waiting for a command), whichever is later; 0 without work.
    since_step_s: float = 0.0
    max_step_s: float = 0.0  # the longest of the last RECENT_STEPS steps that ran something


class EvictionLog:
    """Prefix-cache blocks the engine evicted, numbered, so each reader (the gateway, which
    corrects its prefix index) asks for what came after the last number it saw. Bounded: a
    reader that falls further behind than ``max_entries`` is told it missed some."""

    def __init__(self, max_entries: int) -> None:
        self._lock = threading.Lock()
        self._hashes: collections.deque[bytes] = collections.deque(maxlen=max_entries)
        self._next_seq = 0  # the number the next eviction gets

    def extend(self, block_hashes: list[bytes]) -> None:
        with self._lock:
            self._hashes.extend(block_hashes)
            self._next_seq += len(block_hashes)

    @property
    def next_seq(self) -> int:
        """The number the next eviction will get."""
        with self._lock:
            return self._next_seq

    def since(self, seq: int) -> tuple[list[bytes], int, bool]:
        """(hashes numbered ``seq`` and after, the next number, whether some were dropped). A
        ``seq`` from before a restart (beyond the next number) reads as everything missed."""
        with self._lock:
            first_kept = self._next_seq - len(self._hashes)
            if seq > self._next_seq:
                return list(self._hashes), self._next_seq, True
            start = max(seq, first_kept)
            hashes = list(itertools.islice(self._hashes, start - first_kept, None))
            return hashes, self._next_seq, seq < first_kept


def _measure(engine: LLMEngine, decode_speed: DecodeSpeed | None = None) -> EngineLoad:
    queued = sum(seq.num_tokens - seq.num_computed_tokens for seq in engine.waiting)
    queued += sum(
        seq.num_tokens - seq.num_computed_tokens - 1
        for seq in engine.running
        if seq.num_tokens - seq.num_computed_tokens > 1
    )
    line = (0.0, 0.0) if decode_speed is None else decode_speed.line() or (0.0, 0.0)
    return EngineLoad(
        num_waiting=len(engine.waiting),
        num_running=len(engine.running),
        num_reserved=len(engine.reservations),
        num_handed_off=len(engine.handed_off),
        num_queued_tokens=queued,
        num_running_tokens=sum(seq.num_tokens for seq in engine.running),
        num_free_blocks=engine.blocks.num_free_blocks,
        num_total_blocks=engine.blocks.num_total_blocks,
        num_preemptions=engine.num_preemptions,
        prefill_tok_s=engine.prefill_tok_s or 0.0,
        decode_base_s=line[0],
        decode_token_s=line[1],
        num_swapped=len(engine.swapped),
        num_swapped_out=engine.num_swapped_out,
        num_handed_back=engine.num_handed_back,
        num_admitted_tokens=engine.num_admitted_tokens,
        num_admitted_cached_tokens=engine.num_admitted_cached_tokens,
    )


_STOP = object()
PREFILL_SPEED_SMOOTHING = 0.2  # weight of the newest step in the moving average


def _note_prefill_speed(engine: LLMEngine, step_s: float) -> None:
    """Fold the last step, which took ``step_s``, into ``engine.prefill_tok_s``: a moving average
    of prompt tokens per second over the steps that computed some. A mixed step's decode share
    counts as prefill time: an underestimate, which makes the time cap bound the whole step
    (prompt and decodes) near ``max_prefill_step_s``; when the decodes alone take longer, the
    cap settles at its floor of one block per step."""
    num_prompt_tokens = engine.num_step_prompt_tokens
    if num_prompt_tokens == 0:
        return
    tok_s = num_prompt_tokens / max(step_s, 1e-6)
    if engine.prefill_tok_s is None:
        engine.prefill_tok_s = tok_s
    else:
        engine.prefill_tok_s += PREFILL_SPEED_SMOOTHING * (tok_s - engine.prefill_tok_s)


DECODE_SPEED_SMOOTHING = 0.05  # weight of the newest pure decode step in DecodeSpeed's fit
_MIN_RELATIVE_SPREAD = 0.1  # contexts must differ this much (std / mean) to fit a slope


class DecodeSpeed:
    """How long a pure decode step takes for the tokens its batch holds: the least-squares line
    ``step_s = base_s + token_s × context`` over recent steps, weighted exponentially (the
    newest ``DECODE_SPEED_SMOOTHING``). The gateway predicts from it what more requests do to
    a decode worker's step time, which is every request's time per output token there
    (``gateway.scheduler.place``). Until the contexts seen differ enough to fit a slope, the
    line goes through 0 (all of the step proportional to what the batch holds: an overestimate
    of what more context costs, so the gateway errs towards keeping TPOT). Engine thread
    only."""

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def note(self, num_context_tokens: int, step_s: float) -> None:
        keep = 1.0 - DECODE_SPEED_SMOOTHING
        x = float(num_context_tokens)
        self._w = keep * self._w + DECODE_SPEED_SMOOTHING
        self._x = keep * self._x + DECODE_SPEED_SMOOTHING * x
        self._y = keep * self._y + DECODE_SPEED_SMOOTHING * step_s
        self._xx = keep * self._xx + DECODE_SPEED_SMOOTHING * x * x
        self._xy = keep * self._xy + DECODE_SPEED_SMOOTHING * x * step_s

    def line(self) -> tuple[float, float] | None:
        """(base_s, token_s), None before the first step."""
        if self._w <= 0.0:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        variance = self._xx / self._w - mean_x * mean_x
        covariance = self._xy / self._w - mean_x * mean_y
        if variance > (_MIN_RELATIVE_SPREAD * mean_x) ** 2 and covariance > 0.0:
            slope = covariance / variance
            return max(0.0, mean_y - slope * mean_x), slope
        return 0.0, mean_y / max(mean_x, 1.0)


class EngineThread:
    """See the module docstring. ``submit``, ``call``, ``load`` and ``stop`` are thread-safe;
    ``watch`` and ``unwatch`` are for commands (they run on the engine thread)."""

    def __init__(
        self,
        engine: LLMEngine,
        *,
        name: str = "engine",
        clock: Callable[[], float] = time.perf_counter,
        on_death: Callable[[EngineFailed], None] | None = None,
    ) -> None:
        """``on_death(error)``: called once, on the engine thread, if the engine dies of a
        failure (not of ``stop``); it must only hand the news on."""
        self.engine = engine
        self._clock = clock  # times the steps
        self._on_death = on_death
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._lock = threading.Lock()
        self._error: EngineFailed | None = None
        self._decode_speed = DecodeSpeed()
        self._load = _measure(engine)
        self.evictions = EvictionLog(4 * engine.blocks.num_total_blocks)
        # Progress: written by the engine thread only, each a single attribute read whole by
        # ``progress`` on any thread (no lock on the step path; a reader may see one step's
        # update half done, which is off by one step, never by a stall).
        self._num_steps = 0
        self._has_work = False
        self._progress_at = clock()  # when a step last ended, or the work was taken up
        self._recent_step_s: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self._max_step_s = 0.0

    @property
    def load(self) -> EngineLoad:
        return self._load

    @property
    def progress(self) -> StepProgress:
        """Read live (see the module docstring), from any thread."""
        has_work = self._has_work
        since_step_s = max(0.0, self._clock() - self._progress_at) if has_work else 0.0
        return StepProgress(
            num_steps=self._num_steps,
            has_work=has_work,
            since_step_s=since_step_s,
            max_step_s=self._max_step_s,
        )

    @property
    def error(self) -> EngineFailed | None:
        """Why the engine died, or None while it runs."""
        return self._error

    @property
    def is_alive(self) -> bool:
        """Started, running, and not dead of a failure or a ``stop``."""
        return self._thread.is_alive() and self._error is None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current step and end the thread; pending commands get ``EngineFailed``."""
        self._commands.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def submit(self, command: Callable[[LLMEngine], _T]) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            if self._error is not None:
                future.set_exception(self._error)
                return future
            self._commands.put((command, future))
        return future

    async def call(self, command: Callable[[LLMEngine], _T], *, timeout_s: float = 60.0) -> _T:
        """Run ``command`` on the engine thread and await its result."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.submit(command)), timeout_s)
        except TimeoutError as exc:
            raise RequestTimeout(f"the engine did not answer within {timeout_s:g} s") from exc

    def watch(self, request_id: str, sink: OutputSink) -> None:
        self._sinks[request_id] = sink

    def unwatch(self, request_id: str) -> OutputSink | None:
        """Stop watching; returns the sink that was removed, if any."""
        return self._sinks.pop(request_id, None)

    # ---- the thread -------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            logger.exception("the engine failed; it is dead")
            error = EngineFailed(f"the engine failed: {type(exc).__name__}: {str(exc)[:300]}")
            self._die(error)
            if self._on_death is not None:
                try:
                    self._on_death(error)
                except Exception:
                    logger.exception("on_death failed")

    def _loop(self) -> None:
        """Until ``stop``; raises when the engine cannot go on (see Failures)."""
        engine = self.engine
        is_idle = True
        while True:
            try:
                if is_idle:
                    self._has_work = False
                    item = self._commands.get(timeout=engine.seconds_until_change())
                else:
                    item = self._commands.get_nowait()
            except queue.Empty:
                item = None
            if not self._has_work:  # taken up: a command came, or a room hold ran out
                self._progress_at = self._clock()
                self._has_work = True
            while item is not None:
                if item is _STOP:
                    self._die(EngineFailed("the engine stopped"))
                    return
                command, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(command(engine))
                    except Exception as exc:  # the command's own error, handed to its caller
                        future.set_exception(exc)
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    item = None
            if engine.has_unfinished():
                started = self._clock()
                outputs = engine.step()
                ended = self._clock()
                step_s = ended - started
                self._note_step(step_s, ended, has_runs=engine.num_scheduled_runs > 0)
                _note_prefill_speed(engine, step_s)
                if engine.num_step_prompt_tokens == 0 and self._load.num_running_tokens:
                    # A pure decode step, of the batch the last measure saw.
                    self._decode_speed.note(self._load.num_running_tokens, step_s)
                self._dispatch(outputs)
                is_idle = engine.num_scheduled_runs == 0
            else:
                is_idle = True
            evicted = engine.blocks.drain_evicted_hashes()
            if evicted:
                self.evictions.extend(evicted)
            self._load = _measure(engine, self._decode_speed)

    def _note_step(self, step_s: float, ended: float, *, has_runs: bool) -> None:
        """Count a completed step. Only steps that ran something set the step time: one that
        found nothing to run takes microseconds and says nothing about how long a real one
        may take (counting it would make a long first prefill look overdue)."""
        if has_runs:
            self._recent_step_s.append(step_s)
            self._max_step_s = max(self._recent_step_s)
        self._progress_at = ended
        self._num_steps += 1

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            request_id = output.request_id
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            is_last = output.finish_reason is not None or output.is_handed_off
            if is_last or output.is_preempted or output.error is not None:
                del self._sinks[request_id]
            try:
                sink(output if output.error is None else RequestFailed(output.error))
            except Exception:
                # The sink's own bug: its request can no longer be told anything. Free what it
                # holds, unless it was handed off: a transfer may be reading those blocks.
                logger.exception("the sink of request %s failed; aborting it", request_id)
                self._sinks.pop(request_id, None)
                if request_id not in self.engine.handed_off:
                    self.engine.abort(request_id)

    def _die(self, error: EngineFailed) -> None:
        with self._lock:
            self._error = error
        self._has_work = False  # nothing more will be done: no progress to wait for
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            try:
                sink(error)
            except Exception:  # one broken sink must not keep the news from the others
                logger.exception("the sink of request %s failed", request_id)
        while True:  # commands that raced in before _error was set
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(error)
