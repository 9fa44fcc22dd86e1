"""Live membership on real processes (gateway and null-engine workers on loopback): a worker
added by URL serves; a decode worker drained under requests lets them finish, takes no new ones
and then reports drained; a removed worker is gone; workers started with ``--gateway`` register
themselves with the registration token (and not with a wrong one, or any other), and
unregister when they stop; a worker's registration is renewed, and made again after the gateway
was away; the admin CLI's worker commands and the worker flags say what they do."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web

from deploy.launcher import WorkerProcess, WorkerSpec, start_workers
from deploy.stack import Stack
from tests.gateway.conftest import AdminCli, run_admin_cli, start_test_stack
from transfer.registration import (
    REGISTER_PATH,
    TOKEN_ENV,
    UNREGISTER_PATH,
    Registration,
    WorkerDeregistration,
    WorkerRegistration,
)

REGISTRATION_TOKEN = "fgr-test-registration-token-0123456789"
WORKER_ARGS = ("--log-level", "info", "--threads", "1")
MAX_TOKENS = 200  # the null engine decodes a step in 5 ms: a request of about a second

Launch = Callable[..., WorkerProcess]


@pytest.fixture
def launch() -> Iterator[Launch]:
    """``launch(*args, env=…, log_path=…)``: a null-engine decode worker, stopped after the
    test."""
    started: list[WorkerProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> WorkerProcess:
        spec = WorkerSpec(
            "decode",
            "null",
            (*WORKER_ARGS, *args),
            env or {},
            None if log_path is None else str(log_path),
        )
        [worker] = start_workers([spec], timeout_s=120.0)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def _workers(stack: Stack) -> list[dict[str, Any]]:
    response = httpx.get(
        stack.base_url + "/admin/v1/workers",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        timeout=10.0,
    )
    response.raise_for_status()
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def _worker(stack: Stack, url: str) -> dict[str, Any] | None:
    return next((w for w in _workers(stack) if w["url"] == url), None)


def _wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)
    return value


def _state(stack: Stack, url: str) -> str | None:
    worker = _worker(stack, url)
    return None if worker is None else str(worker["state"])


def _kv_landed(worker: WorkerProcess) -> float:
    """KV transfers that landed on a decode worker: one per request it took."""
    text = httpx.get(worker.http_url + "/metrics", timeout=10.0).text
    match = re.search(r'^fairgate_kv_transfers_total\{outcome="ok"\} (\S+)$', text, re.M)
    return 0.0 if match is None else float(match.group(1))


async def _complete(
    client: httpx.AsyncClient, key: str, max_tokens: int = MAX_TOKENS
) -> httpx.Response:
    return await client.post(
        "/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "null", "prompt": "hello there", "max_tokens": max_tokens},
    )


def _completed(responses: Sequence[httpx.Response], max_tokens: int = MAX_TOKENS) -> bool:
    return all(
        r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
        for r in responses
    )


async def test_a_worker_added_by_url_serves_and_a_drained_one_finishes_its_requests_only(
    stack: Stack,
    admin: AdminCli,
    launch: Launch,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [first] = [w for w in stack.workers if w.spec.role == "decode"]
    added = launch()
    status = admin("workers", "add", added.http_url, "--role", "decode")
    assert (status["url"], status["source"]) == (added.http_url, "admin")
    _wait_for(lambda: _state(stack, added.http_url) == "ready", "the added worker is ready")
    # Adding it again changes nothing; as another role, it is refused.
    assert admin("workers", "add", added.http_url, "--role", "decode")["state"] == "ready"
    code, _, err = run_admin_cli(
        stack, capsys, monkeypatch, "workers", "add", added.http_url, "--role", "prefill"
    )
    assert code == 1 and "HTTP 409" in err

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as client:
        running = [asyncio.create_task(_complete(client, stack.demo_key)) for _ in range(4)]
        await asyncio.to_thread(
            _wait_for,
            lambda: (_worker(stack, first.http_url) or {}).get("inflight_requests"),
            "requests on the first decode worker",
        )
        drained = admin("workers", "drain", first.worker_id)
        assert drained["state"] == "draining" and drained["drain_requested"]
        assert _completed(await asyncio.gather(*running))
        await asyncio.to_thread(
            _wait_for,
            lambda: _state(stack, first.http_url) == "drained",
            "the first decode worker reports drained",
        )
        landed_first, landed_added = _kv_landed(first), _kv_landed(added)
        assert _completed(
            await asyncio.gather(*(_complete(client, stack.demo_key) for _ in range(4)))
        )
        assert _kv_landed(first) == landed_first  # nothing new on the drained worker
        assert _kv_landed(added) == landed_added + 4
        assert _state(stack, first.http_url) == "drained"

        assert admin("workers", "undrain", first.http_url)["state"] == "ready"
        code, out, _ = run_admin_cli(
            stack, capsys, monkeypatch, "workers", "remove", first.http_url
        )
        assert code == 0 and out.strip() == f"removed worker {first.http_url}"
        assert _worker(stack, first.http_url) is None
        landed_first = _kv_landed(first)
        assert _completed([await _complete(client, stack.demo_key, 8)], 8)
        assert _kv_landed(first) == landed_first
    # The table shows each worker's state.
    code, out, _ = run_admin_cli(stack, capsys, monkeypatch, "workers")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["URL", "ROLE", "STATE", "SOURCE"]
    assert [row.split()[:4] for row in rows if added.http_url in row] == [
        [added.http_url, "decode", "ready", "admin"]
    ]


def test_registration_is_off_without_a_registration_token(stack: Stack) -> None:
    response = httpx.post(
        stack.base_url + REGISTER_PATH,
        headers={"authorization": f"Bearer {stack.admin_token}"},
        json={"url": "http://127.0.0.1:9", "role": "decode"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


@pytest.fixture(scope="module")
def registering_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway that takes registrations, with a prefill worker and no decode worker."""
    started = start_test_stack(
        tmp_path_factory.mktemp("registering"),
        num_decode_workers=0,
        env={"FAIRGATE_GATEWAY_REGISTRATION_TOKEN": REGISTRATION_TOKEN},
    )
    try:
        yield started
    finally:
        started.stop()


