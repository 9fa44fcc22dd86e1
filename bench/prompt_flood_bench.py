"""``fairgate bench gateway --prompt-flood``: does one tenant's huge prompts slow another tenant's
small requests?

The stack is ``fairgate bench gateway``'s (null engine workers, never the limit; the gateway with
its default settings and the default model's tokenizer, which is what is under test). Two
tenants: ``small`` sends short completions (``SMALL_PROMPT_CHARS`` characters of text, tokenized
on the gateway's loop, ``OUTPUT_TOKENS`` tokens, non-streaming) at ``SMALL_RPS`` Poisson
arrivals throughout; ``flood`` runs ``FLOOD_CLIENTS`` closed-loop clients, each sending its next
huge prompt as soon as the last is answered. Phases without and with the flood alternate,
``rounds`` of each, so a noisy moment of the machine falls on both alike.

Each variant is a kind of huge prompt (random lowercase words: no two requests share much that a
tokenizer cache could keep):

- ``5mb``: 5,000,000 characters. Its length alone proves it over the context, so the gateway
  should refuse it (400 ``context_length_exceeded``) once the body is read, without tokenizing.
- ``near_bound``: 500,000 characters, under the length that proves a prompt too long (the
  context times the tokenizer's longest token, ``length_bound_chars``), so the gateway must
  tokenize it (off its event loop, one at a time per tenant) before it knows it has ~200,000
  tokens, and then refuses it: the harder case.
- ``fits``: a prompt of about the context's length in tokens (some 20 KB), tokenized off the loop,
  then accepted and served.

Per variant: the small requests' figures without and with the flood (latency p50/p90/p99 in
ms, answers, timeouts) and the ratios of those percentiles (on a shared machine the p99 of a few
hundred requests is one stall of the machine; the p50 and p90 are the steadier figures); how the
flood's requests were answered (each status with its error code, latency, rate); the CPU of each
process (in cores) and this load generator's loop lag, per kind of phase.

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
from typing import Any, Literal

import httpx
import msgspec

from bench.cpu_meter import measure_window
from bench.gateway_bench import OUTPUT_TOKENS, StackLoad
from bench.lean_http import ConnectionPool
from bench.null_stack import create_tenant, log_counts, stack_pids, start_null_stack
from bench.outcomes import Outcome, open_loop, summarize, timed_post
from bench.report import log, print_result
from deploy.stack import Stack
from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer

__all__ = ["VARIANTS", "PromptFloodPlan", "Variant", "run_prompt_flood_bench"]

Variant = Literal["5mb", "near_bound", "fits"]
VARIANTS: tuple[Variant, ...] = ("5mb", "near_bound", "fits")
HUGE_CHARS = 5_000_000
NEAR_BOUND_CHARS = 500_000
SMALL_PROMPT_CHARS = 200
SMALL_RPS = 20.0
FLOOD_CLIENTS = 4
SMALL_TIMEOUT_S = 30.0
FLOOD_TIMEOUT_S = 120.0  # a flood request waits for its tenant's turn to tokenize
FITS_MARGIN_TOKENS = 64  # under the context, for the output and the tokenizer's special tokens
PAUSE_S = 1.0  # between phases
# Words of 1 to many letters, about 5 on average: text the tokenizer has never seen.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz     "


@dataclass(frozen=True, slots=True)
class PromptFloodPlan:
    """What runs and for how long (``of(quick=True)``: one short round, for a first look)."""

    variants: tuple[Variant, ...] = VARIANTS
    phase_s: float = 10.0
    rounds: int = 3
    flood_clients: int = FLOOD_CLIENTS
    pause_s: float = PAUSE_S

    @classmethod
    def of(cls, *, quick: bool = False) -> PromptFloodPlan:
        return cls(phase_s=3.0, rounds=1) if quick else cls()

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or not self.variants:
            raise ValueError(f"prompt flood variants are {VARIANTS}, got {self.variants}")
        if self.phase_s <= 0 or self.rounds < 1 or self.flood_clients < 1:
            raise ValueError("the phase length, rounds and flood clients must be positive")


def random_text(rng: random.Random, num_chars: int) -> str:
    return "".join(rng.choices(_ALPHABET, k=num_chars))


def fitting_text(tokenizer: Tokenizer, rng: random.Random, max_tokens: int) -> str:
    """The longest prefix of some random text that encodes (as the gateway encodes a completion
    prompt) in at most ``max_tokens`` tokens."""
    # Random words make about a token per 2 characters: 8 leave room to search (were all of it
    # to fit, the whole text would be the answer, and ``prompt_chars`` in the result says so).
    text = random_text(rng, max_tokens * 8)
    low, high = 0, len(text) + 1  # text[:low] fits in max_tokens; text[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if len(tokenizer.encode(text[:middle], add_special_tokens=True)) <= max_tokens:
            low = middle
        else:
            high = middle
    return text[:low]


class _Bodies:
    """Each variant's request bodies, one for each flood client, encoded once."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, plan: PromptFloodPlan) -> None:
        rng = random.Random(0)
        num = plan.flood_clients
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        texts: dict[str, list[str]] = {}
        for variant in plan.variants:
            if variant == "5mb":
                texts[variant] = [random_text(rng, HUGE_CHARS) for _ in range(num)]
            elif variant == "near_bound":
                texts[variant] = [random_text(rng, NEAR_BOUND_CHARS) for _ in range(num)]
            else:
                max_tokens = max_model_len - OUTPUT_TOKENS - FITS_MARGIN_TOKENS
                texts[variant] = [fitting_text(tokenizer, rng, max_tokens) for _ in range(num)]
        self.prompt_chars = {variant: len(t[0]) for variant, t in texts.items()}
        self.bodies = {
            variant: [_body(text) for text in variant_texts]
            for variant, variant_texts in texts.items()
        }

    @property
    def length_bound_chars(self) -> int | None:
        """Prompts of this many characters or more are refused from their length alone."""
        per_token = self.tokenizer.max_bytes_per_token
        return None if per_token is None else self.max_model_len * per_token


