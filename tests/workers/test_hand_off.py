"""The hand-off with the reservation off the TTFT path (``run_disaggregated``): the prefill starts
at once and its target follows. Every way it can go wrong ends the request cleanly, and no
block is left held on either worker (tiny model, real processes, failpoints)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from deploy.launcher import WorkerSpec
from tests.workers.conftest import (
    TINY_ARGS,
    Launch,
    disaggregated,
    failure_code,
    wait_for_idle,
    worker_load,
)
from transfer.client import DecodeClient, PrefillClient, run_disaggregated
from transfer.errors import (
    NoRoomError,
    RequestTimeout,
    TransferError,
    TransferTimeout,
    WorkerUnreachable,
)
from transfer.messages import (
    DecodeRequest,
    PrefillRequest,
    PrefillTarget,
    Reserved,
    SamplingSpec,
    TokenFrame,
)

KV_TIMEOUT_S = 3.0
ARGS = (*TINY_ARGS, "--kv-timeout", str(KV_TIMEOUT_S))
DECODE_ARGS = (*ARGS, "--kv-wait-timeout", "30")
SAMPLING = SamplingSpec(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = list(range(1000, 1300))  # 300 tokens: 18 full blocks and a partial one


def _failpoint(name: str, action: str = "pause") -> dict[str, str]:
    return {"FAIRGATE_FAILPOINTS": f"{name}={action}"}


async def test_no_room_drops_the_kv_and_the_resumption_finds_the_prompt_cached(
    launch: Launch,
) -> None:
    """The decode worker has no room: the first token still comes from the prefill, then the
    no_room error naming the decode worker (the caller resumes it elsewhere); the prefill
    worker keeps nothing but its prefix cache, and the resumption finds the prompt there and
    goes on token for token."""
    prefill, decode = launch(
        [WorkerSpec("prefill", "tiny", ARGS), WorkerSpec("decode", "tiny", DECODE_ARGS)]
    )
    long_prompt = list(range(100, 2100))  # 126 blocks: four of them leave 8 of 512 free
    async with (
        contextlib.AsyncExitStack() as stack,
        PrefillClient(prefill.http_url) as prefill_client,
        DecodeClient(decode.http_url) as decode_client,
    ):
        for index in range(4):
            stream = await stack.enter_async_context(
                decode_client.decode(DecodeRequest(f"hold-{index}", long_prompt))
            )
            assert isinstance(await stream.next(), Reserved)
        frames = []
        with pytest.raises(NoRoomError) as no_room:
            async for frame in run_disaggregated(
                prefill_client, decode_client, "squeezed", PROMPT, SAMPLING
            ):
                frames.append(frame)
        # No block is held for it on the prefill worker while the holds stand.
        await wait_for_idle(prefill, timeout_s=5)
    (first,) = frames
    assert isinstance(first, TokenFrame)
    assert no_room.value.worker_url == decode.http_url  # the worker at fault, by identity
    await wait_for_idle(decode, timeout_s=5)
    async with (
        PrefillClient(prefill.http_url) as prefill_client,
        DecodeClient(decode.http_url) as decode_client,
    ):
        resumed = [
            frame
            async for frame in run_disaggregated(
                prefill_client,
                decode_client,
                "squeezed",
                [*PROMPT, *first.token_ids],
                SAMPLING,
                num_prior_output_tokens=1,
            )
        ]
    assert isinstance(resumed[0], TokenFrame)
    assert resumed[0].num_cached_tokens == 18 * 16  # the prompt's full blocks
    output = [
        *first.token_ids,
        *(t for f in resumed if isinstance(f, TokenFrame) for t in f.token_ids),
    ]
    assert output == await disaggregated(prefill.http_url, decode.http_url, "ref", PROMPT, SAMPLING)
    for worker in (prefill, decode):
        await wait_for_idle(worker, timeout_s=5)


async def test_kv_held_for_a_target_that_never_comes_is_released_in_time(
    launch: Launch,
) -> None:
    [prefill] = launch([WorkerSpec("prefill", "tiny", ARGS)])
    async with PrefillClient(prefill.http_url) as client:
        result = await client.prefill(
            PrefillRequest("orphan", PROMPT, SAMPLING, target_follows=True)
        )
        assert result.will_transfer
        held = await worker_load(prefill)
        assert held.num_pending_transfers == 1 and held.num_free_blocks < held.num_total_blocks
        started = time.monotonic()
        await wait_for_idle(prefill, timeout_s=3 * KV_TIMEOUT_S)
        assert time.monotonic() - started > KV_TIMEOUT_S / 2  # held, not dropped at once
        # A target that comes after the give-up is told so, and holds nothing.
        with pytest.raises(TransferTimeout, match="no prefill of orphan"):
            await client.send_target(PrefillTarget("orphan", None))
    await wait_for_idle(prefill, timeout_s=1)


async def test_a_decode_worker_that_never_answers_leaves_the_prefill_worker_whole(
    launch: Launch,
) -> None:
    """The decode worker wedges after reserving (the target never reaches the prefill worker):
    the first token still comes, the held KV is released after ``kv_timeout_s``, and when the
    decode worker dies the error names it."""
    [prefill] = launch([WorkerSpec("prefill", "tiny", ARGS)])
    [decode] = launch(
        [WorkerSpec("decode", "tiny", DECODE_ARGS, env=_failpoint("decode.reserved"))]
    )
    async with (
        PrefillClient(prefill.http_url) as prefill_client,
        DecodeClient(decode.http_url) as decode_client,
    ):
        frames = run_disaggregated(prefill_client, decode_client, "stuck", PROMPT, SAMPLING)
        first = await asyncio.wait_for(anext(frames), 30)
        assert isinstance(first, TokenFrame)
        rest = asyncio.ensure_future(anext(frames))
        await asyncio.to_thread(decode.wait_event, "failpoint", 30)
        await wait_for_idle(prefill, timeout_s=3 * KV_TIMEOUT_S)
        assert not rest.done()
        decode.kill()
        with pytest.raises(WorkerUnreachable) as lost:
            await asyncio.wait_for(rest, 10)
        await frames.aclose()
    assert lost.value.worker_url == decode.http_url
    await wait_for_idle(prefill, timeout_s=1)


async def test_a_prefill_worker_killed_before_the_hand_off_frees_the_reservation_at_once(
    launch: Launch,
) -> None:
    """The prefill worker wedges as the target arrives, then dies: the caller closes the decode
    stream as soon as it knows, long before the reservation's own timeout (30 s here)."""
    [decode] = launch([WorkerSpec("decode", "tiny", DECODE_ARGS)])
    [prefill] = launch(
        [WorkerSpec("prefill", "tiny", ARGS, env=_failpoint("prefill.target_arrived"))]
    )
    request = asyncio.ensure_future(
        failure_code(prefill.http_url, decode.http_url, "orphaned", PROMPT, SAMPLING)
    )
    await asyncio.to_thread(prefill.wait_event, "failpoint", 30)
    assert (await worker_load(decode)).num_reserved == 1
    prefill.kill()
    started = time.monotonic()
    assert await asyncio.wait_for(request, 10) == WorkerUnreachable.code
    await wait_for_idle(decode, timeout_s=3)
    assert time.monotonic() - started < 5


