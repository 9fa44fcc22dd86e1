"""``fairgate bench gateway --overload``: offered more than it can serve, does the gateway keep
serving at capacity, and refuse the rest fast?

The stack is ``fairgate bench gateway``'s (one prefill and one decode worker with the null
engine, never the limit; the gateway with its default settings) and so are the requests
(non-streaming completions, 64 random prompt token ids, 16 output tokens). First ``rps_max``, as
there: a closed loop of ``CONCURRENCY`` clients. Then, for each factor (1.5 and 3 by default),
an open loop of Poisson arrivals at factor × ``rps_max`` for a window, every request with a
client timeout (``CLIENT_TIMEOUT_S``; a request that times out closes its connection, as a
real client's would, and counts as a timeout whatever the gateway did later). Each factor runs
twice:

- ``one_tenant``: all of it from one tenant (the demo tenant), as the issue measured it;
- ``two_tenants``: the same flood, plus a second tenant at a small steady rate
  (``STEADY_SHARE`` of ``rps_max``). The gateway refuses a tenant's own backlog; the steady
  tenant's requests should all succeed.

Per tenant and factor: the rate sent against the rate meant (and how late the generator sent,
``send_lag_*``), requests completed (200) per second over the window and their ratio to
``rps_max`` (the goal: 0.9 or more), the share of each kind of answer (200, refused with 429 or
503, other statuses, client timeouts, transport errors), each status with its error code, the
latency of the completed and of the refused requests, whether the refusals carried
``Retry-After``, and where the 200s' time went by the gateway's ``Server-Timing``: in its queue
for workers, or outside its handler (``outside_handler_*``: before it began on the request).

Per phase: the gateway's own count of the requests that ended, by outcome (``gateway_outcomes``,
from its metrics: ``ok`` beyond the client's 200s is work done for clients that had left;
``client_disconnected``, requests it dropped as their clients left); the depth of its queue for
workers, sampled once a second, and how many of those scrapes it did not answer within 5 s (its
backlog is then in front of its handlers, where its refusals do not look); the CPU of every
process of the stack and of this load generator (in cores; ``rps_max_cpu_cores`` the same at
capacity), the gateway's CPU per completed request (``gateway_cpu_ms_per_completed``, against
``rps_max_gateway_cpu_ms_per_completed``) and this loop's timer lag: on 2 cores the generator
competes with what it measures, and these say when it did. The stack's logs go to files; the
result counts their warnings, errors and tracebacks per process.

The last stdout line is the JSON result.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench.cpu_meter import measure_window
from bench.gateway_bench import CONCURRENCY, OUTPUT_TOKENS, PROMPT_TOKENS, StackLoad, sustained_rps
from bench.lean_http import ConnectionPool
from bench.null_stack import (
    METRICS_TIMEOUT_S,
    create_tenant,
    log_counts,
    queue_depth,
    read_metrics,
    requests_by_outcome,
    stack_pids,
    start_null_stack,
)
from bench.outcomes import Outcome, open_loop, summarize, timed_post
from bench.report import log, print_result
from deploy.stack import Stack
from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection

__all__ = ["FACTORS", "OverloadPlan", "run_overload_bench"]

FACTORS = (1.5, 3.0)
CLIENT_TIMEOUT_S = 10.0  # what an impatient client waits; the gateway should answer well before
STEADY_SHARE = 0.05  # the second tenant's rate, of rps_max
FLOOD_TENANT = "flood"  # the names in the result; the flood sends with the demo tenant's key
STEADY_TENANT = "steady"
DRAIN_S = 2.0  # after a phase: what the gateway still holds of it ends
START_DELAY_S = 0.05  # a phase's arrivals begin this long after it is set up
QUEUE_SAMPLE_S = 1.0


@dataclass(frozen=True, slots=True)
class OverloadPlan:
    """What runs and for how long (``of(quick=True)``: shorter windows, for a first look)."""

    factors: tuple[float, ...] = FACTORS
    window_s: float = 20.0
    client_timeout_s: float = CLIENT_TIMEOUT_S
    warmup_s: float = 3.0
    rps_window_s: float = 10.0
    two_tenants: bool = True
    drain_s: float = DRAIN_S

    @classmethod
    def of(
        cls,
        factors: tuple[float, ...] = FACTORS,
        *,
        quick: bool = False,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> OverloadPlan:
        if quick:
            return cls(factors, 5.0, client_timeout_s, warmup_s=1.0, rps_window_s=3.0)
        return cls(factors, client_timeout_s=client_timeout_s)

    def __post_init__(self) -> None:
        if not self.factors or any(f <= 0 for f in self.factors):
            raise ValueError(f"overload factors must be positive, got {self.factors}")
        if self.window_s <= 0 or self.client_timeout_s <= 0:
            raise ValueError("the window and the client timeout must be positive")


class _Sender:
    """Sends one tenant's requests through a shared pool, and counts those in flight."""

    def __init__(self, pool: ConnectionPool, key: str, seed: str, timeout_s: float) -> None:
        self.pool = pool
        self.auth = f"authorization: Bearer {key}\r\n".encode()
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.num_in_flight = 0
        self.max_in_flight = 0

    async def send(self, intended_at: float) -> Outcome:
        prompt = [self.rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]
        body = msgspec.json.encode({"model": "null", "prompt": prompt, "max_tokens": OUTPUT_TOKENS})
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            return await timed_post(
                self.pool,
                "/v1/completions",
                body,
                self.auth,
                timeout_s=self.timeout_s,
                intended_at=intended_at,
            )
        finally:
            self.num_in_flight -= 1


