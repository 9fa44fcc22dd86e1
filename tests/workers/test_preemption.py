"""Priorities and preemption through real worker processes (tiny model, gloo over loopback): a
request handed back by recompute and resumed through a prefill worker, or swapped to host memory
and back, produces exactly the tokens it would have without the interruption; ``make_room``
preempts only less important requests, reservations included (one whose KV is still landing
gives its blocks back once, when the landing ends); every block comes back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from deploy.launcher import WorkerProcess, WorkerSpec
from tests.workers.conftest import TINY_ARGS, Launch, colocated, wait_for_idle, worker_load
from transfer.client import DecodeClient, PrefillClient, run_disaggregated
from transfer.errors import WorkerUnreachable
from transfer.messages import (
    DecodeRequest,
    GenerateRequest,
    Preempted,
    Priority,
    Reserved,
    SamplingSpec,
    TokenFrame,
)

ARGS = (*TINY_ARGS, "--kv-timeout", "2")
NUM_SWAP_BLOCKS = 24  # of 16 tokens: four requests of 120 tokens need 32
LOW, HIGH = Priority(rank=0), Priority(rank=1)
GREEDY = SamplingSpec(max_tokens=400, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def workers(launch: Launch) -> dict[str, WorkerProcess]:
    prefill, colocated_worker, swap = launch(
        [
            WorkerSpec("prefill", "tiny", ARGS),
            WorkerSpec("colocated", "tiny", ARGS),  # --preemption recompute: hands back
            WorkerSpec(
                "decode",
                "tiny",
                (*ARGS, "--num-blocks", str(NUM_SWAP_BLOCKS), "--preemption", "swap"),
            ),
        ]
    )
    return {"prefill": prefill, "colocated": colocated_worker, "swap": swap}


def _prompt(seed: int, length: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(length)]


async def _make_room(
    worker: WorkerProcess, priority: Priority, num_tokens: int = 1 << 20
) -> tuple[int, int]:
    async with DecodeClient(worker.http_url) as client:
        result = await client.make_room(num_tokens, priority)
    return result.num_free_tokens, result.num_preempted


async def _wait_idle(*workers: WorkerProcess) -> None:
    for worker in workers:
        await wait_for_idle(worker, timeout_s=10)


async def _disaggregated_frames(
    prefill: WorkerProcess,
    decode: WorkerProcess,
    request_id: str,
    prompt: list[int],
    sampling: SamplingSpec,
    *,
    priority: Priority = LOW,
    num_prior_output_tokens: int = 0,
) -> AsyncIterator[TokenFrame | Preempted]:
    async with PrefillClient(prefill.http_url) as p, DecodeClient(decode.http_url) as d:
        frames = run_disaggregated(
            p,
            d,
            request_id,
            prompt,
            sampling,
            priority=priority,
            num_prior_output_tokens=num_prior_output_tokens,
        )
        async for frame in frames:
            yield frame


async def _tokens(frames: AsyncIterator[TokenFrame | Preempted]) -> list[int]:
    tokens: list[int] = []
    async for frame in frames:
        assert isinstance(frame, TokenFrame), frame
        tokens += frame.token_ids
    return tokens


async def test_a_request_handed_back_resumes_through_prefill_token_for_token(
    workers: dict[str, WorkerProcess],
) -> None:
    prefill, decode = workers["prefill"], workers["colocated"]
    prompt = _prompt(1)
    expected = await colocated(decode.http_url, "reference-1", prompt, GREEDY)
    before = await worker_load(decode)
    tokens: list[int] = []
    preempted: Preempted | None = None
    async for frame in _disaggregated_frames(prefill, decode, "handed-back", prompt, GREEDY):
        if isinstance(frame, Preempted):
            preempted = frame
            break
        tokens += frame.token_ids
        assert frame.num_output_tokens == len(tokens)
        if len(tokens) >= 10 and len(tokens) - len(frame.token_ids) < 10:
            num_free_tokens, num_preempted = await _make_room(decode, HIGH)
            assert num_preempted == 1
            assert num_free_tokens == before.num_total_blocks * 16
    assert preempted is not None and preempted.num_output_tokens == len(tokens)
    assert 10 <= len(tokens) < GREEDY.max_tokens
    # The gateway's part: prompt and tokens so far through the prefill pool, with the same seed.
    resumed_sampling = SamplingSpec(
        max_tokens=GREEDY.max_tokens, temperature=0, seed=preempted.seed, ignore_eos=True
    )
    resumed = [
        frame
        async for frame in _disaggregated_frames(
            prefill,
            decode,
            "handed-back",
            prompt + tokens,
            resumed_sampling,
            num_prior_output_tokens=len(tokens),
        )
    ]
    assert all(isinstance(frame, TokenFrame) for frame in resumed)
    rest = [t for frame in resumed if isinstance(frame, TokenFrame) for t in frame.token_ids]
    assert tokens + rest == expected
    last = resumed[-1]
    assert isinstance(last, TokenFrame) and last.finish_reason == "length"
    assert (last.num_output_tokens, last.num_prompt_tokens) == (GREEDY.max_tokens, len(prompt))
    await _wait_idle(prefill, decode)
    after = await worker_load(decode)
    assert after.num_handed_back == before.num_handed_back + 1
    assert after.num_preemptions == before.num_preemptions + 1


async def test_make_room_preempts_only_less_important_requests(
    workers: dict[str, WorkerProcess],
) -> None:
    """On a colocated worker: the low-priority stream ends with ``Preempted`` and resumes there
    (``GenerateRequest.num_prior_output_tokens``); the high-priority one never notices."""
    url = workers["colocated"].http_url
    prompts = {"low": _prompt(2), "high": _prompt(3)}
    sampling = SamplingSpec(max_tokens=300, temperature=0.8, seed=5, ignore_eos=True)
    expected = {
        name: await colocated(url, f"reference-{name}", prompt, sampling)
        for name, prompt in prompts.items()
    }
    started = {name: asyncio.Event() for name in prompts}
    room_made = asyncio.Event()

    async def stream(name: str, priority: Priority) -> tuple[list[int], Preempted | None]:
        request = GenerateRequest(f"mixed-{name}", prompts[name], sampling, priority=priority)
        tokens: list[int] = []
        async with DecodeClient(url) as client, client.generate(request) as frames:
            async for frame in frames:
                if isinstance(frame, Preempted):
                    return tokens, frame
                assert isinstance(frame, TokenFrame)
                tokens += frame.token_ids
                if len(tokens) >= 5:
                    started[name].set()
        return tokens, None

    low = asyncio.create_task(stream("low", LOW))
    high = asyncio.create_task(stream("high", Priority(rank=2)))
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started.values())), 30)
    num_free_tokens, num_preempted = await _make_room(workers["colocated"], HIGH)
    room_made.set()
    assert num_preempted == 1
    assert num_free_tokens < (await worker_load(workers["colocated"])).num_total_blocks * 16
    high_tokens, high_preempted = await high
    assert high_preempted is None and high_tokens == expected["high"]
    low_tokens, low_preempted = await low
    assert low_preempted is not None and low_preempted.num_output_tokens == len(low_tokens)
    assert low_preempted.seed == sampling.seed
    # Resumed on the colocated worker itself.
    resume = GenerateRequest(
        "mixed-low",
        prompts["low"] + low_tokens,
        sampling,
        priority=LOW,
        num_prior_output_tokens=len(low_tokens),
    )
    async with DecodeClient(url) as client, client.generate(resume) as frames:
        rest = [
            t async for frame in frames if isinstance(frame, TokenFrame) for t in frame.token_ids
        ]
    assert low_tokens + rest == expected["low"]
    await _wait_idle(workers["colocated"])


async def test_a_waiting_reservation_is_preempted_at_once(
    workers: dict[str, WorkerProcess],
) -> None:
    decode = workers["colocated"]
    total_tokens = (await worker_load(decode)).num_total_blocks * 16
    async with DecodeClient(decode.http_url) as client:
        request = DecodeRequest("reserved-only", _prompt(4, 300), GREEDY, priority=LOW)
        async with client.decode(request) as stream:
            assert isinstance(await stream.next(), Reserved)
            # Not for a request as important as it is.
            result = await client.make_room(total_tokens, LOW)
            assert (result.num_free_tokens, result.num_preempted) == (total_tokens - 19 * 16, 0)
            result = await client.make_room(total_tokens, HIGH)
            assert (result.num_free_tokens, result.num_preempted) == (total_tokens, 1)
            assert await stream.next() == Preempted(num_output_tokens=0, seed=0)
            assert stream.is_finished
    await _wait_idle(decode)


async def test_a_request_preempted_while_its_kv_lands_frees_its_blocks_once(
    workers: dict[str, WorkerProcess], launch: Launch
) -> None:
    """The transfer stops half way (the prefill worker pauses, then dies): ``make_room`` counts
    the request as preempted but cannot free blocks the KV is landing in; when the landing fails
    they come back, once, and after the first token the request ends resumable: with the decode
    worker's ``Preempted``, or with the prefill worker's death (which breaks the decode stream
    off) when that comes first."""
    decode = workers["colocated"]
    [doomed] = launch(
        [
            WorkerSpec(
                "prefill", "tiny", ARGS, env={"FAIRGATE_FAILPOINTS": "kv.send.mid_transfer=pause"}
            )
        ]
    )
    prompt = _prompt(5, 300)  # 19 blocks: the transfer has many messages to stop between
    sampling = SamplingSpec(max_tokens=20, temperature=0, ignore_eos=True)
    total_tokens = (await worker_load(decode)).num_total_blocks * 16

    frames: list[TokenFrame | Preempted] = []

    async def collect() -> WorkerUnreachable | None:
        try:
            async for frame in _disaggregated_frames(doomed, decode, "landing", prompt, sampling):
                frames.append(frame)
        except WorkerUnreachable as exc:
            return exc
        return None

    request = asyncio.create_task(collect())
    await asyncio.to_thread(doomed.wait_event, "failpoint", 60)
    num_free_tokens, num_preempted = await _make_room(decode, HIGH)
    assert num_preempted == 1
    assert num_free_tokens == total_tokens - 19 * 16  # still landing: not free yet
    # Asked again, it is not preempted twice.
    assert await _make_room(decode, HIGH) == (total_tokens - 19 * 16, 0)
    doomed.kill()
    failure = await asyncio.wait_for(request, 30)
    first, *rest_of_frames = frames
    assert isinstance(first, TokenFrame) and len(first.token_ids) == 1
    if failure is None:
        [preempted] = rest_of_frames
        assert isinstance(preempted, Preempted) and preempted.num_output_tokens == 1
    else:
        assert failure.worker_url == doomed.http_url and not rest_of_frames
    await _wait_idle(decode)
    # Resumed from its first token through a healthy prefill worker: as if never interrupted.
    resumed_sampling = SamplingSpec(max_tokens=20, temperature=0, ignore_eos=True)
    rest = await _tokens(
        _disaggregated_frames(
            workers["prefill"],
            decode,
            "landing",
            prompt + first.token_ids,
            resumed_sampling,
            num_prior_output_tokens=1,
        )
    )
    assert first.token_ids + rest == await colocated(
        decode.http_url, "reference-5", prompt, sampling
    )
    await _wait_idle(decode, workers["prefill"])


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingSpec(max_tokens=100, temperature=0, ignore_eos=True),
        SamplingSpec(max_tokens=100, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
async def test_swapping_out_of_a_full_cache_keeps_every_output(
    workers: dict[str, WorkerProcess], sampling: SamplingSpec
) -> None:
    prefill, swap = workers["prefill"], workers["swap"]
    prompts = [_prompt(10 + index, 20) for index in range(4)]
    reference_url = workers["colocated"].http_url
    expected = [
        await colocated(reference_url, f"reference-swap-{index}", prompt, sampling)
        for index, prompt in enumerate(prompts)
    ]
    before = await worker_load(swap)
    # Later ones more important: a swapped-out request never refuses them a reservation.
    outputs = await asyncio.gather(
        *(
            _tokens(
                _disaggregated_frames(
                    prefill, swap, f"swap-{index}", prompt, sampling, priority=Priority(rank=index)
                )
            )
            for index, prompt in enumerate(prompts)
        )
    )
    assert outputs == expected
    after = await wait_for_idle(swap, timeout_s=10)
    assert after.num_swapped_out > before.num_swapped_out
    assert after.num_handed_back == before.num_handed_back


async def test_make_room_swaps_a_request_out_until_the_important_one_has_room(
    workers: dict[str, WorkerProcess],
) -> None:
    prefill, swap = workers["prefill"], workers["swap"]
    sampling = SamplingSpec(max_tokens=150, temperature=0, ignore_eos=True)
    prompts = {"low": _prompt(20, 20), "high": _prompt(21, 20)}
    reference_url = workers["colocated"].http_url
    expected = {
        name: await colocated(reference_url, f"reference-{name}-swap", prompt, sampling)
        for name, prompt in prompts.items()
    }
    before = await worker_load(swap)
    low_tokens: list[int] = []
    high_tokens: list[int] = []
    async for frame in _disaggregated_frames(prefill, swap, "pause-low", prompts["low"], sampling):
        assert isinstance(frame, TokenFrame)
        low_tokens += frame.token_ids
        if not high_tokens and len(low_tokens) >= 5:
            num_free_tokens, num_preempted = await _make_room(swap, HIGH)
            assert (num_free_tokens, num_preempted) == (NUM_SWAP_BLOCKS * 16, 1)
            assert (await worker_load(swap)).num_swapped == 1
            high_tokens = await _tokens(
                _disaggregated_frames(
                    prefill, swap, "pause-high", prompts["high"], sampling, priority=HIGH
                )
            )
    assert low_tokens == expected["low"] and high_tokens == expected["high"]
    after = await wait_for_idle(swap, timeout_s=10)
    assert after.num_swapped_out >= before.num_swapped_out + 1
