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
