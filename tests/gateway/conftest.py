"""A real local stack (`fairgate up`'s code: worker and gateway processes on loopback, the null
engine) for the end-to-end tests, and the admin CLI run in-process against it."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.stack import Stack, StackConfig, start_stack
from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer

AdminCli = Callable[..., Any]


# The overload guard (503 overloaded while the gateway's loop lags over 50 ms) is off in test
# stacks unless a test sets it: on a shared 2-core machine the lag of other tests' processes
# made tests about other things fail with 503. test_overload.py tests the guard itself.
TEST_STACK_ENV = {"FAIRGATE_GATEWAY_MAX_LOOP_LAG_S": "10"}


def start_test_stack(state_dir: Path, **overrides: Any) -> Stack:
    settings: dict[str, Any] = {
        "engine": "null",
        "port": 0,
        "worker_args": ["--log-level", "warning"],
        "ready_timeout_s": 120.0,
    }
    overrides["env"] = TEST_STACK_ENV | (overrides.get("env") or {})
    return start_stack(StackConfig(state_dir=state_dir, **(settings | overrides)))


def answer_without_body(stack: Stack, path: str, key: str) -> bytes:
    """The whole answer (head and body) to a POST that announces a megabyte and sends none of
    it: what the gateway refuses before it reads a body."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10.0) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n".encode()
            + b"content-type: application/json\r\ncontent-length: 1000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)  # the head and the body may come apart
            assert chunk, answer
            answer += chunk
    return answer


def null_tokenizer() -> Tokenizer:
    """The tokenizer the gateway of a test stack (the null engine) uses."""
    return Tokenizer.load(tokenizer_path(resolve_model("null", pull=False)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_test_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield started
    finally:
        started.stop()


def run_admin_cli(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str
) -> tuple[int, str, str]:
    from deploy.cli import main

    monkeypatch.setenv("FAIRGATE_URL", stack.base_url)
    monkeypatch.setenv("FAIRGATE_ADMIN_TOKEN", stack.admin_token)
    capsys.readouterr()
    code = main(["admin", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def admin(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> AdminCli:
    """``admin("tenants", "create", "x")`` → the parsed ``--json`` output; fails on an error."""

    def call(*argv: str) -> Any:
        code, out, err = run_admin_cli(stack, capsys, monkeypatch, "--json", *argv)
        assert code == 0, err
        return json.loads(out)

    return call


@pytest.fixture
def new_tenant(admin: AdminCli) -> Callable[..., tuple[dict[str, Any], str]]:
    """Create a tenant with a unique name and flags; (tenant, key secret)."""

    def create(*flags: str) -> tuple[dict[str, Any], str]:
        tenant = admin("tenants", "create", f"t-{uuid.uuid4().hex[:8]}", *flags)
        created = admin("keys", "create", tenant["name"])
        return tenant, created["secret"]

    return create