async def _queue_depths(stack: Stack, start: float, window_s: float) -> tuple[list[int], int]:
    """The gateway's queue depth about once a second over the window, and how many scrapes
    got no answer within ``METRICS_TIMEOUT_S`` (a scrape waits its turn like any request: when
    they time out, the gateway's backlog is in front of its handlers). None starts after the
    window."""
    depths: list[int] = []
    num_unanswered = 0
    next_at = start
    while (now := time.perf_counter()) < start + window_s:
        await asyncio.sleep(max(0.0, next_at - now))
        try:
            async with asyncio.timeout(METRICS_TIMEOUT_S):
                depths.append(queue_depth(await read_metrics(stack)))
        except (httpx.HTTPError, TimeoutError):
            num_unanswered += 1
        next_at = max(next_at + QUEUE_SAMPLE_S, time.perf_counter())
    return depths, num_unanswered


async def _phase(
    stack: Stack, senders: dict[str, tuple[_Sender, float]], plan: OverloadPlan, seed: str
) -> dict[str, Any]:
    """One window of open loops, one per tenant at its rate; the figures per tenant."""
    window_s = plan.window_s
    ended_before = requests_by_outcome(await read_metrics(stack))
    start = time.perf_counter() + START_DELAY_S
    measured = asyncio.create_task(measure_window(stack_pids(stack), start, window_s))
    depths = asyncio.create_task(_queue_depths(stack, start, window_s))
    outcomes = await asyncio.gather(
        *(
            open_loop(sender.send, rate, start, window_s, random.Random(f"{seed}:{name}"))
            for name, (sender, rate) in senders.items()
        )
    )
    cpu_cores, loop_lag = await measured
    queue_depths, num_unanswered = await depths
    await asyncio.sleep(plan.drain_s)  # what the gateway still holds of this phase ends
    ended = requests_by_outcome(await read_metrics(stack)) - ended_before
    tenants: dict[str, Any] = {}
    for (name, (sender, rate)), results in zip(senders.items(), outcomes, strict=True):
        tenants[name] = {
            "intended_rps": round(rate, 1),
            **summarize(results, [(start, start + window_s)]),
            # The most requests outstanding at once, each holding a connection of its own.
            "max_in_flight": sender.max_in_flight,
        }
        sender.max_in_flight = 0
    return {
        "tenants": tenants,
        "gateway_outcomes": dict(sorted(ended.items())),
        # Requests waiting in the gateway's queue for workers (where its refusals look),
        # sampled once a second: to set against the clients' max_in_flight.
        "gateway_queue_depth_max": max(queue_depths, default=None),
        "gateway_queue_depth_samples": queue_depths,
        "gateway_metrics_unanswered": num_unanswered,
        "cpu_cores": cpu_cores,
        "loop_lag_ms": loop_lag,
    }


