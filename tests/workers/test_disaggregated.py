"""Requests through real prefill and decode worker processes (tiny model, gloo over loopback):
the output equals a colocated worker's and the engine's alone, and every block comes back."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from deploy.launcher import WorkerProcess, WorkerSpec
from engine.loader import load_engine
from engine.sequence import SamplingParams
from tests.workers.conftest import (
    TINY_ARGS,
    Launch,
    colocated,
    disaggregated,
    over_all_pairs,
    worker_load,
)
from transfer.client import DecodeClient, PrefillClient, run_disaggregated
from transfer.errors import InvalidWorkerRequest, NoRoomError, RequestAborted
from transfer.messages import (
    DecodeRequest,
    GenerateRequest,
    Reserved,
    SamplingSpec,
    TokenFrame,
    WorkerLoad,
)

NUM_REQUESTS = 16


@pytest.fixture(scope="module")
def workers(launch: Launch) -> dict[str, list[WorkerProcess]]:
    started = launch(
        [WorkerSpec("prefill", "tiny", TINY_ARGS)] * 2
        + [WorkerSpec("decode", "tiny", TINY_ARGS)] * 2
        + [WorkerSpec("colocated", "tiny", TINY_ARGS)]
    )
    return {"prefill": started[:2], "decode": started[2:4], "colocated": started[4:]}


def _prompts(seed: int, count: int = NUM_REQUESTS) -> list[list[int]]:
    rng = random.Random(seed)
    # Lengths across block boundaries, from one block to many (block size 16).
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(1, 200))] for _ in range(count)]


async def _all_disaggregated(
    workers: dict[str, list[WorkerProcess]],
    prompts: list[list[int]],
    sampling: SamplingSpec,
    *,
    name: str = "disagg",
) -> list[list[int]]:
    """Request ids are ``{name}-{index}``: calls in one test need their own ``name``, since the
    previous request of an id may still be leaving its workers (see ``_assert_no_blocks_held``)."""
    return await over_all_pairs(workers["prefill"], workers["decode"], prompts, sampling, name=name)


async def _all_colocated(
    workers: dict[str, list[WorkerProcess]], prompts: list[list[int]], sampling: SamplingSpec
) -> list[list[int]]:
    url = workers["colocated"][0].http_url
    return list(
        await asyncio.gather(
            *(colocated(url, f"colo-{i}", prompt, sampling) for i, prompt in enumerate(prompts))
        )
    )


async def _after_release_work(worker: WorkerProcess, *, timeout_s: float) -> WorkerLoad:
    """The worker's load once the two releases that by design end after the caller has its last
    token have ended, by the worker's own count of them (nothing else is waited for):

    - a prefill worker frees a handed-off request's blocks when the decode worker's ack of the
      KV transfer comes back (``num_pending_transfers``); the decode worker acks after the KV
      has landed and decodes at once, so its frames, a request ending at its first decode step
      included, may reach the caller first;
    - a decode worker gives back a reservation whose stream the caller closed (a request the
      prefill worker finished, whose KV never comes, or a caller that left) when it sees the
      stream close (``num_reserved``).

    No event of either reaches the caller: poll /v1/load (as ``conftest.wait_for_idle`` does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = await worker_load(worker)
        if load.num_pending_transfers == 0 and load.num_reserved == 0:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{worker.worker_id}: releases pending after {timeout_s} s: {load}"
            )
        await asyncio.sleep(0.01)


async def _assert_no_blocks_held(workers: dict[str, list[WorkerProcess]]) -> None:
    """Every block is back and no request is left. Blocks held once no transfer and no
    reservation is pending are a leak, and fail at once."""
    for worker in [*workers["prefill"], *workers["decode"], *workers["colocated"]]:
        load = await _after_release_work(worker, timeout_s=10)
        assert load.num_free_blocks == load.num_total_blocks, load
        assert (load.num_running, load.num_waiting, load.num_reserved) == (0, 0, 0), load
        assert load.num_pending_transfers == 0, load


