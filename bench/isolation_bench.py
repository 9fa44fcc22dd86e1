"""``fairgate bench isolation``: does a flooding tenant hurt the others, on the real stack?

For each policy (``fcfs`` and ``vtc`` by default) a fresh stack runs (``fairgate up``'s code: the
tiny model, one prefill and one decode worker, the gateway, SQLite) and four tenants are
created. A closed-loop probe on the first policy's stack measures how many requests per second it
completes (``capacity_rps``); every policy then gets the same rates. Then two phases of the
same length, each from the same seeded arrival trace:

- *steady*: three tenants each send ``STEADY_SHARE`` of that capacity (Poisson arrivals);
- *flood*: the same three, plus a fourth sending ten times one steady tenant's rate, which
  overloads the stack.

Requests are streamed completions (``PROMPT_TOKENS`` random token ids, ``OUTPUT_TOKENS`` tokens),
so TTFT is the time to the first content chunk as the client sees it. The report gives each
tenant's p50/p99 TTFT per phase and policy, how many of its requests the gateway refused (429 or
503 with ``Retry-After``: the flood's own backlog is refused once it stands, ``gateway.dispatch``),
and, for the steady tenants, the ratio of their p99 with and without the flood
(``scheduling.md``'s isolation claim: under a fair policy it stays small; under FCFS the flood's
queue is everyone's queue).

The claim holds for tenants within their fair share of what the stack serves under the flood,
which on a small machine is less than the probe measures: the load generator, the gateway and
the workers share its cores, and the flood's arrivals cost CPU the probe's closed loop does not
spend. So the report gives the rate the stack completed requests at during the flood
(``flood_served_rps``) and each steady tenant's rate as a fraction of its fair quarter of it
(``steady_of_fair_share``; at 1 or more it is backlogged, and no fair policy keeps its TTFT);
``--steady-share`` sets the steady tenants' rate.

The last stdout line is the JSON result.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.lean_http import ConnectionPool, HttpError
from bench.outcomes import percentile
from bench.report import log, print_result
from deploy.stack import Stack, StackConfig, start_stack

__all__ = ["has_text", "run_isolation_bench"]

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 16
STEADY_TENANTS = ("steady-a", "steady-b", "steady-c")
FLOOD_TENANT = "flood"
# Default: of the probed capacity, per steady tenant: 30% for the three. At 15% (the first
# default) they asked for all of their fair share of what a 2-core machine serves under the
# flood (``steady_of_fair_share`` 1.0), so they were backlogged and the bench measured that.
STEADY_SHARE = 0.10
FLOOD_FACTOR = 10.0  # the flooding tenant's rate, in steady tenants' rates: 100% of capacity
PROBE_CONCURRENCY = 64
PROBE_WARMUP_S = 3.0
REFUSED_PAUSE_S = 1.0  # a probe client the gateway refused waits about its Retry-After


def has_text(chunk: bytes) -> bool:
    """Whether an SSE chunk of a streamed completion carries text."""
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if any(choice.get("text") for choice in event.get("choices", [])):
                return True
    return False


class _Tenants:
    """The four tenants' keys on one stack, and a request that measures its TTFT."""

    def __init__(self, stack: Stack, client: httpx.AsyncClient, rng: random.Random) -> None:
        self.stack = stack
        self.client = client  # for the admin calls; completions go through the lean pool
        self.rng = rng
        self.keys: dict[str, str] = {}
        self.model = ""
        self.completed_at: list[float] = []  # perf_counter times completions ended
        self.refused: collections.Counter[str] = collections.Counter()  # 429/503, by tenant
        url = httpx.URL(stack.base_url)
        self.pool = ConnectionPool(url.host, url.port or 80)

    async def create(self) -> None:
        admin = {"authorization": f"Bearer {self.stack.admin_token}"}
        for name in (*STEADY_TENANTS, FLOOD_TENANT):
            response = await self.client.post(
                "/admin/v1/tenants", json={"name": name}, headers=admin
            )
            response.raise_for_status()
            response = await self.client.post(
                f"/admin/v1/tenants/{name}/keys", json={"name": "bench"}, headers=admin
            )
            response.raise_for_status()
            self.keys[name] = response.json()["secret"]
        response = await self.client.get(
            "/v1/models", headers={"authorization": f"Bearer {self.keys[FLOOD_TENANT]}"}
        )
        response.raise_for_status()
        self.model = response.json()["data"][0]["id"]

    async def ttft(self, tenant: str) -> float | None:
        """Seconds from sending to the first content chunk of a streamed completion; None when
        the gateway refused it for now (429 or 503, counted in ``refused``)."""
        prompt = [self.rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": OUTPUT_TOKENS,
            "temperature": 0,
            "stream": True,
        }
        headers = f"authorization: Bearer {self.keys[tenant]}\r\n".encode()
        start = time.perf_counter()
        try:
            first = await self.pool.post_stream(
                "/v1/completions", json.dumps(body).encode(), headers, has_text
            )
        except HttpError as exc:
            if exc.status in (429, 503):
                self.refused[tenant] += 1
                return None
            raise RuntimeError(f"{tenant}: the gateway answered {exc}") from None
        self.completed_at.append(time.perf_counter())
        if first is None:
            raise RuntimeError(f"{tenant}: a completion without any text")
        return first - start


