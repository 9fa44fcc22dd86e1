"""Model configuration: the shape of a Llama-family decoder, read from GGUF metadata or an HF
``config.json``. Torch-free (the gateway reads configs too).

Errors::

    ModelLoadError                 the checkpoint cannot be read: missing or malformed files,
     │                             metadata or tensors
     └── UnsupportedModelError     readable, but an architecture, feature or tensor type the
                                   engine does not implement
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from engine.gguf_reader import GGUFFile

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "ModelLoadError",
    "RopeScaling",
    "UnsupportedModelError",
    "config_from_gguf",
    "config_from_gguf_metadata",
    "config_from_hf",
    "errors_about",
    "gguf_metadata",
    "load_config",
    "open_gguf",
    "read_json_object",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp stores Llama-3 RoPE scaling not as metadata but as this tensor of per-frequency
# divisors [head_dim // 2]; the config is recovered from it (see `_llama3_scaling_from_factors`).
GGUF_ROPE_FREQS_TENSOR = "rope_freqs.weight"


class ModelLoadError(Exception):
    """A checkpoint that cannot be read into a model; the message names the file and the problem."""


class UnsupportedModelError(ModelLoadError):
    """A readable checkpoint using an architecture, feature or tensor type we do not implement."""


@contextmanager
def errors_about(path: str | Path) -> Iterator[None]:
    """Prefix the message of any ``ModelLoadError`` raised inside with ``path``, keeping its type,
    so that errors from the path-agnostic parsers say which file they are about."""
    try:
        yield
    except ModelLoadError as exc:
        if str(exc).startswith(f"{path}: "):
            raise
        raise type(exc)(f"{path}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the model code needs to know about a checkpoint's shape."""

    architecture: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2-style bias on q/k/v projections
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (config.json, tokenizer_config.json, ...)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return value


def load_config(path: str | Path) -> ModelConfig:
    """The config of a ``.gguf`` file or of an HF directory holding ``config.json``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        with errors_about(path):
            return config_from_gguf(open_gguf(path))
    if path.is_dir():
        config_path = path / "config.json"
        config_json = read_json_object(config_path)
        with errors_about(config_path):
            return config_from_hf(config_json, name=path.name)
    raise ModelLoadError(f"{path}: neither a .gguf file nor an HF model directory")


# --- GGUF ----------------------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """A memory-mapped reader for ``path``, with parse errors translated to ours.

    Readers are cached per file version: the tokenizer, the config and the weights of one model
    all read the same file, and parsing a 49k-token vocabulary still takes ~0.1 s (see
    ``engine.gguf_reader`` for why this is not ``gguf.GGUFReader``, which takes seconds).
    """
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {exc}") from exc
    return _open_gguf_version(str(resolved), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open_gguf_version(path: str, mtime_ns: int, size: int) -> GGUFFile:
    try:
        return GGUFFile(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {exc}") from exc


def gguf_metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every metadata field as a plain Python value (str, int, float, bool or list)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def config_from_gguf(reader: GGUFFile) -> ModelConfig:
    """The config of an open GGUF file: its metadata plus what its tensor list implies."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    rope_freqs = tensors.get(GGUF_ROPE_FREQS_TENSOR)
    factors = None
    if rope_freqs is not None:
        if rope_freqs.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise UnsupportedModelError(
                f"{GGUF_ROPE_FREQS_TENSOR} stored as {rope_freqs.tensor_type.name} is not supported"
            )
        factors = [float(x) for x in rope_freqs.data.ravel()]
    return config_from_gguf_metadata(gguf_metadata(reader), tensors.keys(), factors)


