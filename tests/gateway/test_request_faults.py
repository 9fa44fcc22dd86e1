"""Requests that meet trouble on a real stack (worker and gateway processes, the null engine): a
client that leaves, a worker that dies under a request (its requests go on elsewhere), the last
worker of a role stopping. The tenant gets its whole answer or a clean error that names no
internal address, the log has no traceback, and the ledger bills only what reached the client
(the README's rule), once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from tests.gateway.conftest import answer_without_body, null_tokenizer, start_test_stack

PROMPT = [{"role": "user", "content": "Go on for a while."}]
MAX_TOKENS = 1000  # the null engine's 5 ms a step: about 5 s


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    started = start_test_stack(tmp_path / "state", log_dir=tmp_path / "logs", num_decode_workers=2)
    try:
        yield started
    finally:
        started.stop()


async def _tenant(
    client: httpx.AsyncClient, stack: Stack, name: str, **spec: Any
) -> tuple[str, str, str]:
    """(tenant id, key, model)."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    body = {"name": name, **spec}
    tenant = await client.post("/admin/v1/tenants", json=body, headers=admin)
    assert tenant.status_code == 201, tenant.text
    key = await client.post(f"/admin/v1/tenants/{name}/keys", json={"name": "k"}, headers=admin)
    secret = key.json()["secret"]
    models = await client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
    return tenant.json()["tenant_id"], secret, models.json()["data"][0]["id"]


async def _ledger(stack: Stack, tenant_id: str) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) recorded for the tenant this month (the
    admin route writes what is pending first)."""
    async with httpx.AsyncClient(base_url=stack.base_url) as client:
        admin = {"authorization": f"Bearer {stack.admin_token}"}
        response = await client.get(f"/admin/v1/tenants/{tenant_id}/usage", headers=admin)
        assert response.status_code == 200, response.text
    rows = response.json()["data"]
    if not rows:
        return 0, 0, 0
    [usage] = rows
    return usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]


async def _assert_nothing_held(stack: Stack) -> None:
    """Every request has ended in the gateway's books: none counted in it, none queued (its
    own metrics, within a few seconds for what ends after its client saw the answer)."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    held: list[str] = []
    deadline = time.monotonic() + 5.0
    async with httpx.AsyncClient(base_url=stack.base_url, headers=admin) as client:
        while time.monotonic() < deadline:
            metrics = (await client.get("/metrics")).text
            held = [
                line
                for line in metrics.splitlines()
                if line.startswith(("fairgate_requests_in_gateway{", "fairgate_queue_depth{"))
                and float(line.rsplit(" ", 1)[1]) != 0
            ]
            if not held:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"still held: {held}")


def _log(tmp_path: Path) -> str:
    return (tmp_path / "logs" / "gateway-0.log").read_text(encoding="utf-8")


async def _wait_for_log(tmp_path: Path, text: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (log := _log(tmp_path)):
        assert time.monotonic() < deadline, f"{text!r} not logged"
        await asyncio.sleep(0.05)
    return log


async def test_a_client_that_leaves_is_logged_as_such_and_billed_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """It received nothing, so it is billed nothing; but its quota counts the work done for it
    (the prompt and about 200 tokens in the second it waited), so hanging up does not get
    around a tokens-per-minute limit."""
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30.0) as client:
        tpm = {"quotas": {"tokens_per_minute": 2100}}
        tenant_id, key, model = await _tenant(client, stack, "leaver", **tpm)
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": model, "messages": PROMPT, "max_tokens": 2000}  # about 10 s
        with pytest.raises(httpx.ReadTimeout):
            # After a second the client gives up and closes its connection.
            await client.post("/v1/chat/completions", json=body, headers=headers, timeout=1.0)
        log = await _wait_for_log(tmp_path, "outcome=client_disconnected")
        again = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert "Traceback" not in log and "ERROR" not in log
    assert await _ledger(stack, tenant_id) == (0, 0, 0)
    await _assert_nothing_held(stack)
    # 2000 + the prompt would fit the minute's 2100 only if the first request had cost nothing.
    assert again.status_code == 429, again.text
    assert again.json()["error"]["code"] == "rate_limit_exceeded"


async def _streamed(
    client: httpx.AsyncClient, body: dict[str, Any], key: str, started: asyncio.Event
) -> tuple[str, dict[str, Any] | None]:
    """(the text received, the error event if any)."""
    body = body | {"stream": True}
    text, error = "", None
    headers = {"authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                error = event["error"]
            elif event["choices"]:
                text += event["choices"][0]["delta"].get("content") or ""
                started.set()
    return text, error


async def test_requests_on_a_decode_worker_that_dies_go_on_elsewhere_token_for_token(
    stack: Stack, tmp_path: Path
) -> None:
    """Both decode workers run requests, whole and streamed; one is killed mid-stream. Every
    request completes on the other one with the output it would have had (the null engine's
    tokens are a function of seed and position: the same seeds sent again after the fault
    give the same texts), each is billed once, for its prompt and every token, and the log
    has no traceback."""
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as client:
        tenant_id, key, model = await _tenant(client, stack, "victim")
        headers = {"authorization": f"Bearer {key}"}

        def body(seed: int) -> dict[str, Any]:
            return {"model": model, "messages": PROMPT, "max_tokens": MAX_TOKENS, "seed": seed}

        whole = [
            asyncio.create_task(client.post("/v1/chat/completions", json=body(i), headers=headers))
            for i in range(4)
        ]
        started = [asyncio.Event() for _ in range(4)]
        streams = [
            asyncio.create_task(_streamed(client, body(10 + i), key, s))
            for i, s in enumerate(started)
        ]
        for event in started:
            await asyncio.wait_for(event.wait(), 30.0)
        stack.workers[-1].kill()
        answers = await asyncio.gather(*whole)
        results = await asyncio.gather(*streams)
        requests, prompt_tokens, completion_tokens = await _ledger(stack, tenant_id)
        # Together, as the first ones ran (the null engine's tokens do not depend on the batch):
        # one after another they took 8 x 5 s.
        again = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=body(i), headers=headers)
                for i in (*range(4), *range(10, 14))
            )
        )
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert [a.status_code for a in again] == [200] * 8, [a.text for a in again]
    assert [error for _, error in results] == [None] * 4
    texts = [a.json()["choices"][0]["message"]["content"] for a in answers]
    texts += [text for text, _ in results]
    assert texts == [a.json()["choices"][0]["message"]["content"] for a in again]
    log = _log(tmp_path)
    assert "moved off a failed worker" in log  # some were on the killed worker
    assert "Traceback" not in log
    num_prompt = len(null_tokenizer().encode_chat(PROMPT))
    assert (requests, prompt_tokens, completion_tokens) == (8, 8 * num_prompt, 8 * MAX_TOKENS)
    await _assert_nothing_held(stack)


