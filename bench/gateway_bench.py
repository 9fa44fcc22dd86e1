"""``fairgate bench gateway``: how many requests the gateway sustains, and what it adds to each.

The whole stack runs on this machine (`fairgate up`'s code: one prefill and one decode worker
with the null engine, made fast enough that it is never the limit, and the gateway), and so does
this load generator. Requests are non-streaming completions of a 64-token prompt (random token
ids, so no prefix-cache hits) with 16 output tokens.

- ``rps_max``: closed loop, ``CONCURRENCY`` requests always in flight, completed requests per
  second over the measured window.
- overhead: open loop at half of ``rps_max`` (Poisson arrivals), in alternating blocks, the same
  requests sent (a) through the gateway and (b) straight to the workers the way the gateway
  drives them (``transfer.client.run_disaggregated``) from this process. ``overhead_p50_ms`` /
  ``overhead_p99_ms`` are the differences of the latency percentiles (b subtracted from a): what
  the gateway adds — HTTP and JSON, auth, quotas, tokenization, queueing, detokenization.
  ``server_timing_overhead_p50_ms`` is the gateway's own view (total minus time in worker calls,
  from its ``Server-Timing`` header).
- ``--tracing``: a second stack whose three processes trace every request and export the spans
  over OTLP/HTTP to a receiver process on this machine; one open loop at the rate above sends
  each request to a random stack and path, and ``tracing_overhead_p50_ms`` is what tracing
  adds to ``overhead_p50_ms``.

- ``--redis``: a second stack whose gateway shares its state as a replica would
  (``[replicas] redis_url``: quota reservations and settles in Redis, fair counters published
  every 50 ms), against a Redis server of its own on this machine; side by side as with
  ``--tracing``, ``redis_overhead_p50_ms`` / ``_p99_ms`` are what that adds.

``--overload`` and ``--prompt-flood`` are other benchmarks of the same stack, in
``bench.overload_bench`` and ``bench.prompt_flood_bench``; they share ``sustained_rps`` and
``StackLoad`` from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench.lean_http import ConnectionPool
from bench.null_stack import start_null_stack
from bench.outcomes import percentile
from bench.report import log, print_result
from deploy.launcher import start_child
from deploy.stack import Stack
from gateway.config import GatewaySection
from transfer.client import Connections, DecodeClient, PrefillClient, run_disaggregated
from transfer.messages import Preempted, SamplingSpec

__all__ = ["StackLoad", "run_gateway_bench", "sustained_rps"]

PROMPT_TOKENS = 64
OUTPUT_TOKENS = 16
CONCURRENCY = 48
UNSTREAMED_FLUSH_S = GatewaySection().unstreamed_flush_s
RECEIVER_TIMEOUT_S = 30.0  # for the OTLP receiver to start, and to report as it stops


class StackLoad:
    """Both ways to send one request, timed."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        [prefill] = [w for w in stack.workers if w.spec.role == "prefill"]
        [decode] = [w for w in stack.workers if w.spec.role == "decode"]
        self.connections = Connections()
        self.prefill = PrefillClient(prefill.http_url, connections=self.connections)
        self.decode = DecodeClient(decode.http_url, connections=self.connections)
        self.rng = random.Random(0)
        self.server_overheads_ms: list[float] = []
        self._auth = f"authorization: Bearer {stack.demo_key}\r\n".encode()
        url = httpx.URL(stack.base_url)
        self.gateway = ConnectionPool(url.host, url.port or 80)

    async def aclose(self) -> None:
        self.gateway.close()
        await self.connections.aclose()

    def _prompt(self) -> list[int]:
        return [self.rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]

    async def via_gateway(self) -> float:
        body = msgspec.json.encode(
            {"model": "null", "prompt": self._prompt(), "max_tokens": OUTPUT_TOKENS}
        )
        start = time.perf_counter()
        status, head, answer = await self.gateway.post("/v1/completions", body, self._auth)
        elapsed = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"gateway answered {status}: {answer[:500]!r}")
        timing_line = head.lower().split(b"server-timing: ", 1)[1].split(b"\r\n", 1)[0]
        timing = dict(part.strip().split(";dur=") for part in timing_line.decode().split(","))
        self.server_overheads_ms.append(float(timing["total"]) - float(timing["worker"]))
        return elapsed

    async def direct(self) -> float:
        sampling = SamplingSpec(max_tokens=OUTPUT_TOKENS)
        start = time.perf_counter()
        num_tokens = 0
        async for frame in run_disaggregated(
            self.prefill,
            self.decode,
            uuid.uuid4().hex,
            self._prompt(),
            sampling,
            flush_interval_s=UNSTREAMED_FLUSH_S,  # as the gateway asks for these requests
        ):
            if isinstance(frame, Preempted):  # the bench's batch never fills the decode cache
                raise RuntimeError("a direct request was preempted")
            num_tokens += len(frame.token_ids)
        elapsed = time.perf_counter() - start
        if num_tokens != OUTPUT_TOKENS:
            raise RuntimeError(f"direct request produced {num_tokens} tokens")
        return elapsed


