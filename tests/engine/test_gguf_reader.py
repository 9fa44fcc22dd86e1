"""engine.gguf_reader against gguf.GGUFReader, on the default model's file and on small files
written here (every value type, nested and empty arrays, float and quantized tensors, custom
alignment), plus malformed files, which must fail with ValueError (ModelLoadError via open_gguf).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType
from gguf.quants import dequantize, quantize

from engine.config import ModelLoadError, open_gguf
from engine.gguf_reader import GGUFFile

# --- comparison with gguf.GGUFReader -------------------------------------------------------------


def _value_types(value: Any) -> Any:
    """The Python types inside a contents() value (so that 1 == 1.0 == True cannot hide a bug)."""
    if isinstance(value, list):
        return [type(item) for item in value]
    return type(value)


def assert_same_as_gguf_reader(ours: GGUFFile, theirs: gguf.GGUFReader) -> None:
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        expected, actual = field.contents(), ours.fields[key].contents()
        assert actual == expected, key
        assert _value_types(actual) == _value_types(expected), key
        assert list(ours.fields[key].types) == field.types, key
    assert ours.alignment == theirs.alignment
    assert ours.data_offset == theirs.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type is ref.tensor_type, mine.name
        assert mine.shape.dtype == ref.shape.dtype, mine.name
        assert np.array_equal(mine.shape, ref.shape), mine.name
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (
            ref.n_elements,
            ref.n_bytes,
            ref.data_offset,
        ), mine.name
        assert mine.data.dtype == ref.data.dtype, mine.name
        assert mine.data.shape == ref.data.shape, mine.name
        assert np.array_equal(mine.data, ref.data), mine.name
        assert isinstance(mine.data, np.memmap), mine.name
        assert not mine.data.flags.writeable, mine.name


# --- the default model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_reader_default(default_gguf_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(default_gguf_path)  # ~6.5 s: the reason engine.gguf_reader exists


def test_default_model_reads_like_gguf_reader(
    default_gguf_path: Path, gguf_reader_default: gguf.GGUFReader
) -> None:
    ours = GGUFFile(default_gguf_path)
    assert_same_as_gguf_reader(ours, gguf_reader_default)
    tokens = ours.fields["tokenizer.ggml.tokens"]
    assert len(tokens.contents()) == 49152
    assert tokens.types == (VType.ARRAY, VType.STRING)
    # Index and slice arguments select like ReaderField.contents's.
    theirs = gguf_reader_default.fields["tokenizer.ggml.tokens"]
    assert tokens.contents(100) == theirs.contents(100)
    assert tokens.contents(slice(5, 9)) == theirs.contents(slice(5, 9))
    # contents() hands out a fresh list each call: callers may mutate it.
    tokens.contents().clear()
    assert len(tokens.contents()) == 49152


def test_default_model_dequantizes_like_gguf_reader(
    default_gguf_path: Path, gguf_reader_default: gguf.GGUFReader
) -> None:
    ours = {t.name: t for t in GGUFFile(default_gguf_path).tensors}
    for ref in gguf_reader_default.tensors[:12]:
        mine = ours[ref.name]
        expected = dequantize(ref.data, ref.tensor_type)
        assert np.array_equal(dequantize(mine.data, mine.tensor_type), expected), ref.name


def test_open_gguf_is_cached_per_file(default_gguf_path: Path) -> None:
    reader = GGUFFile(default_gguf_path)
    assert len(reader.tensors) == reader.fields["GGUF.tensor_count"].contents()
    assert isinstance(open_gguf(default_gguf_path), GGUFFile)
    assert open_gguf(default_gguf_path) is open_gguf(default_gguf_path)


# --- small files written with GGUFWriter ----------------------------------------------------------

SCALARS: list[tuple[str, VType, Any]] = [
    ("test.uint8", VType.UINT8, 255),
    ("test.int8", VType.INT8, -128),
    ("test.uint16", VType.UINT16, 65535),
    ("test.int16", VType.INT16, -32768),
    ("test.uint32", VType.UINT32, 2**32 - 1),
    ("test.int32", VType.INT32, -(2**31)),
    ("test.float32", VType.FLOAT32, -2.25),
    ("test.uint64", VType.UINT64, 2**64 - 1),
    ("test.int64", VType.INT64, -(2**63)),
    ("test.float64", VType.FLOAT64, 0.1),
    ("test.bool_true", VType.BOOL, True),
    ("test.bool_false", VType.BOOL, False),
    ("test.string", VType.STRING, "héllo ✓ 🦙\n\ttabs"),
    ("test.empty_string", VType.STRING, ""),
]

ARRAYS: list[tuple[str, VType, list[Any]]] = [
    ("test.strings", VType.STRING, ["a", "", "Ġthe", "é ✓", "\x00nul", "🦙" * 40]),
    ("test.uint8s", VType.UINT8, [0, 1, 255]),
    ("test.int8s", VType.INT8, [-128, 0, 127]),
    ("test.uint16s", VType.UINT16, [0, 65535]),
    ("test.int16s", VType.INT16, [-32768, 7]),
    ("test.uint32s", VType.UINT32, [2**32 - 1, 3]),
    ("test.int32s", VType.INT32, list(range(-50, 50))),
    ("test.float32s", VType.FLOAT32, [0.5, -2.25, 3.0, 2.0**-20]),
    ("test.uint64s", VType.UINT64, [2**64 - 1, 0]),
    ("test.int64s", VType.INT64, [-(2**63), 2**63 - 1]),
    ("test.float64s", VType.FLOAT64, [0.1, -1e300]),
    ("test.bools", VType.BOOL, [True, False, True]),
]

# GGUFReader (and so ours) flattens arrays of arrays to their leaf values.
NESTED: list[tuple[str, list[Any], list[Any]]] = [
    ("test.nested_ints", [[1, 2], [3], [4, 5, 6]], [1, 2, 3, 4, 5, 6]),
    ("test.nested_strings", [["a", "b"], ["ç"]], ["a", "b", "ç"]),
]


def _tensors() -> dict[str, tuple[np.ndarray[Any, Any], QType]]:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    return {
        "f32.weight": (np.arange(24, dtype=np.float32).reshape(2, 3, 4), QType.F32),
        "f32.bias": (rng.standard_normal(7).astype(np.float32), QType.F32),
        "f16.weight": (rng.standard_normal((3, 8)).astype(np.float16), QType.F16),
        "i32.ids": (np.arange(-3, 5, dtype=np.int32), QType.I32),
        "q8_0.weight": (quantize(weights, QType.Q8_0), QType.Q8_0),
    }


def _write_small_gguf(path: Path, alignment: int | None) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        writer.add_key_value(key, value, vtype)
    for key, vtype, values in ARRAYS:
        writer.add_key_value(key, values, VType.ARRAY, sub_type=vtype)
    for key, nested, _ in NESTED:
        writer.add_key_value(key, nested, VType.ARRAY)
    for name, (array, qtype) in _tensors().items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def small_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "small.gguf"
    _write_small_gguf(path, alignment=64)
    return path


@pytest.mark.parametrize("alignment", [None, 8, 64, 4096])
def test_small_file_reads_like_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    path = tmp_path / "small.gguf"
    _write_small_gguf(path, alignment)
    ours = GGUFFile(path)
    assert_same_as_gguf_reader(ours, gguf.GGUFReader(path))
    assert ours.alignment == (alignment or 32)
    assert ours.data_offset % ours.alignment == 0
    assert all(t.data_offset % ours.alignment == 0 for t in ours.tensors)


def test_small_file_holds_what_was_written(small_gguf: Path) -> None:
    """Checked against the written values too, not only against GGUFReader."""
    ours = GGUFFile(small_gguf)
    assert ours.version == 3
    assert ours.fields["GGUF.version"].contents() == 3
    assert ours.fields["general.architecture"].contents() == "llama"
    assert ours.fields["general.alignment"].contents() == 64
    for key, vtype, value in SCALARS:
        field = ours.fields[key]
        assert field.types == (vtype,), key
        assert field.contents() == value and type(field.contents()) is type(value), key
    for key, vtype, values in ARRAYS:
        field = ours.fields[key]
        assert field.types == (VType.ARRAY, vtype), key
        assert field.contents() == values, key
        assert [type(v) for v in field.contents()] == [type(v) for v in values], key
    for key, _, flat in NESTED:
        assert ours.fields[key].contents() == flat, key

    tensors = {t.name: t for t in ours.tensors}
    assert list(tensors) == list(_tensors())
    for name, (array, qtype) in _tensors().items():
        tensor = tensors[name]
        assert tensor.tensor_type is qtype, name
        assert tensor.data.dtype == array.dtype and np.array_equal(tensor.data, array), name
    assert tensors["f32.weight"].shape.tolist() == [4, 3, 2]  # innermost first, as in GGUF
    q8 = tensors["q8_0.weight"]
    assert q8.shape.tolist() == [64, 4] and q8.n_elements == 256
    assert q8.data.shape == (4, 2 * 34) and q8.n_bytes == 4 * 2 * 34
    assert dequantize(q8.data, QType.Q8_0).shape == (4, 64)


def test_version_2_files_read_like_version_3(small_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout
    path = tmp_path / "v2.gguf"
    path.write_bytes(bytes(data))
    ours = GGUFFile(path)
    assert ours.version == 2
    assert_same_as_gguf_reader(ours, gguf.GGUFReader(path))


# --- hand-built files ----------------------------------------------------------------------------


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _array(item_type: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, count) + items


def _tensor_info(name: str | bytes, dims: list[int], qtype: int, offset: int) -> bytes:
    return (
        _str(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", qtype, offset)
    )


def _gguf(
    kvs: list[bytes],
    tensor_infos: Sequence[bytes] = (),
    data: bytes = b"",
    version: int = 3,
) -> bytes:
    header = struct.pack("<IIQQ", gguf.GGUF_MAGIC, version, len(tensor_infos), len(kvs))
    header += b"".join(kvs) + b"".join(tensor_infos)
    return header + b"\0" * (-len(header) % 32) + data


def _write(tmp_path: Path, data: bytes, name: str = "hand.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_empty_arrays_read_like_gguf_reader(tmp_path: Path) -> None:
    """GGUFWriter refuses to write empty arrays; llama.cpp's own writer does not."""
    path = _write(
        tmp_path,
        _gguf(
            [
                _kv("empty.ints", VType.ARRAY, _array(VType.INT32, 0)),
                _kv("empty.strings", VType.ARRAY, _array(VType.STRING, 0)),
                _kv("empty.nested", VType.ARRAY, _array(VType.ARRAY, 1, _array(VType.INT8, 0))),
            ]
        ),
    )
    ours = GGUFFile(path)
    assert_same_as_gguf_reader(ours, gguf.GGUFReader(path))
    assert ours.fields["empty.strings"].contents() == []
    assert ours.tensors == []


