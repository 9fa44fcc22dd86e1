"""The stack as an operator runs it: `fairgate up` as a command (credentials in their file and
nowhere in its output, the printed curl works, Ctrl-C stops every child; a killed worker comes
back, a crash loop stops the stack), a restart that keeps tenants, keys and usage, a client that
disconnects mid-stream (its blocks come back on the decode worker), and no worker left (503)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from engine.loader import NULL_DECODE_STEP_S_ENV
from tests.deploy.processes import children
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


def _fairgate_up(
    state_dir: Path, stderr_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``fairgate up`` (null engine, any free port) as a command; its logs go to ``stderr_path``
    (a file: nobody has to drain it). ``env``: added to the environment its processes get."""
    command = [sys.executable, "-m", "deploy.cli", "up", "--engine", "null", "--port", "0"]
    with stderr_path.open("w") as stderr:
        return subprocess.Popen(
            [*command, "--state-dir", str(state_dir), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )


def _welcome(process: subprocess.Popen[str]) -> str:
    """What ``fairgate up`` prints once the stack is up (its stdout until the last line)."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    return "".join(lines)


def test_fairgate_up_keeps_secrets_out_of_its_output_and_ctrl_c_stops_everything(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"  # fairgate creates it
    # The printed curl sets no max_tokens, and the null engine never ends a reply: it decodes the
    # rest of its 8k context, 41 s at its usual 5 ms a step.
    fast = {NULL_DECODE_STEP_S_ENV: "0.0002"}
    with _fairgate_up(state_dir, tmp_path / "stderr.log", env=fast) as process:
        try:
            output = _welcome(process)
            credentials = json.loads((state_dir / "credentials.json").read_text())
            assert set(credentials) == {"base_url", "admin_token", "demo_key"}
            assert (state_dir / "credentials.json").stat().st_mode & 0o777 == 0o600
            assert state_dir.stat().st_mode & 0o777 == 0o700
            assert credentials["base_url"] in output
            assert str(state_dir / "credentials.json") in output
            # The curl it prints works as pasted: it reads the key from the file.
            curl = output[output.index("  curl ") : output.index("\n\nA worker")]
            answer = json.loads(_run_shell(curl))
            assert answer["object"] == "chat.completion" and answer["choices"]
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
            # Only the gateway is given the admin token (in its environment).
            environs = {
                c.cmdline.split()[3]: Path(f"/proc/{c.pid}/environ").read_bytes()
                for c in children(process.pid)
            }
            assert sorted(environs) == ["decode-worker", "gateway", "prefill-worker"]
            token = credentials["admin_token"].encode()
            assert [name for name, environ in environs.items() if token in environ] == ["gateway"]
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
            for url in urls:
                _wait_for(lambda url=url: not _answers(url))
            assert process.stdout is not None
            output += process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()
    logs = (tmp_path / "stderr.log").read_text()
    assert "is ready" in logs  # the children's logs are there to look at
    for secret in (credentials["admin_token"], credentials["demo_key"]):
        assert secret not in output
        assert secret not in logs


def _run_shell(command: str) -> str:
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_fairgate_up_restarts_a_killed_worker_and_stops_on_a_crash_loop(tmp_path: Path) -> None:
    with _fairgate_up(tmp_path, tmp_path / "stderr.log", "--max-restarts", "1") as process:
        try:
            _welcome(process)
            credentials = json.loads((tmp_path / "credentials.json").read_text())
            first = _decode_worker_pid(process.pid)
            assert first is not None
            os.kill(first, signal.SIGKILL)
            _wait_for(lambda: _decode_worker_pid(process.pid) not in (None, first))
            second = _decode_worker_pid(process.pid)
            assert second is not None

            def serves() -> bool:
                with openai.OpenAI(
                    base_url=credentials["base_url"] + "/v1",
                    api_key=credentials["demo_key"],
                    max_retries=0,
                ) as client:
                    try:
                        client.completions.create(model="null", prompt="x", max_tokens=2)
                    except openai.APIError:
                        return False  # not back yet (503 no_worker)
                return True

            _wait_for(serves)  # back, and the stack serves again
            assert process.poll() is None
            os.kill(second, signal.SIGKILL)  # the second exit within the window: a crash loop
            assert process.wait(30) == 1
            assert process.stdout is not None
            output = process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()
    assert _children(process.pid) == []
    logs = (tmp_path / "stderr.log").read_text()
    assert (
        f"decode worker 0 (pid {first}) exited with status -9 (SIGKILL); restarting in 0.5 s "
        "(restart 1 of at most 1 within 120 s)"
    ) in logs
    assert f"decode worker 0 is back (pid {second})" in logs
    assert (
        "fairgate: decode worker 0 exited 2 times within 120 s (--max-restarts 1, "
        f"--restart-window 120); the last time (pid {second}) it exited with status -9 (SIGKILL)"
        "; stopping"
    ) in logs
    for secret in (credentials["admin_token"], credentials["demo_key"]):
        assert secret not in output
        assert secret not in logs


def _decode_worker_pid(parent_pid: int) -> int | None:
    pids = [c.pid for c in children(parent_pid) if "decode-worker" in c.cmdline]
    return pids[0] if len(pids) == 1 else None


def _children(parent_pid: int) -> list[int]:
    return [c.pid for c in children(parent_pid)]


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
