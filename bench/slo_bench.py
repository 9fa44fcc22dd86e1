"""``fairgate bench slo``: does interactive TPOT stay within its target under a batch flood?

The real stack (``fairgate up``'s code: the default model unless ``--engine``, one prefill and
one decode worker unless told otherwise, the gateway with its default settings, SQLite). Three
``interactive`` tenants each send streamed chat completions at ``interactive_rate`` (Poisson
arrivals; prompts of about ``interactive_prompt_tokens``, ``interactive_max_tokens`` out); one
``batch`` tenant keeps ``batch_concurrency`` streamed chat completions in flight (prompts of
about ``batch_prompt_tokens``, ``batch_max_tokens`` out), more than the stack serves at once.
The class goes in the ``X-Fairgate-Class`` header. Two phases of ``duration_s`` each:

- *interactive_alone*: the interactive tenants only;
- *with_batch_flood*: the same, after the flood has run ``flood_warmup_s`` (so that the decode
  batch is full of batch requests when the measured requests come).

Per request, from the client's clock: TTFT is the time from sending to the first event with
text; TPOT is (the finishing event's time − the first text's) / (``completion_tokens`` − 1),
with ``completion_tokens`` from the usage event (``stream_options.include_usage``), which is the
gateway's own definition (``gateway.metrics``: e2e − TTFT over the tokens after the first);
without usage, the gaps between text events stand for tokens. Attainment is the share of the
requests the gateway took (not refused) that met the class's target (``gateway.config``'s
``DEFAULT_SLO_CLASSES``: 2 s and 250 ms for ``interactive``); refusals (429/503) are counted
apart. The gaps between successive text events (ITL) and each request's longest gap tell a
uniformly slow decode from stalls.

Beside the clients: every worker's ``/v1/load`` each ``LOAD_POLL_S`` (the decode worker's fitted
step line ``decode_base_s + decode_token_s × tokens``, the tokens its batch holds, and the step
that line predicts for them; summarized per phase, and sample by sample from the flood's start
in ``decode_timeline``), CPU per process per phase (``bench.cpu_meter``), and at each
phase's end the gateway's ``/metrics`` attainment gauges (per class and per tenant, over its last
60 s). Prompts are random words (``bench.tenant_load.chat_body``); how many words make the
wanted tokens is measured on the stack first, with the chat template's tokens included.

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
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.cpu_meter import CpuMeter
from bench.lean_http import ConnectionPool, HttpError
from bench.null_stack import (
    create_tenant,
    log_counts,
    read_metrics,
    requests_by_outcome,
    stack_pids,
)
from bench.outcomes import percentile
from bench.report import log, print_result
from bench.tenant_load import REFUSED_PAUSE_S, chat_body, completion_from_answer
from deploy.stack import Stack, StackConfig, start_stack
from gateway.config import DEFAULT_SLO_CLASSES
from transfer.client import WorkerClient
from transfer.errors import FairgateError
from transfer.messages import WorkerLoad

__all__ = [
    "LoadSample",
    "SloPlan",
    "StreamTimes",
    "add_arguments",
    "main",
    "plan_of",
    "run_slo_bench",
    "time_per_output_token",
]

INTERACTIVE = "interactive"
BATCH = "batch"
INTERACTIVE_TENANTS = ("interactive-a", "interactive-b", "interactive-c")
BATCH_TENANT = "batch-flood"
WARMUP_TENANT = "warmup"
TARGETS = {slo.name: slo for slo in DEFAULT_SLO_CLASSES}
REQUEST_TIMEOUT_S = 600.0  # a batch request queued behind the flood may wait minutes on a CPU
LOAD_POLL_S = 1.0
LOAD_TIMEOUT_S = 5.0
WARMUP_SETTLE_S = 1.5  # three of the gateway's load polls: it has the measured speeds
CALIBRATION_WORDS = (16, 160)  # two prompt lengths whose token counts fix words → tokens
PHASES = ("interactive_alone", "with_batch_flood")


@dataclass(frozen=True, slots=True)
class SloPlan:
    """What one run sends (module docstring)."""

    engine: str = "default"
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    duration_s: float = 60.0
    flood_warmup_s: float = 10.0
    interactive_rate: float = 0.2  # requests/s, per interactive tenant
    interactive_prompt_tokens: int = 96
    interactive_max_tokens: int = 64
    batch_prompt_tokens: int = 1536
    batch_max_tokens: int = 128
    batch_concurrency: int = 16
    policy: str | None = None  # the gateway's default when None
    threads: int | None = None  # torch threads per worker; None: the stack's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.flood_warmup_s < 0 or self.interactive_rate <= 0:
            raise ValueError("duration_s and interactive_rate must be > 0, flood_warmup_s >= 0")
        if min(self.interactive_max_tokens, self.batch_max_tokens) < 2:
            raise ValueError("max_tokens must be at least 2: TPOT needs a second token")
        if self.batch_concurrency < 1 or min(self.num_prefill_workers, self.num_decode_workers) < 1:
            raise ValueError("batch_concurrency and worker counts must be at least 1")


def time_per_output_token(first_s: float, last_s: float, num_tokens: int) -> float | None:
    """Seconds per token after the first, from the first token's and the last token's arrival
    times; None for fewer than two tokens (no TPOT)."""
    if num_tokens < 2:
        return None
    return (last_s - first_s) / (num_tokens - 1)


@dataclass(slots=True)
class StreamTimes:
    """One streamed chat completion as the client saw it: when each SSE event with text came,
    when the finishing one came (``perf_counter`` times), the usage event's counts, and how it
    failed if it did (``refused``: the gateway's 429/503 with its error code; ``error``: an
    in-band error event's code, or ``client_timeout``)."""

    sent_s: float
    text_s: list[float] = field(default_factory=list)
    finished_s: float | None = None
    ended_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    refused: str | None = None
    error: str | None = None

    def on_chunk(self, chunk: bytes, now: float) -> None:
        """Note an HTTP chunk of the stream (one or more SSE events) that arrived at ``now``."""
        for line in chunk.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue  # blank separators and ``data: [DONE]``
            event = json.loads(line[6:])
            if "error" in event:
                self.error = str(event["error"].get("code") or "error")
                continue
            usage = event.get("usage")
            if usage:
                self.prompt_tokens = usage["prompt_tokens"]
                self.completion_tokens = usage["completion_tokens"]
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    self.text_s.append(now)
                if choice.get("finish_reason"):
                    self.finished_s = now

    @property
    def is_served(self) -> bool:
        return self.refused is None and self.error is None and self.finished_s is not None

    @property
    def ttft_s(self) -> float | None:
        return self.text_s[0] - self.sent_s if self.text_s else None

    @property
    def tpot_s(self) -> float | None:
        """The module docstring's TPOT; None unless served with at least two tokens."""
        if not self.is_served or not self.text_s:
            return None
        if self.completion_tokens is not None and self.finished_s is not None:
            return time_per_output_token(self.text_s[0], self.finished_s, self.completion_tokens)
        return time_per_output_token(self.text_s[0], self.text_s[-1], len(self.text_s))

    def gaps_s(self) -> list[float]:
        """The times between successive events with text."""
        return [b - a for a, b in zip(self.text_s, self.text_s[1:], strict=False)]


def _quantiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(values, 0.5) * scale, 3),
        "p99": round(percentile(values, 0.99) * scale, 3),
        "max": round(max(values) * scale, 3),
    }


