"""``fairgate bench transfer``: the KV data plane against a plain send/recv, and time to first
token disaggregated against colocated, in one run.

Transfer: this process sends, a spawned process receives, over loopback on the backend the
engine's KV would use (gloo on CPU). For KV of the default model's shape and dtype at each size,
rounds alternate between
- ours: ``KvSender`` → ``KvReceiver``, from before the header is posted until the sender holds
  the receiver's ack that every block landed in its cache;
- raw: one ``send`` of a contiguous tensor of the same bytes on a 2-rank group of the same
  backend, from the go signal until the receiver's ack that its ``recv`` completed;
and each side's median is kept. Blocks are consecutive on both ends, as a fresh worker allocates
them (sent and received in place); ``*_scattered`` figures move randomly permuted blocks, the
worst case, through staging buffers.

TTFT: real worker processes with the default model (one prefill and one decode worker, one
colocated worker), a 1k-token prompt new every round (no prefix hits), sides alternating; the
time from sending the request to holding its first token, median of the rounds.
"""

from __future__ import annotations

import asyncio
import datetime
import multiprocessing
import queue
import random
import statistics
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

import torch

from bench.report import log, print_result
from engine.config import ModelConfig, load_config
from engine.loader import probe_dtype, resolve_precision
from engine.model_store import resolve_model
from engine.precision import dtype_name, host_kv_dtype
from transfer.errors import TransferError
from transfer.kv_layout import backend_for, layout_of
from transfer.kv_pair import PrefixStore, connect_store, create_process_group
from transfer.kv_receiver import KvReceiver, ReceiverConfig
from transfer.kv_sender import KvSender, SenderConfig, TransferJob, TransferResult
from transfer.messages import GenerateRequest, KvTarget, SamplingSpec, TokenFrame, TransferHeader

__all__ = ["run_transfer_bench"]

BLOCK_SIZE = 16
TTFT_PROMPT_TOKENS = 1024
TIMEOUT_S = 120.0


def _cache_shape(config: ModelConfig, num_blocks: int) -> tuple[int, ...]:
    return (2, config.num_layers, num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)


def _raw_group(store: Any, *, rank: int, device: torch.device) -> Any:
    """The baseline's own 2-rank group (rank 0 sends), beside the pair the sender makes."""
    return create_process_group(
        PrefixStore("bench/raw/pg", store),
        rank=rank,
        backend=backend_for(device),
        host="127.0.0.1",
        timeout_s=TIMEOUT_S,
    )


# ---- the receiving process ----------------------------------------------------------------------


class _Sink:
    """A destination that takes every transfer (the bench checks timing, the tests contents)."""

    def claim(self, header: TransferHeader) -> None:
        pass

    def landed(self, header: TransferHeader) -> None:
        pass

    def failed(self, header: TransferHeader, error: TransferError) -> None:
        log(f"bench transfer: the receiver failed {header.request_id}: {error}")


def _receiver_main(
    conn: Connection, shape: tuple[int, ...], kv_dtype_name: str, model_id: str, raw_bytes: int
) -> None:
    dtype = getattr(torch, kv_dtype_name)
    cache = torch.zeros(shape, dtype=dtype)
    receiver = KvReceiver(
        cache, layout_of(cache, model_id), _Sink(), ReceiverConfig(timeout_s=TIMEOUT_S)
    )
    receiver.start()
    conn.send(receiver.port)
    store = connect_store("127.0.0.1", receiver.port, TIMEOUT_S)
    raw_group = _raw_group(store, rank=1, device=cache.device)
    raw = torch.zeros(raw_bytes, dtype=torch.uint8)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    while True:
        command = conn.recv()
        if command is None:
            break
        round_id, num_bytes = command
        store.wait([f"bench/raw/go/{round_id}"], timeout)
        raw_group.recv([raw[:num_bytes]], 0, 1).wait(timeout)
        store.set(f"bench/raw/ack/{round_id}", b"1")
    receiver.stop()


