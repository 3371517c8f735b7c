"""Builders of hostile adapter uploads: raw safetensors files, tar.gz archives, and a real server's
Upload and List called through the raw stubs (no SDK checks in the way)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import struct
import tarfile
from pathlib import Path

import grpc

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I32": 4, "BOOL": 1}
CHUNK = 1 << 20


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes | None]]) -> bytes:
    """A safetensors file written by hand: {key: (dtype, shape, data)}; data None = zeros of the shape."""
    header, blobs, offset = {}, [], 0
    for key, (dtype, shape, data) in tensors.items():
        if data is None:
            data = bytes(math.prod(shape) * ITEM_BYTES[dtype])
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def tar_gz(files: dict[str, bytes], extra=None) -> bytes:
    """files {name inside adapter/: bytes}; extra(tar) adds hand-made members."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for name, content in files.items():
            add_member(tar, f"adapter/{name}", content)
        if extra:
            extra(tar)
    return data.getvalue()


def add_member(tar: tarfile.TarFile, name: str, content: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(content) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(content) if info.size else None)


class _Chain(io.RawIOBase):
    """Reads `head`, then `zeros` zero bytes, then `tail`: a huge file without holding it."""

    def __init__(self, head: bytes, zeros: int, tail: bytes) -> None:
        self.segments = [head, zeros, tail]  # bytes, or a count of zero bytes

    def readinto(self, buffer) -> int:
        while self.segments and not self.segments[0]:
            self.segments.pop(0)
        if not self.segments:
            return 0
        segment = self.segments[0]
        n = min(len(buffer), segment if isinstance(segment, int) else len(segment))
        buffer[:n] = bytes(n) if isinstance(segment, int) else segment[:n]
        self.segments[0] = segment - n if isinstance(segment, int) else segment[n:]
        return n

    def readable(self) -> bool:
        return True


def zero_tensor_archive(config: bytes, big_key: str, big_shape: list[int], small: dict) -> bytes:
    """A tar.gz whose safetensors file holds a zero-filled F32 tensor of big_shape (hundreds of MB
    unpacked) plus `small` tensors, compressed as it streams: neither side of the test holds it."""
    small_file = safetensors_bytes(small)
    small_header_len = struct.unpack("<Q", small_file[:8])[0]
    small_header = json.loads(small_file[8:8 + small_header_len])
    big_bytes = math.prod(big_shape) * 4
    header = {big_key: {"dtype": "F32", "shape": big_shape, "data_offsets": [0, big_bytes]}}
    for key, entry in small_header.items():
        begin, end = entry["data_offsets"]
        header[key] = {**entry, "data_offsets": [big_bytes + begin, big_bytes + end]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    head, tail = struct.pack("<Q", len(raw)) + raw, small_file[8 + small_header_len:]
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "adapter/adapter_config.json", config)
        info = tarfile.TarInfo("adapter/adapter_model.safetensors")
        info.size = len(head) + big_bytes + len(tail)
        tar.addfile(info, io.BufferedReader(_Chain(head, big_bytes, tail), CHUNK))
    return out.getvalue()


def upload_raw(channel: grpc.Channel, payload: bytes, timeout: float = 60, **fields):
    meta = dict(name="hostile", size_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    meta.update(fields)
    messages = [pb.UploadRequest(metadata=pb.UploadMetadata(**meta))]
    messages += [pb.UploadRequest(chunk=payload[i:i + CHUNK]) for i in range(0, len(payload), CHUNK)]
    return pb_grpc.AdapterServiceStub(channel).Upload(iter(messages), timeout=timeout)


def list_references(channel: grpc.Channel, page_size: int = 0) -> list[str]:
    """Every version, page after page, through the raw List RPC."""
    stub, token, references = pb_grpc.AdapterServiceStub(channel), "", []
    for _ in range(10_000):
        response = stub.List(pb.ListRequest(page_size=page_size, page_token=token), timeout=30)
        references += [f"{a.name}@{a.version}" for a in response.adapters]
        token = response.next_page_token
        if not token:
            return references
    raise AssertionError("List never ended")


def staging_leftovers(store: Path) -> list[Path]:
    """Files under the store's staging folder other than the live owners' lock files."""
    return [p for p in (store / "staging").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