def test_workers_register_with_the_registration_token_only_and_unregister_when_they_stop(
    registering_stack: Stack, launch: Launch, tmp_path: Path
) -> None:
    stack = registering_stack
    key = {"authorization": f"Bearer {stack.demo_key}"}
    body = {"model": "null", "prompt": "hi", "max_tokens": 4}
    answer = httpx.post(stack.base_url + "/v1/completions", headers=key, json=body, timeout=30)
    assert answer.status_code == 503  # no decode worker yet
    for token in (None, stack.admin_token, "not-the-token"):
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        refused = httpx.post(
            stack.base_url + REGISTER_PATH,
            headers=headers,
            json={"url": "http://127.0.0.1:9", "role": "decode"},
        )
        assert refused.status_code == 401, token
    gateway = ("--gateway", stack.base_url)
    wrong = launch(
        *gateway, env={TOKEN_ENV: "a-wrong-registration-token"}, log_path=tmp_path / "wrong.log"
    )
    good = launch(
        *gateway,
        "--heartbeat-s",
        "10",  # a lease of 30 s: what removes it below is its unregistering
        env={TOKEN_ENV: REGISTRATION_TOKEN},
        log_path=tmp_path / "good.log",
    )
    status = _wait_for(
        lambda: (w := _worker(stack, good.http_url)) and w["state"] == "ready" and w,
        "the worker registers and is ready",
    )
    assert (status["role"], status["source"]) == ("decode", "registered")
    answer = httpx.post(stack.base_url + "/v1/completions", headers=key, json=body, timeout=30)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    wrong_log = tmp_path / "wrong.log"
    _wait_for(lambda: "could not register" in wrong_log.read_text(), "the refusal is logged")
    assert "HTTP 401: invalid registration token" in wrong_log.read_text()
    assert _worker(stack, wrong.http_url) is None

    good.stop()  # SIGTERM: a graceful stop
    _wait_for(lambda: _worker(stack, good.http_url) is None, "the worker unregisters", 10.0)
    logs = (tmp_path / "good.log").read_text()
    assert "registered with the gateway" in logs and "unregistered from the gateway" in logs
    for log in (logs, wrong_log.read_text()):
        assert REGISTRATION_TOKEN not in log and "a-wrong-registration-token" not in log
    # Unregistering what is gone already is what it asks for.
    gone = httpx.post(
        stack.base_url + UNREGISTER_PATH,
        headers={"authorization": f"Bearer {REGISTRATION_TOKEN}"},
        json={"url": good.http_url},
    )
    assert gone.status_code == 204


