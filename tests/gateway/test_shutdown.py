"""The gateway stopped with SIGTERM while requests run (real processes, the null engine): within
the grace period they all finish; past it they end with a clean 503 ``shutting_down`` (an SSE
error event on a stream); either way the usage ledger holds exactly what the clients received
(the README's billing rule), once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from engine.null_engine import NullEngineConfig, null_token
from engine.tokenizer import Tokenizer
from gateway.store import SQLiteStore
from gateway.streaming import TextStream
from tests.gateway.conftest import null_tokenizer, start_test_stack

PROMPT = [{"role": "user", "content": "Count slowly."}]
# The null engine decodes one token per 5 ms step: these take about 6 s (longer than uvicorn's
# own 5 s grace, well within ours of 10 s even at 7 ms a step) and 4 s (longer than 1 s).
SHORT_TOKENS = 1200
LONG_TOKENS = 800


@dataclass(slots=True)
class Answer:
    """What one client received."""

    status: int
    text: str = ""
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    retry_after: str | None = None


@pytest.fixture
def stop_stack() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.stop()


def _start(tmp_path: Path, grace_s: float, stop_stack: list[Stack]) -> Stack:
    stack = start_test_stack(
        tmp_path / "state",
        env={"FAIRGATE_GATEWAY_SHUTDOWN_GRACE_S": str(grace_s)},
        log_dir=tmp_path / "logs",
    )
    stop_stack.append(stack)
    return stack


async def _tenant_key(client: httpx.AsyncClient, stack: Stack) -> tuple[str, str]:
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    tenant = await client.post("/admin/v1/tenants", json={"name": "shut"}, headers=admin)
    assert tenant.status_code == 201, tenant.text
    key = await client.post("/admin/v1/tenants/shut/keys", json={"name": "k"}, headers=admin)
    return tenant.json()["tenant_id"], key.json()["secret"]


async def _model(client: httpx.AsyncClient, key: str) -> str:
    models = await client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
    return str(models.json()["data"][0]["id"])


async def _whole(client: httpx.AsyncClient, body: dict[str, Any], key: str) -> Answer:
    response = await client.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    )
    answer = Answer(response.status_code, retry_after=response.headers.get("retry-after"))
    data = response.json()
    if response.status_code == 200:
        answer.text = data["choices"][0]["message"]["content"]
        answer.usage = data["usage"]
    else:
        answer.error = data["error"]
    return answer


async def _streamed(
    client: httpx.AsyncClient, body: dict[str, Any], key: str, started: asyncio.Event
) -> Answer:
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        answer = Answer(r.status_code)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                answer.error = event["error"]
            elif event["choices"]:
                answer.text += event["choices"][0]["delta"].get("content") or ""
                if answer.text:
                    started.set()
            elif event.get("usage"):
                answer.usage = event["usage"]
    return answer


async def _run_and_stop(stack: Stack, max_tokens: int) -> tuple[list[Answer], str, int]:
    """Four whole and four streamed requests in flight, then SIGTERM to the gateway: the
    answers, the tenant id and the gateway's exit status."""
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as client:
        tenant_id, key = await _tenant_key(client, stack)
        model = await _model(client, key)
        bodies = [
            {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "seed": seed}
            for seed in range(8)
        ]
        whole = [asyncio.create_task(_whole(client, body, key)) for body in bodies[:4]]
        streams_started = [asyncio.Event() for _ in range(4)]
        streamed = [
            asyncio.create_task(_streamed(client, body, key, started))
            for body, started in zip(bodies[4:], streams_started, strict=True)
        ]
        for started in streams_started:  # the whole ones were sent first: all eight run now
            await asyncio.wait_for(started.wait(), 30.0)
        stack.gateway.process.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*whole, *streamed)
    exit_status = await asyncio.to_thread(stack.gateway.process.wait, 30.0)
    return answers, tenant_id, exit_status


async def _recorded_usage(stack: Stack, tenant_id: str) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) the ledger holds for the tenant."""
    store = await SQLiteStore.open(stack.state_dir / "fairgate.db")
    try:
        [usage] = await store.usage(tenant_id, "month")
    finally:
        await store.close()
    return usage.requests, usage.prompt_tokens, usage.completion_tokens


def _gateway_log(tmp_path: Path) -> str:
    return (tmp_path / "logs" / "gateway-0.log").read_text(encoding="utf-8")


async def test_requests_in_flight_finish_within_the_grace_period_and_are_billed_once(
    tmp_path: Path, stop_stack: list[Stack]
) -> None:
    stack = _start(tmp_path, grace_s=10.0, stop_stack=stop_stack)
    stopped_at = time.monotonic()
    answers, tenant_id, exit_status = await _run_and_stop(stack, SHORT_TOKENS)
    assert exit_status == -signal.SIGTERM  # uvicorn re-raises the signal once it has stopped
    assert time.monotonic() - stopped_at < 30.0
    for answer in answers:
        assert (answer.status, answer.error) == (200, None)
        assert answer.usage is not None
        assert answer.usage["completion_tokens"] == SHORT_TOKENS
    assert "stopping: 8 requests in flight" in _gateway_log(tmp_path)
    received = (
        len(answers),
        sum(a.usage["prompt_tokens"] for a in answers if a.usage),
        sum(a.usage["completion_tokens"] for a in answers if a.usage),
    )
    assert await _recorded_usage(stack, tenant_id) == received


def _num_tokens_behind(tokenizer: Tokenizer, text: str, seed: int, limit: int) -> set[int]:
    """How many of the null engine's tokens for ``seed`` a client that received ``text`` got:
    every count whose detokenized text is exactly ``text``."""
    stream = TextStream(tokenizer)
    config = NullEngineConfig()
    shown = ""
    counts = {0} if text == "" else set()
    for position in range(limit):
        shown += stream.push([null_token(seed, position, config)])
        if shown == text:
            counts.add(position + 1)
        elif len(shown) > len(text):
            break
    return counts


async def test_requests_past_the_grace_period_end_cleanly_billed_what_was_received(
    tmp_path: Path, stop_stack: list[Stack]
) -> None:
    stack = _start(tmp_path, grace_s=1.0, stop_stack=stop_stack)
    answers, tenant_id, exit_status = await _run_and_stop(stack, LONG_TOKENS)
    assert exit_status == -signal.SIGTERM
    whole, streamed = answers[:4], answers[4:]
    for answer in whole:
        assert answer.status == 503
        assert answer.error is not None and answer.error["code"] == "shutting_down"
        assert answer.retry_after is not None
    tokenizer = null_tokenizer()
    fewest = most = 0  # completion tokens the streams' texts stand for
    for seed, answer in enumerate(streamed, start=4):
        assert answer.status == 200  # the stream had begun: its error is its last event
        assert answer.error is not None and answer.error["code"] == "shutting_down"
        assert answer.usage is None and answer.text
        counts = _num_tokens_behind(tokenizer, answer.text, seed, LONG_TOKENS)
        assert counts and max(counts) < LONG_TOKENS
        fewest, most = fewest + min(counts), most + max(counts)
    assert "ending 8 requests still running" in _gateway_log(tmp_path)
    requests, prompt_tokens, completion_tokens = await _recorded_usage(stack, tenant_id)
    # Billed: each stream's prompt and the tokens whose text its client got; the whole answers
    # never reached their clients, so nothing of them.
    assert requests == 4
    assert prompt_tokens == 4 * len(tokenizer.encode_chat(PROMPT))
    assert fewest <= completion_tokens <= most
