"""The command line as a user runs it: `fairgate generate --disaggregated` starts a prefill and a
decode worker process, drives the request through them and prints what colocated generation
prints; the worker commands document themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _fairgate(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.parametrize(
    "model", ["tiny", pytest.param("default", marks=pytest.mark.slow)], ids=["tiny", "smollm2"]
)
def test_generate_disaggregated_prints_the_colocated_completion(model: str) -> None:
    command = ("generate", "What is the capital of France?", "--model", model)
    command += ("--temperature", "0", "--max-tokens", "12")
    colocated = _fairgate(*command)
    assert colocated.returncode == 0, colocated.stderr
    disaggregated = _fairgate("-v", *command, "--disaggregated")
    assert disaggregated.returncode == 0, disaggregated.stderr
    assert disaggregated.stdout == colocated.stdout
    assert colocated.stdout.strip()
    assert "KV pair" in disaggregated.stderr  # it really went through a pair of workers
    if model == "default":
        assert "Paris" in colocated.stdout


def test_worker_commands_describe_their_flags() -> None:
    for command in ("prefill-worker", "decode-worker"):
        result = _fairgate(command, "--help", timeout_s=60)
        assert result.returncode == 0
        for flag in ("--kv-host", "--kv-timeout", "--num-blocks", "--exit-with-parent"):
            assert flag in result.stdout
    decode_help = _fairgate("decode-worker", "--help", timeout_s=60).stdout
    assert "--kv-port" in decode_help and "--colocated" in decode_help


def test_a_worker_whose_model_cannot_load_exits_with_the_reason() -> None:
    result = _fairgate("prefill-worker", "--model", "/no/such/model.gguf", "--port", "0")
    assert result.returncode == 1
    assert "/no/such/model.gguf" in result.stderr
    assert '"event":"failed"' in result.stdout