def _body(prompt: str) -> bytes:
    return msgspec.json.encode({"model": "null", "prompt": prompt, "max_tokens": OUTPUT_TOKENS})


class _Tenants:
    def __init__(self, pool: ConnectionPool, keys: dict[str, str]) -> None:
        self.pool = pool
        self.auth = {
            name: f"authorization: Bearer {key}\r\n".encode() for name, key in keys.items()
        }
        self.rng = random.Random(1)

    async def small(self, intended_at: float) -> Outcome:
        body = _body(random_text(self.rng, SMALL_PROMPT_CHARS))
        return await timed_post(
            self.pool,
            "/v1/completions",
            body,
            self.auth["small"],
            timeout_s=SMALL_TIMEOUT_S,
            intended_at=intended_at,
        )

    async def flood_client(self, body: bytes, end: float) -> list[Outcome]:
        outcomes: list[Outcome] = []
        while time.perf_counter() < end:
            outcomes.append(
                await timed_post(
                    self.pool,
                    "/v1/completions",
                    body,
                    self.auth["flood"],
                    timeout_s=FLOOD_TIMEOUT_S,
                )
            )
        return outcomes


@dataclass(slots=True)
class _Series:
    """One kind of phase of one variant, over its rounds."""

    windows: list[tuple[float, float]]
    small: list[Outcome]
    flood: list[Outcome]
    cpu: list[dict[str, float]]
    lag_p99_ms: list[float]


async def _phase(
    stack: Stack, tenants: _Tenants, series: _Series, bodies: list[bytes] | None, phase_s: float
) -> None:
    """One phase: the small tenant's open loop, with the flood's clients unless ``bodies`` is
    None; what happened is added to ``series``."""
    start = time.perf_counter() + 0.05
    measured = asyncio.create_task(measure_window(stack_pids(stack), start, phase_s))
    rng = random.Random(f"{start}")
    small = asyncio.create_task(open_loop(tenants.small, SMALL_RPS, start, phase_s, rng))
    floods = [tenants.flood_client(body, start + phase_s) for body in bodies or []]
    for outcomes in await asyncio.gather(*floods):
        series.flood += outcomes
    series.small += await small
    cpu, lag = await measured
    series.windows.append((start, start + phase_s))
    series.cpu.append(cpu)
    if lag["p99_ms"] is not None:
        series.lag_p99_ms.append(lag["p99_ms"])


def _mean_cpu(samples: list[dict[str, float]]) -> dict[str, float]:
    names = {name for sample in samples for name in sample}
    return {
        name: round(sum(s.get(name, 0.0) for s in samples) / len(samples), 3)
        for name in sorted(names)
    }


