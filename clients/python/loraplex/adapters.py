"""`client.adapters`: upload, list, get, delete, load and unload adapters on a server (admin token)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

from .errors import error_from

CHUNK_BYTES = 1 << 20
MAX_PAGE_SIZE = 1000  # ListRequest.page_size
RESIDENCY = {pb.RESIDENCY_DEVICE: "device", pb.RESIDENCY_HOST: "host", pb.RESIDENCY_DISK: "disk"}
Progress = Callable[[int, int], None]  # (bytes sent, total bytes)


@dataclass
class AdapterInfo:
    name: str
    version: int
    task: str
    labels: list[str]
    rank: int
    target_modules: list[str]
    size_bytes: int
    created: str
    base_fingerprint: str
    residency: str  # "device", "host" or "disk"
    pinned: bool
    manifest: dict = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"


def _info(m: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(m.name, m.version, m.task, list(m.labels), m.rank, list(m.target_modules), m.size_bytes,
                       m.created, m.base_fingerprint, RESIDENCY.get(m.residency, "unknown"), m.pinned,
                       json.loads(m.manifest_json) if m.manifest_json else {})


def pack(path: Path, into: Path) -> Path:
    """A PEFT folder -> a .tar.gz of it in `into`; an archive is sent as it is."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such adapter folder or archive")
    archive = into / f"{path.name or 'adapter'}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(path.iterdir()):
            tar.add(entry, arcname=f"adapter/{entry.name}", recursive=False)
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _messages(archive: Path, metadata: pb.UploadMetadata, progress: Progress | None) -> Iterator[pb.UploadRequest]:
    yield pb.UploadRequest(metadata=metadata)
    sent = 0
    with archive.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            yield pb.UploadRequest(chunk=block)
            sent += len(block)
            if progress is not None:
                progress(sent, metadata.size_bytes)


def _upload_metadata(archive: Path, name: str, labels: list[str] | None, metrics: dict | None,
                     base_fingerprint: str) -> pb.UploadMetadata:
    return pb.UploadMetadata(name=name, labels=labels or [], size_bytes=archive.stat().st_size,
                             sha256=_sha256(archive), metrics_json=json.dumps(metrics or {}),
                             base_fingerprint=base_fingerprint)


def _upload_timeout(timeout: float, metadata: pb.UploadMetadata) -> float:
    # The deadline grows with the size: at least 1 MB/s on top of the usual timeout.
    return timeout + metadata.size_bytes / 1e6


def _list_request(page_size: int, page_token: str) -> pb.ListRequest:
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}, or 0 for the server's default")
    return pb.ListRequest(page_size=page_size, page_token=page_token)


def _next_token(response: pb.ListResponse, seen: set[str]) -> str:
    """The next page's token; empty at the end. A token seen before would loop forever: stop with an error."""
    token = response.next_page_token
    if token and token in seen:
        raise RuntimeError("the server returned the same page token twice; the listing is incomplete")
    seen.add(token)
    return token


class Adapters:
    """Adapter management through a Client's channel; every method raises the client's typed errors."""

    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]], timeout: float, call) -> None:
        self._stub = pb_grpc.AdapterServiceStub(channel)
        self._metadata, self._timeout, self._call = metadata, timeout, call

    def upload(self, path: str | Path, name: str, labels: list[str] | None = None, metrics: dict | None = None,
               base_fingerprint: str = "", progress: Progress | None = None) -> AdapterInfo:
        """Upload a PEFT folder or a .tar/.tar.gz of one as the next version of `name`."""
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            archive = pack(Path(path), Path(tmp))
            metadata = _upload_metadata(archive, name, labels, metrics, base_fingerprint)
            try:
                response = self._stub.Upload(_messages(archive, metadata, progress),
                                             timeout=_upload_timeout(self._timeout, metadata),
                                             metadata=self._metadata)
            except grpc.RpcError as exc:
                raise error_from(exc) from None
        return _info(response.adapter)

    def list(self, page_size: int = 0) -> list[AdapterInfo]:
        """Every registered version, fetched `page_size` at a time (0: the server's default page)."""
        adapters, token, seen = [], "", set()
        while True:
            response = self._call(self._stub.List, _list_request(page_size, token))
            adapters.extend(_info(m) for m in response.adapters)
            token = _next_token(response, seen)
            if not token:
                return adapters

    def get(self, adapter: str) -> AdapterInfo:
        """`name` (the latest version) or `name@version`."""
        return _info(self._call(self._stub.Get, pb.GetRequest(adapter=adapter)).adapter)

    def delete(self, adapter: str) -> list[int]:
        """Delete `name@version`, or every version of `name`; returns the versions deleted."""
        return list(self._call(self._stub.Delete, pb.DeleteRequest(adapter=adapter)).versions)

    def load(self, adapter: str, pin: bool = False) -> AdapterInfo:
        """Put the adapter into a device slot now; a pinned one is never evicted."""
        return _info(self._call(self._stub.Load, pb.LoadRequest(adapter=adapter, pin=pin)).adapter)

    def unload(self, adapter: str) -> AdapterInfo:
        return _info(self._call(self._stub.Unload, pb.UnloadRequest(adapter=adapter)).adapter)


class AsyncAdapters:
    """The asyncio twin of Adapters (an AsyncClient's `.adapters`): the same methods, awaited."""

    def __init__(self, channel: grpc.aio.Channel, metadata: list[tuple[str, str]], timeout: float, call) -> None:
        self._stub = pb_grpc.AdapterServiceStub(channel)
        self._metadata, self._timeout, self._call = metadata, timeout, call

    async def upload(self, path: str | Path, name: str, labels: list[str] | None = None,
                     metrics: dict | None = None, base_fingerprint: str = "",
                     progress: Progress | None = None) -> AdapterInfo:
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            # Packing and hashing read the whole adapter: off the event loop.
            archive = await asyncio.to_thread(pack, Path(path), Path(tmp))
            metadata = await asyncio.to_thread(_upload_metadata, archive, name, labels, metrics, base_fingerprint)
            try:
                response = await self._stub.Upload(_messages(archive, metadata, progress),
                                                   timeout=_upload_timeout(self._timeout, metadata),
                                                   metadata=self._metadata)
            except grpc.RpcError as exc:
                raise error_from(exc) from None
        return _info(response.adapter)

    async def list(self, page_size: int = 0) -> list[AdapterInfo]:
        adapters, token, seen = [], "", set()
        while True:
            response = await self._call(self._stub.List, _list_request(page_size, token))
            adapters.extend(_info(m) for m in response.adapters)
            token = _next_token(response, seen)
            if not token:
                return adapters

    async def get(self, adapter: str) -> AdapterInfo:
        return _info((await self._call(self._stub.Get, pb.GetRequest(adapter=adapter))).adapter)

    async def delete(self, adapter: str) -> list[int]:
        return list((await self._call(self._stub.Delete, pb.DeleteRequest(adapter=adapter))).versions)

    async def load(self, adapter: str, pin: bool = False) -> AdapterInfo:
        return _info((await self._call(self._stub.Load, pb.LoadRequest(adapter=adapter, pin=pin))).adapter)

    async def unload(self, adapter: str) -> AdapterInfo:
        return _info((await self._call(self._stub.Unload, pb.UnloadRequest(adapter=adapter))).adapter)


class ProgressBar:
    """A one-line text progress bar on a stream (the CLI's upload)."""

    def __init__(self, label: str, stream, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        filled = self.width * done // max(total, 1)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{100 * done // max(total, 1):3d}% {done / 1e6:.1f}/{total / 1e6:.1f} MB")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
