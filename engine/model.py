"""The Llama-family decoder (Llama 2/3, SmolLM, Qwen2 q/k/v bias) over a paged KV cache.

Tokens arrive flattened: a step carries ``num_tokens`` tokens from several sequences, each
sequence contributing a contiguous run (a whole prompt, a prompt chunk, or one decode token).
``AttentionBatch`` says where each run is, where its keys and values go in the paged cache and
which cached blocks it attends to. The weights use HF ``LlamaForCausalLM`` names on load; q/k/v
and gate/up are fused into one matrix each so a layer runs four matrix products.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.precision import USES, PrecisionPlan, Product, Use, use_of_rows

__all__ = ["AttentionBatch", "LlamaModel", "SequenceSlice", "rope_inv_freq"]


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's run of tokens inside a flattened step."""

    token_start: int  # index of its first token in the flattened batch
    num_query_tokens: int  # tokens computed this step
    context_len: int  # tokens the run attends to, itself included (cached prefix + this run)
    block_table: torch.Tensor  # [num_blocks_of_sequence] int64 ids into the cache


@dataclass(slots=True)
class DecodeGroup:
    """Decode runs of similar context length, attended in one padded call. ``rows``: their
    places among the step's decodes (None: all of them, in order)."""

    rows: torch.Tensor | None  # [n] int64
    block_tables: torch.Tensor  # [n, max_blocks] int64 (padded with 0)
    mask: torch.Tensor | None  # [n, 1, 1, max_blocks * block_size] bool; None for one run
    max_context_len: int


@dataclass(slots=True)
class AttentionBatch:
    """Where the step's keys and values go and what each query attends to.

    Decode runs (one query token each) are attended in padded groups of similar context length
    (``DecodeGroup``; one group when their lengths are alike); prefill runs one sequence at a
    time.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    prefills: list[SequenceSlice]
    decode_token_indices: torch.Tensor | None  # [num_decodes] int64 rows of the flattened batch
    decode_groups: list[DecodeGroup]


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


def _gather_blocks(
    kv_cache: torch.Tensor, block_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``block_ids`` (one layer), each [len(block_ids) * block_size, kvh, hd].

    ``index_select`` on flattened contiguous views, keys and values apart: advanced indexing of
    the 5-d cache takes a generic kernel several times slower, and ``index_select`` on the
    non-contiguous pair would first copy the whole layer."""
    num_blocks, _, num_kv_heads, head_dim = kv_cache.shape[1:]
    keys = kv_cache[0].view(num_blocks, -1).index_select(0, block_ids)
    values = kv_cache[1].view(num_blocks, -1).index_select(0, block_ids)
    return keys.view(-1, num_kv_heads, head_dim), values.view(-1, num_kv_heads, head_dim)


_PACKED_BATCH_ROWS = 16  # the batch size oneDNN's packed layout is tuned for
# Logits of a low-precision output projection computed again exactly, per row (``compute_logits``).
EXACT_TOP_LOGITS = 64