def test_the_worker_commands_say_what_they_do(capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--help"])
        assert exited.value.code == 0
        return capsys.readouterr().out

    listing = help_of("admin", "workers")
    for word in ("add", "remove", "drain", "undrain", "draining", "ejected", "dead"):
        assert word in listing
    assert "--role" in help_of("admin", "workers", "add")
    for command in ("prefill-worker", "decode-worker"):
        flags = help_of(command)
        for flag in ("--gateway", "--registration-token", "--advertise-url", "--heartbeat-s"):
            assert flag in flags
        assert TOKEN_ENV in flags


async def test_a_registration_is_renewed_and_made_again_after_the_gateway_was_away() -> None:
    """Against a gateway's two routes on loopback that record what they are sent: heartbeats
    come every interval, calls that fail are tried again (backoff), so a gateway that was away
    (restarted, its registry empty) learns the worker again; stopping unregisters."""
    calls: list[tuple[str, str, msgspec.Struct]] = []

    async def register(request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read(), type=WorkerRegistration)
        calls.append(("register", request.headers["authorization"], body))
        return web.json_response({"state": "unknown"}, status=201)

    async def unregister(request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read(), type=WorkerDeregistration)
        calls.append(("unregister", request.headers["authorization"], body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post(REGISTER_PATH, register)
    app.router.add_post(UNREGISTER_PATH, unregister)
    port = 0

    async def gateway_up() -> web.AppRunner:
        nonlocal port
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        port = runner.addresses[0][1]
        return runner

    async def until(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10.0):
            while not predicate():
                await asyncio.sleep(0.02)

    async def registered(count: int) -> None:
        async with asyncio.timeout(10.0):
            while sum(kind == "register" for kind, _, _ in calls) < count:
                await asyncio.sleep(0.02)

    runner = await gateway_up()
    advertised = "http://10.0.0.7:8201"
    registration = Registration(
        f"http://127.0.0.1:{port}",
        REGISTRATION_TOKEN,
        "decode",
        lambda: advertised,
        heartbeat_s=0.2,
    )
    registration.start()
    try:
        await registered(2)  # the first, and a heartbeat
        await runner.cleanup()  # the gateway goes away…
        await until(lambda: registration.last_error is not None)  # a heartbeat failed
        num_before = len(calls)
        runner = await gateway_up()  # …and comes back, knowing no worker
        await registered(num_before + 1)
        # (The server records the call before the worker's thread reads the answer.)
        await until(lambda: registration.last_error is None)
    finally:
        await asyncio.to_thread(registration.stop)
        await runner.cleanup()
    assert {auth for _, auth, _ in calls} == {f"Bearer {REGISTRATION_TOKEN}"}
    assert calls[0][2] == WorkerRegistration(advertised, "decode", 0.2)
    assert calls[-1][0] == "unregister" and calls[-1][2] == WorkerDeregistration(advertised)