async def _measure(stack: Stack, plan: OverloadPlan) -> dict[str, Any]:
    url = httpx.URL(stack.base_url)
    pool = ConnectionPool(url.host, url.port or 80)
    load = StackLoad(stack)
    try:
        # The CPU over the closed loop's measured window: what each process spends at capacity,
        # to set against each phase's.
        at_capacity = asyncio.create_task(
            measure_window(
                stack_pids(stack), time.perf_counter() + plan.warmup_s, plan.rps_window_s
            )
        )
        rps_max = await sustained_rps(load, warmup_s=plan.warmup_s, duration_s=plan.rps_window_s)
        rps_max_cpu_cores, _ = await at_capacity
        log(f"rps_max {rps_max:.0f}; cpu (cores) {rps_max_cpu_cores}")
        flood = _Sender(pool, stack.demo_key, "flood", plan.client_timeout_s)
        steady_key = await create_tenant(stack, STEADY_TENANT)
        steady = _Sender(pool, steady_key, "steady", plan.client_timeout_s)
        phases: dict[str, dict[str, Any]] = {}
        for factor in plan.factors:
            variants = {"one_tenant": {FLOOD_TENANT: (flood, factor * rps_max)}}
            if plan.two_tenants:
                variants["two_tenants"] = {
                    FLOOD_TENANT: (flood, factor * rps_max),
                    STEADY_TENANT: (steady, STEADY_SHARE * rps_max),
                }
            for variant, senders in variants.items():
                figures = await _phase(stack, senders, plan, f"{factor}:{variant}")
                for tenant in figures["tenants"].values():
                    tenant["completed_of_rps_max"] = round(tenant["completed_rps"] / rps_max, 3)
                completed_rps = sum(t["completed_rps"] for t in figures["tenants"].values())
                figures["gateway_cpu_ms_per_completed"] = _cpu_ms_per(
                    figures["cpu_cores"], completed_rps
                )
                phases[f"{factor:g}x_{variant}"] = {"factor": factor, **figures}
                _log_phase(factor, variant, figures)
    finally:
        pool.close()
        await load.aclose()
    return {
        "rps_max": round(rps_max, 1),
        "rps_max_cpu_cores": rps_max_cpu_cores,
        "rps_max_gateway_cpu_ms_per_completed": _cpu_ms_per(rps_max_cpu_cores, rps_max),
        "phases": phases,
    }


def _cpu_ms_per(cpu_cores: dict[str, float], completed_rps: float) -> float | None:
    """The gateway's CPU per completed request (ms), its refusals' included: what the machine
    gave it does not change this figure, so it compares across runs where rates do not."""
    gateway_cores = cpu_cores.get("gateway")
    if gateway_cores is None or completed_rps <= 0:
        return None
    return round(gateway_cores * 1e3 / completed_rps, 3)


def _log_phase(factor: float, variant: str, figures: dict[str, Any]) -> None:
    for name, tenant in figures["tenants"].items():
        log(
            f"{factor:g}x {variant} {name}: sent {tenant['sent_rps']}/s "
            f"(meant {tenant['intended_rps']}), completed {tenant['completed_rps']}/s "
            f"({tenant['completed_of_rps_max']} of rps_max), answers {tenant['answers']}"
        )
    log(f"  cpu (cores) {figures['cpu_cores']}, loop lag {figures['loop_lag_ms']}")


def gateway_settings() -> dict[str, Any]:
    """The overload settings the stack ran with (the defaults: the bench sets none)."""
    scheduler = SchedulerSection()
    return {
        "queue_timeout_s": scheduler.queue_timeout_s,
        "max_queued_per_tenant": scheduler.max_queued_per_tenant,
        "max_queue_wait_s": {c.name: c.queue_wait_limit_s for c in DEFAULT_SLO_CLASSES},
        "class": "standard (the default)",
    }


def run_overload_bench(
    plan: OverloadPlan, *, quick: bool = False, output: str | None = None
) -> int:
    result: dict[str, Any] = {
        "mode": "overload",
        "quick": quick,
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "rps_max_concurrency": CONCURRENCY,
        "window_s": plan.window_s,
        "client_timeout_s": plan.client_timeout_s,
        "steady_share": STEADY_SHARE,
        "gateway_settings": gateway_settings(),
    }
    with contextlib.ExitStack() as cleanup:
        state_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fairgate-")))
        stack = start_null_stack(state_dir, {}, log_dir=state_dir / "logs")
        cleanup.callback(stack.stop)
        result |= asyncio.run(_measure(stack, plan))
        stack.stop()
        result["log_lines"] = log_counts(state_dir / "logs")
    print_result(result, output)
    return 0