def config_from_gguf_metadata(
    metadata: Mapping[str, Any],
    tensor_names: Collection[str],
    rope_freq_factors: Sequence[float] | None = None,
) -> ModelConfig:
    """Build a config from GGUF key/values. ``tensor_names`` is needed because GGUF records some
    facts only by which tensors exist: a tied LM head is the absence of ``output.weight``, and q/k/v
    bias the presence of ``blk.0.attn_q.bias``. ``rope_freq_factors`` is the content of the
    ``rope_freqs.weight`` tensor when the file has one (Llama-3 RoPE scaling)."""
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise ModelLoadError("GGUF metadata lacks 'general.architecture'")
    _check_architecture(architecture)

    def get(suffix: str, default: Any = None) -> Any:
        key = f"{architecture}.{suffix}"
        value = metadata.get(key, default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {key!r}")
        return value

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    # head_count_kv may be per-layer in some files; the engine needs one value for all layers.
    num_kv_heads = _single_value(get("attention.head_count_kv", num_heads), "head_count_kv")
    head_dim = int(
        metadata.get(
            f"{architecture}.attention.key_length",
            metadata.get(f"{architecture}.rope.dimension_count", hidden_size // num_heads),
        )
    )
    vocab_size = metadata.get(f"{architecture}.vocab_size")
    if vocab_size is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(
                f"GGUF metadata has neither '{architecture}.vocab_size' nor 'tokenizer.ggml.tokens'"
            )
        vocab_size = len(tokens)
    rope_theta = float(get("rope.freq_base", 10000.0))

    scaling_type = metadata.get(f"{architecture}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise UnsupportedModelError(f"RoPE scaling type {scaling_type!r} is not supported")
    rope_scaling = None
    if rope_freq_factors is not None:
        rope_scaling = _llama3_scaling_from_factors(rope_freq_factors, rope_theta, head_dim)

    eos_token_id = metadata.get("tokenizer.ggml.eos_token_id")
    bos_token_id = metadata.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=rope_scaling,
        bos_token_id=None if bos_token_id is None else int(bos_token_id),
        eos_token_ids=() if eos_token_id is None else (int(eos_token_id),),
        name=str(metadata.get("general.name", "")),
    )


def _single_value(value: Any, key: str) -> int:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"per-layer {key} {value} is not supported")
        value = value[0]
    return int(value)


_BLEND_TOLERANCE = 1e-4  # relative; rope_freqs is float32


def _llama3_scaling_from_factors(
    factors: Sequence[float], rope_theta: float, head_dim: int
) -> RopeScaling | None:
    """Recover Llama-3 RoPE scaling from llama.cpp's per-frequency divisors.

    llama.cpp's converter turns ``rope_scaling`` into ``rope_freqs[i]``, the divisor of frequency
    ``i``: 1 for short wavelengths, ``factor`` for long ones, and ``1 / ((1 - s) / factor + s)`` in
    the blend between, where ``s = a / wavelength + b`` with ``a = orig_ctx / (high - low)`` and
    ``b = -low / (high - low)``. The divisors fix ``factor``, ``a`` and ``b`` only, so any
    parameters with the same three values give identical frequencies: we try Llama 3.x's own
    numbers, then solve with ``low = 1`` (as every Llama 3 release has), and keep the first
    candidate that reproduces the tensor.
    """
    if len(factors) != head_dim // 2:
        raise ModelLoadError(
            f"{GGUF_ROPE_FREQS_TENSOR} has {len(factors)} values, expected head_dim / 2 = "
            f"{head_dim // 2}"
        )
    factor = max(factors)
    if factor <= 1.0:
        return None
    inv_wavelens = [rope_theta ** (-2 * i / head_dim) / (2 * math.pi) for i in range(head_dim // 2)]
    for candidate in _llama3_candidates(factor, inv_wavelens, factors):
        expected = _llama3_factors(candidate, inv_wavelens)
        if all(math.isclose(e, f, rel_tol=1e-3) for e, f in zip(expected, factors, strict=True)):
            return candidate
    raise UnsupportedModelError(
        f"{GGUF_ROPE_FREQS_TENSOR} does not follow Llama-3 RoPE scaling; other schemes are not "
        "supported"
    )


def _llama3_candidates(
    factor: float, inv_wavelens: Sequence[float], factors: Sequence[float]
) -> list[RopeScaling]:
    """Parameter guesses with ``low = 1``, most conventional first (see the caller)."""

    def scaling(high_freq_factor: float, orig_ctx: float) -> RopeScaling:
        return RopeScaling(factor, 1.0, high_freq_factor, round(orig_ctx))

    candidates = [scaling(4.0, 8192)]  # Llama 3.1 / 3.2 / 3.3
    # Blend points as (1 / wavelength, s); they lie on the line s = a * x + b.
    blend = [
        (x, (1 / r - 1 / factor) / (1 - 1 / factor))
        for x, r in zip(inv_wavelens, factors, strict=True)
        if 1 + _BLEND_TOLERANCE <= r <= factor * 0.9999
    ]
    if len(blend) >= 2:
        (x0, s0), (x1, s1) = blend[0], blend[-1]
        slope = (s1 - s0) / (x1 - x0)
        intercept = s0 - slope * x0
        if intercept < 0:  # b = -low / (high - low) with low = 1, so high = 1 - 1 / b
            candidates.append(scaling(round(1 - 1 / intercept, 4), -slope / intercept))
    elif len(blend) == 1:  # with high = 4 as well: s = (orig * x - 1) / 3
        x, s = blend[0]
        candidates.append(scaling(4.0, (3 * s + 1) / x))
    else:  # with high = 4: every 1 needs wavelength < orig / 4, every `factor` one > orig
        pairs = list(zip(inv_wavelens, factors, strict=True))
        lower = 4 * max((1 / x for x, r in pairs if r < 1 + _BLEND_TOLERANCE), default=0.25)
        upper = min((1 / x for x, r in pairs if r > factor * 0.9999), default=math.inf)
        if lower < upper:
            power_of_two = 2.0 ** (math.floor(math.log2(lower)) + 1)
            candidates.append(scaling(4.0, power_of_two if power_of_two < upper else lower + 1))
    return candidates


def _llama3_factors(scaling: RopeScaling, inv_wavelens: Sequence[float]) -> list[float]:
    """The divisors llama.cpp's converter writes for ``scaling`` (same formula as HF's)."""
    orig_ctx = scaling.original_max_position_embeddings
    low_freq_wavelen = orig_ctx / scaling.low_freq_factor
    high_freq_wavelen = orig_ctx / scaling.high_freq_factor
    result = []
    for x in inv_wavelens:
        wavelen = 1 / x
        if wavelen < high_freq_wavelen:
            result.append(1.0)
        elif wavelen > low_freq_wavelen:
            result.append(scaling.factor)
        else:
            smooth = (orig_ctx * x - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            result.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return result


# --- HF config.json ------------------------------------------------------------------------------


def config_from_hf(config_json: Mapping[str, Any], *, name: str = "") -> ModelConfig:
    """Build a config from an HF ``config.json`` (transformers 4.x ``rope_theta``/``rope_scaling``
    or 5.x ``rope_parameters``). ``config.json`` does not reliably name the model, so the caller
    passes ``name`` (``load_config`` uses the directory name)."""
    architecture = config_json.get("model_type")
    if not isinstance(architecture, str):
        raise ModelLoadError("config.json lacks 'model_type'")
    _check_architecture(architecture)

    def get(key: str, default: Any = None) -> Any:
        value = config_json.get(key, default)
        if value is None:
            raise ModelLoadError(f"config.json lacks {key!r}")
        return value

    if get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {config_json['hidden_act']!r} is not supported")
    if config_json.get("mlp_bias"):
        raise UnsupportedModelError("MLP bias (mlp_bias=true) is not supported")
    if architecture == "llama" and config_json.get("attention_bias"):
        # HF Llama's attention_bias also puts a bias on o_proj, which the engine does not have.
        raise UnsupportedModelError("Llama attention_bias=true (with o_proj bias) is not supported")
    if config_json.get("use_sliding_window") or "sliding_attention" in config_json.get(
        "layer_types", ()
    ):
        raise UnsupportedModelError("sliding-window attention is not supported")

    hidden_size = int(get("hidden_size"))
    num_heads = int(get("num_attention_heads"))
    rope_theta, rope_scaling = _hf_rope(config_json)
    eos = config_json.get("eos_token_id")
    eos_token_ids = (
        () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    )
    bos_token_id = config_json.get("bos_token_id")
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden_size,
        intermediate_size=int(get("intermediate_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(get("num_key_value_heads", num_heads)),
        head_dim=int(get("head_dim", hidden_size // num_heads)),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(get("max_position_embeddings")),
        tie_word_embeddings=bool(config_json.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias (and none on o_proj); it is not a config switch there.
        attention_bias=architecture == "qwen2",
        rope_scaling=rope_scaling,
        bos_token_id=None if bos_token_id is None else int(bos_token_id),
        eos_token_ids=eos_token_ids,
        name=name,
    )


def _hf_rope(config_json: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, rope_scaling)`` from either generation of transformers' config keys."""
    params = dict(config_json.get("rope_scaling") or {})
    params.update(config_json.get("rope_parameters") or {})
    rope_theta = float(params.get("rope_theta", config_json.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return rope_theta, None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"RoPE scaling type {rope_type!r} is not supported")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ModelLoadError(f"llama3 RoPE scaling lacks {exc.args[0]!r}") from exc
    return rope_theta, scaling


def _check_architecture(architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