async def test_a_kv_that_never_arrives_times_out_on_the_decode_worker(launch: Launch) -> None:
    """The prefill worker wedges as the target arrives: the decode worker gives the reservation
    up after its ``kv_wait_timeout_s`` without anyone's help."""
    [decode] = launch([WorkerSpec("decode", "tiny", (*ARGS, "--kv-wait-timeout", "2"))])
    [prefill] = launch(
        [WorkerSpec("prefill", "tiny", ARGS, env=_failpoint("prefill.target_arrived"))]
    )
    request = asyncio.ensure_future(
        failure_code(prefill.http_url, decode.http_url, "never-lands", PROMPT, SAMPLING)
    )
    await asyncio.to_thread(prefill.wait_event, "failpoint", 30)
    await wait_for_idle(decode, timeout_s=2 + 3)
    prefill.kill()
    # Which error ends it depends on a race the test does not fix: whether the first token was
    # answered before the target wedged the prefill worker (then the caller reads the decode
    # stream and hears its timeout) or not (then it hears the prefill worker die).
    code = await asyncio.wait_for(request, 10)
    assert code in (RequestTimeout.code, WorkerUnreachable.code)
    await wait_for_idle(decode, timeout_s=1)


async def test_a_target_the_prefill_worker_fails_on_frees_both_sides(launch: Launch) -> None:
    prefill, decode = launch(
        [
            WorkerSpec("prefill", "tiny", ARGS, env=_failpoint("prefill.target_arrived", "error")),
            WorkerSpec("decode", "tiny", DECODE_ARGS),
        ]
    )
    started = time.monotonic()
    with pytest.raises(TransferError, match=r"failpoint prefill\.target_arrived"):
        await disaggregated(prefill.http_url, decode.http_url, "refused", PROMPT, SAMPLING)
    for worker in (prefill, decode):
        await wait_for_idle(worker, timeout_s=3)
    assert time.monotonic() - started < KV_TIMEOUT_S + 3  # not the reservation's timeout
