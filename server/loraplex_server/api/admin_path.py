"""The request path of adapter management (admin token): upload into the store, list, get, delete, load and
unload. As for inference: metrics, auth and readiness first, every input bounded, store I/O off the loop."""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from loraplex_adapters.bounded_json import loads_bounded
from loraplex_adapters.manifest import check_labels, check_name, parse_reference
from loraplex_adapters.store import AdapterTooLarge
from loraplex_server.api import inputs as bounds
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.request_path import RequestPath
from loraplex_server.api.requests import AdapterView, Call, UploadInput
from loraplex_server.api.serving_runtime import ServingRuntime, adapter_key

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces
MAX_METRICS_BYTES = 64 * 1024
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
_MAX_TOKEN_CHARS = 512
# An upload's metadata and its archive's chunks, read from the wire once the caller may upload.
Receive = Callable[[], Awaitable[tuple[UploadInput | None, AsyncIterator[bytes] | None]]]


class AdminPath:
    def __init__(self, path: RequestPath, max_upload_bytes: int) -> None:
        self.path, self.max_upload_bytes = path, max_upload_bytes

    def _view(self, runtime: ServingRuntime, manifest) -> AdapterView:
        key = adapter_key(manifest.name, manifest.version)
        return AdapterView(manifest, runtime.residency(key), runtime.is_pinned(key))

    async def _run(self, call: Call, reference: str | None, work):
        return await self.path.observed(call, reference, work, admin=True)

    # -- upload ---------------------------------------------------------------------------------

    def check_upload(self, meta: UploadInput) -> dict:
        """The metadata bounded before a byte of the archive is read; returns the parsed metrics."""
        bounds.check_unicode(meta.name, "name")
        check_name(meta.name)
        if meta.size_bytes <= 0:
            raise InvalidRequest("size_bytes must be the archive's size, > 0")
        if meta.size_bytes > self.max_upload_bytes:
            raise AdapterTooLarge(f"upload of {meta.size_bytes} bytes is over the server's limit of "
                                  f"{self.max_upload_bytes} bytes")
        if not _SHA256.fullmatch(meta.sha256):
            raise InvalidRequest("sha256 must be the archive's hex sha256 (64 lowercase hex digits)")
        for i, label in enumerate(meta.labels):
            bounds.check_unicode(label, f"labels[{i}]")
        check_labels(list(meta.labels))
        if meta.base_fingerprint and not _FINGERPRINT.fullmatch(meta.base_fingerprint):
            raise InvalidRequest("base_fingerprint must be 1-256 printable ASCII characters without spaces")
        return _metrics(meta.metrics_json)

    async def upload(self, call: Call, receive: Receive) -> AdapterView:
        """Once the caller may upload, `receive()` the metadata (bounded before a byte of the archive is
        read) and the archive's chunks (size checked as they come, sha256 at the end; written and hashed
        in a store thread), and publish it as the next version of the name."""
        async def work(runtime: ServingRuntime) -> AdapterView:
            meta, chunks = await receive()
            if meta is None or chunks is None:
                raise InvalidRequest("empty upload: send the metadata, then the archive's chunks")
            metrics = self.check_upload(meta)
            fd, name = await runtime.in_store_thread(
                lambda: tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=runtime.store.staging))
            path = Path(name)
            try:
                with os.fdopen(fd, "wb") as file:
                    digest, received = hashlib.sha256(), 0
                    async for chunk in chunks:
                        received += len(chunk)
                        if received > meta.size_bytes:
                            raise InvalidRequest(f"received more than the declared {meta.size_bytes} bytes")
                        await runtime.in_store_thread(_write, file, digest, chunk)
                if received != meta.size_bytes:
                    raise InvalidRequest(f"upload ended after {received} of the declared {meta.size_bytes} bytes")
                if digest.hexdigest() != meta.sha256:
                    raise InvalidRequest(f"checksum mismatch: the archive's sha256 is {digest.hexdigest()}, the "
                                         f"metadata says {meta.sha256}")
                manifest = await runtime.in_store_thread(
                    lambda: runtime.store.publish(path, meta.name, labels=list(meta.labels),
                                                  base_fingerprint=meta.base_fingerprint or None, metrics=metrics))
            finally:
                path.unlink(missing_ok=True)
            log.info("published %s@%d (%s, rank %s, %s bytes)", manifest.name, manifest.version,
                     manifest.extra.get("task"), manifest.extra.get("rank"), manifest.extra.get("size"))
            return self._view(runtime, manifest)
        return await self._run(call, None, work)

    # -- the rest -------------------------------------------------------------------------------

    async def list(self, call: Call, page_size: int, page_token: str, cost: Callable[[AdapterView], int],
                   max_bytes: int) -> tuple[list[AdapterView], str]:
        """One page in (name, version) order: page_size entries (0 = the default), fewer when the next one
        would take the encoded page past max_bytes (`cost` is an entry's encoded size; always one)."""
        async def work(runtime: ServingRuntime):
            size = page_size or DEFAULT_PAGE_SIZE
            if not 1 <= size <= MAX_PAGE_SIZE:
                raise InvalidRequest(f"page_size must be 0 (meaning {DEFAULT_PAGE_SIZE}) or 1-{MAX_PAGE_SIZE}, "
                                     f"got {page_size}")
            after = decode_page_token(page_token)
            manifests = sorted(await runtime.in_store_thread(runtime.store.list), key=lambda m: (m.name, m.version))
            if after is not None:
                manifests = [m for m in manifests if (m.name, m.version) > after]
            page, used = [], 0
            for manifest in manifests[:size]:
                view = self._view(runtime, manifest)
                if page and used + cost(view) > max_bytes - 1024:  # room left for the token
                    break
                page.append(view)
                used += cost(view)
            more = len(page) < len(manifests)
            last = page[-1].manifest if page else None
            return page, encode_page_token(last.name, last.version) if more and last else ""
        return await self._run(call, None, work)

    async def get(self, call: Call, reference: str) -> AdapterView:
        async def work(runtime: ServingRuntime):
            return self._view(runtime, await runtime.manifest(bounds.check_unicode(reference, "adapter")))
        return await self._run(call, reference, work)

    async def delete(self, call: Call, reference: str) -> list[int]:
        async def work(runtime: ServingRuntime):
            name, version = parse_reference(bounds.check_unicode(reference, "adapter"))
            versions = await runtime.in_store_thread(runtime.store.delete, name, version)
            await runtime.forget([adapter_key(name, v) for v in versions])
            log.info("deleted %s version(s) %s", name, ", ".join(map(str, versions)))
            return versions
        return await self._run(call, reference, work)

    async def load(self, call: Call, reference: str, pin: bool) -> AdapterView:
        async def work(runtime: ServingRuntime):
            key, manifest = await self.path.adapter(runtime, reference, None)
            await runtime.warm(key, pin)
            return self._view(runtime, manifest)
        return await self._run(call, reference, work)

    async def unload(self, call: Call, reference: str) -> AdapterView:
        async def work(runtime: ServingRuntime):
            key, manifest = await self.path.adapter(runtime, reference, None)
            await runtime.unload(key)
            return self._view(runtime, manifest)
        return await self._run(call, reference, work)


def _write(file, digest, chunk: bytes) -> None:
    digest.update(chunk)
    file.write(chunk)


def _metrics(metrics_json: str) -> dict:
    if len(metrics_json.encode("utf-8", "surrogatepass")) > MAX_METRICS_BYTES:
        raise InvalidRequest(f"metrics_json is over {MAX_METRICS_BYTES} bytes")
    metrics = loads_bounded(metrics_json, "metrics_json") if metrics_json else {}
    if not isinstance(metrics, dict):
        raise InvalidRequest("metrics_json must be a JSON object")
    bounds.check_tree_unicode(metrics, "metrics_json")
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