async def test_greedy_equals_colocated_and_engine_alone(
    workers: dict[str, list[WorkerProcess]],
) -> None:
    prompts = _prompts(seed=1)
    sampling = SamplingSpec(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = await _all_disaggregated(workers, prompts, sampling)
    assert all(len(output) == 24 for output in outputs)
    assert outputs == await _all_colocated(workers, prompts, sampling)
    engine = load_engine("tiny", precision="float32", num_blocks=512).engine
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    assert outputs == [engine.generate([prompt], params)[0] for prompt in prompts]
    await _assert_no_blocks_held(workers)


async def test_seeded_sampling_equals_colocated(workers: dict[str, list[WorkerProcess]]) -> None:
    prompts = _prompts(seed=2, count=6)
    sampling = SamplingSpec(max_tokens=12, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)
    outputs = await _all_disaggregated(workers, prompts, sampling)
    assert outputs == await _all_colocated(workers, prompts, sampling)
    await _assert_no_blocks_held(workers)


async def test_eos_and_one_token_requests_end_without_leaks(
    workers: dict[str, list[WorkerProcess]],
) -> None:
    prompts = _prompts(seed=3, count=4)
    one_token = SamplingSpec(max_tokens=1, temperature=0)
    outputs = await _all_disaggregated(workers, prompts, one_token, name="one")
    assert [len(output) for output in outputs] == [1] * 4
    await _assert_no_blocks_held(workers)  # the prefill finished them: nothing was shipped
    # The greedy second token as a stop token: the decode worker ends at once.
    greedy = SamplingSpec(max_tokens=5, temperature=0, ignore_eos=True)
    [two] = await _all_disaggregated(workers, prompts[:1], greedy, name="greedy")
    stopping = SamplingSpec(max_tokens=5, temperature=0, stop_token_ids=[two[1]])
    [stopped] = await _all_disaggregated(workers, prompts[:1], stopping, name="stop")
    assert stopped == two[:2] or (two[0] == two[1] and stopped == two[:1])
    await _assert_no_blocks_held(workers)


async def test_prefix_cache_hits_are_reported_and_shipped(
    workers: dict[str, list[WorkerProcess]],
) -> None:
    rng = random.Random(4)
    shared = [rng.randrange(100, 40000) for _ in range(128)]  # 8 full blocks
    sampling = SamplingSpec(max_tokens=8, temperature=0, ignore_eos=True)
    prefill, decode = workers["prefill"][0].http_url, workers["decode"][0].http_url
    first = await disaggregated(prefill, decode, "prefix-1", [*shared, 11, 12], sampling)
    async with PrefillClient(prefill) as prefill_client, DecodeClient(decode) as decode_client:
        frames = [
            frame
            async for frame in run_disaggregated(
                prefill_client, decode_client, "prefix-2", [*shared, 11, 12], sampling
            )
        ]
    assert frames[0].num_cached_tokens == 128
    assert [t for frame in frames for t in frame.token_ids] == first
    await _assert_no_blocks_held(workers)


async def test_reservations_beyond_the_cache_are_refused_as_no_room(
    workers: dict[str, list[WorkerProcess]],
) -> None:
    """Reserved blocks are real: four 1900-token reservations hold 480 of 512 blocks, and a fifth
    is refused at once with 503 no_room; closing the streams gives every block back."""
    decode_url = workers["decode"][0].http_url
    long_prompt = list(range(100, 2000))
    async with contextlib.AsyncExitStack() as stack, DecodeClient(decode_url) as client:
        streams = []  # held: a dropped stream closes its connection, which aborts the request
        for index in range(4):
            stream = await stack.enter_async_context(
                client.decode(DecodeRequest(f"hold-{index}", long_prompt))
            )
            assert isinstance(await stream.next(), Reserved)
            streams.append(stream)
        with pytest.raises(NoRoomError, match="no room for 1901 tokens"):
            async with client.decode(DecodeRequest("one-too-many", long_prompt)):
                pass
    await _assert_no_blocks_held(workers)


async def test_abort_ends_a_waiting_stream_and_frees_its_reservation(
    workers: dict[str, list[WorkerProcess]],
) -> None:
    decode_url = workers["decode"][1].http_url
    async with DecodeClient(decode_url) as client:
        async with client.decode(DecodeRequest("to-abort", list(range(100, 400)))) as stream:
            assert isinstance(await stream.next(), Reserved)
            assert await client.abort("to-abort")
            with pytest.raises(RequestAborted, match="to-abort was aborted"):
                await stream.next()
        assert not await client.abort("to-abort")  # gone
        assert not await client.abort("never-seen")
    await _assert_no_blocks_held(workers)


async def test_a_flush_interval_sends_the_same_tokens_in_fewer_frames(
    workers: dict[str, list[WorkerProcess]],
) -> None:
    """What a non-streaming caller asks for: the decode worker holds tokens back for up to the
    interval and sends them together; the tokens are those of a frame per step."""
    [prompt] = _prompts(seed=5, count=1)
    sampling = SamplingSpec(max_tokens=24, temperature=0, ignore_eos=True)
    prefill, decode = workers["prefill"][0].http_url, workers["decode"][0].http_url
    per_step = await disaggregated(prefill, decode, "flush-0", prompt, sampling)
    async with PrefillClient(prefill) as prefill_client, DecodeClient(decode) as decode_client:
        frames = [
            frame
            async for frame in run_disaggregated(
                prefill_client, decode_client, "flush-1", prompt, sampling, flush_interval_s=1.0
            )
        ]
        # The prefill's first token, then the other 23 in one frame unless a step took a second.
        assert 2 <= len(frames) <= 3
        assert [t for frame in frames for t in frame.token_ids] == per_step
        assert frames[-1].finish_reason == "length" and frames[-1].num_output_tokens == 24
        with pytest.raises(InvalidWorkerRequest, match="flush_interval_s must be in"):
            async with decode_client.decode(
                DecodeRequest("flush-bad", prompt, sampling, flush_interval_s=5.0)
            ):
                pass
    async with (
        DecodeClient(workers["colocated"][0].http_url) as client,
        client.generate(
            GenerateRequest("flush-colo", prompt, sampling, flush_interval_s=1.0)
        ) as stream,
    ):
        colocated_frames = [frame async for frame in stream]
    assert all(isinstance(frame, TokenFrame) for frame in colocated_frames)
    assert 1 <= len(colocated_frames) <= 2
    tokens = [
        t for frame in colocated_frames if isinstance(frame, TokenFrame) for t in frame.token_ids
    ]
    assert tokens == per_step
    await _assert_no_blocks_held(workers)