class Linear(nn.Module):
    """``y = x @ weight.T + bias``, in the dtype the precision plan gives its use.

    The use follows from the number of rows (``engine.precision.use_of_rows``): one row (batch-1
    decode), a few (batched decode) or many (prefill). Uses in ``low_uses`` run on
    ``low_weight``, a copy in the plan's low dtype, with activations cast in and the result cast
    back; the others on ``weight``. One row in the model's dtype is ``mv``, which on CPU streams a
    column-major weight (``LlamaModel.store_weights_column_major``) at close to memory speed. On
    CPU a bf16 copy is packed in oneDNN's blocked layout for a 16-row batch, which serves every
    row count: on AVX-512 BF16 it ran as fast at one row and at 512 as a layout packed for those,
    and faster than a plain bf16 matrix at all three (on AMX, ~15% slower than plain at 512).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.low_weight: torch.Tensor | None = None
        self.low_bias: torch.Tensor | None = None
        self.is_low_weight_packed = False
        self.low_uses: frozenset[Use] = frozenset()

    def forward(self, x: torch.Tensor, *, keep_low_dtype: bool = False) -> torch.Tensor:
        """x [num_tokens, in_features]. The result is in x's dtype, or, with
        ``keep_low_dtype``, in the low dtype when the low weight was used (for a consumer that
        casts to it anyway)."""
        if use_of_rows(x.shape[0]) in self.low_uses:
            return self.low_product(x, keep_low_dtype=keep_low_dtype)
        return self.product(x)

    def row_product(self, x: torch.Tensor) -> torch.Tensor:
        """The batch-1 product of one row x [in_features] -> [out_features], without the
        module call (``engine.single_decode``)."""
        if "single_row" in self.low_uses:
            return self.low_product(x.unsqueeze(0))[0]
        y = torch.mv(self.weight, x)
        return y if self.bias is None else y + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """On the model's own weight."""
        if x.shape[0] == 1 and x.device.type == "cpu":
            y = torch.mv(self.weight, x[0])
            if self.bias is not None:
                y = y + self.bias
            return y.unsqueeze(0)
        return F.linear(x, self.weight, self.bias)

    def low_product(self, x: torch.Tensor, *, keep_low_dtype: bool = False) -> torch.Tensor:
        """On the low-precision copy (``attach_low_weight`` first)."""
        assert self.low_weight is not None
        low_x = x.to(self.low_weight.dtype)
        y: torch.Tensor
        if self.is_low_weight_packed:
            y = torch.ops.mkldnn._linear_pointwise(
                low_x, self.low_weight, self.low_bias, "none", [], ""
            )
        else:
            y = F.linear(low_x, self.low_weight, self.low_bias)
        return y if keep_low_dtype else y.to(x.dtype)

    @torch.no_grad()
    def attach_low_weight(self, dtype: torch.dtype) -> None:
        weight = self.weight.detach().to(dtype).contiguous()
        self.low_bias = None if self.bias is None else self.bias.detach().to(dtype)
        self.is_low_weight_packed = (
            weight.device.type == "cpu"
            and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            and _cpu_packs_bf16()
        )
        if self.is_low_weight_packed:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACKED_BATCH_ROWS)
        self.low_weight = weight

    def apply_plan(self, plan: PrecisionPlan) -> None:
        """Route each use the plan puts in its low dtype to the low copy; drop the copy when
        none is."""
        low_uses = frozenset(use for use in USES if plan.of(use) != plan.dtype)
        stale = self.low_weight is not None and self.low_weight.dtype != plan.low_dtype
        if self.weight.is_meta and (low_uses != set(USES) or stale):
            raise ValueError("this projection's own weight was released; reload the model")
        self.low_uses = low_uses
        if self.low_uses and (self.low_weight is None or stale):
            assert plan.low_dtype is not None
            self.attach_low_weight(plan.low_dtype)
        if not self.low_uses:
            self.low_weight = self.low_bias = None
            self.is_low_weight_packed = False

    @property
    def is_all_low(self) -> bool:
        """Every use runs on the low copy."""
        return self.low_uses == set(USES)

    def release_weight(self) -> None:
        """Free the model-dtype weight once every use runs on the low copy (it held 2/3 of the
        memory of the pair). Its shape stays, on the meta device: a product on it fails."""
        assert self.is_all_low
        self.weight = nn.Parameter(
            torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"),
            requires_grad=False,
        )

    def probe(self, x: torch.Tensor, use: Use, is_low: bool) -> torch.Tensor:
        """The product ``use`` would run, on the low copy or not (``engine.precision``)."""
        if is_low:
            return self.low_product(x)
        return self.product(x)


