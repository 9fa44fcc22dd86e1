"""Config and weight loading: against transformers on the real default GGUF, on tiny HF
safetensors checkpoints, and on small GGUF files written here the way llama.cpp writes them."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file

from engine.config import (
    ModelConfig,
    ModelLoadError,
    RopeScaling,
    UnsupportedModelError,
    config_from_gguf_metadata,
    config_from_hf,
    load_config,
)
from engine.weights import (
    load_gguf,
    load_safetensors_dir,
    load_weights,
    unpermute_rope_rows,
    validate_state_dict,
)

transformers = pytest.importorskip("transformers")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


# --- the default model against transformers ----------------------------------------------------


@pytest.fixture(scope="module")
def default_dir(default_gguf_path: Path) -> Path:
    return default_gguf_path.parent


@pytest.fixture(scope="module")
def ours_default(default_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    return load_weights(default_dir / DEFAULT_GGUF)


@pytest.fixture(scope="module")
def hf_default(hf_default_model: Any) -> Any:
    # Its .config is what AutoConfig.from_pretrained(dir, gguf_file=...) builds.
    return hf_default_model


@pytest.mark.slow
def test_default_gguf_config_matches_transformers(
    ours_default: tuple[ModelConfig, dict[str, torch.Tensor]], hf_default: Any
) -> None:
    config, _ = ours_default
    hf = hf_default.config
    assert config.architecture == hf.model_type == "llama"
    assert config.vocab_size == hf.vocab_size == 49152
    assert config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.num_kv_heads < config.num_heads  # GQA, so K's un-permutation uses kv heads
    assert config.head_dim == hf.head_dim
    assert config.rope_theta == _hf_rope_theta(hf)
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings is hf.tie_word_embeddings is True
    assert config.bos_token_id == hf.bos_token_id
    assert config.eos_token_ids == (hf.eos_token_id,)
    assert config.rope_scaling is None
    assert not config.attention_bias


@pytest.mark.slow
def test_default_gguf_weights_equal_transformers(
    ours_default: tuple[ModelConfig, dict[str, torch.Tensor]], hf_default: Any
) -> None:
    _, ours = ours_default
    theirs = hf_default.state_dict()
    # transformers lists the tied head under its own name too.
    assert set(theirs) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(theirs)
    mismatched = [name for name, tensor in ours.items() if not torch.equal(tensor, theirs[name])]
    assert mismatched == []
    assert all(tensor.dtype == torch.float32 for tensor in ours.values())


def _hf_rope_theta(hf_config: Any) -> float:
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 0.0)))


# --- tiny HF checkpoints -----------------------------------------------------------------------


def _tiny_hf(kind: str, tie: bool) -> Any:
    """A random 2-layer model of ``kind`` ("llama", "llama3" or "qwen2") with no parameter left
    at its constant init, so a wrong name mapping cannot hide behind equal tensors."""
    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1e6, **common))
    else:
        rope_scaling = None
        if kind == "llama3":
            rope_scaling = {"rope_type": "llama3"} | dataclasses.asdict(LLAMA3_SCALING)
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(rope_theta=5e5, rope_scaling=rope_scaling, **common)
        )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _expected_config(kind: str, tie: bool, name: str = "", from_gguf: bool = False) -> ModelConfig:
    """The config of ``_tiny_hf(kind, tie)``; GGUF stores floats as float32."""
    return ModelConfig(
        architecture="qwen2" if kind == "qwen2" else "llama",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=float(np.float32(1e-5)) if from_gguf else 1e-5,
        rope_theta=1e6 if kind == "qwen2" else 5e5,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        attention_bias=kind == "qwen2",
        rope_scaling=LLAMA3_SCALING if kind == "llama3" else None,
        bos_token_id=1,
        eos_token_ids=(2,),
        name=name,
    )


def _hf_tensors(model: Any) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = model.state_dict()
    if model.config.tie_word_embeddings:
        del state_dict["lm_head.weight"]
    return state_dict


@pytest.mark.parametrize(
    ("kind", "tie", "sharded"),
    [
        ("llama", False, False),
        ("llama", True, True),
        ("qwen2", True, False),
        ("llama3", False, True),
    ],
)
def test_safetensors_round_trip(kind: str, tie: bool, sharded: bool, tmp_path: Path) -> None:
    model = _tiny_hf(kind, tie)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded

    config, state_dict = load_safetensors_dir(tmp_path)

    assert config == _expected_config(kind, tie, name=tmp_path.name)
    assert load_config(tmp_path) == config
    expected = _hf_tensors(model)
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[name], expected[name]) for name in expected)


def test_safetensors_dtype_cast(tmp_path: Path) -> None:
    model = _tiny_hf("llama", tie=False)
    model.save_pretrained(tmp_path)
    _, state_dict = load_weights(tmp_path, dtype=torch.bfloat16)
    expected = _hf_tensors(model)
    assert all(t.dtype == torch.bfloat16 for t in state_dict.values())
    assert all(torch.equal(state_dict[n], expected[n].to(torch.bfloat16)) for n in expected)


def test_safetensors_missing_tensor_is_named(tmp_path: Path) -> None:
    model = _tiny_hf("llama", tie=False)
    model.config.to_json_file(tmp_path / "config.json")
    partial = _hf_tensors(model)
    del partial["model.layers.1.mlp.up_proj.weight"]
    save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_safetensors_dir(tmp_path)


def test_validate_state_dict_lists_every_problem() -> None:
    model = _tiny_hf("qwen2", tie=False)
    state_dict = _hf_tensors(model)
    config = _expected_config("qwen2", tie=False)
    validate_state_dict(config, state_dict)  # the intact checkpoint passes

    del state_dict["model.layers.0.self_attn.k_proj.bias"]
    state_dict["model.norm.weight"] = torch.zeros(63)
    state_dict["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(16)
    with pytest.raises(ModelLoadError) as info:
        validate_state_dict(config, state_dict)
    message = str(info.value)
    assert "missing: model.layers.0.self_attn.k_proj.bias" in message
    assert "unexpected: model.layers.0.self_attn.q_norm.weight" in message
    assert "model.norm.weight (63,) (expected (64,))" in message


def test_config_from_hf_rejects_unsupported_models() -> None:
    base = _tiny_hf("llama", tie=False).config.to_dict()
    with pytest.raises(UnsupportedModelError, match="'mistral'"):
        config_from_hf(base | {"model_type": "mistral"})
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        config_from_hf(base | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="o_proj"):
        config_from_hf(base | {"attention_bias": True})
    with pytest.raises(ModelLoadError, match="'hidden_size'"):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def test_config_from_transformers_4_keys() -> None:
    """Checkpoints saved by transformers 4.x carry rope_theta and rope_scaling at the top level."""
    legacy = {
        "model_type": "llama",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "llama3"} | dataclasses.asdict(LLAMA3_SCALING),
        "bos_token_id": 1,
        "eos_token_id": [2],
    }
    assert config_from_hf(legacy) == _expected_config("llama3", tie=False)


# --- GGUF files written the llama.cpp way ------------------------------------------------------

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# A mix of storage types; layer 0 keeps Q/K in F32 so un-permutation is checked bit for bit.
_LLAMA_TYPES = {
    "token_embd.weight": QType.Q8_0,
    "output.weight": QType.Q8_0,
    "blk.1.attn_q.weight": QType.Q8_0,
    "blk.1.attn_k.weight": QType.F16,
    "blk.0.attn_v.weight": QType.BF16,
    "blk.0.attn_output.weight": QType.Q4_0,
    "blk.1.attn_output.weight": QType.Q4_1,
    "blk.0.ffn_gate.weight": QType.Q8_0,
    "blk.0.ffn_up.weight": QType.F16,
    "blk.1.ffn_down.weight": QType.Q8_0,
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{_GGUF_LAYER_NAMES[rest]}"


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py (called with the KV head
    count for K)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama_cpp_rope_factors(theta: float, head_dim: int, scaling: RopeScaling) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter computes it for ``rope_type == "llama3"``."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    orig = scaling.original_max_position_embeddings
    low_freq_wavelen = orig / scaling.low_freq_factor
    high_freq_wavelen = orig / scaling.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (orig / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.array(factors, dtype=np.float32)


def _stored(array: np.ndarray, qtype: QType) -> np.ndarray:
    """What a GGUF tensor of ``qtype`` holds for ``array``: plain floats or quantized bytes."""
    if qtype == QType.F32:
        return array.astype(np.float32)
    if qtype == QType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def _write_gguf(
    path: Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    types: dict[str, QType],
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> None:
    writer = gguf.GGUFWriter(path, config.architecture)
    arch = config.architecture
    writer.add_name("tiny test model")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_uint32(f"{arch}.rope.dimension_count", config.head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, tensor in state_dict.items():
        name = _gguf_name(hf_name)
        array = tensor.numpy()
        if arch == "llama" and ".attn_q." in name:
            array = _llama_cpp_permute(array, config.num_heads)
        elif arch == "llama" and ".attn_k." in name:
            array = _llama_cpp_permute(array, config.num_kv_heads)
        qtype = types.get(name, QType.F32)
        stored = _stored(array, qtype)
        quantized = qtype not in (QType.F32, QType.F16)
        writer.add_tensor(name, stored, raw_dtype=qtype if quantized else None)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_unpermutes_and_dequantizes(tmp_path: Path) -> None:
    model = _tiny_hf("llama3", tie=False)
    config = _expected_config("llama3", tie=False, name="tiny test model", from_gguf=True)
    state_dict = _hf_tensors(model)
    rope_freqs = _llama_cpp_rope_factors(config.rope_theta, config.head_dim, LLAMA3_SCALING)
    assert rope_freqs.max() > 1.0 and rope_freqs.min() == 1.0  # the scaling is not a no-op
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, config, state_dict, _LLAMA_TYPES, {"rope_freqs.weight": rope_freqs})

    loaded_config, loaded = load_weights(path)

    assert loaded_config == config
    assert load_config(path) == config
    assert loaded.keys() == state_dict.keys()
    for hf_name, original in state_dict.items():
        qtype = _LLAMA_TYPES.get(_gguf_name(hf_name), QType.F32)
        # Quantization works on rows of the [out, in] matrix, so it commutes with the row
        # permutation: the loaded tensor must equal exactly the HF tensor's own round trip.
        stored = _stored(original.numpy(), qtype)
        expected = torch.from_numpy(gguf.quants.dequantize(stored, qtype).copy())
        assert torch.equal(loaded[hf_name], expected.reshape(original.shape)), hf_name
        tolerance = {QType.Q4_0: 0.2, QType.Q4_1: 0.1, QType.Q8_0: 0.01}.get(qtype, 0.005)
        assert torch.allclose(
            loaded[hf_name], original, rtol=0, atol=tolerance * original.abs().max()
        )
    # The F32 layer-0 Q/K are the HF originals bit for bit, and the file really was permuted.
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        assert torch.equal(loaded[name], state_dict[name])
    permuted_q = _llama_cpp_permute(state_dict["model.layers.0.self_attn.q_proj.weight"].numpy(), 4)
    assert not np.array_equal(permuted_q, state_dict["model.layers.0.self_attn.q_proj.weight"])


def test_gguf_qwen2_has_bias_and_no_permutation(tmp_path: Path) -> None:
    model = _tiny_hf("qwen2", tie=True)
    config = _expected_config("qwen2", tie=True, name="tiny test model", from_gguf=True)
    state_dict = _hf_tensors(model)
    path = tmp_path / "qwen2.gguf"
    _write_gguf(path, config, state_dict, {})

    loaded_config, loaded = load_gguf(path, dtype=torch.float16)

    assert loaded_config == config
    assert loaded.keys() == state_dict.keys()
    assert all(loaded[n].dtype == torch.float16 for n in loaded)
    assert all(torch.equal(loaded[n], state_dict[n].to(torch.float16)) for n in state_dict)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    weight = torch.randn(6 * 8, 5)  # 6 heads of head_dim 8
    permuted = torch.from_numpy(_llama_cpp_permute(weight.numpy(), 6))
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_rope_rows(permuted, 6), weight)
    bias = torch.randn(2 * 16)
    assert torch.equal(
        unpermute_rope_rows(torch.from_numpy(_llama_cpp_permute(bias.numpy(), 2)), 2), bias
    )


def test_gguf_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for load in (load_gguf, load_config):
        with pytest.raises(UnsupportedModelError, match="'mamba'"):
            load(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("f64", r"'blk\.1\.ffn_up\.weight' has GGML type F64"),
        ("unknown_name", r"unexpected tensors.*blk\.0\.attn_q_norm\.weight"),
    ],
)
def test_gguf_unsupported_tensors_are_named(case: str, message: str, tmp_path: Path) -> None:
    state_dict = _hf_tensors(_tiny_hf("llama", tie=True))
    up = state_dict.pop("model.layers.1.mlp.up_proj.weight").numpy()
    if case == "f64":  # a type gguf can store but not dequantize
        extra = {"blk.1.ffn_up.weight": up.astype(np.float64)}
    else:  # e.g. a Qwen3-style QK norm written under architecture "llama"
        extra = {"blk.1.ffn_up.weight": up, "blk.0.attn_q_norm.weight": np.ones(16, np.float32)}
    path = tmp_path / "bad.gguf"
    _write_gguf(path, _expected_config("llama", tie=True), state_dict, {}, extra)
    with pytest.raises(UnsupportedModelError, match=message):
        load_gguf(path)


def test_not_a_model(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=r"bogus\.gguf"):
        load_weights(bogus)
    with pytest.raises(ModelLoadError, match="neither"):
        load_weights(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_weights(empty)


# --- Llama-3 RoPE scaling from rope_freqs ------------------------------------------------------


def _gguf_metadata(head_dim: int, theta: float) -> dict[str, Any]:
    return {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.context_length": 131072,
        "llama.embedding_length": 32 * head_dim,
        "llama.feed_forward_length": 14336,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.rope.freq_base": theta,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": head_dim,
        "tokenizer.ggml.tokens": ["a", "b", "c"],
    }


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(8.0, 1.0, 4.0, 8192),  # Llama 3.1
        RopeScaling(32.0, 1.0, 4.0, 8192),  # Llama 3.2
        RopeScaling(16.0, 1.0, 8.0, 4096),
    ],
)
def test_llama3_scaling_recovered_from_rope_freqs(scaling: RopeScaling) -> None:
    factors = _llama_cpp_rope_factors(5e5, 128, scaling)
    config = config_from_gguf_metadata(
        _gguf_metadata(128, 5e5), ["token_embd.weight"], factors.tolist()
    )
    assert config.vocab_size == 3  # from the token list, as the file has no vocab_size key
    assert config.rope_scaling is not None
    recovered = config.rope_scaling
    assert recovered.factor == scaling.factor
    assert recovered.low_freq_factor == scaling.low_freq_factor
    assert recovered.high_freq_factor == pytest.approx(scaling.high_freq_factor, rel=1e-4)
    assert recovered.original_max_position_embeddings == scaling.original_max_position_embeddings


def test_llama3_scaling_equivalent_parameters_reproduce_frequencies() -> None:
    """Only factor and the blend line are recoverable; other parameters with the same line must
    give the same frequencies."""
    scaling = RopeScaling(8.0, 2.0, 6.0, 16384)
    factors = _llama_cpp_rope_factors(5e5, 128, scaling)
    config = config_from_gguf_metadata(_gguf_metadata(128, 5e5), [], factors.tolist())
    assert config.rope_scaling is not None
    assert _llama_cpp_rope_factors(5e5, 128, config.rope_scaling) == pytest.approx(
        factors, rel=1e-5
    )


def test_rope_freqs_of_another_scheme_are_rejected() -> None:
    factors = np.linspace(1.0, 4.0, 64)  # linear in index, not in 1 / wavelength
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        config_from_gguf_metadata(_gguf_metadata(128, 5e5), [], factors.tolist())


def test_gguf_metadata_errors_name_the_key() -> None:
    metadata = _gguf_metadata(64, 1e4)
    del metadata["llama.block_count"]
    with pytest.raises(ModelLoadError, match=r"'llama\.block_count'"):
        config_from_gguf_metadata(metadata, [])
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        config_from_gguf_metadata(_gguf_metadata(64, 1e4) | {"llama.rope.scaling.type": "yarn"}, [])


def test_hf_config_json_is_read(tmp_path: Path) -> None:
    model = _tiny_hf("qwen2", tie=False)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    assert load_config(tmp_path) == _expected_config("qwen2", tie=False, name=tmp_path.name)
