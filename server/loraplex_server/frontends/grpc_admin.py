"""gRPC AdapterService: upload into the store, list, get, delete, load and unload adapters."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import grpc

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc
from loraplex_adapters.bounded_json import loads_bounded
from loraplex_adapters.manifest import Manifest, check_labels, check_name, parse_reference
from loraplex_adapters.store import AdapterStore, AdapterTooLarge
from loraplex_server.api.status import abort_for
from loraplex_server.frontends.grpc_inference import InvalidRequest, observed
from loraplex_server.runtime.adapter_manager import AdapterManager, adapter_key
from loraplex_server.runtime.engine_loop import EngineLoop

log = logging.getLogger(__name__)
RESIDENCY = {"device": pb.RESIDENCY_DEVICE, "host": pb.RESIDENCY_HOST, "disk": pb.RESIDENCY_DISK}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces
MAX_METRICS_BYTES = 64 * 1024
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
MAX_PAGE_BYTES = 1 << 20
_MAX_TOKEN_CHARS = 512


class AdapterAdminService(pb_grpc.AdapterServiceServicer):
    def __init__(self, metrics, max_upload_bytes: int) -> None:
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes
        self.cache: AdapterManager | None = None  # set once the base model is loaded
        self.scheduler: EngineLoop | None = None

    def attach(self, cache: AdapterManager, scheduler: EngineLoop) -> None:
        self.cache, self.scheduler = cache, scheduler

    @property
    def store(self) -> AdapterStore:
        return self.cache.store

    async def _ready(self, context) -> None:
        if self.cache is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the base model is still loading; retry shortly")

    def _info(self, manifest: Manifest) -> pb.AdapterInfo:
        extra, key = manifest.extra, adapter_key(manifest.name, manifest.version)
        return pb.AdapterInfo(
            name=manifest.name, version=manifest.version, task=extra.get("task", ""), labels=manifest.labels,
            rank=extra.get("rank", 0), target_modules=extra.get("target_modules", []),
            size_bytes=extra.get("size", 0), created=extra.get("created", ""),
            base_fingerprint=extra.get("base_fingerprint") or "", residency=RESIDENCY[self.cache.residency(key)],
            pinned=self.cache.is_pinned(key), manifest_json=json.dumps(manifest.to_dict(), sort_keys=True))

    # -- upload ---------------------------------------------------------------------------------

    def _check_metadata(self, message: pb.UploadRequest) -> tuple[pb.UploadMetadata, dict]:
        if not message.HasField("metadata"):
            raise InvalidRequest("the first upload message must carry the metadata, then the archive's chunks")
        meta = message.metadata
        check_name(meta.name)
        if meta.size_bytes <= 0:
            raise InvalidRequest("size_bytes must be the archive's size, > 0")
        if meta.size_bytes > self.max_upload_bytes:
            raise AdapterTooLarge(f"upload of {meta.size_bytes} bytes is over the server's limit of "
                                  f"{self.max_upload_bytes} bytes")
        if not _SHA256.fullmatch(meta.sha256):
            raise InvalidRequest("sha256 must be the archive's hex sha256 (64 lowercase hex digits)")
        check_labels(list(meta.labels))
        if meta.base_fingerprint and not _FINGERPRINT.fullmatch(meta.base_fingerprint):
            raise InvalidRequest("base_fingerprint must be 1-256 printable ASCII characters without spaces")
        return meta, _metrics(meta.metrics_json)

    async def _receive(self, requests, meta: pb.UploadMetadata, path: Path) -> None:
        """Write the chunks to `path`, checking the size as they come and the checksum at the end."""
        digest, received = hashlib.sha256(), 0
        with path.open("wb") as f:
            async for message in requests:
                if not message.HasField("chunk"):
                    raise InvalidRequest("metadata may only come once, in the first message")
                received += len(message.chunk)
                if received > meta.size_bytes:
                    raise InvalidRequest(f"received more than the declared {meta.size_bytes} bytes")
                digest.update(message.chunk)
                f.write(message.chunk)
        if received != meta.size_bytes:
            raise InvalidRequest(f"upload ended after {received} of the declared {meta.size_bytes} bytes")
        if digest.hexdigest() != meta.sha256:
            raise InvalidRequest(f"checksum mismatch: the archive's sha256 is {digest.hexdigest()}, the metadata "
                                 f"says {meta.sha256}")

    @observed
    async def Upload(self, requests, context) -> pb.UploadResponse:
        await self._ready(context)
        path = None
        try:
            first = await anext(aiter(requests), None)
            if first is None:
                raise InvalidRequest("empty upload: send the metadata, then the archive's chunks")
            meta, metrics = self._check_metadata(first)  # bounded before a byte of the archive is read
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=self.store.staging)
            os.close(fd)
            path = Path(name)
            await self._receive(requests, meta, path)
            manifest = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.store.publish(path, meta.name, labels=list(meta.labels),
                                                 base_fingerprint=meta.base_fingerprint or None, metrics=metrics))
        except Exception as exc:
            await abort_for(context, exc)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
        log.info("published %s@%d (%s, rank %s, %s bytes)", manifest.name, manifest.version,
                 manifest.extra.get("task"), manifest.extra.get("rank"), manifest.extra.get("size"))
        return pb.UploadResponse(adapter=self._info(manifest))

    # -- the rest -------------------------------------------------------------------------------

    @observed
    async def List(self, request: pb.ListRequest, context) -> pb.ListResponse:
        """One page, in (name, version) order: page_size entries, fewer when the next one would take the
        response past 1 MiB (always at least one)."""
        await self._ready(context)
        try:
            size = request.page_size or DEFAULT_PAGE_SIZE
            if not 1 <= size <= MAX_PAGE_SIZE:
                raise InvalidRequest(f"page_size must be 0 (meaning {DEFAULT_PAGE_SIZE}) or 1-{MAX_PAGE_SIZE}, "
                                     f"got {request.page_size}")
            after = decode_page_token(request.page_token)
            manifests = sorted(self.store.list(), key=lambda m: (m.name, m.version))
            if after is not None:
                manifests = [m for m in manifests if (m.name, m.version) > after]
            page, used = [], 0
            for manifest in manifests[:size]:
                info = self._info(manifest)
                cost = info.ByteSize() + 6  # the field's tag and length prefix
                if page and used + cost > MAX_PAGE_BYTES - 1024:  # room left for the token
                    break
                page.append(info)
                used += cost
            more = len(page) < len(manifests)
            token = encode_page_token(page[-1].name, page[-1].version) if more else ""
        except Exception as exc:
            await abort_for(context, exc)
        return pb.ListResponse(adapters=page, next_page_token=token)

    @observed
    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        await self._ready(context)
        try:
            manifest, _ = self.store.resolve(*parse_reference(request.adapter))
        except Exception as exc:
            await abort_for(context, exc)
        return pb.GetResponse(adapter=self._info(manifest))

    @observed
    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        await self._ready(context)
        try:
            name, version = parse_reference(request.adapter)
            versions = await asyncio.get_running_loop().run_in_executor(None, self.store.delete, name, version)
            await self.scheduler.call(lambda: [self.cache.forget(adapter_key(name, v)) for v in versions])
        except Exception as exc:
            await abort_for(context, exc)
        log.info("deleted %s version(s) %s", name, ", ".join(map(str, versions)))
        return pb.DeleteResponse(versions=versions)

    @observed
    async def Load(self, request: pb.LoadRequest, context) -> pb.LoadResponse:
        await self._ready(context)
        try:
            key, manifest = self.cache.resolve(request.adapter)
            await self.scheduler.warm(key, request.pin)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.LoadResponse(adapter=self._info(manifest))

    @observed
    async def Unload(self, request: pb.UnloadRequest, context) -> pb.UnloadResponse:
        await self._ready(context)
        try:
            key, manifest = self.cache.resolve(request.adapter)
            await self.scheduler.call(lambda: self.cache.unload(key))
        except Exception as exc:
            await abort_for(context, exc)
        return pb.UnloadResponse(adapter=self._info(manifest))


def _metrics(metrics_json: str) -> dict:
    if len(metrics_json.encode("utf-8", "surrogatepass")) > MAX_METRICS_BYTES:
        raise InvalidRequest(f"metrics_json is over {MAX_METRICS_BYTES} bytes")
    metrics = loads_bounded(metrics_json, "metrics_json") if metrics_json else {}
    if not isinstance(metrics, dict):
        raise InvalidRequest("metrics_json must be a JSON object")
    return metrics


def encode_page_token(name: str, version: int) -> str:
    """Opaque to clients: where the previous page ended."""
    return base64.urlsafe_b64encode(f"{name}@{version}".encode()).decode("ascii")


def decode_page_token(token: str) -> tuple[str, int] | None:
    if not token:
        return None
    malformed = InvalidRequest("malformed page_token: pass the next_page_token of the previous page unchanged")
    if len(token) > _MAX_TOKEN_CHARS:
        raise malformed
    try:
        name, version = parse_reference(base64.b64decode(token, altchars=b"-_", validate=True).decode("utf-8"))
    except (binascii.Error, ValueError):  # ValueError: UnicodeDecodeError, AdapterFormatError
        raise malformed from None
    if version is None:
        raise malformed
    return name, version