async def _until_speed_reported(client: httpx.AsyncClient, stack: Stack) -> None:
    """Until the gateway's view of the prefill worker has its measured speed (a load poll)."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    deadline = time.monotonic() + 10.0
    while True:
        workers = (await client.get("/admin/v1/workers", headers=admin)).json()["data"]
        loads = [w["load"] for w in workers if w["role"] == "prefill" and w["load"]]
        if loads and loads[0]["prefill_tok_s"] > 0:
            return
        assert time.monotonic() < deadline, workers
        await asyncio.sleep(0.05)


async def test_queued_requests_get_no_worker_at_once_when_the_last_prefill_worker_stops(
    tmp_path: Path,
) -> None:
    """A slow prefill worker keeps requests queued in the gateway; stopping it ends every one of
    them within 2 s with 503 no_worker and Retry-After (not after the queue timeout), and a new
    request is refused the same way at once."""
    slow = start_test_stack(
        tmp_path / "state",
        log_dir=tmp_path / "logs",
        env={"FAIRGATE_NULL_PREFILL_TOK_S": "400"},  # a 200-token prompt: half a second
    )
    try:
        async with httpx.AsyncClient(base_url=slow.base_url, timeout=60.0) as client:
            _, key, model = await _tenant(client, slow, "queued")
            headers = {"authorization": f"Bearer {key}"}
            # Different prompts: a repeated one would be served from the prefix cache.
            bodies = [
                {"model": model, "prompt": list(range(1000 + i, 1200 + i)), "max_tokens": 4}
                for i in range(18)
            ]
            # Once the worker has measured its speed, the gateway sends it one prompt at a
            # time (``max_prefill_inflight_s``) and holds the rest.
            warm_up = await client.post("/v1/completions", json=bodies.pop(), headers=headers)
            assert warm_up.status_code == 200
            await _until_speed_reported(client, slow)
            sent = [
                asyncio.create_task(client.post("/v1/completions", json=body, headers=headers))
                for body in bodies[:16]
            ]
            # The first prompts run; the rest wait in the gateway. Once the oldest has waited
            # past the class's limit (standard: 2.5 s), the tenant's next request is refused,
            # before its body is read.
            await asyncio.sleep(3.0)
            refused_unread = answer_without_body(slow, "/v1/completions", key)
            assert refused_unread.startswith(b"HTTP/1.1 429 ")
            assert b'"code":"queue_full"' in refused_unread
            assert b"retry-after" in refused_unread.lower()
            [prefill] = [w for w in slow.workers if w.spec.role == "prefill"]
            prefill.process.send_signal(signal.SIGTERM)  # it stops; its own exit takes a while
            stopped_at = time.monotonic()
            answers = await asyncio.gather(*sent)
            ended_within_s = time.monotonic() - stopped_at
            await asyncio.to_thread(prefill.stop)
            late = await client.post("/v1/completions", json=bodies[16], headers=headers)
            await _assert_nothing_held(slow)
    finally:
        slow.stop()
    refused = [a for a in answers if a.status_code != 200]
    assert len(refused) >= 6  # at 0.5 s a prompt, most were still waiting
    for answer in [*refused, late]:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "no_worker"
        assert int(answer.headers["retry-after"]) >= 1
    assert ended_within_s < 2.0


async def test_a_stream_that_pauses_sends_keep_alive_comments(tmp_path: Path) -> None:
    """Tokens 0.8 s apart and a keep-alive every 0.2 s: comment lines come between the tokens
    (proxies with idle timeouts keep the stream), and a client reading events sees only the
    events, the whole answer."""
    slow = start_test_stack(
        tmp_path / "state",
        env={"FAIRGATE_NULL_DECODE_STEP_S": "0.8", "FAIRGATE_GATEWAY_SSE_KEEPALIVE_S": "0.2"},
    )
    try:
        async with httpx.AsyncClient(base_url=slow.base_url, timeout=30.0) as client:
            _, key, model = await _tenant(client, slow, "patient")
            body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True}
            headers = {"authorization": f"Bearer {key}"}
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines() if line]
    finally:
        slow.stop()
    comments = [line for line in lines if line.startswith(":")]
    events = [line for line in lines if line.startswith("data: ")]
    assert len(comments) >= 4, lines  # two gaps of 0.8 s at least
    assert set(comments) == {": keep-alive"}
    assert events[-1] == "data: [DONE]"
    assert len(lines) == len(comments) + len(events)
