"""A fast, memory-mapped reader for GGUF files (format versions 2 and 3, little-endian).

Why not ``gguf.GGUFReader``: it parses every metadata value, down to each element of an array,
into its own numpy view of the memory map. A Llama-family tokenizer stores its vocabulary, token
types and BPE merges as three arrays of ~50k elements each, so opening the default model's file
(a 49152-token vocabulary) costs ~6.5 s of pure Python overhead, which dominated worker start-up.

This module reads the same file in one pass over the header bytes: scalars with ``struct``,
strings and string arrays by slicing a ``memoryview`` of the map (one ``str`` per element, no numpy
objects), and fixed-size numeric arrays with a single ``numpy.frombuffer`` each. It exposes just
the surface the engine uses from ``GGUFReader``:

* ``GGUFFile.fields``: metadata key -> ``GGUFField``, whose ``contents()`` returns exactly what
  ``ReaderField.contents()`` returns (the synthetic ``GGUF.version``, ``GGUF.tensor_count`` and
  ``GGUF.kv_count`` fields included, arrays of arrays flattened to their leaf values);
* ``GGUFFile.tensors``: ``GGUFTensor`` objects whose ``name``, ``tensor_type``, ``shape``,
  ``n_elements``, ``n_bytes``, ``data_offset`` and ``data`` equal ``ReaderTensor``'s, ``data``
  being a read-only view of the memory map in the dtype and shape ``gguf.quants.dequantize``
  expects (elements for float/int types, ``uint8`` bytes per row for quantized ones).

Malformed or truncated files raise ``ValueError`` naming the problem and its byte offset; files
written for big-endian hosts are rejected.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)
from gguf.quants import quant_shape_to_byte_shape

__all__ = ["SUPPORTED_VERSIONS", "GGUFField", "GGUFFile", "GGUFTensor"]

SUPPORTED_VERSIONS: Final = (2, 3)

ALIGNMENT_KEY: Final = "general.alignment"

# Deeper nesting of arrays than this is treated as a malformed file (real files nest none).
_MAX_ARRAY_DEPTH: Final = 16

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

# Fixed-size scalar types: (struct format, little-endian numpy dtype). Sizes follow the format.
_SCALARS: Final[dict[GGUFValueType, tuple[struct.Struct, np.dtype[Any]]]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
    GGUFValueType.BOOL: (struct.Struct("<B"), np.dtype(np.bool_)),
}

# Tensor types stored element-wise; every other type is viewed as uint8 bytes per row.
_ELEMENT_DTYPES: Final[dict[GGMLQuantizationType, np.dtype[Any]]] = {
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


@dataclass(frozen=True, slots=True)
class GGUFField:
    """One metadata key/value.

    ``types`` lists the value's type the way ``ReaderField.types`` does: ``(STRING,)`` or
    ``(UINT32,)`` for a scalar; ``(ARRAY, item type)`` for a non-empty array, ``(ARRAY,)`` for an
    empty one, and for an array of arrays the types of its first element appended. ``value`` holds
    the parsed value; arrays are kept as a tuple of their (flattened) leaf values.
    """

    name: str
    offset: int  # of the key/value pair in the file
    types: tuple[GGUFValueType, ...]
    value: Any

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        """The value as plain Python, as ``ReaderField.contents`` gives it: a str, int, float or
        bool for a scalar, a fresh list for an array (arrays of arrays flattened), or the element
        (or list of elements) ``index_or_slice`` selects from an array. Scalars ignore it."""
        if not (self.types and self.types[0] == GGUFValueType.ARRAY):
            return self.value
        if isinstance(index_or_slice, int):
            return self.value[index_or_slice]
        return list(self.value[index_or_slice])


@dataclass(frozen=True, slots=True, eq=False)
class GGUFTensor:
    """One tensor's description and its bytes, as ``gguf.ReaderTensor`` has them.

    ``shape`` lists the dimensions innermost first (GGUF order) as ``uint64``; ``data`` is a
    read-only ``numpy.memmap`` view shaped outermost first: elements for F16/F32/F64/I8..I64,
    otherwise ``uint8`` with the last dimension in bytes (``quant_shape_to_byte_shape``).
    """

    name: str
    tensor_type: GGMLQuantizationType
    shape: npt.NDArray[np.uint64]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: npt.NDArray[Any]


class GGUFFile:
    """A GGUF file, memory-mapped read-only, with its metadata parsed and its tensors mapped.

    Attributes: ``path``, ``version``, ``alignment``, ``data_offset`` (start of the tensor data),
    ``fields`` (key -> ``GGUFField``, in file order after the three synthetic ``GGUF.*`` ones),
    ``tensors`` (in file order) and ``data`` (the whole file as a ``uint8`` memory map).
    """

    path: Path
    version: int
    alignment: int
    data_offset: int
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensor]
    data: np.memmap[Any, np.dtype[np.uint8]]

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        size = os.stat(self.path).st_size
        if size < 24:  # magic, version, tensor count, kv count
            raise ValueError(f"not a GGUF file: {size} bytes is too short for a GGUF header")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        parser = _Parser(self.data.data, self.data.size)  # the mapped size, should the file change
        self._parse(parser)

    def get_field(self, key: str) -> GGUFField | None:
        """The metadata field ``key``, or None."""
        return self.fields.get(key)

    def _parse(self, p: _Parser) -> None:
        if p.u32(0, "magic") != GGUF_MAGIC:
            raise ValueError(f"not a GGUF file: bad magic {bytes(p.buf[0:4])!r}")
        version = p.u32(4, "version")
        if version & 0xFFFF == 0 and version != 0:
            raise ValueError(
                "GGUF file written for a big-endian host "
                f"(version field {version:#010x}); only little-endian files are supported"
            )
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"unsupported GGUF version {version} (supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        self.version = version
        tensor_count = p.u64(8, "tensor count")
        kv_count = p.u64(16, "metadata key/value count")
        self.fields = {
            "GGUF.version": GGUFField("GGUF.version", 4, (GGUFValueType.UINT32,), version),
            "GGUF.tensor_count": GGUFField(
                "GGUF.tensor_count", 8, (GGUFValueType.UINT64,), tensor_count
            ),
            "GGUF.kv_count": GGUFField("GGUF.kv_count", 16, (GGUFValueType.UINT64,), kv_count),
        }
        off = 24
        # Every key/value takes at least 12 bytes and every tensor info at least 24: reject
        # absurd counts before looping over them.
        p.check_count(off, kv_count, 12, "metadata key/value")
        for _ in range(kv_count):
            off = self._parse_field(p, off)
        p.check_count(off, tensor_count, 24, "tensor info")
        infos: list[tuple[str, list[int], int, int]] = []
        for _ in range(tensor_count):
            info, off = _parse_tensor_info(p, off)
            infos.append(info)

        self.alignment = GGUF_DEFAULT_ALIGNMENT
        alignment_field = self.fields.get(ALIGNMENT_KEY)
        if alignment_field is not None:
            if alignment_field.types != (GGUFValueType.UINT32,):
                types = "/".join(t.name for t in alignment_field.types)
                raise ValueError(f"{ALIGNMENT_KEY} must be a UINT32, not {types}")
            alignment = int(alignment_field.value)
            if alignment <= 0 or alignment & (alignment - 1):
                raise ValueError(f"{ALIGNMENT_KEY} {alignment} is not a power of two")
            self.alignment = alignment
        self.data_offset = off + (-off % self.alignment)
        self.tensors = self._map_tensors(infos, p.size)

    def _parse_field(self, p: _Parser, off: int) -> int:
        start = off
        key, off = p.string(off, "metadata key")
        if key in self.fields:
            raise ValueError(f"duplicate metadata key {key!r} at offset {start}")
        raw_type = p.u32(off, f"type of metadata {key!r}")
        try:
            value_type = GGUFValueType(raw_type)
            value, types, off = p.value(value_type, off + 4, 0)
        except ValueError as exc:
            raise ValueError(f"metadata {key!r} at offset {start}: {exc}") from exc
        self.fields[key] = GGUFField(key, start, types, value)
        return off

    def _map_tensors(
        self, infos: list[tuple[str, list[int], int, int]], file_size: int
    ) -> list[GGUFTensor]:
        tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, raw_type, relative_offset in infos:
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            try:
                tensor_type = GGMLQuantizationType(raw_type)
                block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name!r} has unknown GGML type {raw_type}") from None
            n_elements = math.prod(dims)
            n_bytes = n_elements * type_size // block_size
            start = self.data_offset + relative_offset
            if start + n_bytes > file_size:
                raise ValueError(
                    f"tensor {name!r} ({n_bytes} bytes at offset {start}) extends past the end "
                    f"of the file ({file_size} bytes): truncated?"
                )
            shape: tuple[int, ...] = tuple(reversed(dims))  # outermost first
            dtype = _ELEMENT_DTYPES.get(tensor_type)
            if dtype is None:
                dtype = np.dtype(np.uint8)
                if not shape:
                    raise ValueError(f"quantized tensor {name!r} has no dimensions")
                try:
                    shape = quant_shape_to_byte_shape(shape, tensor_type)
                except ValueError as exc:
                    raise ValueError(f"tensor {name!r}: {exc}") from None
            data = self.data[start : start + n_bytes].view(dtype).reshape(shape)
            tensors.append(
                GGUFTensor(
                    name=name,
                    tensor_type=tensor_type,
                    shape=np.array(dims, dtype=np.uint64),
                    n_elements=n_elements,
                    n_bytes=n_bytes,
                    data_offset=start,
                    data=data,
                )
            )
        return tensors


def _parse_tensor_info(p: _Parser, off: int) -> tuple[tuple[str, list[int], int, int], int]:
    """One tensor info record: (name, dims innermost first, GGML type, offset), next offset."""
    name, off = p.string(off, "tensor name")
    n_dims = p.u32(off, f"dimension count of tensor {name!r}")
    off += 4
    p.need(off, 8 * n_dims, f"dimensions of tensor {name!r}")
    dims = [_U64.unpack_from(p.buf, off + 8 * i)[0] for i in range(n_dims)]
    off += 8 * n_dims
    raw_type = p.u32(off, f"type of tensor {name!r}")
    relative_offset = p.u64(off + 4, f"data offset of tensor {name!r}")
    return (name, dims, raw_type, relative_offset), off + 12


class _Parser:
    """Bounds-checked little-endian reads from the file's bytes; offsets are absolute."""

    __slots__ = ("buf", "size")

    def __init__(self, buf: memoryview, size: int) -> None:
        self.buf = buf
        self.size = size

    def need(self, off: int, n: int, what: str) -> None:
        """Fail unless ``n`` bytes of ``what`` are there at ``off``."""
        if off + n > self.size:
            raise ValueError(
                f"truncated GGUF file: {what} at offset {off} needs {n} bytes, "
                f"the file has {self.size}"
            )

    def check_count(self, off: int, count: int, min_size: int, what: str) -> None:
        """Fail if ``count`` items of at least ``min_size`` bytes cannot fit after ``off``."""
        if count * min_size > self.size - off:
            raise ValueError(
                f"corrupt GGUF file: {count} {what}s at offset {off} cannot fit in a file of "
                f"{self.size} bytes"
            )

    def u32(self, off: int, what: str) -> int:
        """The uint32 at ``off``."""
        self.need(off, 4, what)
        value: int = _U32.unpack_from(self.buf, off)[0]
        return value

    def u64(self, off: int, what: str) -> int:
        """The uint64 at ``off``."""
        self.need(off, 8, what)
        value: int = _U64.unpack_from(self.buf, off)[0]
        return value

    def string(self, off: int, what: str) -> tuple[str, int]:
        """The length-prefixed UTF-8 string at ``off`` and the offset after it."""
        length = self.u64(off, f"length of {what}")
        off += 8
        self.need(off, length, what)
        try:
            return str(self.buf[off : off + length], "utf-8"), off + length
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} at offset {off} is not UTF-8: {exc}") from None

    def value(
        self, value_type: GGUFValueType, off: int, depth: int
    ) -> tuple[Any, tuple[GGUFValueType, ...], int]:
        """The value of type ``value_type`` at ``off``: (value, types, offset after it)."""
        if value_type == GGUFValueType.STRING:
            text, off = self.string(off, "string value")
            return text, (value_type,), off
        if value_type == GGUFValueType.ARRAY:
            items, types, off = self.array(off, depth)
            return tuple(items), types, off
        scalar, _ = _SCALARS[value_type]
        self.need(off, scalar.size, f"{value_type.name} value")
        if value_type == GGUFValueType.BOOL:
            return self.buf[off] != 0, (value_type,), off + 1
        return scalar.unpack_from(self.buf, off)[0], (value_type,), off + scalar.size

    def array(self, off: int, depth: int) -> tuple[list[Any], tuple[GGUFValueType, ...], int]:
        """The array at ``off`` as (leaf values, types, offset after it). Arrays of arrays are
        flattened and typed by their first element, as ``GGUFReader`` does."""
        item_type = GGUFValueType(self.u32(off, "array item type"))
        count = self.u64(off + 4, "array length")
        off += 12
        if count == 0:
            return [], (GGUFValueType.ARRAY,), off
        if item_type == GGUFValueType.STRING:
            strings, off = self.string_array(off, count)
            return strings, (GGUFValueType.ARRAY, item_type), off
        if item_type == GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise ValueError(f"arrays nested deeper than {_MAX_ARRAY_DEPTH} levels")
            self.check_count(off, count, 12, "nested array")
            leaves: list[Any] = []
            types: tuple[GGUFValueType, ...] = ()
            for index in range(count):
                items, item_types, off = self.array(off, depth + 1)
                if index == 0:
                    types = (GGUFValueType.ARRAY, *item_types)
                leaves += items
            return leaves, types, off
        scalar, dtype = _SCALARS[item_type]
        self.check_count(off, count, scalar.size, f"{item_type.name} array item")
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=off).tolist()
        return values, (GGUFValueType.ARRAY, item_type), off + count * scalar.size

    def string_array(self, off: int, count: int) -> tuple[list[str], int]:
        """``count`` consecutive length-prefixed strings at ``off`` and the offset after them:
        the hot loop of a tokenizer's vocabulary and merges, so it is kept to slicing."""
        self.check_count(off, count, 8, "array string")
        buf, size = self.buf, self.size
        unpack_length = _U64.unpack_from
        strings: list[str] = []
        append = strings.append
        for _ in range(count):
            if off + 8 > size:
                self.need(off, 8, "length of array string")
            end = off + 8 + unpack_length(buf, off)[0]
            if end > size:
                self.need(off + 8, end - off - 8, "array string")
            try:
                append(str(buf[off + 8 : end], "utf-8"))
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"array string {len(strings)} at offset {off} is not UTF-8: {exc}"
                ) from None
            off = end
        return strings, off
