"""The batch-1 decode step on CPU, as plain tensor calls.

One token of one sequence is memory-bound: its cost should be the time to stream the weights. In
``LlamaModel.forward`` the module calls, the batch bookkeeping and the general attention paths add
~300 µs per layer around ~60 small ops, which on SmolLM2's 30 layers is a third of the step. This
path runs the same arithmetic (HF's RMSNorm formula, RoPE with the sign folded into ``sin``, the
projections' batch-1 products in the precision plan's dtype for them (``Linear.row_product``),
attention in the cache's dtype) over weights and cache views gathered once, and takes ~150 µs
per layer less. ``ModelRunner`` uses it whenever a step is a single decode on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model import DecoderLayer, Linear, LlamaModel

__all__ = ["SingleDecoder"]


@dataclass(frozen=True, slots=True)
class _LayerParts:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [q_size + 2 * kv_size, hidden], with the bias where the model has one
    o: Linear  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]
    keys: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] (a view of the cache)
    values: torch.Tensor


class SingleDecoder:
    """Decodes one token of one sequence through ``model`` over ``kv_cache``."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor) -> None:
        config = model.config
        self.model = model
        self.eps = config.rms_norm_eps
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_size = (config.num_heads + config.num_kv_heads) * config.head_dim
        self.layers: list[_LayerParts] = []
        for index, layer in enumerate(model.layers):
            assert isinstance(layer, DecoderLayer)
            self.layers.append(
                _LayerParts(
                    input_norm=layer.input_norm.detach(),
                    qkv=layer.qkv_proj,
                    o=layer.o_proj,
                    post_norm=layer.post_attention_norm.detach(),
                    gate_up=layer.gate_up_proj,
                    down=layer.down_proj,
                    keys=kv_cache[0, index],
                    values=kv_cache[1, index],
                )
            )

    @torch.inference_mode()
    def __call__(
        self, token_id: int, position: int, block_ids: torch.Tensor, context_len: int
    ) -> torch.Tensor:
        """The final normed hidden state [1, hidden] after writing the token's keys and values at
        ``position`` in the sequence's blocks ``block_ids``; ``context_len == position + 1``."""
        model = self.model
        block_size = self.layers[0].keys.shape[1]
        slot = block_ids[position // block_size : position // block_size + 1] * block_size + (
            position % block_size
        )
        hidden = model.embed_tokens.weight[token_id]
        angles = model.inv_freq * float(position)  # fp32, as in LlamaModel.forward
        cos = torch.cat((angles.cos(), angles.cos())).to(hidden.dtype)
        sin = angles.sin()
        sin = torch.cat((-sin, sin)).to(hidden.dtype)
        for parts in self.layers:
            hidden = self._layer(hidden, parts, cos, sin, slot, block_ids, context_len)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * model.norm
        return hidden.unsqueeze(0)

    def _layer(
        self,
        hidden: torch.Tensor,  # [hidden]
        parts: _LayerParts,
        cos: torch.Tensor,  # [head_dim]
        sin: torch.Tensor,
        slot: torch.Tensor,  # [1]
        block_ids: torch.Tensor,
        context_len: int,
    ) -> torch.Tensor:
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * parts.input_norm
        qkv = parts.qkv.row_product(x)
        qk = qkv[: self.qk_size].view(num_heads + num_kv_heads, head_dim)
        qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
        v = qkv[self.qk_size :].view(1, num_kv_heads, head_dim)
        keys, values = parts.keys, parts.values
        cache_dtype = keys.dtype
        keys.view(-1, num_kv_heads, head_dim).index_copy_(
            0, slot, qk[None, num_heads:].to(cache_dtype)
        )
        values.view(-1, num_kv_heads, head_dim).index_copy_(0, slot, v.to(cache_dtype))
        num_blocks = keys.shape[0]
        # [context, kvh, hd] -> [1, kvh, context, hd]
        context_keys = keys.view(num_blocks, -1).index_select(0, block_ids)
        context_values = values.view(num_blocks, -1).index_select(0, block_ids)
        context_keys = context_keys.view(-1, num_kv_heads, head_dim)[:context_len]
        context_values = context_values.view(-1, num_kv_heads, head_dim)[:context_len]
        attention = F.scaled_dot_product_attention(
            qk[None, :num_heads, None].to(cache_dtype),  # [1, heads, 1, hd]
            context_keys.transpose(0, 1)[None],
            context_values.transpose(0, 1)[None],
            enable_gqa=True,
        )
        hidden = hidden + parts.o.row_product(attention.reshape(-1).to(hidden.dtype))
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * parts.post_norm
        gate, up = parts.gate_up.row_product(x).chunk(2)
        return hidden + parts.down.row_product(F.silu(gate) * up)