def summarize_interactive(streams: Sequence[StreamTimes]) -> dict[str, Any]:
    """TTFT and TPOT figures and attainment of the interactive requests of a phase."""
    target = TARGETS[INTERACTIVE]
    taken = [s for s in streams if s.refused is None]
    served = [s for s in taken if s.is_served]
    ttfts = [s.ttft_s for s in served if s.ttft_s is not None]
    tpots = [t for s in served if (t := s.tpot_s) is not None]
    gaps = [gap for s in served for gap in s.gaps_s()]
    longest_gaps = [max(s.gaps_s()) for s in served if len(s.text_s) > 1]
    ttft_met = sum(s.ttft_s is not None and s.ttft_s <= target.ttft_target_s for s in taken)
    tpot_target_s = target.tpot_target_s or float("inf")
    return {
        "sent": len(streams),
        "served": len(served),
        "refused": dict(Counter(s.refused for s in streams if s.refused is not None)),
        "failed": dict(Counter(s.error for s in taken if s.error is not None)),
        "ttft_ms": _quantiles(ttfts, 1e3),
        "tpot_ms": _quantiles(tpots, 1e3),
        "itl_ms": _quantiles(gaps, 1e3),
        "longest_gap_ms": _quantiles(longest_gaps, 1e3),
        "ttft_attainment": round(ttft_met / len(taken), 3) if taken else None,
        "tpot_attainment": (
            round(sum(t <= tpot_target_s for t in tpots) / len(tpots), 3) if tpots else None
        ),
        "mean_prompt_tokens": _mean([s.prompt_tokens for s in served]),
        "mean_completion_tokens": _mean([s.completion_tokens for s in served]),
    }


