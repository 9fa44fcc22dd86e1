"""Decode-side preemption through the whole stack (tiny model, a decode worker whose KV cache
holds 131 blocks of 16 tokens): twelve concurrent requests that each grow to ~25 blocks run the
cache out, the decode worker preempts — handing requests back to the gateway (``recompute``),
which re-queues and re-prefills them, or parking their KV in host memory (``swap``) — and every
answer, streamed or not, is token for token the one the request gets alone."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.stack import Stack
from tests.gateway.conftest import start_test_stack

NUM_REQUESTS = 12
MAX_TOKENS = 300
KV_CACHE_GIB = "0.001"  # 131 blocks of the tiny model's KV


@pytest.fixture(scope="module", params=["recompute", "swap"])
def small_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    mode = request.param
    started = start_test_stack(
        tmp_path_factory.mktemp(f"preemption-{mode}"),
        engine="tiny",
        worker_args=["--log-level", "warning", "--kv-cache-gib", KV_CACHE_GIB],
        decode_worker_args=["--preemption", mode, "--swap-space-gb", "0.01"],
    )
    try:
        yield started
    finally:
        started.stop()


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [
        [rng.randrange(100, 4000) for _ in range(rng.randint(60, 110))] for _ in range(NUM_REQUESTS)
    ]


async def _complete(
    client: httpx.AsyncClient, key: str, model: str, prompt: list[int], *, stream: bool
) -> str:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    headers = {"authorization": f"Bearer {key}"}
    if not stream:
        response = await client.post("/v1/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])
    parts: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                parts += [choice["text"] for choice in chunk["choices"]]
    return "".join(parts)


async def _decode_load(client: httpx.AsyncClient, stack: Stack) -> dict[str, Any]:
    response = await client.get(
        "/admin/v1/workers", headers={"authorization": f"Bearer {stack.admin_token}"}
    )
    response.raise_for_status()
    [decode] = [w for w in response.json()["data"] if w["role"] == "decode"]
    return dict(decode["load"])


async def test_preempted_requests_answer_as_if_never_interrupted(
    small_stack: Stack, tmp_path: Path
) -> None:
    stack = small_stack
    prompts = _prompts()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=300.0) as client:
        models = await client.get(
            "/v1/models", headers={"authorization": f"Bearer {stack.demo_key}"}
        )
        model = models.json()["data"][0]["id"]
        alone = [
            await _complete(client, stack.demo_key, model, prompt, stream=False)
            for prompt in prompts
        ]
        before = await _decode_load(client, stack)
        together = await asyncio.gather(
            *(
                _complete(client, stack.demo_key, model, prompt, stream=index % 2 == 0)
                for index, prompt in enumerate(prompts)
            )
        )
        assert together == alone
        await asyncio.sleep(1.0)  # a load report from after the last answer
        after = await _decode_load(client, stack)
        assert after["num_preemptions"] > before["num_preemptions"]  # it did preempt
        for _ in range(50):  # the last blocks come back just after the last answer
            if after["num_free_blocks"] == after["num_total_blocks"]:
                break
            await asyncio.sleep(0.1)
            after = await _decode_load(client, stack)
        assert after["num_free_blocks"] == after["num_total_blocks"]
        assert (after["num_running"], after["num_reserved"], after["num_swapped"]) == (0, 0, 0)


# ---- room for a higher class ------------------------------------------------------------------
# The null engine at 20 ms per decode step with a 40-block decode cache: two batch requests
# (240-token prompts, 64 tokens each: 19 blocks each at the end, so they never run each other
# out) leave the gateway 158 free KV slots, and an interactive request with a 200-token prompt
# fits nowhere. The gateway asks the decode worker to make room: one batch request is handed
# back (recompute) and finishes after the interactive one, with exactly its tokens, and the
# tenant's counter charges it once.

BATCH_PROMPT_TOKENS = 240
BATCH_MAX_TOKENS = 64


@pytest.fixture(scope="module")
def slow_small_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_test_stack(
        tmp_path_factory.mktemp("make-room"),
        engine="null",
        worker_args=["--log-level", "warning", "--num-blocks", "40"],
        decode_worker_args=["--preemption", "recompute"],
        gateway_args=["--policy", "vtc"],
        env={"FAIRGATE_NULL_DECODE_STEP_S": "0.02"},
    )
    try:
        yield started
    finally:
        started.stop()


async def _complete_text(client: httpx.AsyncClient, key: str, body: dict[str, Any]) -> str:
    headers = {"authorization": f"Bearer {key}"}
    response = await client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


async def _text_and_end(
    client: httpx.AsyncClient,
    key: str,
    body: dict[str, Any],
    first_chunk: asyncio.Event | None = None,
) -> tuple[str, dict[str, Any], float]:
    """A streamed completion: its text, its usage and when it ended (loop time); sets
    ``first_chunk`` when the first text arrives."""
    parts: list[str] = []
    usage: dict[str, Any] = {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            parts += [choice["text"] for choice in chunk["choices"]]
            usage = chunk.get("usage") or usage
            if first_chunk is not None and parts:
                first_chunk.set()
    return "".join(parts), usage, asyncio.get_running_loop().time()


async def _fair_counter(client: httpx.AsyncClient, stack: Stack, tenant: str) -> float:
    response = await client.get(
        "/metrics", headers={"authorization": f"Bearer {stack.admin_token}"}
    )
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "fairgate_fair_counter" and sample.labels["tenant"] == tenant:
                return sample.value
    raise AssertionError(f"no fair counter for {tenant}")


async def test_a_higher_class_request_gets_room_from_a_lower_class_one(
    slow_small_stack: Stack,
) -> None:
    stack = slow_small_stack
    rng = random.Random(11)
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=120.0) as client:
        models = await client.get(
            "/v1/models", headers={"authorization": f"Bearer {stack.demo_key}"}
        )
        model = models.json()["data"][0]["id"]

        def body(num_prompt_tokens: int, max_tokens: int, seed: int) -> dict[str, Any]:
            prompt = [rng.randrange(1000, 4000) for _ in range(num_prompt_tokens)]
            return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed}

        batch = [
            {**body(BATCH_PROMPT_TOKENS, BATCH_MAX_TOKENS, seed), "fairgate_class": "batch"}
            for seed in (1, 2)
        ]
        interactive = {**body(200, 8, 3), "fairgate_class": "interactive"}
        alone = [await _complete_text(client, stack.demo_key, request) for request in batch]
        before = await _decode_load(client, stack)

        started = [asyncio.Event(), asyncio.Event()]
        batch_runs = [
            asyncio.create_task(_text_and_end(client, stack.demo_key, request, event))
            for request, event in zip(batch, started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30.0)
        _, interactive_usage, interactive_end = await _text_and_end(
            client, stack.demo_key, interactive
        )
        batch_results = await asyncio.gather(*batch_runs)

        # It did not wait for a batch request to finish, and both batch answers are the ones
        # they get alone: the handed-back one resumed with no token lost or repeated.
        assert interactive_usage["completion_tokens"] == 8
        assert interactive_end < min(end for _, _, end in batch_results)
        assert [text for text, _, _ in batch_results] == alone
        for _, usage, _ in batch_results:  # the client's prompt, not the resumption's
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
                BATCH_PROMPT_TOKENS,
                BATCH_MAX_TOKENS,
            )
        after = await _decode_load(client, stack)
        assert after["num_handed_back"] > before["num_handed_back"]
        # The tenant's VTC counter charged each request once, w_in × prompt + w_out × output
        # (1 and 2), the handed-back one included: nothing for its re-prefill.
        expected = 2 * 2 * (BATCH_PROMPT_TOKENS + 2 * BATCH_MAX_TOKENS) + (200 + 2 * 8)
        assert await _fair_counter(client, stack, "demo") == expected
        for _ in range(50):
            if after["num_free_blocks"] == after["num_total_blocks"]:
                break
            await asyncio.sleep(0.1)
            after = await _decode_load(client, stack)
        assert after["num_free_blocks"] == after["num_total_blocks"]
