"""Requests that make a worker's engine fail, through real worker processes (tiny model): the
request fails with an error naming it, every block comes back, the worker stays ready; and a
worker whose engine cannot go on exits, non-zero, instead of living on unready (issue 16).

The failpoint ``engine.forward=error`` makes every runner step of a worker raise."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from deploy.launcher import WorkerSpec
from engine.serving import EXIT_ENGINE_FAILED
from tests.workers.conftest import TINY_ARGS, Launch, colocated, disaggregated, wait_for_idle
from transfer.errors import EngineFailed, RequestFailed
from transfer.messages import SamplingSpec

SAMPLING = SamplingSpec(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = list(range(1000, 1040))
FAILING_STEPS = {"FAIRGATE_FAILPOINTS": "engine.forward=error"}


async def test_a_tiny_temperature_completes_greedily_through_real_workers(launch: Launch) -> None:
    """temperature=1e-39 is within the API's range; it once killed the engine of whichever
    worker sampled it, for good."""
    prefill, decode, whole = launch(
        [
            WorkerSpec("prefill", "tiny", TINY_ARGS),
            WorkerSpec("decode", "tiny", TINY_ARGS),
            WorkerSpec("colocated", "tiny", TINY_ARGS),
        ]
    )
    tiny = msgspec.structs.replace(SAMPLING, temperature=1e-39, seed=-1)
    greedy = await disaggregated(prefill.http_url, decode.http_url, "greedy", PROMPT, SAMPLING)
    assert len(greedy) == SAMPLING.max_tokens
    assert await disaggregated(prefill.http_url, decode.http_url, "tiny", PROMPT, tiny) == greedy
    assert await colocated(whole.http_url, "tiny-colocated", PROMPT, tiny) == greedy
    for worker in (prefill, decode, whole):
        assert (await wait_for_idle(worker, timeout_s=5)).ready


async def test_a_failing_step_on_either_side_fails_the_request_and_frees_every_block(
    launch: Launch,
) -> None:
    healthy_prefill, healthy_decode, failing_prefill, failing_decode = launch(
        [
            WorkerSpec("prefill", "tiny", TINY_ARGS),
            WorkerSpec("decode", "tiny", TINY_ARGS),
            WorkerSpec("prefill", "tiny", TINY_ARGS, env=FAILING_STEPS),
            WorkerSpec("decode", "tiny", TINY_ARGS, env=FAILING_STEPS),
        ]
    )
    # The prompt's step fails: /v1/prefill answers with the error; the decode worker's
    # reservation comes back when the caller gives up on it.
    with pytest.raises(RequestFailed, match="request on-prefill failed: the engine failed"):
        await disaggregated(
            failing_prefill.http_url, healthy_decode.http_url, "on-prefill", PROMPT, SAMPLING
        )
    # The KV landed and the first decode step fails: the stream ends with the error.
    with pytest.raises(RequestFailed, match="request on-decode failed: the engine failed"):
        await disaggregated(
            healthy_prefill.http_url, failing_decode.http_url, "on-decode", PROMPT, SAMPLING
        )
    for worker in (healthy_prefill, healthy_decode, failing_prefill, failing_decode):
        assert (await wait_for_idle(worker, timeout_s=10)).ready


async def test_a_worker_whose_every_step_fails_exits_non_zero(launch: Launch) -> None:
    """One failed request leaves the worker ready; the third step in a row in which everything
    failed (requests of three tenants) kills the engine, and the process says so and exits with
    ``EXIT_ENGINE_FAILED``."""
    [worker] = launch([WorkerSpec("colocated", "tiny", TINY_ARGS, env=FAILING_STEPS)])
    message = r"request doomed-1 failed: .*failpoint engine\.forward"
    with pytest.raises(RequestFailed, match=message):
        await colocated(worker.http_url, "doomed-1", PROMPT, SAMPLING, b"tenant-1")
    assert (await wait_for_idle(worker, timeout_s=5)).ready
    with pytest.raises(RequestFailed, match="request doomed-2 failed"):
        await colocated(worker.http_url, "doomed-2", PROMPT, SAMPLING, b"tenant-2")
    with pytest.raises(EngineFailed, match="failed every run in 3 steps in a row"):
        await colocated(worker.http_url, "doomed-3", PROMPT, SAMPLING, b"tenant-3")
    died = time.monotonic()
    failed = await asyncio.to_thread(worker.wait_event, "failed", 10)
    assert "3 steps in a row" in failed["reason"]
    exit_code = await asyncio.to_thread(worker.process.wait, 15)
    assert exit_code == EXIT_ENGINE_FAILED
    assert time.monotonic() - died < 10
