"""Tensor bytes of the Open Inference Protocol: BYTES elements in and out, FP32 out.

Raw contents are the elements flattened in row-major order, little-endian; each BYTES element is
prefixed with its length as a 4-byte little-endian integer (what tritonclient sends and reads).
Every length is checked against the buffer before it is used. No protobuf types here: the servicer
(oip_service.py) hands in plain values.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from loraplex_server.api.errors import InvalidRequest

_LENGTH = struct.Struct("<I")


def texts_of_shape(shape: Sequence[int], what: str, max_count: int) -> int:
    """The element count of a BYTES input that must be one-dimensional, [N] with 1 <= N <= max_count."""
    if len(shape) != 1:
        raise InvalidRequest(f"input {what} must have shape [N] (one dimension), got {list(shape)}")
    count = shape[0]
    if not 1 <= count <= max_count:
        raise InvalidRequest(f"input {what} has shape [{count}]; it takes 1 to {max_count} elements")
    return count


def split_bytes(raw: bytes, count: int, what: str) -> list[bytes]:
    """The `count` length-prefixed elements of raw BYTES contents, which they must fill exactly."""
    elements, offset = [], 0
    for i in range(count):
        if offset + _LENGTH.size > len(raw):
            raise InvalidRequest(f"raw contents of input {what} end before element {i} of {count}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if length > len(raw) - offset:
            raise InvalidRequest(f"raw contents of input {what}: element {i} claims {length} bytes, "
                                 f"only {len(raw) - offset} follow")
        elements.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidRequest(f"raw contents of input {what} hold {len(raw) - offset} bytes past its "
                             f"{count} elements; the shape and the contents must agree")
    return elements


def decode_texts(elements: Sequence[bytes], what: str) -> list[str]:
    texts = []
    for i, element in enumerate(elements):
        try:
            texts.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {what}, element {i}, is not UTF-8 text") from None
    return texts


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def pack_fp32(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def top_classes(rows: Sequence[Sequence[float]], labels: Sequence[str], count: int) -> list[bytes]:
    """Triton's classification output: per row, the `count` best classes as "probability:index:label",
    best first (row-major, so the tensor is [rows, count])."""
    elements = []
    for row in rows:
        best = sorted(range(len(row)), key=lambda i: -row[i])[:count]
        elements += [f"{row[i]:f}:{i}:{labels[i]}".encode() for i in best]
    return elements
