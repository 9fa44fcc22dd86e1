"""What happened to each request a load generator sent, and the figures of many of them.

``open_loop`` sends requests at Poisson arrivals and collects their outcomes. ``timed_post`` sends
one request through a ``bench.lean_http.ConnectionPool`` under a client timeout and returns an
``Outcome`` whatever happens: an answer (any status), the client's timeout, or a transport error.
It never raises for the server's behaviour, so an open loop counts every request it sent.
``summarize`` turns a window's outcomes into the figures the overload and prompt flood benchmarks
report.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from bench.lean_http import ConnectionPool, header

__all__ = ["Outcome", "open_loop", "percentile", "summarize", "timed_post"]

OutcomeKind = Literal["ok", "refused", "client_error", "timeout", "error"]
_REFUSED = (429, 503)  # what the gateway answers for load it will not serve now


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: ``kind`` ``ok`` (200), ``refused`` (429 or 503), ``client_error`` (any other
    status), ``timeout`` (the client gave up) or ``error`` (the connection failed); ``reason``:
    the status and the error's ``code`` from the body (``"429 queue_full"``), or the exception's
    name. Times are ``perf_counter`` seconds."""

    kind: OutcomeKind
    reason: str
    intended_at: float  # when the arrival process meant to send it
    started_at: float  # when it was sent
    ended_at: float  # when its answer was read (or the client gave up)
    has_retry_after: bool = False
    # From a 200's ``Server-Timing`` (gateway.openai_routes): the gateway's own view, from when
    # its handler began on the request: waiting in its queue for workers, and in all.
    server_queue_s: float | None = None
    server_total_s: float | None = None

    @property
    def latency_s(self) -> float:
        return self.ended_at - self.started_at


class _ErrorBody(msgspec.Struct):
    error: dict[str, Any] = {}


def _reason(status: int, answer: bytes) -> str:
    try:
        code = msgspec.json.decode(answer, type=_ErrorBody).error.get("code")
    except msgspec.DecodeError:
        code = None
    return f"{status} {code}" if code else str(status)


def _server_timing(head: bytes) -> dict[str, float]:
    """``Server-Timing: queue;dur=1.2, worker;dur=3.4, total;dur=5.6`` in seconds by name."""
    value = header(head, b"server-timing")
    timing: dict[str, float] = {}
    for part in (value or b"").decode("latin-1").split(","):
        name, _, duration = part.strip().partition(";dur=")
        with contextlib.suppress(ValueError):
            timing[name] = float(duration) / 1e3
    return timing


async def timed_post(
    pool: ConnectionPool,
    path: str,
    body: bytes,
    headers: bytes,
    *,
    timeout_s: float,
    intended_at: float | None = None,
) -> Outcome:
    """Send ``body`` and wait at most ``timeout_s`` for the whole answer."""
    started_at = time.perf_counter()
    intended = started_at if intended_at is None else intended_at
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            status, head, answer = await pool.post(path, body, headers)
    except TimeoutError:
        # An OS-level TimeoutError (a connect that timed out) is a transport error, not ours.
        kind: OutcomeKind = "timeout" if deadline.expired() else "error"
        return Outcome(kind, "TimeoutError", intended, started_at, time.perf_counter())
    except (OSError, EOFError, asyncio.LimitOverrunError, ValueError) as exc:
        return Outcome("error", type(exc).__name__, intended, started_at, time.perf_counter())
    ended_at = time.perf_counter()
    if status == 200:
        timing = _server_timing(head)
        return Outcome(
            "ok",
            "200",
            intended,
            started_at,
            ended_at,
            server_queue_s=timing.get("queue"),
            server_total_s=timing.get("total"),
        )
    return Outcome(
        "refused" if status in _REFUSED else "client_error",
        _reason(status, answer),
        intended,
        started_at,
        ended_at,
        has_retry_after=header(head, b"retry-after") is not None,
    )


