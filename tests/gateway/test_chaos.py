"""The chaos suite (issue 18): worker faults at exact points under load, on real processes.

Each test starts the tiny model on 2 prefill and 2 decode workers and the gateway, sends 40
greedy requests at once (prompts of 150-250 tokens, up to 160 tokens out; every other one
streamed), and injects one fault while they run. Then it checks what the README promises:

- every request completes with the output of an uninterrupted run (the references: the same
  requests sent again after the fault, to the workers left), or ends with a clean OpenAI-style
  error (none here: every fault is within the migration bound);
- none is still running 30 s after the fault (a hang);
- the workers left hold no KV block and no request afterwards;
- the usage ledger holds exactly what the clients were told they used.

Each prints its row of the issue's table: fault, requests, completed identical, clean errors,
hangs, and the longest pause a stream saw between two chunks. The last test restarts every
worker in turn (drain, remove, stop, start a new one, add) under constant load.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.launcher import WorkerProcess, start_workers
from deploy.stack import Stack
from tests.gateway.conftest import start_test_stack
from tests.workers.conftest import wait_for_idle

NUM_REQUESTS = 40
MAX_TOKENS = 160
HANG_S = 30.0  # a request still running this long after the fault is a hang
PREFILL_1, DECODE_1 = 1, 3  # indexes in Stack.workers: prefill-0, prefill-1, decode-0, decode-1


@dataclass(slots=True)
class Outcome:
    """How one request ended, as its client saw it."""

    status: int = 0
    text: str = ""
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    chunk_times: list[float] = field(default_factory=list)
    ended_at: float | None = None

    @property
    def max_pause_s(self) -> float:
        times = self.chunk_times
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _bodies(model: str) -> list[dict[str, Any]]:
    rng = random.Random(18)
    return [
        {
            "model": model,
            "prompt": [rng.randrange(3, 500) for _ in range(rng.randrange(150, 250))],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": index % 2 == 1,
        }
        for index in range(NUM_REQUESTS)
    ]


async def _send(client: httpx.AsyncClient, body: dict[str, Any], outcome: Outcome) -> None:
    if not body["stream"]:
        answer = await client.post("/v1/completions", json=body)
        outcome.status = answer.status_code
        payload = answer.json()
        if answer.status_code == 200:
            outcome.text = payload["choices"][0]["text"]
            outcome.usage = payload["usage"]
        else:
            outcome.error = payload["error"]
        outcome.ended_at = time.monotonic()
        return
    body = body | {"stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.error = json.loads(await response.aread())["error"]
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                outcome.chunk_times.append(time.monotonic())
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    outcome.error = event["error"]
                elif event["choices"]:
                    outcome.text += event["choices"][0]["text"]
                elif event.get("usage"):
                    outcome.usage = event["usage"]
    outcome.ended_at = time.monotonic()


async def _tenant_key(stack: Stack) -> tuple[str, str, str]:
    """(tenant id, key, model) of a fresh tenant."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=admin, timeout=30.0) as client:
        tenant = await client.post("/admin/v1/tenants", json={"name": "chaos"})
        assert tenant.status_code == 201, tenant.text
        key = await client.post("/admin/v1/tenants/chaos/keys", json={"name": "k"})
        secret = key.json()["secret"]
        models = await client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
    return tenant.json()["tenant_id"], secret, models.json()["data"][0]["id"]


async def _ledger(stack: Stack, tenant_id: str) -> tuple[int, int, int]:
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=admin) as client:
        response = await client.get(f"/admin/v1/tenants/{tenant_id}/usage")
    [usage] = response.json()["data"]
    return usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]


Fault = Callable[[Stack, list[Outcome]], Awaitable[None]]


