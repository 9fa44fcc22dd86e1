"""Checkpoint weights as a plain ``dict[str, torch.Tensor]`` in HF ``LlamaForCausalLM`` names and
shapes (Linear weights ``[out_features, in_features]``), from a GGUF file or an HF safetensors
directory, so the model code has one naming scheme to load and tests can compare against
transformers tensor by tensor.

GGUF tensors are dequantized to fp32 on the CPU and only then cast to the requested dtype: the
engine computes in a plain float dtype and does not run quantized kernels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open

from engine.config import (
    GGUF_ROPE_FREQS_TENSOR,
    ModelConfig,
    ModelLoadError,
    UnsupportedModelError,
    config_from_gguf,
    errors_about,
    load_config,
    open_gguf,
)
from engine.gguf_reader import GGUFTensor

__all__ = [
    "expected_tensor_shapes",
    "load_gguf",
    "load_safetensors_dir",
    "load_weights",
    "unpermute_rope_rows",
    "validate_state_dict",
]

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
_MAX_LISTED = 8  # names listed per kind of mismatch before "and N more"


def load_weights(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights of a ``.gguf`` file or an HF safetensors directory."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if path.is_dir():
        return load_safetensors_dir(path, dtype)
    raise ModelLoadError(f"{path}: neither a .gguf file nor an HF model directory")


# --- GGUF ----------------------------------------------------------------------------------------


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF file (memory-mapped), dequantize every tensor and undo llama.cpp's Q/K row
    permutation, so the result equals the HF checkpoint the file was converted from (up to
    quantization error)."""
    with errors_about(path):
        reader = open_gguf(path)
        config = config_from_gguf(reader)
        named = _hf_names(reader.tensors)
        state_dict: dict[str, torch.Tensor] = {}
        for hf_name, tensor in named.items():
            weight = _dequantize(tensor)
            if config.architecture == "llama" and ".attn_q." in tensor.name:
                weight = unpermute_rope_rows(weight, config.num_heads)
            elif config.architecture == "llama" and ".attn_k." in tensor.name:
                weight = unpermute_rope_rows(weight, config.num_kv_heads)
            state_dict[hf_name] = weight.to(dtype)
        validate_state_dict(config, state_dict)
    return config, state_dict


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives Llama Q and K projections (and their biases).

    HF rotates each head's halves together (``x[i]`` with ``x[i + d/2]``); llama.cpp's Llama RoPE
    rotates adjacent pairs (``x[2i]`` with ``x[2i + 1]``). The converter therefore interleaves the
    two halves of every head's output rows::

        HF rows of one head:    r0  r1  ...  r(d/2-1)  |  r(d/2)  ...  r(d-1)
        GGUF rows of that head: r0  r(d/2)  r1  r(d/2+1)  ...  r(d/2-1)  r(d-1)

    Viewing each head's GGUF rows as ``[d/2, 2]`` and transposing to ``[2, d/2]`` restores HF order.
    Qwen2 files are not permuted (llama.cpp uses NeoX-style RoPE there, as HF does).
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    # [num_heads, head_dim // 2, 2, *rest] -> [num_heads, 2, head_dim // 2, *rest]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _hf_names(tensors: list[GGUFTensor]) -> dict[str, GGUFTensor]:
    """Map every tensor to its HF name, failing before any dequantization on unknown ones."""
    named: dict[str, GGUFTensor] = {}
    unknown: list[str] = []
    for tensor in tensors:
        if tensor.name == GGUF_ROPE_FREQS_TENSOR:
            continue  # already folded into config.rope_scaling
        hf_name = _GGUF_GLOBAL_NAMES.get(tensor.name)
        if hf_name is None and (match := _GGUF_LAYER_PATTERN.fullmatch(tensor.name)):
            suffix = _GGUF_LAYER_NAMES.get(match.group(2))
            if suffix is not None:
                hf_name = f"model.layers.{match.group(1)}.{suffix}"
        if hf_name is None:
            unknown.append(tensor.name)
        else:
            named[hf_name] = tensor
    if unknown:
        raise UnsupportedModelError(
            f"unexpected tensors (unsupported features?): {_listed(unknown)}"
        )
    return named


def _dequantize(tensor: GGUFTensor) -> torch.Tensor:
    """One GGUF tensor as fp32 in torch order (GGUF lists dimensions innermost first)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        array = dequantize(tensor.data, qtype)
    except NotImplementedError as exc:
        raise UnsupportedModelError(
            f"tensor {tensor.name!r} has GGML type {qtype.name}, which cannot be dequantized"
        ) from exc
    shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable:
        array = array.copy()  # an F32 tensor is a view of the read-only memory map
    return torch.from_numpy(array)


# --- safetensors ---------------------------------------------------------------------------------


def load_safetensors_dir(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF directory: ``config.json`` plus one ``*.safetensors`` file or the shards named in
    ``model.safetensors.index.json``."""
    path = Path(path)
    config = load_config(path)
    state_dict: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # a buffer some old checkpoints saved; recomputed from config
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some checkpoints store the tied head anyway
                    state_dict[name] = handle.get_tensor(name).to(dtype)
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"{file}: cannot read safetensors: {exc}") from exc
    with errors_about(path):
        validate_state_dict(config, state_dict)
    return config, state_dict


def _safetensors_files(path: Path) -> list[Path]:
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index_path}: malformed shard index: {exc}") from exc
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ModelLoadError(f"{index_path}: shards missing from the directory: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    return files


# --- validation ----------------------------------------------------------------------------------


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` must have, by HF name, with its shape."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for index in range(config.num_layers):
        p = f"model.layers.{index}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_size, hidden),
            p + "self_attn.k_proj.weight": (kv_size, hidden),
            p + "self_attn.v_proj.weight": (kv_size, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_size),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        if config.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_size,),
                p + "self_attn.k_proj.bias": (kv_size,),
                p + "self_attn.v_proj.bias": (kv_size,),
            }
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def validate_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ``ModelLoadError`` naming every missing, unexpected or wrongly shaped tensor, so a
    bad checkpoint fails at load time rather than as a shape error deep in the model."""
    expected = expected_tensor_shapes(config)
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    wrong = [
        f"{name} {tuple(state_dict[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    ]
    problems = [
        f"{kind}: {_listed(names)}"
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if names
    ]
    if problems:
        raise ModelLoadError(
            f"weights do not match the {config.architecture} config: {'; '.join(problems)}"
        )


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown if more <= 0 else f"{shown} and {more} more"