def summarize_batch(streams: Sequence[StreamTimes], start_s: float, end_s: float) -> dict[str, Any]:
    """The flood's requests: those served that finished in [start_s, end_s), and their output
    tokens per second of that window."""
    served = [s for s in streams if s.is_served]
    in_window = [s for s in served if s.finished_s is not None and start_s <= s.finished_s < end_s]
    tokens = sum(s.completion_tokens or len(s.text_s) for s in in_window)
    return {
        "sent": len(streams),
        "completed": len(in_window),
        "output_tok_s": round(tokens / (end_s - start_s), 2) if end_s > start_s else None,
        "refused": dict(Counter(s.refused for s in streams if s.refused is not None)),
        "failed": dict(Counter(s.error for s in streams if s.error is not None)),
        "ttft_ms": _quantiles([t for s in in_window if (t := s.ttft_s) is not None], 1e3),
        "tpot_ms": _quantiles([t for s in in_window if (t := s.tpot_s) is not None], 1e3),
        "mean_prompt_tokens": _mean([s.prompt_tokens for s in in_window]),
        "mean_completion_tokens": _mean([s.completion_tokens for s in in_window]),
    }


def _mean(values: Sequence[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.fmean(known), 1) if known else None


class _Client:
    """Streamed chat completions of random words, each tenant with its key and class."""

    def __init__(self, stack: Stack, model: str, rng: random.Random) -> None:
        url = httpx.URL(stack.base_url)
        self.pool = ConnectionPool(url.host, url.port or 80)
        self.model = model
        self.rng = rng
        self.headers: dict[str, bytes] = {}
        self.words_per_token = 1.0
        self.template_tokens = 0

    def add_tenant(self, tenant: str, key: str, slo_class: str) -> None:
        self.headers[tenant] = (
            f"authorization: Bearer {key}\r\nx-fairgate-class: {slo_class}\r\n".encode()
        )

    async def calibrate(self, tenant: str) -> None:
        """Measure the prompt tokens two word counts make (the chat template's tokens, then
        tokens per word), so that ``words_for`` hits a token count."""
        counts: list[int] = []
        for num_words in CALIBRATION_WORDS:
            body = chat_body(self.model, self.rng, num_words, 1)
            status, _, answer = await asyncio.wait_for(
                self.pool.post("/v1/chat/completions", body, self.headers[tenant]),
                REQUEST_TIMEOUT_S,
            )
            if status != 200:
                raise RuntimeError(f"calibration: the gateway answered {status}: {answer[:200]!r}")
            counts.append(completion_from_answer(tenant, 0.0, 0.0, answer).prompt_tokens)
        low, high = CALIBRATION_WORDS
        tokens_per_word = (counts[1] - counts[0]) / (high - low)
        self.words_per_token = 1.0 / tokens_per_word
        self.template_tokens = round(counts[0] - tokens_per_word * low)

    def words_for(self, num_tokens: int) -> int:
        return max(1, round((num_tokens - self.template_tokens) * self.words_per_token))

    async def stream(self, tenant: str, num_tokens: int, max_tokens: int) -> StreamTimes:
        body = json.loads(chat_body(self.model, self.rng, self.words_for(num_tokens), max_tokens))
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        times = StreamTimes(time.perf_counter())

        # ``post_stream`` shows its predicate every chunk until the predicate holds once; this
        # one never holds, so it sees them all.
        def observe(chunk: bytes) -> bool:
            times.on_chunk(chunk, time.perf_counter())
            return False

        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await self.pool.post_stream(
                    "/v1/chat/completions", json.dumps(body).encode(), self.headers[tenant], observe
                )
        except HttpError as exc:
            if exc.status not in (429, 503):
                raise RuntimeError(f"{tenant}: the gateway answered {exc}") from None
            times.refused = f"{exc.status} {json.loads(exc.body)['error']['code']}"
        except TimeoutError:
            times.error = "client_timeout"
        times.ended_s = time.perf_counter()
        return times


async def _poisson(client: _Client, plan: SloPlan, tenant: str, seed: str) -> list[StreamTimes]:
    """One interactive tenant's requests over ``duration_s``, each awaited to its end."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[StreamTimes]] = []
    next_at = time.perf_counter()
    end = next_at + plan.duration_s
    while (next_at := next_at + rng.expovariate(plan.interactive_rate)) < end:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        request = client.stream(tenant, plan.interactive_prompt_tokens, plan.interactive_max_tokens)
        tasks.append(asyncio.create_task(request))
    return list(await asyncio.gather(*tasks))


async def _interactive(client: _Client, plan: SloPlan, phase: str) -> list[StreamTimes]:
    runs = await asyncio.gather(
        *(_poisson(client, plan, t, f"{plan.seed}:{phase}:{t}") for t in INTERACTIVE_TENANTS)
    )
    return [stream for run in runs for stream in run]


async def _flood_client(client: _Client, plan: SloPlan, into: list[StreamTimes]) -> None:
    while True:
        times = await client.stream(BATCH_TENANT, plan.batch_prompt_tokens, plan.batch_max_tokens)
        into.append(times)
        if times.refused is not None:
            await asyncio.sleep(REFUSED_PAUSE_S)  # about its Retry-After; no hot loop


@dataclass(slots=True)
class LoadSample:
    """A worker's ``/v1/load`` answer and when it came (``perf_counter``)."""

    t_s: float
    worker: str
    load: WorkerLoad


async def _poll_loads(stack: Stack, into: list[LoadSample]) -> None:
    """Every worker's ``/v1/load`` each ``LOAD_POLL_S`` until cancelled."""
    urls = {w.process.pid: w.http_url for w in stack.workers}
    clients = {
        name: WorkerClient(urls[pid]) for name, pid in stack_pids(stack).items() if pid in urls
    }
    try:
        while True:
            for name, worker in clients.items():
                try:
                    load = await worker.load(timeout_s=LOAD_TIMEOUT_S)
                except FairgateError:
                    continue  # a missed poll is a gap in the samples, not the run's failure
                into.append(LoadSample(time.perf_counter(), name, load))
            await asyncio.sleep(LOAD_POLL_S)
    finally:
        for worker in clients.values():
            await worker.aclose()


def predicted_step_s(load: WorkerLoad) -> float:
    """The decode step the worker's own line predicts for the tokens its batch holds now."""
    return load.decode_base_s + load.decode_token_s * load.num_running_tokens


def _load_summary(samples: Sequence[LoadSample], start_s: float, end_s: float) -> dict[str, Any]:
    """Per worker, over the samples in [start_s, end_s): its batch, what it held and queued,
    and for a decode worker the step its line predicted; plus its last line."""
    by_worker: dict[str, list[WorkerLoad]] = {}
    for sample in samples:
        if start_s <= sample.t_s < end_s:
            by_worker.setdefault(sample.worker, []).append(sample.load)
    summary: dict[str, Any] = {}
    for name, loads in sorted(by_worker.items()):
        figures: dict[str, Any] = {
            "samples": len(loads),
            "num_running": _quantiles([float(x.num_running) for x in loads]),
            "num_reserved": _quantiles([float(x.num_reserved) for x in loads]),
            "num_running_tokens": _quantiles([float(x.num_running_tokens) for x in loads]),
            "num_queued_tokens": _quantiles([float(x.num_queued_tokens) for x in loads]),
            "busy_share": round(
                sum(x.num_running + x.num_waiting > 0 for x in loads) / len(loads), 3
            ),
            "num_preemptions": loads[-1].num_preemptions - loads[0].num_preemptions,
        }
        if loads[-1].role == "decode":
            figures["predicted_step_ms"] = _quantiles([predicted_step_s(x) for x in loads], 1e3)
            figures["last_line"] = _line(loads[-1])
        summary[name] = figures
    return summary


def decode_timeline(
    samples: Sequence[LoadSample], start_s: float, end_s: float
) -> dict[str, list[list[float]]]:
    """Per decode worker, each sample in [start_s, end_s) (from the flood's start, its warm-up
    included) as [seconds from ``start_s``, requests running, requests reserved (KV not landed
    yet: not in the running tokens), tokens the running ones hold, the step its line predicts
    for them in ms]: when the batch got in, and what the batch and the line did then."""
    timeline: dict[str, list[list[float]]] = {}
    for sample in samples:
        if sample.load.role == "decode" and start_s <= sample.t_s < end_s:
            timeline.setdefault(sample.worker, []).append(
                [
                    round(sample.t_s - start_s, 1),
                    sample.load.num_running,
                    sample.load.num_reserved,
                    sample.load.num_running_tokens,
                    round(predicted_step_s(sample.load) * 1e3, 1),
                ]
            )
    return timeline


def _line(load: WorkerLoad) -> dict[str, float]:
    return {
        "decode_base_s": round(load.decode_base_s, 5),
        "decode_token_s": load.decode_token_s,
        "num_running": load.num_running,
        "num_running_tokens": load.num_running_tokens,
        "predicted_step_ms": round(predicted_step_s(load) * 1e3, 2),
    }


def attainment_gauges(metrics: str) -> dict[str, Any]:
    """The gateway's TTFT and TPOT attainment gauges: per class, and per tenant and class."""
    found: dict[str, Any] = {}
    wanted = (
        "fairgate_slo_attainment",
        "fairgate_tpot_attainment",
        "fairgate_tenant_slo_attainment",
        "fairgate_tenant_tpot_attainment",
    )
    for family in text_string_to_metric_families(metrics):
        if family.name not in wanted:
            continue
        values: dict[str, float] = {}
        for sample in family.samples:
            labels = sample.labels
            key = (
                f"{labels['tenant']}/{labels['slo_class']}"
                if "tenant" in labels
                else labels["slo_class"]
            )
            values[key] = round(sample.value, 3)
        found[family.name] = values
    return found


async def _decode_lines(stack: Stack) -> dict[str, Any]:
    lines: dict[str, Any] = {}
    for i, worker in enumerate(w for w in stack.workers if w.spec.role == "decode"):
        async with WorkerClient(worker.http_url) as client:
            lines[f"decode-{i}"] = _line(await client.load(timeout_s=LOAD_TIMEOUT_S))
    return lines


async def _gateway_figures(stack: Stack) -> dict[str, Any]:
    metrics = await read_metrics(stack)
    return attainment_gauges(metrics) | {"requests_by_outcome": dict(requests_by_outcome(metrics))}


async def _warm_up(client: _Client, plan: SloPlan) -> None:
    """Calibrate the prompts, then a few requests of both shapes at once, so that the workers
    have measured their speeds (the decode line over batches of different sizes)."""
    await client.calibrate(WARMUP_TENANT)
    log(
        f"prompts: {client.template_tokens} template tokens, "
        f"{1 / client.words_per_token:.2f} tokens per word"
    )
    shapes = [(plan.interactive_prompt_tokens, plan.interactive_max_tokens)] * 2
    shapes += [(plan.batch_prompt_tokens, plan.interactive_max_tokens)] * 2
    await asyncio.gather(*(client.stream(WARMUP_TENANT, n, m) for n, m in shapes))
    await asyncio.sleep(WARMUP_SETTLE_S)


async def _measure(stack: Stack, plan: SloPlan) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30.0) as http:
        warmup_key = await create_tenant(stack, WARMUP_TENANT)
        response = await http.get("/v1/models", headers={"authorization": f"Bearer {warmup_key}"})
        response.raise_for_status()
        model = str(response.json()["data"][0]["id"])
    client = _Client(stack, model, random.Random(plan.seed))
    client.add_tenant(WARMUP_TENANT, warmup_key, INTERACTIVE)
    for tenant in INTERACTIVE_TENANTS:
        client.add_tenant(tenant, await create_tenant(stack, tenant), INTERACTIVE)
    client.add_tenant(BATCH_TENANT, await create_tenant(stack, BATCH_TENANT), BATCH)
    samples: list[LoadSample] = []
    poller = asyncio.create_task(_poll_loads(stack, samples))
    flood: list[asyncio.Task[None]] = []
    batch_streams: list[StreamTimes] = []
    phases: dict[str, Any] = {}
    try:
        await _warm_up(client, plan)
        for phase in PHASES:
            if phase == "with_batch_flood":
                flood_start_s = time.perf_counter()
                flood = [
                    asyncio.create_task(_flood_client(client, plan, batch_streams))
                    for _ in range(plan.batch_concurrency)
                ]
                await asyncio.sleep(plan.flood_warmup_s)
            meter = CpuMeter(stack_pids(stack))
            meter.start()
            start_s = time.perf_counter()
            log(f"{phase}: {plan.duration_s:g} s")
            streams = await _interactive(client, plan, phase)
            end_s = time.perf_counter()
            for task in flood:
                if task.done():
                    task.result()  # a flood client's error is the run's
            result: dict[str, Any] = {
                "interactive": summarize_interactive(streams),
                "cpu_cores": meter.stop(),
                "workers": _load_summary(samples, start_s, end_s),
                "decode_line_at_end": await _decode_lines(stack),
                "gateway": await _gateway_figures(stack),
            }
            if flood:
                result["batch"] = summarize_batch(batch_streams, start_s, end_s)
                result["decode_timeline"] = decode_timeline(samples, flood_start_s, end_s)
            log(f"{phase}: {json.dumps(result['interactive'])}")
            phases[phase] = result
    finally:
        for task in [*flood, poller]:
            task.cancel()
        await asyncio.gather(*flood, poller, return_exceptions=True)
        client.pool.close()
    return phases


