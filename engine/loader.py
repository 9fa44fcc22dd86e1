"""Build a ready engine and its tokenizer from a ``--model`` name."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.engine import EngineConfig, LLMEngine
from engine.model_store import ModelSpec, resolve_model
from engine.runner import ModelRunner, kv_bytes_per_token
from engine.tiny import tiny_config, tiny_state_dict
from engine.tokenizer import Tokenizer
from engine.weights import load_weights

__all__ = ["LoadedEngine", "default_dtype", "load_engine"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedEngine:
    engine: LLMEngine
    runner: ModelRunner
    tokenizer: Tokenizer
    model_id: str


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (reference-exact, and the fastest single-token path there); bf16 on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_engine(
    model: str | ModelSpec = "default",
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    block_size: int = 16,
    num_blocks: int | None = None,
    kv_cache_gib: float = 1.0,
    engine_config: EngineConfig | None = None,
) -> LoadedEngine:
    """Load weights and tokenizer and size the KV cache (``num_blocks`` or ``kv_cache_gib``)."""
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    torch_device = torch.device(device)
    dtype = dtype or default_dtype(torch_device)
    if spec.kind == "tiny":
        # The tiny model borrows the default model's tokenizer so it speaks real text.
        tokenizer = Tokenizer.load(_default_path())
        config = tiny_config(tokenizer.vocab_size)
        state_dict = tiny_state_dict(config)
    else:
        assert spec.path is not None
        tokenizer = Tokenizer.load(spec.path)
        config, state_dict = load_weights(spec.path, dtype=dtype)
    if num_blocks is None:
        block_bytes = kv_bytes_per_token(config, dtype) * block_size
        num_blocks = max(1, int(kv_cache_gib * 2**30) // block_bytes)
    runner = ModelRunner(
        config,
        state_dict,
        num_blocks=num_blocks,
        block_size=block_size,
        device=torch_device,
        dtype=dtype,
    )
    eos_token_ids = set(tokenizer.stop_token_ids) | set(config.eos_token_ids)
    engine = LLMEngine(runner, engine_config, eos_token_ids=eos_token_ids)
    logger.info(
        "loaded %s: %d layers, %s on %s, %d KV blocks of %d tokens",
        spec.model_id,
        config.num_layers,
        dtype,
        torch_device,
        num_blocks,
        block_size,
    )
    return LoadedEngine(engine, runner, tokenizer, spec.model_id)


def _default_path() -> str:
    spec = resolve_model("default")
    assert spec.path is not None
    return str(spec.path)