def test_a_file_without_tensors_or_metadata(tmp_path: Path) -> None:
    ours = GGUFFile(_write(tmp_path, _gguf([])))
    assert list(ours.fields) == ["GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"]
    assert ours.tensors == []


ONE_TENSOR = _tensor_info("t", [4], QType.F32, 0)

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "too short"),
    ("garbage", b"definitely not gguf" * 10, "bad magic"),
    ("bad magic", b"GGUG" + _gguf([])[4:], "bad magic"),
    ("version 1", _gguf([], version=1), "unsupported GGUF version 1"),
    ("version 4", _gguf([], version=4), "unsupported GGUF version 4"),
    ("big-endian", _gguf([], version=3 << 24), "big-endian"),
    (
        "absurd kv count",
        struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, 0, 2**62) + b"\0" * 64,
        "cannot fit",
    ),
    (
        "absurd tensor count",
        struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, 2**40, 0) + b"\0" * 64,
        "cannot fit",
    ),
    ("unknown value type", _gguf([_kv("k", 13, b"\0" * 8)]), "13"),
    ("unknown array item type", _gguf([_kv("k", VType.ARRAY, _array(99, 1))]), "99"),
    (
        "absurd array length",
        _gguf([_kv("k", VType.ARRAY, _array(VType.UINT32, 2**61, b"\0" * 8))]),
        "cannot fit",
    ),
    (
        "absurd string length",
        _gguf([_kv("k", VType.STRING, struct.pack("<Q", 2**63) + b"abc")]),
        "truncated",
    ),
    (
        "string array running off the end",
        _gguf([_kv("k", VType.ARRAY, _array(VType.STRING, 2, _str("a") + _str("b" * 99)))])[:-40],
        "truncated",
    ),
    ("non-UTF-8 key", _gguf([_kv(b"\xff\xfe", VType.UINT8, b"\0")]), "UTF-8"),
    ("non-UTF-8 value", _gguf([_kv("k", VType.STRING, _str(b"ok\xc3"))]), "UTF-8"),
    (
        "non-UTF-8 array string",
        _gguf([_kv("k", VType.ARRAY, _array(VType.STRING, 2, _str("ok") + _str(b"\x80")))]),
        "UTF-8",
    ),
    (
        "duplicate key",
        _gguf([_kv("k", VType.UINT8, b"\1"), _kv("k", VType.UINT8, b"\2")]),
        "duplicate metadata key 'k'",
    ),
    (
        "key clashing with a GGUF.* field",
        _gguf([_kv("GGUF.version", VType.UINT32, b"\3\0\0\0")]),
        "duplicate",
    ),
    (
        "arrays nested too deep",
        _gguf([_kv("k", VType.ARRAY, _array(VType.ARRAY, 1) * 40 + _array(VType.UINT8, 0))]),
        "nested",
    ),
    (
        "alignment not a power of two",
        _gguf([_kv("general.alignment", VType.UINT32, struct.pack("<I", 48))]),
        "power of two",
    ),
    (
        "alignment zero",
        _gguf([_kv("general.alignment", VType.UINT32, struct.pack("<I", 0))]),
        "power of two",
    ),
    (
        "alignment of the wrong type",
        _gguf([_kv("general.alignment", VType.UINT64, struct.pack("<Q", 64))]),
        "UINT32",
    ),
    ("tensor data past the end", _gguf([], [ONE_TENSOR], b"\0" * 8), "past the end"),
    (
        "tensor offset past the end",
        _gguf([], [_tensor_info("t", [4], QType.F32, 2**40)], b"\0" * 16),
        "past the end",
    ),
    ("duplicate tensor", _gguf([], [ONE_TENSOR, ONE_TENSOR], b"\0" * 16), "duplicate tensor"),
    ("unknown tensor type", _gguf([], [_tensor_info("t", [4], 4, 0)], b"\0" * 16), "GGML type"),
    (
        "quantized row not whole blocks",
        _gguf([], [_tensor_info("t", [16, 2], QType.Q8_0, 0)], b"\0" * 64),
        "block size",
    ),
    (
        "quantized scalar",
        _gguf([], [_tensor_info("t", [], QType.Q8_0, 0)], b"\0" * 64),
        "no dimensions",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"),
    [pytest.param(data, message, id=name) for name, data, message in MALFORMED],
)
def test_malformed_files_raise_value_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message):
        GGUFFile(path)
    with pytest.raises(
        ModelLoadError, match=rf"{path.name}: not a readable GGUF file: .*{message}"
    ):
        open_gguf(path)


