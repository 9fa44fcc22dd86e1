"""Build a ready engine and its tokenizer from a ``--model`` name."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch

from engine.engine import EngineConfig, LLMEngine, Runner
from engine.model_store import ModelSpec, cache_dir, resolve_model, tokenizer_path
from engine.null_engine import NullEngineConfig, create_null_engine
from engine.runner import ModelRunner, kv_bytes_per_token
from engine.tiny import tiny_config, tiny_state_dict
from engine.tokenizer import Tokenizer
from engine.weights import load_weights

__all__ = ["LoadedEngine", "Precision", "load_engine", "probe_dtype", "resolve_precision"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedEngine:
    engine: LLMEngine
    runner: Runner
    tokenizer: Tokenizer
    model_id: str
    # [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]: what the KV data plane
    # moves. The null engine's is a real tensor with one layer and one 1-wide head, so its
    # transfers run the whole data plane on a few bytes per block.
    kv_cache: torch.Tensor


Precision = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The weights' dtype for a ``--precision`` choice.

    ``auto``: bf16 (fp16 without bf16 support) on CUDA. On CPU fp32 weights, and what runs in
    bf16 is measured once the model is loaded (``probe_dtype``; ``engine.precision``): whether
    bf16 pays depends on more than the CPU's flags. A named dtype runs everything in it;
    ``float32`` is the reference path of the logit tests.
    """
    if precision != "auto":
        dtype: torch.dtype = getattr(torch, precision)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def probe_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype timed against the weights' at load for each use (``engine.runner.measure_plan``):
    bf16 for ``auto`` on CPU, on every CPU; None elsewhere."""
    return torch.bfloat16 if precision == "auto" and device.type == "cpu" else None


def load_engine(
    model: str | ModelSpec = "default",
    *,
    device: str = "cpu",
    precision: Precision = "auto",
    block_size: int = 16,
    num_blocks: int | None = None,
    kv_cache_gib: float = 1.0,
    engine_config: EngineConfig | None = None,
    swap_space_gib: float | None = 0.0,
) -> LoadedEngine:
    """Load weights and tokenizer and size the KV cache (``num_blocks`` or ``kv_cache_gib``)
    and the host pool swapped-out KV goes to (``swap_space_gib``; None: 1 GiB or as many blocks
    as the device cache, whichever is smaller; 0: none)."""
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    torch_device = torch.device(device)
    dtype = resolve_precision(precision, torch_device)
    low_dtype = probe_dtype(precision, torch_device)
    tokenizer = Tokenizer.load(tokenizer_path(spec))
    if spec.kind == "null":
        return _load_null_engine(
            spec, tokenizer, block_size, num_blocks, engine_config, swap_space_gib
        )
    if spec.kind == "tiny":
        # The test model: its products are too small for a timing to mean anything, and tests
        # want the reference arithmetic.
        config = tiny_config(tokenizer.vocab_size)
        state_dict = tiny_state_dict(config)
        low_dtype = None
    else:
        assert spec.path is not None
        config, state_dict = load_weights(spec.path, dtype=dtype)
    runner = ModelRunner(
        config,
        state_dict,
        num_blocks=1,  # sized below, once the plan says the KV cache's dtype
        block_size=block_size,
        device=torch_device,
        dtype=dtype,
        precision=low_dtype,
        # One plan per host for this model: its workers run the same arithmetic.
        plan_cache_dir=cache_dir() / "precision",
    )
    block_bytes = kv_bytes_per_token(config, runner.kv_dtype) * block_size
    if num_blocks is None:
        num_blocks = max(1, int(kv_cache_gib * 2**30) // block_bytes)
    runner.allocate_kv_cache(num_blocks, _num_host_blocks(swap_space_gib, block_bytes, num_blocks))
    eos_token_ids = set(tokenizer.stop_token_ids) | set(config.eos_token_ids)
    engine = LLMEngine(runner, engine_config, eos_token_ids=eos_token_ids)
    logger.info(
        "loaded %s: %d layers, %s on %s, %d KV blocks of %d tokens",
        spec.model_id,
        config.num_layers,
        runner.precision,
        torch_device,
        num_blocks,
        block_size,
    )
    return LoadedEngine(engine, runner, tokenizer, spec.model_id, runner.kv_cache)


def _num_host_blocks(swap_space_gib: float | None, block_bytes: int, num_blocks: int) -> int:
    if swap_space_gib is None:
        return min(num_blocks, 2**30 // block_bytes)
    if swap_space_gib < 0:
        raise ValueError(f"swap space must be >= 0 GiB, got {swap_space_gib:g}")
    return int(swap_space_gib * 2**30) // block_bytes


def _load_null_engine(
    spec: ModelSpec,
    tokenizer: Tokenizer,
    block_size: int,
    num_blocks: int | None,
    engine_config: EngineConfig | None,
    swap_space_gib: float | None,
) -> LoadedEngine:
    defaults = NullEngineConfig()
    num_blocks = num_blocks or defaults.num_blocks
    # Its blocks have no size to speak of: any host pool holds as many as the device cache.
    num_host_blocks = 0 if swap_space_gib == 0 else num_blocks
    config = NullEngineConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=block_size,
        num_blocks=num_blocks,
        num_host_blocks=num_host_blocks,
        # Load tests of the gateway make the pretend engine faster than anything they measure.
        prefill_tok_s=_env_float(NULL_PREFILL_TOK_S_ENV, defaults.prefill_tok_s),
        decode_step_s=_env_float(NULL_DECODE_STEP_S_ENV, defaults.decode_step_s),
    )
    engine = create_null_engine(config, engine_config, eos_token_ids=tokenizer.stop_token_ids)
    kv_cache = torch.zeros(2, 1, config.num_blocks, block_size, 1, 1)
    logger.info("loaded the null engine: %d KV blocks of %d tokens", config.num_blocks, block_size)
    return LoadedEngine(engine, engine.runner, tokenizer, spec.model_id, kv_cache)


NULL_PREFILL_TOK_S_ENV = "FAIRGATE_NULL_PREFILL_TOK_S"
NULL_DECODE_STEP_S_ENV = "FAIRGATE_NULL_DECODE_STEP_S"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None