# ---- the transfer figures -----------------------------------------------------------------------


def _transfer_figures(sizes: list[int], rounds: int) -> dict[str, Any]:
    spec = resolve_model("default")
    assert spec.path is not None
    config = load_config(spec.path)
    # The KV dtype the default model's CPU workers hold (``engine.precision.host_kv_dtype``).
    cpu = torch.device("cpu")
    dtype = resolve_precision("auto", cpu)
    kv_dtype = host_kv_dtype(dtype, probe_dtype("auto", cpu) or dtype)
    num_blocks = max(sizes) // BLOCK_SIZE
    shape = _cache_shape(config, num_blocks)
    cache = torch.randn(shape, dtype=torch.float32).to(kv_dtype)
    max_bytes = cache.numel() * cache.element_size()
    kv_dtype_name = dtype_name(kv_dtype)
    log(f"bench transfer: KV {shape} {kv_dtype_name}, sizes {sizes}, {rounds} rounds")

    context = multiprocessing.get_context("spawn")
    ours_end, theirs_end = context.Pipe()
    process = context.Process(
        target=_receiver_main,
        args=(theirs_end, shape, kv_dtype_name, spec.model_id, max_bytes),
        daemon=True,
    )
    process.start()
    try:
        port = ours_end.recv()
        sender = KvSender(
            cache, layout_of(cache, spec.model_id), "bench", SenderConfig(timeout_s=TIMEOUT_S)
        )
        store = connect_store("127.0.0.1", port, TIMEOUT_S)
        raw_group = _raw_group(store, rank=0, device=cache.device)
        raw = torch.ones(max_bytes, dtype=torch.uint8)
        figures: dict[str, Any] = {}
        for num_tokens in sizes:
            figures[str(num_tokens)] = _one_size(
                sender, port, store, raw_group, raw, ours_end, cache, num_tokens, rounds
            )
        sender.stop()
        ours_end.send(None)
        process.join(30)
    finally:
        if process.is_alive():
            process.kill()
    return {
        "kv_shape": {
            "num_layers": shape[1],
            "block_size": shape[3],
            "num_kv_heads": shape[4],
            "head_dim": shape[5],
        },
        "kv_dtype": kv_dtype_name,
        "backend": backend_for(cache.device),
        "sizes": figures,
    }