def test_big_endian_files_from_gguf_writer_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_uint32("test.value", 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="big-endian"):
        GGUFFile(path)


def test_every_truncation_raises_value_error(small_gguf: Path, tmp_path: Path) -> None:
    """Cut anywhere before the end of the last tensor's data, a file fails to open, with a
    ValueError (never an IndexError, struct.error or a short tensor)."""
    data = small_gguf.read_bytes()
    reader = GGUFFile(small_gguf)
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    # Every byte of the header (each cut lands in a different place of its structure), and
    # every few bytes of the tensor data.
    cuts = [*range(reader.data_offset), *range(reader.data_offset, end, 5), end - 1]
    assert len(cuts) > 1000
    for cut in cuts:
        path = _write(tmp_path, data[:cut], f"cut{cut}.gguf")
        with pytest.raises(ValueError):
            GGUFFile(path)
        path.unlink()


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_after_a_valid_preamble_raise_value_error(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    preamble = struct.pack("<II", gguf.GGUF_MAGIC, 3)
    path = _write(tmp_path, preamble + rng.bytes(int(rng.integers(0, 4096))))
    with pytest.raises(ValueError):
        GGUFFile(path)


def test_garbage_through_open_gguf_is_a_model_load_error(tmp_path: Path) -> None:
    path = _write(tmp_path, b"\x00" * 3, "tiny.gguf")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        open_gguf(path)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        open_gguf(tmp_path / "missing.gguf")
