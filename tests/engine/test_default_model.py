"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.model_store import DEFAULT_MODEL
from engine.runner import ModelRunner
from engine.sequence import SamplingParams, ScheduledRun, Sequence
from engine.tokenizer import Tokenizer
from engine.weights import load_weights

pytestmark = pytest.mark.slow

# Both sides run the same fp32 weights; 30 layers of differently blocked matrix products leave
# differences around 1e-4 on logits of magnitude ~20.
LOGITS_ATOL = 2e-3


@pytest.fixture(scope="module")
def runner(default_gguf_path: Path) -> ModelRunner:
    config, state_dict = load_weights(default_gguf_path)
    return ModelRunner(config, state_dict, num_blocks=64, block_size=16)


@pytest.fixture(scope="module")
def prompt_ids(default_gguf_path: Path) -> list[int]:
    tokenizer = Tokenizer.load(default_gguf_path)
    messages = [{"role": "user", "content": "Write a haiku about the sea, then explain it."}]
    return tokenizer.encode_chat(messages)


def test_logits_match_transformers_on_the_same_gguf(
    runner: ModelRunner, hf_default_model: Any, prompt_ids: list[int]
) -> None:
    seq = Sequence("a", list(prompt_ids), SamplingParams(temperature=0))
    seq.block_table = list(range(8))
    batch, input_ids, positions, _ = runner._prepare([ScheduledRun(seq, seq.num_tokens)])
    with torch.inference_mode():
        ours = runner.model.compute_logits(
            runner.model(input_ids, positions, runner.kv_cache, batch)
        )
        theirs = hf_default_model(torch.tensor([prompt_ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)
    seq.num_computed_tokens = seq.num_tokens
    # Ten greedy decode steps through the paged cache against a full recompute in transformers.
    for _ in range(10):
        seq.output_token_ids.append(int(ours[-1].argmax()))
        ours = runner.execute([ScheduledRun(seq, 1)])
        seq.num_computed_tokens += 1
        with torch.inference_mode():
            theirs = hf_default_model(torch.tensor([seq.token_ids])).logits[0, -1:]
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)
        assert int(ours[-1].argmax()) == int(theirs[-1].argmax())


def _fairgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )


def test_generate_answers_paris() -> None:
    result = _fairgate("generate", "What is the capital of France?", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1  # the completion only, no chatter


def test_model_pull_copies_and_verifies(tmp_path: Path) -> None:
    env = {**os.environ, "FAIRGATE_HOME": str(tmp_path)}
    result = _fairgate("model", "pull", env=env)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == tmp_path / "models" / DEFAULT_MODEL.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEFAULT_MODEL.sha256
    assert "pull SmolLM2-135M-Instruct" in result.stderr  # the progress bar
    # A second pull finds it cached.
    again = _fairgate("model", "pull", env=env)
    assert again.returncode == 0 and Path(again.stdout.strip()) == path


def test_generate_rejects_an_unknown_model(tmp_path: Path) -> None:
    result = _fairgate("generate", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2
    assert "neither 'default', 'tiny'" in result.stderr


def test_generate_with_the_tiny_model_is_seed_deterministic() -> None:
    args = ("generate", "Hello", "--model", "tiny", "--max-tokens", "8", "--seed", "3")
    first, second = _fairgate(*args), _fairgate(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
