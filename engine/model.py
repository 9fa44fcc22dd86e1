"""The Llama-family decoder (Llama 2/3, SmolLM, Qwen2 q/k/v bias) over a paged KV cache.

Tokens arrive flattened: a step carries ``num_tokens`` tokens from several sequences, each
sequence contributing a contiguous run (a whole prompt, a prompt chunk, or one decode token).
``AttentionBatch`` says where each run is, where its keys and values go in the paged cache and
which cached blocks it attends to. The weights use HF ``LlamaForCausalLM`` names on load; q/k/v
and gate/up are fused into one matrix each so a layer runs four matrix products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig

__all__ = ["AttentionBatch", "LlamaModel", "SequenceSlice", "rope_inv_freq"]


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's run of tokens inside a flattened step."""

    token_start: int  # index of its first token in the flattened batch
    num_query_tokens: int  # tokens computed this step
    context_len: int  # tokens the run attends to, itself included (cached prefix + this run)
    block_table: torch.Tensor  # [num_blocks_of_sequence] int64 ids into the cache


@dataclass(slots=True)
class AttentionBatch:
    """Where the step's keys and values go and what each query attends to.

    Decode runs (one query token each) are batched into one padded attention call; prefill runs are
    attended one sequence at a time.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    prefills: list[SequenceSlice]
    decode_token_indices: torch.Tensor | None  # [num_decodes] int64 rows of the flattened batch
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim // 2], with Llama-3 frequency scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.input_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.post_attention_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,  # [num_tokens, 1, head_dim]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        batch: AttentionBatch,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        x = F.rms_norm(hidden, (hidden.shape[-1],), self.input_norm, self.eps)
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        block_size = kv_cache.shape[2]
        k_cache = kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)  # [slots, kvh, hd]
        v_cache = kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        k_cache.index_copy_(0, batch.slot_mapping, k)
        v_cache.index_copy_(0, batch.slot_mapping, v)

        out = torch.empty_like(q)
        for run in batch.prefills:
            out[run.token_start : run.token_start + run.num_query_tokens] = self._attend_prefill(
                q, k, v, kv_cache, run
            )
        if batch.decode_token_indices is not None:
            out[batch.decode_token_indices] = self._attend_decode(q, kv_cache, batch, block_size)

        hidden = hidden + self.o_proj(out.view(num_tokens, -1))
        x = F.rms_norm(hidden, (hidden.shape[-1],), self.post_attention_norm, self.eps)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        mlp_out: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return hidden + mlp_out

    def _attend_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        run: SequenceSlice,
    ) -> torch.Tensor:
        start, num_query = run.token_start, run.num_query_tokens
        query = q[start : start + num_query].transpose(0, 1)  # [heads, num_query, hd]
        if run.context_len == num_query:
            # Nothing cached before this run: its own keys are all it sees.
            keys = k[start : start + num_query]
            values = v[start : start + num_query]
            mask = None
        else:
            # A chunk after a cached prefix: read the whole context back from the paged cache.
            keys = kv_cache[0, run.block_table].flatten(0, 1)[: run.context_len]
            values = kv_cache[1, run.block_table].flatten(0, 1)[: run.context_len]
            # Bottom-right aligned causal mask: query i sits at context_len - num_query + i.
            query_pos = torch.arange(run.context_len - num_query, run.context_len).unsqueeze(1)
            mask = torch.arange(run.context_len).unsqueeze(0) <= query_pos  # [num_query, context]
        # Repeat the kv heads for their query groups: SDPA's enable_gqa takes the slow math path
        # on CPU, the flash kernel needs equal head counts.
        group = self.num_heads // self.num_kv_heads
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, context, hd]
        values = values.transpose(0, 1).repeat_interleave(group, dim=0)
        # A leading batch dimension of 1: the CPU flash kernel takes only 4-d inputs.
        out = F.scaled_dot_product_attention(
            query[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None
        )
        return out[0].transpose(0, 1)

    def _attend_decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, block_size: int
    ) -> torch.Tensor:
        assert batch.decode_block_tables is not None and batch.decode_mask is not None
        num_decodes = batch.decode_block_tables.shape[0]
        query = q[batch.decode_token_indices].unsqueeze(2)  # [num_decodes, heads, 1, hd]
        # [num_decodes, max_blocks, block_size, kvh, hd] -> [num_decodes, kvh, max_context, hd]
        keys = kv_cache[0, batch.decode_block_tables].view(
            num_decodes, -1, self.num_kv_heads, self.head_dim
        )
        values = kv_cache[1, batch.decode_block_tables].view(
            num_decodes, -1, self.num_kv_heads, self.head_dim
        )
        out = F.scaled_dot_product_attention(
            query,
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=batch.decode_mask,
            enable_gqa=True,
        )
        return out.squeeze(2)  # [num_decodes, heads, hd]


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and the output projection."""

    inv_freq: torch.Tensor  # [head_dim // 2] fp32 RoPE frequencies (a buffer)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head: nn.Parameter | None = (
            None
            if config.tie_word_embeddings
            else nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        )
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: torch.Tensor,  # [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """Run the decoder; returns the final hidden states [num_tokens, hidden_size] (normed)."""
        hidden = self.embed_tokens(input_ids)
        # Same arithmetic as HF: angles in fp32, then cast to the activation dtype.
        angles = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos().to(hidden.dtype).unsqueeze(1)  # [num_tokens, 1, head_dim]
        sin = angles.sin().to(hidden.dtype).unsqueeze(1)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, kv_cache[:, index], batch)
        return F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.config.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab_size] in fp32 for the given final hidden states [n, hidden_size]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        return F.linear(hidden, weight).float()

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in HF ``LlamaForCausalLM`` into this model, fusing q/k/v and
        gate/up."""
        prefix = "model.layers."
        self.embed_tokens.weight.copy_(state_dict["model.embed_tokens.weight"])
        self.norm.copy_(state_dict["model.norm.weight"])
        if self.lm_head is not None:
            self.lm_head.copy_(state_dict["lm_head.weight"])
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            p = f"{prefix}{index}."
            layer.input_norm.copy_(state_dict[p + "input_layernorm.weight"])
            layer.post_attention_norm.copy_(state_dict[p + "post_attention_layernorm.weight"])
            attn = p + "self_attn."
            layer.qkv_proj.weight.copy_(
                torch.cat([state_dict[f"{attn}{n}_proj.weight"] for n in "qkv"], dim=0)
            )
            if layer.qkv_proj.bias is not None:
                layer.qkv_proj.bias.copy_(
                    torch.cat([state_dict[f"{attn}{n}_proj.bias"] for n in "qkv"], dim=0)
                )
            layer.o_proj.weight.copy_(state_dict[attn + "o_proj.weight"])
            mlp = p + "mlp."
            layer.gate_up_proj.weight.copy_(
                torch.cat(
                    [state_dict[mlp + "gate_proj.weight"], state_dict[mlp + "up_proj.weight"]]
                )
            )
            layer.down_proj.weight.copy_(state_dict[mlp + "down_proj.weight"])