async def open_loop(
    send: Callable[[float], Coroutine[Any, Any, Outcome]],
    rate: float,
    start: float,
    window_s: float,
    rng: random.Random,
) -> list[Outcome]:
    """Outcomes of the requests of a Poisson arrival process of ``rate`` per second over
    ``[start, start + window_s)`` (``perf_counter`` times); ``send`` gets the time each was meant
    to go. Waits for every answer (each bounded by its client timeout)."""
    tasks: list[asyncio.Task[Outcome]] = []
    next_at = start
    while True:
        next_at += rng.expovariate(rate)
        if next_at >= start + window_s:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # Behind schedule, it starts the late ones at once, a burst (as a real client's backlog
        # would be), and the outcomes' send lag says how late.
        tasks.append(asyncio.create_task(send(next_at)))
    return list(await asyncio.gather(*tasks))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(values: Sequence[float], q: float) -> float | None:
    return round(percentile(values, q) * 1e3, 2) if values else None


def summarize(
    outcomes: Sequence[Outcome], windows: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Figures of the requests a load generator meant to send in ``windows`` (``(start, end)``
    ``perf_counter`` times; several when the phases of one kind alternate with others): rates
    over the windows' total length (``completed_rps`` counts the 200s that ended in one), the
    share of each kind, latency percentiles in ms (``answered_*``: of every answer, whatever its
    status), and how late the load generator sent them (``send_lag_*``: sent minus meant; it
    grows when the generator cannot keep up)."""
    total_s = sum(end - start for start, end in windows)

    def in_windows(t: float) -> bool:
        return any(start <= t < end for start, end in windows)

    num = len(outcomes)
    by_kind = Counter(o.kind for o in outcomes)
    ok = [o.latency_s for o in outcomes if o.kind == "ok"]
    answered = [o.latency_s for o in outcomes if o.kind not in ("timeout", "error")]
    refused = [o for o in outcomes if o.kind == "refused"]
    lags = [o.started_at - o.intended_at for o in outcomes]
    server_queue = [o.server_queue_s for o in outcomes if o.server_queue_s is not None]
    outside = [o.latency_s - o.server_total_s for o in outcomes if o.server_total_s is not None]
    return {
        "num_requests": num,
        "sent_rps": round(sum(in_windows(o.started_at) for o in outcomes) / total_s, 2),
        "send_lag_p50_ms": _ms(lags, 0.5),
        "send_lag_p99_ms": _ms(lags, 0.99),
        "completed_rps": round(
            sum(o.kind == "ok" and in_windows(o.ended_at) for o in outcomes) / total_s, 2
        ),
        "share": {kind: round(count / num, 4) for kind, count in sorted(by_kind.items())},
        "answers": dict(sorted(Counter(o.reason for o in outcomes).items())),
        "ok_p50_ms": _ms(ok, 0.5),
        "ok_p99_ms": _ms(ok, 0.99),
        "answered_p50_ms": _ms(answered, 0.5),
        "answered_p90_ms": _ms(answered, 0.9),
        "answered_p99_ms": _ms(answered, 0.99),
        "refused_p50_ms": _ms([o.latency_s for o in refused], 0.5),
        "refused_p99_ms": _ms([o.latency_s for o in refused], 0.99),
        "refused_with_retry_after": (
            round(sum(o.has_retry_after for o in refused) / len(refused), 4) if refused else None
        ),
        "num_timeouts": by_kind["timeout"],
        # Where the 200s' time went: in the gateway's queue for workers (where its overload
        # refusals look), and outside its handler (before the handler began: the connection's
        # and the event loop's backlog; or reading the answer).
        "server_queue_p50_ms": _ms(server_queue, 0.5),
        "server_queue_p99_ms": _ms(server_queue, 0.99),
        "outside_handler_p50_ms": _ms(outside, 0.5),
        "outside_handler_p99_ms": _ms(outside, 0.99),
    }
