"""``fairgate bench hol``: do short prompts wait behind a long one of the same tenant?

Head-of-line blocking on the real stack (``fairgate up``'s code: one prefill and one decode
worker, the gateway, SQLite). Two tenants: ``hol`` sends one long prompt (``long_tokens``
random token ids), then ``delay_s`` later ``num_short`` short ones (``short_tokens``);
``other`` sends ``num_short`` short ones at that same moment. Every request is a streamed
completion of ``max_tokens`` tokens, and its TTFT is the time from sending it to its first
content chunk, as the client sees it. PecSched's claim: the short prompts' TTFT does not depend
on the long one's length, and the long one's own TTFT is not much more than its prefill alone.

Before the measured rounds a ``warmup`` tenant sends a few prompts, so that the workers have
measured their speeds and the gateway caps what it sends them as it does in steady state (a
fresh stack runs its first step at the whole token budget and sends everything at once). Each
round's prompts are new random ids (no prefix-cache hits), and a round starts once the last
one's requests have ended.

Engines: ``default`` (the issue's case: a 4,070-token prompt takes some 20 s to prefill on a CPU),
``tiny`` (the tiny random model: its context holds 2,048 tokens and it computes them in well
under a second, so the effect is small in absolute terms), ``null`` (the real engine loop over
the null runner at ``NULL_PREFILL_TOK_S``: the default model's scheduling in seconds), or a
model path.

The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.isolation_bench import has_text
from bench.lean_http import ConnectionPool
from bench.null_stack import create_tenant, log_counts
from bench.report import log, print_result
from deploy.stack import Stack, StackConfig, start_stack

__all__ = ["HolPlan", "add_arguments", "main", "plan_of", "run_hol_bench"]

NULL_PREFILL_TOK_S_ENV = "FAIRGATE_NULL_PREFILL_TOK_S"  # ``engine.loader``'s, without torch
NULL_PREFILL_TOK_S = 1000.0  # the null engine's prompt speed: a 4,000-token prompt in 4 s
# The longest prompt each known engine takes (its context less the output), for the default.
LONG_TOKENS = {"default": 4070, "tiny": 2000, "null": 4070}
# The gateway reads its settings from ``FAIRGATE_<SECTION>_<FIELD>`` too (``gateway.config``).
INFLIGHT_S_ENV = "FAIRGATE_SCHEDULER_MAX_PREFILL_INFLIGHT_S"
WARMUP_REQUESTS = 3
WARMUP_SETTLE_S = 1.5  # three of the gateway's load polls: it has the measured speeds
PAUSE_S = 1.0  # between rounds
REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class HolPlan:
    """What one run sends (module docstring)."""

    engine: str = "default"
    long_tokens: int = LONG_TOKENS["default"]
    short_tokens: int = 32
    num_short: int = 4
    delay_s: float = 0.8
    max_tokens: int = 4
    rounds: int = 1
    policy: str | None = None  # the gateway's default when None
    # The gateway's ``max_prefill_inflight_s`` (None: its default). Raised, every prompt goes
    # to the prefill worker at once and the worker's own order is what is measured.
    max_prefill_inflight_s: float | None = None
    warmup: bool = True  # measure a stack whose speeds are known (module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.short_tokens < self.long_tokens:
            raise ValueError("short prompts must be shorter than the long one")
        if self.num_short < 1 or self.rounds < 1 or self.max_tokens < 1:
            raise ValueError("num_short, rounds and max_tokens must be at least 1")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")


class _Client:
    """Streamed completions of random token ids, one tenant key each."""

    def __init__(self, stack: Stack, keys: dict[str, str], model: str, plan: HolPlan) -> None:
        url = httpx.URL(stack.base_url)
        self.pool = ConnectionPool(url.host, url.port or 80)
        self.auth = {
            name: f"authorization: Bearer {key}\r\n".encode() for name, key in keys.items()
        }
        self.model = model
        self.plan = plan
        self.rng = random.Random(plan.seed)

    async def ttft(self, tenant: str, num_tokens: int) -> float:
        prompt = [self.rng.randrange(1000, 40000) for _ in range(num_tokens)]
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.plan.max_tokens,
            "temperature": 0,
            "stream": True,
        }
        start = time.perf_counter()
        first = await asyncio.wait_for(
            self.pool.post_stream(
                "/v1/completions", json.dumps(body).encode(), self.auth[tenant], has_text
            ),
            REQUEST_TIMEOUT_S,
        )
        if first is None:
            raise RuntimeError(f"{tenant}: a completion without any text")
        return round(first - start, 3)


async def _round(client: _Client) -> dict[str, Any]:
    plan = client.plan
    long = asyncio.create_task(client.ttft("hol", plan.long_tokens))
    await asyncio.sleep(plan.delay_s)
    same = [client.ttft("hol", plan.short_tokens) for _ in range(plan.num_short)]
    other = [client.ttft("other", plan.short_tokens) for _ in range(plan.num_short)]
    ttfts = await asyncio.gather(*same, *other)
    return {
        "long_ttft_s": await long,
        "same_tenant_short_ttft_s": sorted(ttfts[: plan.num_short]),
        "other_tenant_short_ttft_s": sorted(ttfts[plan.num_short :]),
    }


async def _measure(stack: Stack, plan: HolPlan) -> list[dict[str, Any]]:
    keys = {name: await create_tenant(stack, name) for name in ("warmup", "hol", "other")}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30.0) as http:
        response = await http.get(
            "/v1/models", headers={"authorization": f"Bearer {keys['warmup']}"}
        )
        response.raise_for_status()
        model = str(response.json()["data"][0]["id"])
    client = _Client(stack, keys, model, plan)
    try:
        for _ in range(WARMUP_REQUESTS if plan.warmup else 0):
            await client.ttft("warmup", max(plan.short_tokens, plan.long_tokens // 8))
        await asyncio.sleep(WARMUP_SETTLE_S if plan.warmup else 0.0)
        rounds: list[dict[str, Any]] = []
        for index in range(plan.rounds):
            result = await _round(client)
            log(f"round {index}: {result}")
            rounds.append(result)
            await asyncio.sleep(PAUSE_S)
        return rounds
    finally:
        client.pool.close()


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    values: list[float] = []
    for result in rounds:
        value = result[key]
        values += value if isinstance(value, list) else [value]
    return round(statistics.median(values), 3)


def run_hol_bench(plan: HolPlan, *, output: str | None = None) -> dict[str, Any]:
    """Run ``plan`` on a fresh stack; the result (also printed as the last stdout line, and
    written to ``output`` when given)."""
    with tempfile.TemporaryDirectory(prefix="fairgate-hol-") as state_dir:
        gateway_args = ["--log-level", "warning"]
        if plan.policy is not None:
            gateway_args += ["--policy", plan.policy]
        env: dict[str, str] = {}
        if plan.engine == "null":
            env[NULL_PREFILL_TOK_S_ENV] = str(NULL_PREFILL_TOK_S)
        if plan.max_prefill_inflight_s is not None:
            env[INFLIGHT_S_ENV] = str(plan.max_prefill_inflight_s)
        stack = start_stack(
            StackConfig(
                engine=plan.engine,
                port=0,
                state_dir=Path(state_dir),
                worker_args=["--log-level", "warning"],
                gateway_args=gateway_args,
                env=env,
                log_dir=Path(state_dir) / "logs",
            )
        )
        try:
            rounds = asyncio.run(_measure(stack, plan))
        finally:
            stack.stop()
        log_lines = log_counts(Path(state_dir) / "logs")
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "rounds": rounds,
        "median_long_ttft_s": _median(rounds, "long_ttft_s"),
        "median_same_tenant_short_ttft_s": _median(rounds, "same_tenant_short_ttft_s"),
        "median_other_tenant_short_ttft_s": _median(rounds, "other_tenant_short_ttft_s"),
        "log_lines": log_lines,
    }
    print_result(result, output)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fairgate bench hol``'s flags."""
    default = HolPlan()
    parser.add_argument("--engine", default="default", help="default | tiny | null | PATH")
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=None,
        help="the long prompt's tokens (default: 4070, or 2000 with the tiny model)",
    )
    parser.add_argument("--short-tokens", type=int, default=default.short_tokens)
    parser.add_argument("--num-short", type=int, default=default.num_short)
    parser.add_argument("--delay-s", type=float, default=default.delay_s)
    parser.add_argument("--max-tokens", type=int, default=default.max_tokens)
    parser.add_argument("--rounds", type=int, default=default.rounds)
    parser.add_argument("--policy", default=None, help="the gateway's policy (default: its own)")
    parser.add_argument(
        "--max-prefill-inflight-s",
        type=float,
        default=None,
        help="the gateway's prefill in-flight cap in seconds of work (default: its own)",
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="measure a fresh stack (speeds not yet known)"
    )
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--output", default=None, help="also write the JSON result here")


def plan_of(args: argparse.Namespace) -> HolPlan:
    long_tokens = args.long_tokens or LONG_TOKENS.get(args.engine, LONG_TOKENS["default"])
    return HolPlan(
        engine=args.engine,
        long_tokens=long_tokens,
        short_tokens=args.short_tokens,
        num_short=args.num_short,
        delay_s=args.delay_s,
        max_tokens=args.max_tokens,
        rounds=args.rounds,
        policy=args.policy,
        max_prefill_inflight_s=args.max_prefill_inflight_s,
        warmup=not args.no_warmup,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hol_bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_hol_bench(plan_of(args), output=args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
