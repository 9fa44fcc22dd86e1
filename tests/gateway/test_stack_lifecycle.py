"""The stack as an operator runs it: `fairgate up` as a command (credentials, Ctrl-C stops every
child), a restart that keeps tenants, keys and usage, a client that disconnects mid-stream (its
blocks come back on the decode worker), and no worker left (503)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from tests.gateway.conftest import start_test_stack
from transfer.messages import WorkerLoad


def _load(url: str) -> WorkerLoad:
    return msgspec.msgpack.decode(httpx.get(url + "/v1/load").content, type=WorkerLoad)


def _wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_fairgate_up_prints_credentials_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "deploy.cli",
        "up",
        "--engine",
        "null",
        "--port",
        "0",
        "--state-dir",
        str(tmp_path),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            lines = []
            for line in process.stdout:
                lines.append(line)
                if line.startswith("Ctrl-C"):
                    break
            output = "".join(lines)
            credentials = json.loads((tmp_path / "credentials.json").read_text())
            assert set(credentials) == {"base_url", "admin_token", "demo_key"}
            assert (tmp_path / "credentials.json").stat().st_mode & 0o777 == 0o600
            assert credentials["base_url"] in output and credentials["demo_key"] in output
            assert "curl" in output
            with openai.OpenAI(
                base_url=credentials["base_url"] + "/v1",
                api_key=credentials["demo_key"],
                max_retries=0,
            ) as client:
                answer = client.chat.completions.create(
                    model="null", messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )
            assert answer.usage is not None and answer.usage.completion_tokens == 3
            workers = httpx.get(
                credentials["base_url"] + "/admin/v1/workers",
                headers={"authorization": f"Bearer {credentials['admin_token']}"},
            ).json()["data"]
            urls = [credentials["base_url"], *(w["url"] for w in workers)]
            assert len(urls) == 3
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
            for url in urls:
                _wait_for(lambda url=url: not _answers(url))
        finally:
            if process.poll() is None:
                process.kill()


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=1.0)
    except httpx.HTTPError:
        return False
    return True


def test_restart_keeps_tenants_keys_and_usage(tmp_path: Path) -> None:
    stack = start_test_stack(tmp_path)
    try:
        admin = {"authorization": f"Bearer {stack.admin_token}"}
        with httpx.Client(base_url=stack.base_url, headers=admin) as client:
            assert client.post("/admin/v1/tenants", json={"name": "keeper"}).status_code == 201
            secret = client.post("/admin/v1/tenants/keeper/keys", json={}).json()["secret"]
        with openai.OpenAI(
            base_url=stack.base_url + "/v1", api_key=secret, max_retries=0
        ) as client:
            answer = client.completions.create(model="null", prompt="x", max_tokens=5)
        used = answer.usage
    finally:
        stack.stop()  # the usage recorder flushes on the way down
    stack = start_test_stack(tmp_path)
    try:
        assert (
            stack.admin_token
            == json.loads((tmp_path / "credentials.json").read_text())["admin_token"]
        )
        with httpx.Client(
            base_url=stack.base_url, headers={"authorization": f"Bearer {stack.admin_token}"}
        ) as client:
            [row] = client.get("/admin/v1/tenants/keeper/usage").json()["data"]
        assert used is not None
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
            1,
            used.prompt_tokens,
            used.completion_tokens,
        )
        with openai.OpenAI(
            base_url=stack.base_url + "/v1", api_key=secret, max_retries=0
        ) as client:
            again = client.completions.create(model="null", prompt="x", max_tokens=1)
        assert again.choices
    finally:
        stack.stop()


def test_disconnect_mid_stream_frees_the_decode_blocks(tmp_path: Path) -> None:
    stack = start_test_stack(tmp_path)
    try:
        [decode_url] = [w.http_url for w in stack.workers if w.spec.role == "decode"]
        baseline = _load(decode_url)
        body = {
            "model": "null",
            "messages": [{"role": "user", "content": "go " * 200}],
            "max_tokens": 4000,
            "stream": True,
        }
        headers = {"authorization": f"Bearer {stack.demo_key}"}
        with (
            httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
            during = _load(decode_url)
            assert during.num_running == 1
            assert during.num_free_blocks < baseline.num_free_blocks
        # The connection is closed here, long before 4000 tokens.
        _wait_for(lambda: _load(decode_url).num_running == 0)
        after = _load(decode_url)
        assert after.num_free_blocks == baseline.num_free_blocks
        assert after.num_reserved == 0
    finally:
        stack.stop()


def test_no_worker_left_is_a_503(tmp_path: Path) -> None:
    stack = start_test_stack(tmp_path)
    try:
        with openai.OpenAI(
            base_url=stack.base_url + "/v1", api_key=stack.demo_key, max_retries=0
        ) as client:
            client.completions.create(model="null", prompt="x", max_tokens=1)
            for worker in stack.workers:
                if worker.spec.role == "decode":
                    worker.kill()
            _wait_for(lambda: httpx.get(stack.base_url + "/readyz").status_code == 503)
            with pytest.raises(openai.InternalServerError) as caught:
                client.completions.create(model="null", prompt="x", max_tokens=1)
            assert caught.value.status_code == 503
            assert caught.value.code == "no_worker"
    finally:
        stack.stop()