@functools.cache
def _cpu_packs_bf16() -> bool:
    """Whether oneDNN can pack bf16 weights on this CPU (it needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT; elsewhere the low copy stays a plain bf16 matrix)."""
    capability: dict[str, object] = torch._C._cpu._get_cpu_capability()
    avx512 = all(capability.get(f"avx512_{name}", False) for name in ("bw", "vl", "dq"))
    return avx512 or bool(capability.get("avx_ne_convert", False))


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
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.post_attention_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,  # [num_tokens, 1, head_dim]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        batch: AttentionBatch,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.rms_norm(hidden, (hidden.shape[-1],), self.input_norm, self.eps)
        qkv = self.qkv_proj(x)
        q_size, kv_size, _ = self.split_sizes
        # RoPE on q and k at once: rotate_half(x) * sin == roll(x, half) * [-sin | sin].
        qk = qkv[:, : q_size + kv_size].view(num_tokens, num_heads + num_kv_heads, head_dim)
        qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        v = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)

        k_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [slots, kvh, hd]
        v_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
        k_cache.index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))

        if not batch.prefills and batch.decode_token_indices is not None:
            out = self._attend_decode(q, kv_cache, batch)  # every row decodes, in order
        else:
            out = torch.empty_like(q)
            for run in batch.prefills:
                start, end = run.token_start, run.token_start + run.num_query_tokens
                out[start:end] = self._attend_prefill(q, k, v, kv_cache, run)
            if batch.decode_token_indices is not None:
                rows = batch.decode_token_indices
                out[rows] = self._attend_decode(q[rows], kv_cache, batch)

        hidden = hidden + self.o_proj(out.view(num_tokens, -1))
        x = F.rms_norm(hidden, (hidden.shape[-1],), self.post_attention_norm, self.eps)
        # The MLP's inner activations may stay in the low dtype: down_proj casts to it anyway
        # (when it runs in it: a 1-row product may not, and casts them back).
        gate, up = self.gate_up_proj(x, keep_low_dtype=True).chunk(2, dim=-1)
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
            keys, values = _gather_blocks(kv_cache, run.block_table)
            keys, values = keys[: run.context_len], values[: run.context_len]
            # Bottom-right aligned causal mask: query i sits at context_len - num_query + i.
            query_pos = torch.arange(run.context_len - num_query, run.context_len).unsqueeze(1)
            mask = torch.arange(run.context_len).unsqueeze(0) <= query_pos  # [num_query, context]
        # Attention runs in the cache's dtype, the precision plan's choice for it.
        dtype = kv_cache.dtype
        # 4-d inputs (a batch of 1): the CPU flash kernel takes no others, and with them it
        # handles grouped kv heads itself.
        out = F.scaled_dot_product_attention(
            query[None].to(dtype),
            keys.transpose(0, 1)[None].to(dtype),
            values.transpose(0, 1)[None].to(dtype),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1).to(query.dtype)

    def _attend_decode(
        self,
        query: torch.Tensor,  # [num_decodes, heads, hd]
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        groups = batch.decode_groups
        if len(groups) == 1 and groups[0].rows is None:
            return self._attend_decode_group(query, kv_cache, groups[0])
        out = torch.empty_like(query)
        for group in groups:
            assert group.rows is not None
            out[group.rows] = self._attend_decode_group(query[group.rows], kv_cache, group)
        return out

    def _attend_decode_group(
        self,
        query: torch.Tensor,  # [n, heads, hd]
        kv_cache: torch.Tensor,
        group: DecodeGroup,
    ) -> torch.Tensor:
        num_decodes = query.shape[0]
        keys, values = _gather_blocks(kv_cache, group.block_tables.flatten())
        # [n * max_context, kvh, hd] -> [n, kvh, max_context, hd]
        keys = keys.view(num_decodes, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = values.view(num_decodes, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = group.mask
        if num_decodes == 1:
            # One sequence: cut to its context instead of masking (the unmasked kernel is faster).
            keys = keys[:, :, : group.max_context_len]
            values = values[:, :, : group.max_context_len]
            mask = None
        out = F.scaled_dot_product_attention(
            query.unsqueeze(2).to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=True
        )
        return out.squeeze(2).to(query.dtype)  # [n, heads, hd]


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and the output projection."""

    inv_freq: torch.Tensor  # [head_dim // 2] fp32 RoPE frequencies (a buffer)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        # With tied embeddings ``load_hf_state_dict`` points its weight at the embedding table.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
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
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(hidden.dtype).unsqueeze(1)
        sin = angles.sin()
        # [-sin | sin]: the sign of rotate_half folded in (see DecoderLayer.forward).
        sin = torch.cat((-sin, sin), dim=-1).to(hidden.dtype).unsqueeze(1)  # [num_tokens, 1, hd]
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, kv_cache[:, index], batch)
        return F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.config.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab_size] in fp32 for the given final hidden states [n, hidden_size].

        Where the plan runs the output projection in a low dtype, the ``EXACT_TOP_LOGITS``
        largest of each row are computed again on the model's own weight: the greedy choice and
        each row's 64 most likely tokens are the reference arithmetic's (a bf16 product rounds
        logits of ~20 to steps of 0.125, which flipped near ties). The rest, and so the softmax
        normaliser and candidates of a ``top_k`` above 64, keep the low product's rounding; near
        rank 64 a rounded tail logit may outrank an exact one."""
        head = self.lm_head
        if hidden.shape[0] == 0 or use_of_rows(hidden.shape[0]) not in head.low_uses:
            logits: torch.Tensor = head.product(hidden)
            return logits.float()
        logits = head.low_product(hidden).float()
        top = logits.topk(min(EXACT_TOP_LOGITS, logits.shape[-1]), dim=-1).indices  # [n, k]
        rows = head.weight.index_select(0, top.flatten()).view(*top.shape, -1)  # [n, k, hidden]
        exact = torch.bmm(rows, hidden.unsqueeze(-1)).squeeze(-1)  # (the head has no bias)
        return logits.scatter_(-1, top, exact.float())

    @torch.no_grad()
    def store_weights_column_major(self) -> None:
        """Lay each projection's weight out transposed in memory (same shape, strides (1, out)):
        a single-row product then runs MKL's transposed GEMV, which streams the weight ~5% faster
        on CPU. Multi-row products and embedding lookups take the strides as they are."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.weight.data = module.weight.data.t().contiguous().t()

    def attach_low_weights(self, dtype: torch.dtype) -> None:
        """Keep ``dtype`` copies of every layer projection (see ``Linear``), for the precision
        probe."""
        for module in self.layers.modules():
            if isinstance(module, Linear):
                module.attach_low_weight(dtype)

    @torch.no_grad()
    def apply_plan(self, plan: PrecisionPlan) -> None:
        """Run each projection's uses in the plan's dtypes (see ``Linear.apply_plan``), the
        output projection's too, with its top logits made exact (``compute_logits``). On
        SmolLM2-135M and an AVX-512 BF16 CPU the fp32 output projection took ~4 ms of a 14 ms
        batch-1 step, reading 113 MB at 28 GB/s; its packed bf16 copy reads 57 MB in ~1 ms.
        A layer projection with every use on its low copy frees its own weight
        (``Linear.release_weight``). The output projection keeps it, row-major: the exact top
        logits (and the embedding lookups, when the table is shared) gather its rows."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.apply_plan(plan)
        # Layers only: the output projection keeps its weight for the exact top logits (and,
        # when tied, the embedding lookups).
        for module in self.layers.modules():
            if isinstance(module, Linear) and module.is_all_low:
                module.release_weight()
        head = self.lm_head
        if head.low_uses and not head.weight.is_contiguous():
            head.weight.data = head.weight.data.contiguous()

    def probe_products(self) -> tuple[list[list[Product]], list[int]]:
        """Each layer's four projections as ``engine.precision.measure`` times them, and their
        input widths."""
        products: list[list[Product]] = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            linears = (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
            products.append([linear.probe for linear in linears])
        layer = self.layers[0]
        assert isinstance(layer, DecoderLayer)
        in_features = [
            linear.weight.shape[1]
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
        ]
        return products, in_features

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in HF ``LlamaForCausalLM`` into this model, fusing q/k/v and
        gate/up."""
        prefix = "model.layers."
        self.embed_tokens.weight.copy_(state_dict["model.embed_tokens.weight"])
        self.norm.copy_(state_dict["model.norm.weight"])
        if self.config.tie_word_embeddings:
            self.lm_head.weight = cast(nn.Parameter, self.embed_tokens.weight)
        else:
            self.lm_head.weight.copy_(state_dict["lm_head.weight"])
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