def _variant_figures(without: _Series, with_flood: _Series) -> dict[str, Any]:
    small_without = summarize(without.small, without.windows)
    small_with = summarize(with_flood.small, with_flood.windows)

    def ratio(key: str) -> float | None:
        before, after = small_without[key], small_with[key]
        return round(after / before, 2) if before and after else None

    return {
        "small_without_flood": small_without,
        "small_with_flood": small_with,
        "small_p50_ratio": ratio("answered_p50_ms"),
        "small_p90_ratio": ratio("answered_p90_ms"),
        "small_p99_ratio": ratio("answered_p99_ms"),
        "flood": summarize(with_flood.flood, with_flood.windows)
        | {"answered_rps": _answered_rps(with_flood)},
        "cpu_cores_without_flood": _mean_cpu(without.cpu),
        "cpu_cores_with_flood": _mean_cpu(with_flood.cpu),
        "loop_lag_p99_ms_without_flood": max(without.lag_p99_ms, default=None),
        "loop_lag_p99_ms_with_flood": max(with_flood.lag_p99_ms, default=None),
    }


def _answered_rps(series: _Series) -> float:
    """Flood requests answered (any status) per second of the flood's phases."""
    total_s = sum(end - start for start, end in series.windows)
    num = sum(o.kind not in ("timeout", "error") for o in series.flood)
    return round(num / total_s, 2)


async def _measure(stack: Stack, plan: PromptFloodPlan, bodies: _Bodies) -> dict[str, Any]:
    keys = {name: await create_tenant(stack, name) for name in ("small", "flood")}
    url = httpx.URL(stack.base_url)
    tenants = _Tenants(ConnectionPool(url.host, url.port or 80), keys)
    variants: dict[str, Any] = {}
    try:
        for variant in plan.variants:
            without = _Series([], [], [], [], [])
            with_flood = _Series([], [], [], [], [])
            for _ in range(plan.rounds):
                await asyncio.sleep(plan.pause_s)
                await _phase(stack, tenants, without, None, plan.phase_s)
                await asyncio.sleep(plan.pause_s)
                await _phase(stack, tenants, with_flood, bodies.bodies[variant], plan.phase_s)
            figures = _variant_figures(without, with_flood)
            variants[variant] = {"prompt_chars": bodies.prompt_chars[variant], **figures}
            log(
                f"{variant}: small p50/p99 {figures['small_without_flood']['answered_p50_ms']}/"
                f"{figures['small_without_flood']['answered_p99_ms']} ms without the flood, "
                f"{figures['small_with_flood']['answered_p50_ms']}/"
                f"{figures['small_with_flood']['answered_p99_ms']} ms with it; flood answers "
                f"{figures['flood']['answers']}, p50 {figures['flood']['answered_p50_ms']} ms"
            )
    finally:
        tenants.pool.close()
    return variants


async def _max_model_len(stack: Stack) -> int:
    load = StackLoad(stack)
    try:
        return (await load.prefill.info()).max_model_len
    finally:
        await load.aclose()


def run_prompt_flood_bench(
    plan: PromptFloodPlan, *, quick: bool = False, output: str | None = None
) -> int:
    with contextlib.ExitStack() as cleanup:
        state_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fairgate-")))
        stack = start_null_stack(state_dir, {}, log_dir=state_dir / "logs")
        cleanup.callback(stack.stop)
        max_model_len = asyncio.run(_max_model_len(stack))
        tokenizer = Tokenizer.load(tokenizer_path(resolve_model("null")))
        log("making the prompts")
        bodies = _Bodies(tokenizer, max_model_len, plan)
        result: dict[str, Any] = {
            "mode": "prompt_flood",
            "quick": quick,
            "phase_s": plan.phase_s,
            "rounds": plan.rounds,
            "small_rps": SMALL_RPS,
            "small_prompt_chars": SMALL_PROMPT_CHARS,
            "flood_clients": plan.flood_clients,
            "max_model_len": max_model_len,
            "length_bound_chars": bodies.length_bound_chars,
            "variants": asyncio.run(_measure(stack, plan, bodies)),
        }
        stack.stop()
        result["log_lines"] = log_counts(state_dir / "logs")
    print_result(result, output)
    return 0
