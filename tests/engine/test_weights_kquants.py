"""K-quant GGUF tensors (Q4_K, Q6_K): our loader against a reference written from llama.cpp's
``dequantize_row_q4_K`` / ``dequantize_row_q6_K``, independent of the gguf package."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from engine.gguf_reader import GGUFFile
from engine.weights import _dequantize

QK_K = 256  # weights per K-quant super-block


def _q4_k_reference(block: bytes) -> np.ndarray:
    d, dmin = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
    scales, qs = block[4:16], block[16:144]

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )

    out = []
    for chunk in range(4):  # 64 weights each: 32 low nibbles, then 32 high nibbles
        q = np.frombuffer(qs[chunk * 32 : (chunk + 1) * 32], dtype=np.uint8)
        sc1, m1 = scale_min(2 * chunk)
        sc2, m2 = scale_min(2 * chunk + 1)
        out.append(d * sc1 * (q & 0xF) - dmin * m1)
        out.append(d * sc2 * (q >> 4) - dmin * m2)
    return np.concatenate(out).astype(np.float32)


def _q6_k_reference(block: bytes) -> np.ndarray:
    ql = np.frombuffer(block[:128], dtype=np.uint8).astype(np.int32)
    qh = np.frombuffer(block[128:192], dtype=np.uint8).astype(np.int32)
    sc = np.frombuffer(block[192:208], dtype=np.int8).astype(np.float32)
    d = np.frombuffer(block[208:210], dtype=np.float16).astype(np.float32)[0]
    y = np.zeros(QK_K, dtype=np.float32)
    for half in range(2):  # 128 weights each
        lo, hi, s, base = ql[64 * half :], qh[32 * half :], sc[8 * half :], 128 * half
        for l in range(32):  # noqa: E741 (llama.cpp's name)
            i = l // 16
            q1 = ((lo[l] & 0xF) | (((hi[l] >> 0) & 3) << 4)) - 32
            q2 = ((lo[l + 32] & 0xF) | (((hi[l] >> 2) & 3) << 4)) - 32
            q3 = ((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32
            q4 = ((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32
            y[base + l] = d * s[i] * q1
            y[base + l + 32] = d * s[i + 2] * q2
            y[base + l + 64] = d * s[i + 4] * q3
            y[base + l + 96] = d * s[i + 6] * q4
    return y


def _random_blocks(qtype: QType, num_blocks: int, rng: np.random.Generator) -> bytes:
    """Random quant bits with small, finite fp16 scale fields."""
    blocks = []
    for _ in range(num_blocks):
        if qtype == QType.Q4_K:
            head = np.array(rng.uniform(0.001, 0.05, size=2), dtype=np.float16).tobytes()
            blocks.append(head + rng.bytes(140))
        else:
            d = np.array([rng.uniform(0.001, 0.05)], dtype=np.float16).tobytes()
            blocks.append(rng.bytes(208) + d)
    return b"".join(blocks)


@pytest.mark.parametrize(
    ("qtype", "reference"), [(QType.Q4_K, _q4_k_reference), (QType.Q6_K, _q6_k_reference)]
)
def test_k_quant_tensors_dequantize_like_llama_cpp(
    qtype: QType, reference: object, tmp_path: Path
) -> None:
    rows, cols = 3, 2 * QK_K
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = _random_blocks(qtype, rows * cols // QK_K, np.random.default_rng(0))
    path = tmp_path / "kquant.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    # A quantized tensor is stored as bytes: [rows, bytes per row].
    data = np.frombuffer(raw, dtype=np.uint8).reshape(rows, cols // QK_K * block_bytes)
    writer.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    [tensor] = GGUFFile(path).tensors
    ours = _dequantize(tensor)

    assert ours.shape == (rows, cols) and ours.dtype == torch.float32
    assert callable(reference)
    expected = np.stack(
        [
            np.concatenate(
                [
                    reference(raw[start : start + block_bytes])
                    for start in range(
                        row_start, row_start + cols // QK_K * block_bytes, block_bytes
                    )
                ]
            )
            for row_start in range(0, len(raw), cols // QK_K * block_bytes)
        ]
    )
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6)