async def _closed_loop(send: Callable[[], Awaitable[float]], duration_s: float) -> float:
    """Completed requests per second with ``CONCURRENCY`` always in flight."""
    deadline = time.perf_counter() + duration_s
    completed = 0

    async def client() -> None:
        nonlocal completed
        while time.perf_counter() < deadline:
            await send()
            completed += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return completed / (time.perf_counter() - start)


async def sustained_rps(load: StackLoad, *, warmup_s: float, duration_s: float) -> float:
    """``rps_max``: completed requests per second through the gateway, closed loop, after a
    warm-up."""
    await _closed_loop(load.via_gateway, warmup_s)
    return await _closed_loop(load.via_gateway, duration_s)


async def _open_loop(
    send: Callable[[], Coroutine[Any, Any, float]], rate: float, count: int, rng: random.Random
) -> list[float]:
    """Latencies of ``count`` requests sent at Poisson arrivals of ``rate`` per second."""
    only = ("", "")
    return (await _open_loop_mixed({only: send}, rate, count, rng))[only]


async def _open_loop_mixed(
    sends: dict[tuple[str, str], Callable[[], Coroutine[Any, Any, float]]],
    rate: float,
    count: int,
    rng: random.Random,
) -> dict[tuple[str, str], list[float]]:
    """Latencies per series of ``count`` requests at Poisson arrivals of ``rate`` per second,
    each sent the way of a series drawn at random."""
    keys = list(sends)
    tasks: list[tuple[tuple[str, str], asyncio.Task[float]]] = []
    next_at = time.perf_counter()
    for _ in range(count):
        next_at += rng.expovariate(rate)
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        key = rng.choice(keys)
        tasks.append((key, asyncio.create_task(sends[key]())))
    latencies: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    for key, task in tasks:
        latencies[key].append(await task)
    return latencies


async def _measure(stacks: dict[str, Stack], quick: bool) -> dict[str, dict[str, Any]]:
    """Each stack's ``rps_max``, then, at half of the lowest: one stack, open-loop blocks
    through the gateway and straight to the workers in turns; several stacks, one open loop
    at that rate whose requests each go to a random stack and path (so a noisy moment of the
    machine falls on every series alike, and the machine carries the same load as with one)."""
    loads = {name: StackLoad(stack) for name, stack in stacks.items()}
    try:
        rps_max: dict[str, float] = {}
        for name, load in loads.items():
            rps_max[name] = await sustained_rps(
                load, warmup_s=1.0 if quick else 3.0, duration_s=3.0 if quick else 10.0
            )
            log(f"{name}: rps_max {rps_max[name]:.0f}")
        rate = min(rps_max.values()) / 2
        block = max(50, int(rate * (2 if quick else 5)))
        rng = random.Random(1)
        gateway_s: dict[str, list[float]] = {name: [] for name in loads}
        direct_s: dict[str, list[float]] = {name: [] for name in loads}
        for load in loads.values():
            load.server_overheads_ms.clear()
        if len(loads) > 1:
            # Side by side: one arrival stream, each request to a random one of the series
            # (stack × path), so every series sees the same moments of the machine.
            sends = {
                (name, path): getattr(load, path)
                for name, load in loads.items()
                for path in ("via_gateway", "direct")
            }
            count = len(sends) * block * (1 if quick else 4)
            mixed = await _open_loop_mixed(sends, rate, count, rng)
            for (name, path), latencies in mixed.items():
                (gateway_s if path == "via_gateway" else direct_s)[name] += latencies
            for name in loads:
                log(
                    f"{name}: gateway p50 {percentile(gateway_s[name], 0.5) * 1e3:.2f} ms, "
                    f"direct p50 {percentile(direct_s[name], 0.5) * 1e3:.2f} ms"
                )
        else:
            [(name, load)] = loads.items()
            for round_index in range(2 if quick else 4):
                gateway_s[name] += await _open_loop(load.via_gateway, rate, block, rng)
                direct_s[name] += await _open_loop(load.direct, rate, block, rng)
                log(
                    f"round {round_index}: gateway p50 "
                    f"{percentile(gateway_s[name], 0.5) * 1e3:.2f} ms, direct p50 "
                    f"{percentile(direct_s[name], 0.5) * 1e3:.2f} ms"
                )
    finally:
        for load in loads.values():
            await load.aclose()
    # Side by side, each stack got its share of the one stream.
    stack_rate = rate / len(loads)
    return {
        name: _figures(
            rps_max[name],
            stack_rate,
            gateway_s[name],
            direct_s[name],
            loads[name].server_overheads_ms,
        )
        for name in loads
    }


def _figures(
    rps_max: float,
    rate: float,
    gateway_s: list[float],
    direct_s: list[float],
    server_overheads_ms: list[float],
) -> dict[str, Any]:
    ms = 1e3
    return {
        "rps_max": round(rps_max, 1),
        "rate_rps": round(rate, 1),
        "num_requests": len(gateway_s),
        "overhead_p50_ms": round((percentile(gateway_s, 0.5) - percentile(direct_s, 0.5)) * ms, 3),
        "overhead_p99_ms": round(
            (percentile(gateway_s, 0.99) - percentile(direct_s, 0.99)) * ms, 3
        ),
        "gateway_p50_ms": round(percentile(gateway_s, 0.5) * ms, 3),
        "gateway_p99_ms": round(percentile(gateway_s, 0.99) * ms, 3),
        "direct_p50_ms": round(percentile(direct_s, 0.5) * ms, 3),
        "direct_p99_ms": round(percentile(direct_s, 0.99) * ms, 3),
        "server_timing_overhead_p50_ms": round(statistics.median(server_overheads_ms), 3),
    }


