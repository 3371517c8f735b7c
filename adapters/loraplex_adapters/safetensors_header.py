"""The safetensors header, read and checked before any tensor data.

A safetensors file is 8 bytes (little-endian header length), a JSON header naming each tensor's
dtype, shape and byte range, then the data. Everything an adapter's shape checks need is in the
header, so a hostile file costs its header to refuse, never its declared data size. The header is
read from an open file, so the caller reads the data that follows from the same file, hashing both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, BinaryIO

from .bounded_json import loads_bounded
from .format_errors import AdapterFormatError, brief

MAX_HEADER_BYTES = 1 << 20
# Only what the slot tables hold faithfully; float8, float64, ints and bool are refused.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # the tensor's bytes within the data section


def read_header(f: BinaryIO, size: int, name: str, digest: Any = None) -> tuple[dict[str, TensorEntry], int]:
    """Each tensor's dtype, shape and data offsets, read from the start of `f` (a file of `size` bytes),
    and the size of the data section that follows; raises AdapterFormatError for any header that does
    not describe exactly the data the file holds. `digest` (a hashlib object) is fed the bytes read."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise AdapterFormatError(f"{name}: unreadable safetensors file (shorter than its 8-byte header length)")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"{name}: safetensors header of {length} bytes, over the {MAX_HEADER_BYTES} "
                                 "byte limit")
    if length > size - 8:
        raise AdapterFormatError(f"{name}: unreadable safetensors file (the header is longer than the file)")
    raw = f.read(length)
    if len(raw) < length:
        raise AdapterFormatError(f"{name}: unreadable safetensors file (shorter than its size on disk)")
    if digest is not None:
        digest.update(prefix)
        digest.update(raw)
    header = loads_bounded(raw, f"{name} header", max_depth=3)
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{name}: unreadable safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    entries = {key: _entry(name, key, info) for key, info in header.items()}
    _check_spans(name, [entry.offsets for entry in entries.values()], size - 8 - length)
    return entries, size - 8 - length


def _entry(name: str, key: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise AdapterFormatError(f"{name}: tensor {brief(key)} has no dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in FLOAT_DTYPES:
        raise AdapterFormatError(f"tensor {brief(key)} has non-float dtype {brief(dtype)}; only float16, bfloat16 "
                                 "and float32 weights are served")
    if not (isinstance(shape, list) and all(_count(d) for d in shape)):
        raise AdapterFormatError(f"{name}: tensor {brief(key)} has a malformed shape {brief(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise AdapterFormatError(f"{name}: tensor {brief(key)} has malformed data_offsets {brief(offsets)}")
    needed = math.prod(shape) * FLOAT_DTYPES[dtype]
    if offsets[1] - offsets[0] != needed:
        raise AdapterFormatError(f"{name}: tensor {brief(key)} of shape {tuple(shape)} needs {needed} bytes, its "
                                 f"data_offsets give {offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), (offsets[0], offsets[1]))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_spans(name: str, spans: list[tuple[int, int]], data_bytes: int) -> None:
    """The tensors must tile the data section exactly: no overlap, no gap, nothing declared past the end."""
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise AdapterFormatError(f"{name}: unreadable safetensors file (tensor data overlaps or leaves gaps)")
        end = stop
    if end != data_bytes:
        raise AdapterFormatError(f"{name}: the header declares {end} bytes of tensor data, the file holds "
                                 f"{data_bytes} (truncated or padded)")
