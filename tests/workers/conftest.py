"""Real worker processes on loopback, and one way to drive requests through them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from deploy.launcher import WorkerProcess, WorkerSpec, start_workers
from transfer.client import DecodeClient, PrefillClient, WorkerClient, run_disaggregated
from transfer.errors import FairgateError
from transfer.messages import GenerateRequest, Preempted, SamplingSpec, TokenFrame, WorkerLoad

# float32 everywhere: with bf16 copies for batched products (`auto` on CPUs with AMX) a token's
# logits depend on the batch it ran in, and these tests compare different batchings.
TINY_ARGS = ("--precision", "float32", "--threads", "1", "--num-blocks", "512", "--kv-timeout", "5")


Launch = Callable[[Sequence[WorkerSpec]], list[WorkerProcess]]


@pytest.fixture(scope="module")
def launch() -> Iterator[Launch]:
    """``launch(specs)`` starts workers that are stopped when the module's tests are done."""
    started: list[WorkerProcess] = []

    def start(specs: Sequence[WorkerSpec]) -> list[WorkerProcess]:
        workers = start_workers(specs)
        started.extend(workers)
        return workers

    yield start
    for worker in started:
        worker.stop()


async def disaggregated(
    prefill_url: str, decode_url: str, request_id: str, prompt: list[int], sampling: SamplingSpec
) -> list[int]:
    async with PrefillClient(prefill_url) as prefill, DecodeClient(decode_url) as decode:
        output: list[int] = []
        async for frame in run_disaggregated(prefill, decode, request_id, prompt, sampling):
            assert isinstance(frame, TokenFrame), f"{request_id} was handed back: {frame}"
            output.extend(frame.token_ids)
        return output


async def failure_code(
    prefill_url: str, decode_url: str, request_id: str, prompt: list[int], sampling: SamplingSpec
) -> str:
    """The ``code`` of the error a request that cannot complete ends with (before or after its
    first token)."""
    async with PrefillClient(prefill_url) as prefill, DecodeClient(decode_url) as decode:
        try:
            async for frame in run_disaggregated(prefill, decode, request_id, prompt, sampling):
                assert not isinstance(frame, Preempted), f"{request_id} was preempted: {frame}"
        except FairgateError as exc:
            return exc.code
    raise AssertionError(f"{request_id} completed")


async def over_all_pairs(
    prefill: Sequence[WorkerProcess],
    decode: Sequence[WorkerProcess],
    prompts: list[list[int]],
    sampling: SamplingSpec,
    *,
    name: str,
) -> list[list[int]]:
    """Every prompt at once, spread over every (prefill, decode) pair in turn."""
    pairs = [(p, d) for d in decode for p in prefill]
    return list(
        await asyncio.gather(
            *(
                disaggregated(
                    pairs[index % len(pairs)][0].http_url,
                    pairs[index % len(pairs)][1].http_url,
                    f"{name}-{index}",
                    prompt,
                    sampling,
                )
                for index, prompt in enumerate(prompts)
            )
        )
    )


async def colocated(
    url: str, request_id: str, prompt: list[int], sampling: SamplingSpec, cache_salt: bytes = b""
) -> list[int]:
    async with (
        DecodeClient(url) as client,
        client.generate(GenerateRequest(request_id, prompt, sampling, cache_salt)) as stream,
    ):
        output: list[int] = []
        async for frame in stream:
            assert isinstance(frame, TokenFrame)
            output.extend(frame.token_ids)
        return output


async def worker_load(worker: WorkerProcess) -> WorkerLoad:
    async with WorkerClient(worker.http_url) as client:
        return await client.load()


async def wait_for_idle(worker: WorkerProcess, *, timeout_s: float) -> WorkerLoad:
    """The worker's load once it holds no blocks and no requests. Work the worker finishes after
    answering (aborts, transfers) has no event to wait on from outside: poll /v1/load."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = await worker_load(worker)
        is_idle = (
            load.num_free_blocks == load.num_total_blocks
            and load.num_running + load.num_waiting + load.num_reserved + load.num_swapped == 0
            and load.num_pending_transfers == 0
        )
        if is_idle:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"{worker.worker_id} still busy after {timeout_s} s: {load}")
        await asyncio.sleep(0.1)