def run_gateway_bench(
    *, quick: bool = False, tracing: bool = False, redis: bool = False, output: str | None = None
) -> int:
    """With ``tracing``, two stacks side by side, one exporting every span of every process to
    an OTLP/HTTP receiver (its own process, ``bench.otlp_receiver``) and one not tracing; the
    result adds ``tracing_overhead_p50_ms``, the difference of their ``overhead_p50_ms``."""
    result: dict[str, Any] = {
        "quick": quick,
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
    }
    with contextlib.ExitStack() as cleanup:
        state_dir = Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fairgate-bench-"))
        )
        if redis:
            redis_url = cleanup.enter_context(_redis_server())
            stacks = {"memory": start_null_stack(state_dir / "memory", {})}
            cleanup.callback(stacks["memory"].stop)
            stacks["redis"] = start_null_stack(
                state_dir / "redis", {"FAIRGATE_REPLICAS_REDIS_URL": redis_url}
            )
            cleanup.callback(stacks["redis"].stop)
            figures = asyncio.run(_measure(stacks, quick))
            result |= {
                "without_redis": figures["memory"],
                "with_redis": figures["redis"],
                "redis_overhead_p50_ms": round(
                    figures["redis"]["overhead_p50_ms"] - figures["memory"]["overhead_p50_ms"], 3
                ),
                "redis_overhead_p99_ms": round(
                    figures["redis"]["overhead_p99_ms"] - figures["memory"]["overhead_p99_ms"], 3
                ),
            }
        elif not tracing:
            stack = start_null_stack(state_dir, {})
            cleanup.callback(stack.stop)
            result |= asyncio.run(_measure({"off": stack}, quick))["off"]
        else:
            receiver = cleanup.enter_context(_ReceiverProcess())
            stacks = {"off": start_null_stack(state_dir / "off", {})}
            cleanup.callback(stacks["off"].stop)
            stacks["on"] = start_null_stack(
                state_dir / "on", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
            )
            cleanup.callback(stacks["on"].stop)
            figures = asyncio.run(_measure(stacks, quick))
            stacks["on"].stop()  # its processes export what is left as they stop
            spans_received = receiver.stop()
            # Every request through the gateway makes four spans or more: fewer means the
            # stack did not trace, and the "overhead" would be noise.
            if spans_received < figures["on"]["num_requests"]:
                raise RuntimeError(
                    f"the tracing stack exported {spans_received} spans for "
                    f"{figures['on']['num_requests']} requests: its tracing did not run"
                )
            result |= {
                "tracing_off": figures["off"],
                "tracing_on": figures["on"],
                "tracing_overhead_p50_ms": round(
                    figures["on"]["overhead_p50_ms"] - figures["off"]["overhead_p50_ms"], 3
                ),
                "tracing_gateway_p50_delta_ms": round(
                    figures["on"]["gateway_p50_ms"] - figures["off"]["gateway_p50_ms"], 3
                ),
                "spans_received": spans_received,
            }
    print_result(result, output)
    return 0


class _ReceiverProcess:
    """``python -m bench.otlp_receiver`` in its own process (decoding spans here would take the
    load generator's CPU), started like a worker (``deploy.launcher.start_child``): waited for
    with a timeout, and gone when this process is. ``stop`` returns how many spans it received."""

    def __enter__(self) -> _ReceiverProcess:
        command = [sys.executable, "-m", "bench.otlp_receiver", "--quiet", "--exit-with-parent"]
        self.child = start_child("OTLP receiver", command, timeout_s=RECEIVER_TIMEOUT_S)
        self.endpoint = str(self.child.ready["endpoint"])
        self._num_spans: int | None = None
        return self

    def stop(self) -> int:
        if self._num_spans is None:
            self.child.process.terminate()  # it reports its counts as it stops
            stopped = self.child.wait_event("stopped", RECEIVER_TIMEOUT_S)
            self.child.stop()
            self._num_spans = int(stopped["num_spans"])
        return self._num_spans

    def __exit__(self, *exc_info: object) -> None:
        self.child.stop()


@contextlib.contextmanager
def _redis_server() -> Iterator[str]:
    """A ``redis-server`` of this benchmark's own (deploy/redis.sh finds or installs it) on a
    free loopback port, without persistence; its URL."""
    script = Path(__file__).resolve().parent.parent / "deploy" / "redis.sh"
    found = subprocess.run([str(script)], check=True, capture_output=True, text=True)
    binary = found.stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory(prefix="fairgate-bench-redis-") as directory:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                   "--appendonly", "no", "--dir", directory]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10.0
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(timeout=10)