async def _run_with_fault(
    stack: Stack,
    fault: Fault,
    name: str,
    *,
    survivors: Callable[[Stack], list[WorkerProcess]] | None = None,
) -> None:
    """``survivors``: the workers that must be left idle (default: those alive)."""
    tenant_id, key, model = await _tenant_key(stack)
    bodies = _bodies(model)
    outcomes = [Outcome() for _ in bodies]
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=120.0) as client:
        sends = [
            asyncio.create_task(_send(client, b, o)) for b, o in zip(bodies, outcomes, strict=True)
        ]
        await fault(stack, outcomes)
        faulted_at = time.monotonic()
        done, pending = await asyncio.wait(sends, timeout=HANG_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        for task in done:
            task.result()  # a client-side failure is the test's, not the gateway's
        references = [Outcome() for _ in bodies]
        await asyncio.gather(
            *(_send(client, b, r) for b, r in zip(bodies, references, strict=True))
        )
    assert all(r.status == 200 and r.error is None for r in references), [
        (r.status, r.error) for r in references if r.error is not None
    ]
    identical = sum(
        o.error is None and o.text == r.text for o, r in zip(outcomes, references, strict=True)
    )
    clean_errors = [o for o in outcomes if o.error is not None]
    for outcome in clean_errors:
        assert outcome.error is not None and outcome.error["type"] == "server_error"
        assert "127.0.0.1" not in outcome.error["message"]
    max_pause = max(o.max_pause_s for o in outcomes)
    print(
        f"\nchaos | {name} | requests {len(outcomes)} | completed identical {identical} | "
        f"clean errors {len(clean_errors)} | hangs {len(pending)} | max pause {max_pause:.2f} s"
    )
    assert not pending, "requests still running 30 s after the fault"
    assert all(o.ended_at is not None and o.ended_at - faulted_at < HANG_S for o in outcomes)
    assert identical == len(outcomes), [
        (o.status, o.error, o.text[:40], r.text[:40])
        for o, r in zip(outcomes, references, strict=True)
        if o.text != r.text
    ]
    # What the clients were told they used, every request once, is what the ledger holds.
    told = [o.usage for o in (*outcomes, *references) if o.usage is not None]
    expected = (
        len(told),
        sum(u["prompt_tokens"] for u in told),
        sum(u["completion_tokens"] for u in told),
    )
    assert await _ledger(stack, tenant_id) == expected
    for worker in (survivors or _alive)(stack):
        await wait_for_idle(worker, timeout_s=15.0)


def _alive(stack: Stack) -> list[WorkerProcess]:
    return [w for w in stack.workers if w.process.poll() is None]


def _chaos_stack(
    tmp_path: Path,
    worker_env: dict[str, dict[str, str]] | None = None,
    env: dict[str, str] | None = None,
) -> Stack:
    return start_test_stack(
        tmp_path / "state",
        engine="tiny",
        num_prefill_workers=2,
        num_decode_workers=2,
        log_dir=tmp_path / "logs",
        worker_env=worker_env or {},
        env=env,
    )


@pytest.fixture
def clean_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = _chaos_stack(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


async def _until_streams_run(outcomes: list[Outcome], num_chunks: int) -> None:
    """Until every streamed request has received ``num_chunks`` chunks (mid-stream)."""
    streamed = outcomes[1::2]
    deadline = time.monotonic() + 60.0
    while not all(len(o.chunk_times) >= num_chunks or o.ended_at for o in streamed):
        assert time.monotonic() < deadline, "the streams never got going"
        await asyncio.sleep(0.01)


async def test_kill_9_of_a_decode_worker_mid_stream(clean_stack: Stack) -> None:
    async def kill_decode(stack: Stack, outcomes: list[Outcome]) -> None:
        await _until_streams_run(outcomes, 4)
        stack.workers[DECODE_1].kill()

    await _run_with_fault(clean_stack, kill_decode, "kill -9 decode mid-stream")


async def _kill_at_failpoint(stack: Stack, index: int) -> None:
    worker = stack.workers[index]
    await asyncio.to_thread(worker.wait_event, "failpoint", 60.0)
    worker.kill()


async def test_kill_9_of_a_prefill_worker_mid_transfer(tmp_path: Path) -> None:
    """prefill-1 wedges in the middle of its first KV transfer, then is killed."""
    env = {"prefill-1": {"FAIRGATE_FAILPOINTS": "kv.send.mid_transfer=pause"}}
    stack = _chaos_stack(tmp_path, env)
    try:

        async def kill_prefill(stack: Stack, outcomes: list[Outcome]) -> None:
            await _kill_at_failpoint(stack, PREFILL_1)

        await _run_with_fault(stack, kill_prefill, "kill -9 prefill mid-transfer")
    finally:
        stack.stop()


async def test_kill_9_of_a_prefill_worker_mid_prefill(tmp_path: Path) -> None:
    """prefill-1's engine wedges at its first step (prompts admitted, none computed), then the
    worker is killed."""
    env = {"prefill-1": {"FAIRGATE_FAILPOINTS": "engine.forward=pause"}}
    stack = _chaos_stack(tmp_path, env)
    try:

        async def kill_prefill(stack: Stack, outcomes: list[Outcome]) -> None:
            await _kill_at_failpoint(stack, PREFILL_1)

        await _run_with_fault(stack, kill_prefill, "kill -9 prefill mid-prefill")
    finally:
        stack.stop()


async def test_sigstop_of_a_decode_worker_past_its_deadline(clean_stack: Stack) -> None:
    """decode-1 stops (SIGSTOP) mid-stream: its load poll times out, the gateway finds it lost
    and its requests move; 10 s later it goes on (SIGCONT), finds its streams gone, frees
    everything and is taken back."""

    async def stop_decode(stack: Stack, outcomes: list[Outcome]) -> None:
        await _until_streams_run(outcomes, 4)
        process = stack.workers[DECODE_1].process
        process.send_signal(signal.SIGSTOP)
        asyncio.get_running_loop().call_later(10.0, process.send_signal, signal.SIGCONT)

    await _run_with_fault(clean_stack, stop_decode, "SIGSTOP decode past its deadline")


async def test_a_decode_worker_whose_engine_wedges_is_ejected(tmp_path: Path) -> None:
    """decode-1's engine thread wedges at its first step while its HTTP server goes on
    answering polls: no failed call, no failed poll. Its progress report shows work and no
    step, so the gateway ejects it after its deadline (3 s here, before any measured step)
    and the requests on it move."""
    env = {"decode-1": {"FAIRGATE_FAILPOINTS": "engine.forward=pause"}}
    deadlines = {
        "FAIRGATE_GATEWAY_MIN_PROGRESS_DEADLINE_S": "2",
        "FAIRGATE_GATEWAY_UNMEASURED_PROGRESS_DEADLINE_S": "3",
    }
    stack = _chaos_stack(tmp_path, env, deadlines)
    try:

        async def wedged(stack: Stack, outcomes: list[Outcome]) -> None:
            await asyncio.to_thread(stack.workers[DECODE_1].wait_event, "failpoint", 60.0)

        def healthy(stack: Stack) -> list[WorkerProcess]:
            return [w for i, w in enumerate(stack.workers) if i != DECODE_1]

        await _run_with_fault(stack, wedged, "decode engine wedged", survivors=healthy)
        [decode_1] = [
            w for w in await _workers(stack) if w["url"] == stack.workers[DECODE_1].http_url
        ]
        assert decode_1["state"] == "ejected", decode_1
    finally:
        stack.stop()


async def test_a_drain_under_load_finishes_what_the_worker_holds(clean_stack: Stack) -> None:
    """decode-1 is drained mid-stream: what runs there finishes there, nothing new goes there,
    and it reports drained."""
    decode_1 = clean_stack.workers[DECODE_1]

    async def drain(stack: Stack, outcomes: list[Outcome]) -> None:
        await _until_streams_run(outcomes, 4)
        status = await _admin(stack, "POST", f"/admin/v1/workers/{decode_1.worker_id}/drain")
        assert status["state"] in ("draining", "drained"), status

    await _run_with_fault(clean_stack, drain, "drain decode under load")
    [status] = [w for w in await _workers(clean_stack) if w["url"] == decode_1.http_url]
    assert status["state"] == "drained", status
    log = (clean_stack.state_dir.parent / "logs" / "gateway-0.log").read_text(encoding="utf-8")
    assert "moved off a failed worker" not in log  # nothing had to move


async def _admin(stack: Stack, method: str, path: str, **kwargs: Any) -> Any:
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=admin, timeout=30.0) as client:
        response = await client.request(method, path, **kwargs)
    assert response.is_success, response.text
    return response.json() if response.content else None


async def _workers(stack: Stack) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = (await _admin(stack, "GET", "/admin/v1/workers"))["data"]
    return workers


async def test_a_rolling_restart_under_constant_load_fails_no_request(tmp_path: Path) -> None:
    """Every worker in turn is drained, removed, stopped and replaced by a new process (a new
    port) added through the admin API, while 16 clients keep sending streamed and whole
    requests (null engine): not one request fails, and each completes whole."""
    stack = start_test_stack(
        tmp_path / "state",
        num_prefill_workers=2,
        num_decode_workers=2,
        log_dir=tmp_path / "logs",
    )
    try:
        _, key, model = await _tenant_key(stack)
        outcomes: list[tuple[dict[str, Any], Outcome]] = []
        is_done = asyncio.Event()
        headers = {"authorization": f"Bearer {key}"}

        async def client_loop(index: int, client: httpx.AsyncClient) -> None:
            rng = random.Random(index)
            while not is_done.is_set():
                body = {
                    "model": model,
                    "prompt": [rng.randrange(3, 500) for _ in range(40)],
                    "max_tokens": rng.randrange(8, 64),
                    "stream": index % 2 == 1,
                }
                outcome = Outcome()
                outcomes.append((body, outcome))
                await _send(client, body, outcome)

        async with httpx.AsyncClient(
            base_url=stack.base_url, headers=headers, timeout=60.0
        ) as client:
            clients = [asyncio.create_task(client_loop(i, client)) for i in range(16)]
            for index, old in enumerate(list(stack.workers)):
                stack.workers[index] = await _replace(stack, old)
            is_done.set()
            await asyncio.gather(*clients)
        failed = [(b, o) for b, o in outcomes if o.status != 200 or o.error is not None]
        num_requests, num_failed = len(outcomes), len(failed)
        print(f"\nchaos | rolling restart | requests {num_requests} | failed {num_failed}")
        assert not failed, failed[:5]
        assert all(o.usage and o.usage["completion_tokens"] == b["max_tokens"] for b, o in outcomes)
        assert len(outcomes) > 100  # the load went on throughout
        states = {w["url"]: w["state"] for w in await _workers(stack)}
        assert states == {w.http_url: "ready" for w in stack.workers}
        # Drained before it went, no worker had a request to move (a prefill worker's
        # removal once moved the requests it had prefilled, decoding elsewhere).
        log = (tmp_path / "logs" / "gateway-0.log").read_text(encoding="utf-8")
        assert "moved off a failed worker" not in log
    finally:
        stack.stop()


async def _replace(stack: Stack, old: WorkerProcess) -> WorkerProcess:
    """Drain ``old`` until it is drained, remove it, stop it; start a new one like it and add
    it; once it is ready, return it."""
    role = old.spec.role
    await _admin(stack, "POST", f"/admin/v1/workers/{old.worker_id}/drain")
    await _until_state(stack, old.http_url, "drained")
    await _admin(stack, "DELETE", f"/admin/v1/workers/{old.worker_id}")
    await asyncio.to_thread(old.stop)
    [new] = await asyncio.to_thread(start_workers, [old.spec], timeout_s=120.0)
    await _admin(stack, "POST", "/admin/v1/workers", json={"url": new.http_url, "role": role})
    await _until_state(stack, new.http_url, "ready")
    return new


async def _until_state(stack: Stack, url: str, state: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        states = {w["url"]: w["state"] for w in await _workers(stack)}
        if states.get(url) == state:
            return
        assert time.monotonic() < deadline, f"{url} not {state}: {states}"
        await asyncio.sleep(0.1)