def run_slo_bench(plan: SloPlan, *, output: str | None = None) -> dict[str, Any]:
    """Run ``plan`` on a fresh stack; the result (also printed as the last stdout line, and
    written to ``output`` when given)."""
    with tempfile.TemporaryDirectory(prefix="fairgate-slo-") as state_dir:
        gateway_args = ["--log-level", "warning"]
        if plan.policy is not None:
            gateway_args += ["--policy", plan.policy]
        stack = start_stack(
            StackConfig(
                engine=plan.engine,
                num_prefill_workers=plan.num_prefill_workers,
                num_decode_workers=plan.num_decode_workers,
                port=0,
                state_dir=Path(state_dir),
                worker_args=["--log-level", "warning"],
                gateway_args=gateway_args,
                log_dir=Path(state_dir) / "logs",
                threads_per_worker=plan.threads,
            )
        )
        try:
            phases = asyncio.run(_measure(stack, plan))
        finally:
            stack.stop()
        log_lines = log_counts(Path(state_dir) / "logs")
    target = TARGETS[INTERACTIVE]
    flooded = phases["with_batch_flood"]["interactive"]
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "targets": {"ttft_s": target.ttft_target_s, "tpot_s": target.tpot_target_s},
        "phases": phases,
        "flood_tpot_p99_ms": flooded["tpot_ms"]["p99"],
        "flood_tpot_p99_within_target": (
            flooded["tpot_ms"]["p99"] is not None
            and target.tpot_target_s is not None
            and flooded["tpot_ms"]["p99"] <= target.tpot_target_s * 1e3
        ),
        "log_lines": log_lines,
    }
    print_result(result, output)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fairgate bench slo``'s flags."""
    default = SloPlan()
    parser.add_argument("--engine", default=default.engine, help="default | tiny | null | PATH")
    parser.add_argument("--prefill-workers", type=int, default=default.num_prefill_workers)
    parser.add_argument("--decode-workers", type=int, default=default.num_decode_workers)
    parser.add_argument(
        "--duration-s", type=float, default=default.duration_s, help="each phase's length"
    )
    parser.add_argument(
        "--flood-warmup-s",
        type=float,
        default=default.flood_warmup_s,
        help="how long the flood runs before the flooded phase is measured",
    )
    parser.add_argument(
        "--interactive-rate",
        type=float,
        default=default.interactive_rate,
        help="requests/s per interactive tenant (three of them)",
    )
    parser.add_argument(
        "--interactive-prompt-tokens", type=int, default=default.interactive_prompt_tokens
    )
    parser.add_argument(
        "--interactive-max-tokens", type=int, default=default.interactive_max_tokens
    )
    parser.add_argument("--batch-prompt-tokens", type=int, default=default.batch_prompt_tokens)
    parser.add_argument("--batch-max-tokens", type=int, default=default.batch_max_tokens)
    parser.add_argument(
        "--batch-concurrency",
        type=int,
        default=default.batch_concurrency,
        help="the batch tenant's requests in flight",
    )
    parser.add_argument("--policy", default=None, help="the gateway's policy (default: its own)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: shared)"
    )
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--output", default=None, help="also write the JSON result here")


def plan_of(args: argparse.Namespace) -> SloPlan:
    return SloPlan(
        engine=args.engine,
        num_prefill_workers=args.prefill_workers,
        num_decode_workers=args.decode_workers,
        duration_s=args.duration_s,
        flood_warmup_s=args.flood_warmup_s,
        interactive_rate=args.interactive_rate,
        interactive_prompt_tokens=args.interactive_prompt_tokens,
        interactive_max_tokens=args.interactive_max_tokens,
        batch_prompt_tokens=args.batch_prompt_tokens,
        batch_max_tokens=args.batch_max_tokens,
        batch_concurrency=args.batch_concurrency,
        policy=args.policy,
        threads=args.threads,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slo_bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_slo_bench(plan_of(args), output=args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