async def _probe_capacity(tenants: _Tenants, duration_s: float) -> float:
    """Completed requests per second with ``PROBE_CONCURRENCY`` always in flight, counted over
    ``duration_s`` after ``PROBE_WARMUP_S`` (until the workers' speeds are measured the gateway
    caps what it sends them differently, and the first steps allocate)."""
    start = time.perf_counter() + PROBE_WARMUP_S
    deadline = start + duration_s
    completed = 0

    async def client(tenant: str) -> None:
        nonlocal completed
        while time.perf_counter() < deadline:
            if await tenants.ttft(tenant) is None:
                await asyncio.sleep(REFUSED_PAUSE_S)  # refused: not served, and no hot loop
                continue
            completed += start <= time.perf_counter() < deadline

    await asyncio.gather(
        *(client(STEADY_TENANTS[i % len(STEADY_TENANTS)]) for i in range(PROBE_CONCURRENCY))
    )
    return completed / duration_s


async def _phase(
    tenants: _Tenants, rates: dict[str, float], duration_s: float, seed: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Every tenant's TTFTs over one phase of Poisson arrivals at ``rates`` (requests/s), and
    how many of its requests were refused."""
    ttfts: dict[str, list[float]] = {tenant: [] for tenant in rates}
    refused_before = tenants.refused.copy()

    async def sender(tenant: str, rate: float, rng: random.Random) -> None:
        tasks: list[asyncio.Task[float | None]] = []
        next_at = time.perf_counter()
        end = next_at + duration_s
        while True:
            next_at += rng.expovariate(rate)
            if next_at >= end:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(tenants.ttft(tenant)))
        ttfts[tenant] = [t for t in await asyncio.gather(*tasks) if t is not None]

    await asyncio.gather(
        *(sender(tenant, rate, random.Random(f"{seed}:{tenant}")) for tenant, rate in rates.items())
    )
    refused = {tenant: tenants.refused[tenant] - refused_before[tenant] for tenant in rates}
    return ttfts, refused


def _summary(ttfts: dict[str, list[float]], refused: dict[str, int]) -> dict[str, dict[str, float]]:
    return {
        tenant: {
            "n": len(values),
            "refused": refused.get(tenant, 0),
            "p50_ttft_s": round(percentile(values, 0.5), 3),
            "p99_ttft_s": round(percentile(values, 0.99), 3),
        }
        for tenant, values in ttfts.items()
        if values
    }


async def _measure(
    stack: Stack, duration_s: float, seed: int, capacity: float | None, steady_share: float
) -> dict[str, Any]:
    """One policy's run; ``capacity`` (requests/s) is probed when None, else the first
    policy's, so that every policy sees the same rates."""
    async with httpx.AsyncClient(
        base_url=stack.base_url,
        timeout=httpx.Timeout(600.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    ) as client:
        tenants = _Tenants(stack, client, random.Random(seed))
        await tenants.create()
        if capacity is None:
            capacity = await _probe_capacity(tenants, min(10.0, duration_s / 2))
        steady_rate = steady_share * capacity
        log(f"capacity {capacity:.2f} req/s; steady tenants at {steady_rate:.2f} req/s each")
        steady = dict.fromkeys(STEADY_TENANTS, steady_rate)
        await asyncio.sleep(2.0)  # the probe's requests are done; let the queues drain
        without, refused_without = await _phase(tenants, steady, duration_s, seed)
        await asyncio.sleep(2.0)
        flood = {**steady, FLOOD_TENANT: FLOOD_FACTOR * steady_rate}
        flood_start = time.perf_counter()
        with_flood, refused_with = await _phase(tenants, flood, duration_s, seed)
        tenants.pool.close()
    # Requests are still arriving until the phase's end: what completed in it is what the stack
    # serves while flooded.
    flood_end = flood_start + duration_s
    served = sum(flood_start <= t < flood_end for t in tenants.completed_at) / duration_s
    fair_share = served / (len(STEADY_TENANTS) + 1)
    ratios = {
        tenant: round(percentile(with_flood[tenant], 0.99) / percentile(without[tenant], 0.99), 2)
        for tenant in STEADY_TENANTS
        if with_flood[tenant] and without[tenant]
    }
    return {
        "capacity_rps": round(capacity, 2),
        "steady_rate_rps": round(steady_rate, 3),
        "flood_rate_rps": round(FLOOD_FACTOR * steady_rate, 3),
        "flood_served_rps": round(served, 2),
        "steady_of_fair_share": round(steady_rate / fair_share, 3) if fair_share else None,
        "without_flood": _summary(without, refused_without),
        "with_flood": _summary(with_flood, refused_with),
        "steady_p99_ratio": ratios,
        "max_steady_p99_ratio": max(ratios.values()) if ratios else None,
    }


def run_isolation_bench(
    *,
    policies: tuple[str, ...] = ("fcfs", "vtc"),
    duration_s: float = 30.0,
    seed: int = 0,
    steady_share: float = STEADY_SHARE,
    output: str | None = None,
) -> int:
    """``steady_share``: each steady tenant's rate, as a fraction of the probed capacity."""
    if not 0 < steady_share < 1:
        raise ValueError(f"--steady-share must be between 0 and 1, got {steady_share}")
    result: dict[str, Any] = {
        "engine": "tiny",
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "duration_s": duration_s,
        "steady_share": steady_share,
        "policies": {},
    }
    capacity: float | None = None
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="fairgate-isolation-") as state_dir:
            stack = start_stack(
                StackConfig(
                    engine="tiny",
                    port=0,
                    state_dir=Path(state_dir),
                    worker_args=["--log-level", "warning"],
                    gateway_args=["--log-level", "warning", "--policy", policy],
                )
            )
            try:
                log(f"policy {policy}")
                measured = asyncio.run(_measure(stack, duration_s, seed, capacity, steady_share))
                capacity = measured["capacity_rps"]
                result["policies"][policy] = measured
                log(
                    f"{policy}: served {measured['flood_served_rps']} req/s under the flood "
                    f"(steady tenants at {measured['steady_of_fair_share']} of their fair "
                    f"share); steady p99 ratios {measured['steady_p99_ratio']}"
                )
            finally:
                stack.stop()
    print_result(result, output)
    return 0
