"""The on-disk adapter store: versioned PEFT folders with manifests, published atomically.

Layout: `<root>/adapters/<name>/<version>/` holds the PEFT files and `loraplex.json`. A version
becomes visible only by one `rename` of a complete, fsynced folder, so a crash at any point leaves
either the old state or the new one.

Several processes may share one root:
- versions are claimed under an flock on `<root>/store.lock`; `<root>/claims/<name>` keeps the highest
  number ever claimed, so a number is never reused (not after a delete, not after a quarantine), and a
  cached `name@version` in any process always means the same weights;
- each store object stages in its own `<root>/staging/<pid>-<hex>/`, owned through an flock on
  `<pid>-<hex>.lock` held for the object's life; opening a store sweeps only folders whose owner is gone;
- the index is a cache of the disk: a lookup rescans its name's folder (one listdir), `list` rescans
  all, `delete` acts on what is on disk under the lock;
- a version whose manifest or files cannot be read or fail their checksums is logged and moved to
  `<root>/quarantine/<name>-<version>-<time>/` the first time any process scans it, or loads it: `load`
  hashes every file again as it reads it into memory, so weights rewritten after publish never serve;
- only regular files are read, never through a link and never in a way that can wait (regular_files):
  a link or FIFO in a version folder quarantines that version; a name folder that is a link is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from .manifest import VERSION_RULE, Manifest, check_name, parse_version, write_manifest
from .peft_folder import AdapterFormatError, LoraAdapter
from .regular_files import NotARegularFile, check_folder, read_small
from .store_rules import (
    ALLOWED_FILES,
    AdapterNotInStore,
    AdapterQuarantined,
    AdapterTooLarge,
    BaseMismatch,
    StoreRules,
    VersionsExhausted,
    check_committed,
    next_version,
)

__all__ = ["ALLOWED_FILES", "AdapterNotInStore", "AdapterQuarantined", "AdapterStore", "AdapterTooLarge",
           "BaseMismatch", "VersionsExhausted"]


def _fsync_tree(folder: Path) -> None:
    """fsync a staged folder's files (written by this process), then the folder."""
    for path in [*folder.iterdir(), folder]:
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


log = logging.getLogger(__name__)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_LOCK_SUFFIX = ".lock"


