"""The on-disk adapter store: versioned PEFT folders with manifests, published atomically.

Layout: `<root>/adapters/<name>/<version>/` holds the PEFT files and `loraplex.json`;
`<root>/staging/` holds uploads in progress. A version becomes visible only by one `rename` of a
complete, fsynced folder, so a crash at any point leaves either the old state or the new one; what
is left in staging is swept at the next start. The index is rebuilt by scanning the folders.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .archive import AdapterTooLarge, extract_archive
from .fingerprint import file_sha256
from .manifest import MANIFEST_FILE, Manifest, check_name, read_manifest, write_manifest
from .peft_folder import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterFormatError, LoraAdapter, load_peft_folder

ALLOWED_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}


class AdapterNotInStore(KeyError):
    pass


class BaseMismatch(AdapterFormatError):
    """The adapter was trained on another base model."""


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AdapterStore:
    def __init__(self, root: str | Path, base_fingerprint: str | None = None, max_rank: int = 256,
                 max_bytes: int = 512 * 1024 * 1024, allow_base_mismatch: bool = False,
                 check_fits: Callable[[LoraAdapter], None] | None = None) -> None:
        """check_fits raises AdapterFormatError when an adapter does not fit the served base (target
        modules, shapes); the server passes its slot table's check."""
        self.root = Path(root)
        self.check_fits = check_fits
        self.adapters_dir = self.root / "adapters"
        self.staging = self.root / "staging"
        self.base_fingerprint = base_fingerprint
        self.max_rank, self.max_bytes = max_rank, max_bytes
        self.allow_base_mismatch = allow_base_mismatch
        self._lock = threading.Lock()
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)  # half uploads from before a crash
        self.staging.mkdir(parents=True)
        self._index: dict[str, dict[int, Manifest]] = {}
        self.rebuild_index()

    def rebuild_index(self) -> None:
        index: dict[str, dict[int, Manifest]] = {}
        for version_dir in self.adapters_dir.glob("*/*"):
            if not version_dir.name.isdigit() or not (version_dir / MANIFEST_FILE).is_file():
                continue
            try:
                manifest = read_manifest(version_dir)
            except AdapterFormatError:
                continue  # not a committed version
            if manifest.name == version_dir.parent.name and manifest.version == int(version_dir.name):
                index.setdefault(manifest.name, {})[manifest.version] = manifest
        self._index = index

    # -- reading --------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._index

    def list(self) -> list[Manifest]:
        return [m for versions in sorted(self._index.items()) for _, m in sorted(versions[1].items())]

    def resolve(self, name: str, version: int | None = None) -> tuple[Manifest, Path]:
        versions = self._index.get(name)
        if not versions:
            raise AdapterNotInStore(f"adapter {name!r} is not registered")
        if version is None:
            version = max(versions)
        if version not in versions:
            raise AdapterNotInStore(f"adapter {name!r} has no version {version}")
        return versions[version], self.adapters_dir / name / str(version)

    def base_mismatch(self, manifest: Manifest) -> str | None:
        """Why an adapter may not be served on this store's base (None when it may)."""
        trained_on = manifest.extra.get("base_fingerprint")
        if not (self.base_fingerprint and trained_on) or trained_on == self.base_fingerprint:
            return None
        if self.allow_base_mismatch:
            return None
        return (f"adapter was trained on base {trained_on}, this server runs {self.base_fingerprint} "
                "(start with --allow-base-mismatch to accept)")

    # -- writing --------------------------------------------------------------------------------

    def _validate(self, folder: Path, manifest: Manifest) -> None:
        for path in folder.iterdir():  # regular files only: publish copied nothing else
            if path.name.endswith(PICKLE_SUFFIXES):
                raise AdapterFormatError(f"pickle file {path.name} refused; save with safetensors")
            if path.name not in ALLOWED_FILES:
                raise AdapterFormatError(f"unexpected entry {path.name!r}; a PEFT folder holds "
                                         f"{', '.join(sorted(ALLOWED_FILES))}")
        size = sum(p.stat().st_size for p in folder.iterdir())
        if size > self.max_bytes:
            raise AdapterTooLarge(f"adapter is {size} bytes, over the {self.max_bytes} byte limit")
        adapter = load_peft_folder(folder)
        if adapter.max_rank > self.max_rank:
            raise AdapterFormatError(f"rank {adapter.max_rank} is above the server's max rank {self.max_rank}")
        if adapter.head is None and manifest.labels:
            raise AdapterFormatError("label names given, but the adapter has no classification head (save it "
                                     "with the task's head in modules_to_save)")
        if adapter.head is not None:
            if not manifest.labels:
                raise AdapterFormatError("a classification adapter needs label names")
            if len(manifest.labels) != adapter.head.num_labels:
                raise AdapterFormatError(f"{len(manifest.labels)} label names for a head with "
                                         f"{adapter.head.num_labels} outputs")
        mismatch = self.base_mismatch(manifest)
        if mismatch:
            raise BaseMismatch(mismatch)
        if self.check_fits is not None:
            self.check_fits(adapter)
        manifest.extra.update(task=adapter.task, rank=adapter.max_rank, target_modules=adapter.target_modules,
                              size=size, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              sha256={p.name: file_sha256(p) for p in sorted(folder.iterdir())})

    def publish(self, source: str | Path, name: str, labels: list[str] | None = None,
                base_fingerprint: str | None = None, metrics: dict | None = None) -> Manifest:
        """Validate a PEFT folder (or .tar/.tar.gz of one) and commit it as the next version of `name`."""
        check_name(name)
        source = Path(source)
        work = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging))
        try:
            if source.is_file():
                source = extract_archive(source, work / "unpacked", self.max_bytes)
            folder = work / "adapter"
            folder.mkdir()
            for path in source.iterdir():
                if path.name == MANIFEST_FILE:
                    continue
                if path.is_symlink() or not path.is_file():
                    raise AdapterFormatError(f"unexpected entry {path.name!r} in the adapter folder")
                shutil.copyfile(path, folder / path.name)
            manifest = Manifest(name=name, labels=list(labels or []))
            manifest.extra["base_fingerprint"] = base_fingerprint or self.base_fingerprint
            if metrics:
                manifest.extra["metrics"] = metrics
            self._validate(folder, manifest)
            with self._lock:
                versions = self._index.get(name, {})
                manifest.version = max(versions, default=0) + 1
                write_manifest(folder, manifest)
                _fsync_tree(folder)
                target = self.adapters_dir / name / str(manifest.version)
                target.parent.mkdir(exist_ok=True)
                os.rename(folder, target)  # the commit point
                _fsync_tree(target.parent)
                self._index.setdefault(name, {})[manifest.version] = manifest
            return manifest
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version, or all of them; returns the versions removed."""
        with self._lock:
            versions = self._index.get(name)
            if not versions or (version is not None and version not in versions):
                raise AdapterNotInStore(f"adapter {name!r}{'' if version is None else f'@{version}'} "
                                        "is not registered")
            doomed = [version] if version is not None else sorted(versions)
            for v in doomed:
                # Rename out of the tree first: the version disappears atomically, then is removed.
                trash = self.staging / f"deleted-{name}-{v}-{time.monotonic_ns()}"
                os.rename(self.adapters_dir / name / str(v), trash)
                shutil.rmtree(trash, ignore_errors=True)
                del versions[v]
            if not versions:
                del self._index[name]
                shutil.rmtree(self.adapters_dir / name, ignore_errors=True)
            return doomed
