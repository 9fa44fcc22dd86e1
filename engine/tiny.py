"""The tiny random-weight model: a two-layer Llama that tests build in well under a second."""

from __future__ import annotations

import torch

from engine.config import ModelConfig

__all__ = ["tiny_config", "tiny_state_dict"]


def tiny_config(vocab_size: int) -> ModelConfig:
    """A two-layer Llama small enough to build in well under a second, for tests."""
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        name="tiny-random-llama",
    )


def tiny_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights in HF names: the same seed gives the same model everywhere."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_size, kv_size = config.num_heads * head_dim, config.num_kv_heads * head_dim
    weights = {"model.embed_tokens.weight": normal(config.vocab_size, hidden)}
    for index in range(config.num_layers):
        p = f"model.layers.{index}."
        weights |= {
            p + "input_layernorm.weight": 1 + normal(hidden),
            p + "self_attn.q_proj.weight": normal(q_size, hidden),
            p + "self_attn.k_proj.weight": normal(kv_size, hidden),
            p + "self_attn.v_proj.weight": normal(kv_size, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_size),
            p + "post_attention_layernorm.weight": 1 + normal(hidden),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
        }
    weights["model.norm.weight"] = 1 + normal(hidden)
    return weights