def _open_lock(path: Path, flags: int) -> int:
    """A lock file's descriptor; NotARegularFile (never a wait) when a link, FIFO or device took its place."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link; a FIFO without a reader
            raise NotARegularFile(f"the store's {path.name} is not a regular file; remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(f"the store's {path.name} is not a regular file; remove it")
    return fd


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and between threads: each call opens its own file)."""
    fd = _open_lock(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _claim_staging(staging: Path) -> tuple[Path, int]:
    """Create this object's staging folder and hold the flock that marks its owner alive."""
    while True:
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        lock_path = staging / (token + _LOCK_SUFFIX)
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a sweeper may have taken the lock between open and flock, and removed the file
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                (staging / token).mkdir()
                return staging / token, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _sweep_staging(staging: Path) -> None:
    """Remove staging folders whose owner process is gone: its lock can be taken, or it has none."""
    for entry in staging.iterdir():
        if entry.name.endswith(_LOCK_SUFFIX):
            try:
                fd = _open_lock(entry, os.O_RDWR)
            except FileNotFoundError:
                continue
            except NotARegularFile:  # not a lock any owner made
                entry.unlink(missing_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its owner is alive
                continue
            shutil.rmtree(staging / entry.name.removesuffix(_LOCK_SUFFIX), ignore_errors=True)
            entry.unlink(missing_ok=True)
            os.close(fd)
        elif not (staging / (entry.name + _LOCK_SUFFIX)).exists():  # owners create the lock first
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _is_name(name: str) -> bool:
    try:
        check_name(name)
    except AdapterFormatError:
        return False
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"a file cannot be read ({exc.strerror or type(exc).__name__})"
    return str(exc)


def _release_staging(folder: Path, fd: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    Path(str(folder) + _LOCK_SUFFIX).unlink(missing_ok=True)
    os.close(fd)


class AdapterStore(StoreRules):
    def __init__(self, root: str | Path, base_fingerprint: str | None = None, max_rank: int = 256,
                 max_bytes: int = 512 * 1024 * 1024, allow_base_mismatch: bool = False,
                 check_fits: Callable[[LoraAdapter], None] | None = None) -> None:
        """check_fits raises AdapterFormatError when an adapter does not fit the served base (target
        modules, shapes); the server passes its slot table's check."""
        super().__init__(base_fingerprint, max_rank, max_bytes, allow_base_mismatch, check_fits)
        self.root = Path(root)
        self.adapters_dir = self.root / "adapters"
        self.claims_dir = self.root / "claims"
        self.quarantine_dir = self.root / "quarantine"
        self._lock = threading.Lock()  # serializes index swaps between this object's threads
        self._unmovable: set[tuple[str, int]] = set()
        self._ignored: set[tuple[str, str]] = set()  # entries that are not version folders, logged once
        for folder in (self.adapters_dir, self.claims_dir, self.quarantine_dir, self.root / "staging"):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / "store.lock"
        _sweep_staging(self.root / "staging")  # half uploads of processes that died
        self.staging, fd = _claim_staging(self.root / "staging")
        self._release = weakref.finalize(self, _release_staging, self.staging, fd)
        self._index: dict[str, dict[int, Manifest]] = {}  # replaced whole, never mutated: readers need no lock
        self.refresh()

    def close(self) -> None:
        """Remove this object's staging folder (also done when it is garbage collected or at exit)."""
        self._release()

    # -- the index: a cache of the disk ---------------------------------------------------------

    def refresh(self, name: str | None = None) -> None:
        """Re-read one name's versions (or all names) from disk: new versions are checked and added,
        vanished ones dropped, unreadable ones quarantined."""
        if name is not None:
            self._refresh_name(name)
            return
        names = {p.name for p in self.adapters_dir.iterdir() if _is_name(p.name)}
        for each in sorted(names | set(self._index)):
            self._refresh_name(each)

    def _refresh_name(self, name: str) -> dict[int, Manifest]:
        known = self._index.get(name, {})
        versions = {}
        for version in sorted(self._versions_on_disk(name)):
            manifest = known.get(version) or self._admit(name, version)
            if manifest is not None:
                versions[version] = manifest
        self._install(name, versions)
        return versions

    def _install(self, name: str, versions: dict[int, Manifest]) -> None:
        with self._lock:
            index = dict(self._index)
            if versions:
                index[name] = versions
            else:
                index.pop(name, None)
            self._index = index

    def _versions_on_disk(self, name: str) -> set[int]:
        folder = self.adapters_dir / name
        if folder.is_symlink():  # its versions would live outside the store
            self._ignore(name, "", "a name folder is a folder, not a link")
            return set()
        try:
            entries = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        versions = set()
        for entry in entries:
            version = parse_version(entry)
            if version is not None:
                versions.add(version)
            else:
                self._ignore(name, entry, VERSION_RULE)
        return versions

    def _ignore(self, name: str, entry: str, why: str) -> None:
        """Log an entry the store skips, once per process."""
        if (name, entry) not in self._ignored:
            self._ignored.add((name, entry))
            log.warning("%r is ignored: %s", f"adapters/{name}/{entry}".rstrip("/"), why)

    def _admit(self, name: str, version: int) -> Manifest | None:
        """The manifest of a committed version seen for the first time, after checking its files;
        None when it vanished meanwhile (deleted by another process) or was quarantined."""
        folder = self.adapters_dir / name / str(version)
        try:
            return check_committed(folder, name, version)
        except (AdapterFormatError, OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
            if os.path.lexists(folder):
                self._quarantine(name, version, _reason(exc))
            return None

    def _damaged(self, manifest: Manifest, folder: Path, reason: str) -> AdapterQuarantined:
        self._quarantine(manifest.name, manifest.version, reason)
        self._refresh_name(manifest.name)
        return self._quarantined(manifest, reason)

    def _quarantine(self, name: str, version: int, reason: str) -> None:
        """Move an unreadable version aside, so it neither serves nor blocks; logged by the one
        process whose rename wins."""
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        target = self.quarantine_dir / f"{name}-{version}-{stamp}"
        with _flock(self._lock_path):
            self._record_claim(name, version)  # its number is never handed out again
            try:
                os.rename(self.adapters_dir / name / str(version), target)
            except FileNotFoundError:
                return  # another process moved or deleted it first
            except OSError as exc:  # it stays out of the index; say so once, not at every lookup
                if (name, version) not in self._unmovable:
                    self._unmovable.add((name, version))
                    log.warning("adapter %s@%s is unreadable (%s) and cannot be quarantined (%s)",
                                name, version, reason, exc.strerror)
                return
        log.warning("adapter %s@%s quarantined to %s: %s", name, version,
                    target.relative_to(self.root), reason)

    # -- version claims (callers hold the store flock) -------------------------------------------

    def _recorded_claim(self, name: str) -> int:
        """The highest number ever claimed (any size: one past MAX_VERSION refuses the next publish)."""
        try:  # a link or FIFO in its place raises NotARegularFile: numbers could be reused, so no publish
            text = read_small(self.claims_dir / name, 64).decode("ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return 0
        return int(text) if _DIGITS.fullmatch(text) else 0

    def _next_version(self, name: str) -> int:
        return next_version(name, max(self._recorded_claim(name), *self._versions_on_disk(name), 0))

    def _record_claim(self, name: str, version: int) -> None:
        if version <= self._recorded_claim(name):
            return
        temporary = self.claims_dir / f".{name}.{secrets.token_hex(4)}"
        temporary.write_text(f"{version}\n")
        os.replace(temporary, self.claims_dir / name)

    # -- reading --------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        """Whether `name` has a version on disk now (one listdir, like `resolve`)."""
        return _is_name(name) and bool(self._refresh_name(name))

    def known(self, name: str) -> bool:
        """Whether `name` had versions when this store last read it (no I/O: for labelling a request
        whose lookup has just refreshed the name)."""
        return name in self._index

    def list(self) -> list[Manifest]:
        self.refresh()
        return [m for versions in sorted(self._index.items()) for _, m in sorted(versions[1].items())]

    def lookup(self, name: str, version: int | None = None) -> Manifest:
        """The manifest of `name@version` (latest when None): `resolve` without the folder."""
        return self.resolve(name, version)[0]

    def resolve(self, name: str, version: int | None = None) -> tuple[Manifest, Path]:
        """The manifest and folder of `name@version` (latest when None), as on disk now."""
        check_name(name)
        versions = self._refresh_name(name)  # one listdir: sees other processes' publishes and deletes
        if not versions:
            raise AdapterNotInStore(f"adapter {name!r} is not registered")
        if version is None:
            version = max(versions)
        if version not in versions:
            raise AdapterNotInStore(f"adapter {name!r} has no version {version}")
        return versions[version], self.adapters_dir / name / str(version)

    # -- writing --------------------------------------------------------------------------------

    def publish(self, source: str | Path, name: str, labels: list[str] | None = None,
                base_fingerprint: str | None = None, metrics: dict | None = None) -> Manifest:
        """Validate a PEFT folder (or .tar/.tar.gz of one) and commit it as the next version of `name`."""
        with self._staged_upload(source, name, labels, base_fingerprint, metrics) as (folder, manifest):
            _fsync_tree(folder)  # the bulk of the syncing, before taking the lock
            self._commit(folder, manifest)
        return manifest

    def _commit(self, folder: Path, manifest: Manifest) -> None:
        """Claim the next version of the name and rename the folder into place, under the store
        lock, so concurrent publishers (threads or processes) get distinct numbers."""
        with _flock(self._lock_path):
            manifest.version = self._next_version(manifest.name)
            write_manifest(folder, manifest)
            _fsync_tree(folder)
            target = self.adapters_dir / manifest.name / str(manifest.version)
            target.parent.mkdir(exist_ok=True)
            check_folder(target.parent)  # a link there would put the version outside the store
            os.rename(folder, target)  # the commit point
            _fsync(target.parent)  # the folder only: its other entries are not this process's files
            self._record_claim(manifest.name, manifest.version)  # after: a crashed commit burns no number
        self._install(manifest.name, {**self._index.get(manifest.name, {}), manifest.version: manifest})

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version, or all versions on disk at this moment; returns the versions removed.
        Decided from the disk under the store lock, so another process's fresh publish is never
        removed by a request that did not name it."""
        check_name(name)
        trash = []
        with _flock(self._lock_path):
            on_disk = self._versions_on_disk(name)
            if not on_disk or (version is not None and version not in on_disk):
                raise AdapterNotInStore(f"adapter {name!r}{'' if version is None else f'@{version}'} "
                                        "is not registered")
            doomed = [version] if version is not None else sorted(on_disk)
            for v in doomed:
                # Rename out of the tree first: the version disappears atomically, then is removed.
                trash.append(self.staging / f"deleted-{name}-{v}-{time.monotonic_ns()}")
                os.rename(self.adapters_dir / name / str(v), trash[-1])
            if set(doomed) == on_disk:
                with contextlib.suppress(OSError):  # a folder with stray files stays
                    (self.adapters_dir / name).rmdir()
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)
        self._refresh_name(name)
        return doomed
