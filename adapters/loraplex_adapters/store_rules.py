"""What every adapter store backend applies the same way: the refusals of a publish, staging an upload
into a checked folder, and the check of a committed version against its manifest.

A backend (the folder store, the S3 store) decides only where versions live and how a number is
claimed; an adapter it accepts or refuses is the same everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .archive import AdapterTooLarge, extract_archive, file_limit
from .bounded_json import loads_bounded
from .manifest import (
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    MAX_VERSION,
    Manifest,
    check_manifest,
    check_name,
    read_manifest,
)
from .peft_folder import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterFormatError, LoraAdapter, load_peft_folder
from .regular_files import check_folder, copy_regular, sha256_of

ALLOWED_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}

__all__ = ["ALLOWED_FILES", "AdapterNotInStore", "AdapterQuarantined", "AdapterTooLarge", "BaseMismatch", "StoreRules",
           "VersionsExhausted", "check_committed", "manifest_from_bytes", "next_version"]


class AdapterNotInStore(KeyError):
    pass


class AdapterQuarantined(AdapterNotInStore):
    """The version's files are damaged (changed since publish, a link, a FIFO...): it was moved aside."""


class BaseMismatch(AdapterFormatError):
    """The adapter was trained on another base model."""


class VersionsExhausted(AdapterTooLarge):
    """The name has used its last version number: a limit of the store, like a size limit."""


def next_version(name: str, highest: int) -> int:
    """The number after `highest` (the name's highest claimed or stored); VersionsExhausted past MAX_VERSION,
    so a publish never reports a version that would be neither listed nor served."""
    if highest >= MAX_VERSION:
        raise VersionsExhausted(f"adapter {name!r} has used every version number up to {MAX_VERSION}; "
                                "publish under another name")
    return highest + 1


class StoreRules:
    """The limits and checks of a store; backends inherit them."""

    def __init__(self, base_fingerprint: str | None = None, max_rank: int = 256,
                 max_bytes: int = 512 * 1024 * 1024, allow_base_mismatch: bool = False,
                 check_fits: Callable[[LoraAdapter], None] | None = None) -> None:
        """check_fits raises AdapterFormatError when an adapter does not fit the served base (target
        modules, shapes); the server passes its slot table's check."""
        self.base_fingerprint = base_fingerprint
        self.max_rank, self.max_bytes = max_rank, max_bytes
        self.allow_base_mismatch = allow_base_mismatch
        self.check_fits = check_fits

    def base_mismatch(self, manifest: Manifest) -> str | None:
        """Why an adapter may not be served on this store's base (None when it may)."""
        trained_on = manifest.extra.get("base_fingerprint")
        if not (self.base_fingerprint and trained_on) or trained_on == self.base_fingerprint:
            return None
        if self.allow_base_mismatch:
            return None
        return (f"adapter was trained on base {trained_on}, this server runs {self.base_fingerprint} "
                "(start with --allow-base-mismatch to accept)")

    def load(self, name: str, version: int | None = None) -> tuple[Manifest, LoraAdapter]:
        """`name@version` (latest when None) read into memory: every file is hashed as it is read and
        must match the manifest's sha256, and the tensors are built from exactly the bytes hashed. A
        version whose files fail (rewritten after publish, a link, a FIFO, unparsable) is quarantined
        and AdapterQuarantined raised; AdapterNotInStore when it is not there (or deleted meanwhile)."""
        manifest, folder = self.resolve(name, version)
        try:
            check_folder(folder)
            adapter = load_peft_folder(folder, checksums=manifest.extra["sha256"], max_bytes=self.max_bytes)
        except (AdapterFormatError, FileNotFoundError) as exc:
            reference = f"{manifest.name}@{manifest.version}"
            if not os.path.lexists(folder):
                raise AdapterNotInStore(f"adapter {reference} was deleted") from None
            if isinstance(exc, FileNotFoundError):  # one of its files vanished, the folder stayed
                exc = AdapterFormatError(f"{Path(exc.filename or 'a file').name} is missing")
            raise self._damaged(manifest, folder, str(exc)) from None
        return manifest, adapter

    def _damaged(self, manifest: Manifest, folder: Path, reason: str) -> AdapterNotInStore:
        """A committed version failed its read: set it aside, and return the error to raise."""
        raise NotImplementedError

    def _quarantined(self, manifest: Manifest, reason: str) -> AdapterQuarantined:
        return AdapterQuarantined(f"adapter {manifest.name}@{manifest.version} is damaged in the store ({reason}) "
                                  "and was quarantined; publish it again")

    @contextmanager
    def _staged_upload(self, source: str | Path, name: str, labels: list[str] | None, base_fingerprint: str | None,
                       metrics: dict | None) -> Iterator[tuple[Path, Manifest]]:
        """An upload staged and validated in a fresh folder under the backend's `self.staging` (removed
        afterwards, committed or not); yields (folder, manifest) for the backend to commit."""
        check_name(name)
        work = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging))
        try:
            yield self._stage(source, work, name, labels, base_fingerprint, metrics)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _stage(self, source: str | Path, work: Path, name: str, labels: list[str] | None,
               base_fingerprint: str | None, metrics: dict | None) -> tuple[Path, Manifest]:
        """Copy a PEFT folder (or unpack a .tar/.tar.gz of one) into `work/adapter` and validate it;
        returns the folder and its manifest, complete but for the version number."""
        source = Path(source)
        if source.is_file():
            source = extract_archive(source, work / "unpacked", self.max_bytes)
        folder = work / "adapter"
        folder.mkdir()
        for path in source.iterdir():
            if path.name == MANIFEST_FILE:
                continue
            if path.is_symlink() or not path.is_file():
                raise AdapterFormatError(f"unexpected entry {path.name!r} in the adapter folder")
            copy_regular(path, folder / path.name, self.max_bytes)  # even if it became a link or FIFO since
        manifest = Manifest(name=name, labels=list(labels or []))
        manifest.extra["base_fingerprint"] = base_fingerprint or self.base_fingerprint
        if metrics:
            manifest.extra["metrics"] = metrics
        self._validate(folder, manifest)
        return folder, manifest

    def _validate(self, folder: Path, manifest: Manifest) -> None:
        check_manifest(manifest)  # the same rules read_manifest applies at index rebuild
        for path in folder.iterdir():  # regular files only: publish copied nothing else
            if path.name.endswith(PICKLE_SUFFIXES):
                raise AdapterFormatError(f"pickle file {path.name} refused; save with safetensors")
            if path.name not in ALLOWED_FILES:
                raise AdapterFormatError(f"unexpected entry {path.name!r}; a PEFT folder holds "
                                         f"{', '.join(sorted(ALLOWED_FILES))}")
            limit = file_limit(path.name, self.max_bytes)
            if limit is not None and path.stat().st_size > limit:
                raise AdapterTooLarge(f"{path.name} is {path.stat().st_size} bytes, over the {limit} byte limit")
        size = sum(p.stat().st_size for p in folder.iterdir())
        if size > self.max_bytes:
            raise AdapterTooLarge(f"adapter is {size} bytes, over the {self.max_bytes} byte limit")
        mismatch = self.base_mismatch(manifest)
        if mismatch:
            raise BaseMismatch(mismatch)
        # Ranks and shapes (check_fits on meta tensors) are checked from the safetensors header, before
        # any tensor data is read.
        adapter = load_peft_folder(folder, max_rank=self.max_rank, check_shapes=self.check_fits)
        if adapter.head is None and manifest.labels:
            raise AdapterFormatError("label names given, but the adapter has no classification head (save it "
                                     "with the task's head in modules_to_save)")
        if adapter.head is not None:
            if not manifest.labels:
                raise AdapterFormatError("a classification adapter needs label names")
            if len(manifest.labels) != adapter.head.num_labels:
                raise AdapterFormatError(f"{len(manifest.labels)} label names for a head with "
                                         f"{adapter.head.num_labels} outputs")
        manifest.extra.update(task=adapter.task, rank=adapter.max_rank, target_modules=adapter.target_modules,
                              size=size, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              sha256={p.name: sha256_of(p) for p in sorted(folder.iterdir())})


