"""Workers killed in the middle of a transfer, restarted, or mismatched: every request ends with
a clear error, every block comes back, nobody hangs, and pairs form again (tiny model)."""

from __future__ import annotations

import asyncio
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
from transfer.client import DecodeClient
from transfer.errors import (
    IncompatiblePeer,
    RequestTimeout,
    TransferError,
    WorkerUnreachable,
)
from transfer.messages import DecodeRequest, Reserved, SamplingSpec

KV_TIMEOUT_S = 3.0
ARGS = (*TINY_ARGS, "--kv-timeout", str(KV_TIMEOUT_S))
DECODE_ARGS = (*ARGS, "--kv-wait-timeout", "20")
SAMPLING = SamplingSpec(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = list(range(1000, 1300))  # 19 blocks: the transfer has many messages to stop between


def _failpoint(name: str) -> dict[str, str]:
    return {"FAIRGATE_FAILPOINTS": f"{name}=pause"}


async def test_prefill_killed_mid_transfer_leaves_decode_healthy_and_whole(
    launch: Launch,
) -> None:
    [decode] = launch([WorkerSpec("decode", "tiny", DECODE_ARGS)])
    [prefill] = launch(
        [WorkerSpec("prefill", "tiny", ARGS, env=_failpoint("kv.send.mid_transfer"))]
    )
    before = await worker_load(decode)
    request = asyncio.create_task(
        failure_code(prefill.http_url, decode.http_url, "doomed", PROMPT, SAMPLING)
    )
    await asyncio.to_thread(prefill.wait_event, "failpoint", 60)
    assert (await worker_load(decode)).num_free_blocks < before.num_free_blocks  # landing
    prefill.kill()
    started = time.monotonic()
    # The decode worker's failed landing, or (whichever the caller hears first) the prefill
    # worker's death, which hands the request back to be resumed elsewhere.
    code = await asyncio.wait_for(request, 10 * KV_TIMEOUT_S)
    assert code in (TransferError.code, WorkerUnreachable.code)
    assert time.monotonic() - started < 3 * KV_TIMEOUT_S
    after = await wait_for_idle(decode, timeout_s=5)
    assert after.num_free_blocks == before.num_free_blocks
    # A new prefill worker pairs with the same decode worker and is served.
    [replacement] = launch([WorkerSpec("prefill", "tiny", ARGS)])
    output = await disaggregated(replacement.http_url, decode.http_url, "next", PROMPT, SAMPLING)
    assert len(output) == SAMPLING.max_tokens
    await wait_for_idle(decode, timeout_s=5)


async def test_decode_killed_mid_transfer_prefill_gives_up_in_time_and_pairs_after_restart(
    launch: Launch,
) -> None:
    prefill, healthy = launch(
        [WorkerSpec("prefill", "tiny", ARGS), WorkerSpec("decode", "tiny", DECODE_ARGS)]
    )
    [doomed] = launch(
        [WorkerSpec("decode", "tiny", DECODE_ARGS, env=_failpoint("kv.recv.mid_transfer"))]
    )
    reference = await disaggregated(
        prefill.http_url, healthy.http_url, "reference", PROMPT, SAMPLING
    )
    request = asyncio.create_task(
        disaggregated(prefill.http_url, doomed.http_url, "doomed", PROMPT, SAMPLING)
    )
    await asyncio.to_thread(doomed.wait_event, "failpoint", 60)
    http_port, kv_port = doomed.http_url.rsplit(":", 1)[1], doomed.kv_port
    doomed.kill()
    started = time.monotonic()
    with pytest.raises(WorkerUnreachable):
        await asyncio.wait_for(request, 10 * KV_TIMEOUT_S)
    # The prefill worker's transfer fails within its timeout and its blocks come back.
    await wait_for_idle(prefill, timeout_s=3 * KV_TIMEOUT_S)
    assert time.monotonic() - started < 3 * KV_TIMEOUT_S
    # It keeps serving: through the healthy decode worker...
    assert reference == await disaggregated(
        prefill.http_url, healthy.http_url, "after", PROMPT, SAMPLING
    )
    # ...and through a decode worker restarted on the dead one's ports, which it pairs with anew.
    restart_args = (*DECODE_ARGS, "--port", http_port, "--kv-port", str(kv_port))
    [restarted] = launch([WorkerSpec("decode", "tiny", restart_args)])
    assert restarted.kv_port == kv_port
    assert reference == await disaggregated(
        prefill.http_url, restarted.http_url, "restarted", PROMPT, SAMPLING
    )
    for worker in (prefill, healthy, restarted):
        await wait_for_idle(worker, timeout_s=5)


async def test_incompatible_prefill_worker_is_refused_with_the_mismatch_named(
    launch: Launch,
) -> None:
    bf16_args = (*ARGS, "--precision", "bfloat16")  # the later flag wins
    prefill, decode = launch(
        [WorkerSpec("prefill", "tiny", bf16_args), WorkerSpec("decode", "tiny", DECODE_ARGS)]
    )
    with pytest.raises(IncompatiblePeer, match=r"dtype 'bfloat16' \(peer\) != 'float32' \(here\)"):
        await disaggregated(prefill.http_url, decode.http_url, "mismatch", PROMPT, SAMPLING)
    await wait_for_idle(decode, timeout_s=5)
    await wait_for_idle(prefill, timeout_s=3 * KV_TIMEOUT_S)


async def test_kv_that_never_comes_times_out_and_frees_the_reservation(
    launch: Launch,
) -> None:
    [decode] = launch([WorkerSpec("decode", "tiny", (*ARGS, "--kv-wait-timeout", "1"))])
    async with (
        DecodeClient(decode.http_url) as client,
        client.decode(DecodeRequest("orphan", PROMPT, SAMPLING)) as stream,
    ):
        assert isinstance(await stream.next(), Reserved)
        with pytest.raises(RequestTimeout, match="did not arrive within 1 s"):
            await stream.next()
    await wait_for_idle(decode, timeout_s=5)
