"""The null engine: no torch, deterministic tokens, real block accounting, configured speed."""

from __future__ import annotations

import subprocess
import sys

from engine.null_engine import NullEngineConfig, create_null_engine, null_token
from engine.sequence import SamplingParams


def test_import_does_not_load_torch() -> None:
    code = "import sys, engine.null_engine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_tokens_are_deterministic_and_in_range() -> None:
    config = NullEngineConfig(vocab_size=5000, first_token_id=100)
    params = SamplingParams(max_tokens=20, seed=7, ignore_eos=True)
    runs = [create_null_engine(config, sleep=lambda s: None).generate([[1, 2, 3]], params)[0]]
    runs.append(create_null_engine(config, sleep=lambda s: None).generate([[9, 9]], params)[0])
    assert runs[0] == runs[1] == [null_token(7, i, config) for i in range(20)]
    assert all(100 <= t < 5000 for t in runs[0])


def test_sleeps_for_the_configured_work() -> None:
    slept: list[float] = []
    config = NullEngineConfig(prefill_tok_s=1000.0, decode_step_s=0.01)
    engine = create_null_engine(config, sleep=slept.append)
    engine.generate([[5] * 100, [6] * 300], SamplingParams(max_tokens=3, ignore_eos=True))
    # One prefill step of 400 tokens, then two decode steps.
    assert slept == [0.4, 0.01, 0.01]


def test_block_accounting_prefix_cache_and_eos() -> None:
    config = NullEngineConfig(num_blocks=64, block_size=4)
    engine = create_null_engine(config, sleep=lambda s: None, eos_token_ids=())
    prompt = list(range(1, 18))
    engine.generate([prompt], SamplingParams(max_tokens=5, seed=1))
    seq = engine.add_request("again", prompt, SamplingParams(max_tokens=5, seed=1))
    engine.step()
    assert seq.num_cached_tokens == 16
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free_blocks == 64
    engine.blocks.check_invariants()
    eos = null_token(3, 2, config)
    eos_engine = create_null_engine(config, sleep=lambda s: None, eos_token_ids=(eos,))
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=10, seed=3))[0]
    assert out == [null_token(3, i, config) for i in range(3)]