def check_committed(folder: Path, name: str, version: int) -> Manifest:
    """The manifest of a committed version's folder, after checking that it names this version and
    that the files are exactly the ones it lists, regular files each with its sha256; raises
    AdapterFormatError (NotARegularFile for a link or FIFO, never waiting on one)."""
    check_folder(folder)
    if not os.path.lexists(folder / MANIFEST_FILE):
        raise AdapterFormatError("its manifest is missing")
    manifest = read_manifest(folder)
    check_identity(manifest, name, version)
    checksums = manifest.extra["sha256"]
    present = {p.name for p in folder.iterdir()} - {MANIFEST_FILE}
    if present != set(checksums):
        raise AdapterFormatError(f"its files {sorted(present)} differ from the manifest's {sorted(checksums)}")
    for file_name, digest in checksums.items():
        if sha256_of(folder / file_name) != digest:
            raise AdapterFormatError(f"{file_name} fails its sha256 check")
    return manifest


def check_identity(manifest: Manifest, name: str, version: int) -> None:
    """A committed manifest must name the place it is stored at and list its files' checksums."""
    if (manifest.name, manifest.version) != (name, version):
        raise AdapterFormatError(f"its manifest names {manifest.name}@{manifest.version}")
    checksums = manifest.extra.get("sha256")
    if not isinstance(checksums, dict) or not checksums:
        raise AdapterFormatError("its manifest lists no file checksums")


def manifest_from_bytes(data: bytes) -> Manifest:
    """A stored manifest read from bytes (an object store's), by read_manifest's rules."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise AdapterTooLarge(f"{MANIFEST_FILE} is {len(data)} bytes, over the {MANIFEST_MAX_BYTES} byte limit")
    parsed = loads_bounded(data, MANIFEST_FILE)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        raise AdapterFormatError(f"{MANIFEST_FILE}: expected a JSON object with a name")
    extra = {k: v for k, v in parsed.items() if k not in ("name", "version", "labels")}
    return check_manifest(Manifest(name=parsed["name"], version=parsed.get("version", 1),
                                   labels=parsed.get("labels", []), extra=extra))


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest as write_manifest writes it."""
    return (json.dumps(manifest.to_dict(), indent=2) + "\n").encode()