def _one_size(
    sender: KvSender,
    port: int,
    store: Any,
    raw_group: Any,
    raw: torch.Tensor,
    conn: Connection,
    cache: torch.Tensor,
    num_tokens: int,
    rounds: int,
) -> dict[str, float]:
    num_blocks = num_tokens // BLOCK_SIZE
    num_bytes = 2 * cache.shape[1] * num_blocks * cache[0, 0, 0].numel() * cache.element_size()
    rng = random.Random(num_tokens)
    layouts = {
        "contiguous": (list(range(num_blocks)), list(range(num_blocks))),
        "scattered": (
            rng.sample(range(cache.shape[2]), num_blocks),
            rng.sample(range(cache.shape[2]), num_blocks),
        ),
    }
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    seconds: dict[str, list[float]] = {"raw": [], "contiguous": [], "scattered": []}
    for round_index in range(rounds + 1):  # round 0 warms up (pairing, first touch)
        for name, (src, dst) in layouts.items():
            started = time.perf_counter()
            _send_and_wait(sender, port, src, dst, num_tokens)
            if round_index:
                seconds[name].append(time.perf_counter() - started)
        round_id = f"{num_tokens}-{round_index}"
        conn.send((round_id, num_bytes))
        started = time.perf_counter()
        store.set(f"bench/raw/go/{round_id}", b"1")
        raw_group.send([raw[:num_bytes]], 1, 1).wait(timeout)
        store.wait([f"bench/raw/ack/{round_id}"], timeout)
        if round_index:
            seconds["raw"].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    gbps = {name: num_bytes / value / 1e9 for name, value in median.items()}
    figures = {
        "bytes": num_bytes,
        "transfer_gbps": gbps["contiguous"],
        "raw_gbps": gbps["raw"],
        "ratio": gbps["contiguous"] / gbps["raw"],
        "transfer_gbps_scattered": gbps["scattered"],
        "ratio_scattered": gbps["scattered"] / gbps["raw"],
    }
    log(f"  {num_tokens} tokens: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    return figures


def _send_and_wait(
    sender: KvSender, port: int, src: list[int], dst: list[int], num_tokens: int
) -> TransferResult:
    results: queue.SimpleQueue[TransferResult] = queue.SimpleQueue()
    target = KvTarget("bench-receiver", "127.0.0.1", port, dst)
    sender.submit(TransferJob(uuid.uuid4().hex, target, src, num_tokens, 0, 0, 0), results.put)
    result = results.get(timeout=TIMEOUT_S)
    if result.error is not None:
        raise result.error
    return result


# ---- TTFT ---------------------------------------------------------------------------------------


async def _ttft_figures(rounds: int) -> dict[str, float]:
    from deploy.launcher import WorkerSpec, start_workers
    from transfer.client import DecodeClient, PrefillClient, run_disaggregated

    log("bench transfer: starting a prefill, a decode and a colocated worker (default model)")
    workers = start_workers([WorkerSpec("prefill"), WorkerSpec("decode"), WorkerSpec("colocated")])
    rng = random.Random(0)
    sampling = SamplingSpec(max_tokens=2, temperature=0, ignore_eos=True)
    seconds: dict[str, list[float]] = {"disagg": [], "colocated": []}
    try:
        prefill = PrefillClient(workers[0].http_url)
        decode = DecodeClient(workers[1].http_url)
        colocated = DecodeClient(workers[2].http_url)
        for round_index in range(rounds + 1):  # round 0 warms up (pairing, first allocations)
            for side in ("disagg", "colocated"):
                prompt = [rng.randrange(1000, 40000) for _ in range(TTFT_PROMPT_TOKENS)]
                request_id = uuid.uuid4().hex
                started = time.perf_counter()
                first_token_s = None
                if side == "disagg":
                    async for _frame in run_disaggregated(
                        prefill, decode, request_id, prompt, sampling
                    ):
                        first_token_s = first_token_s or time.perf_counter() - started
                else:
                    async with colocated.generate(
                        GenerateRequest(request_id, prompt, sampling)
                    ) as stream:
                        async for frame in stream:
                            assert isinstance(frame, TokenFrame)
                            first_token_s = first_token_s or time.perf_counter() - started
                if round_index:
                    assert first_token_s is not None
                    seconds[side].append(first_token_s)
        for client in (prefill, decode, colocated):
            await client.aclose()
    finally:
        for worker in workers:
            worker.stop()
    disagg_ms = statistics.median(seconds["disagg"]) * 1e3
    colocated_ms = statistics.median(seconds["colocated"]) * 1e3
    log(
        f"  TTFT ({TTFT_PROMPT_TOKENS} tokens): disagg {disagg_ms:.0f} ms, "
        f"colocated {colocated_ms:.0f} ms"
    )
    return {
        "ttft_prompt_tokens": TTFT_PROMPT_TOKENS,
        "ttft_disagg_ms": disagg_ms,
        "ttft_colocated_ms": colocated_ms,
        "ttft_ratio": disagg_ms / colocated_ms,
    }


def run_transfer_bench(*, quick: bool = False, output: str | None = None) -> int:
    sizes = [1024, 4096] if quick else [1024, 4096, 16384]
    result: dict[str, Any] = {"quick": quick}
    result["transfer"] = _transfer_figures(sizes, rounds=2 if quick else 5)
    result |= asyncio.run(_ttft_figures(rounds=1 if quick else 3))
    print_result(result, output)
    return 0
