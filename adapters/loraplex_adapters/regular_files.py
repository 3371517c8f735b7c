"""Reading an adapter folder's files: regular files only, never through a link, never blocking, hashed as read.

A version folder is hostile input: anyone who can write the store's disk can put a symlink (to a FIFO,
a device, a file outside the store) or a FIFO where a manifest or weights file belongs. `open`
follows the link and waits on a FIFO until a writer comes, which froze every request once. So every
read here checks the entry with lstat, opens it with O_NOFOLLOW | O_NONBLOCK (a FIFO opens at once,
a link fails with ELOOP) and checks with fstat that what was opened is the regular file lstat saw,
before reading a byte. A folder is checked the same way (lstat: a real folder, not a link to one).

`read_checked` hashes the bytes as it reads them into memory, so what is parsed is exactly what was
hashed: a file swapped between a check and a read cannot pass.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .format_errors import AdapterFormatError, AdapterTooLarge

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
_CHUNK_BYTES = 1 << 20


class NotARegularFile(AdapterFormatError):
    """A link, FIFO, device or socket where the store expects a regular file (or a folder)."""


class ChecksumMismatch(AdapterFormatError):
    """A file's bytes differ from the sha256 its manifest lists: changed on disk after it was published."""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def check_folder(folder: Path) -> None:
    """Raise NotARegularFile unless `folder` is a folder itself (not a link to one); FileNotFoundError
    when it is gone."""
    mode = os.lstat(folder).st_mode
    if not stat.S_ISDIR(mode):
        raise NotARegularFile(f"{folder.name} is {_kind(mode)}, not a folder")


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """(file, size) of the regular file at `path`; raises NotARegularFile for anything else, without
    opening it in a way that can block. FileNotFoundError when it is missing."""
    seen = os.lstat(path)
    if not stat.S_ISREG(seen.st_mode):
        raise NotARegularFile(f"{path.name} is {_kind(seen.st_mode)}; adapters are read from regular files only")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise NotARegularFile(f"{path.name} is a symbolic link; adapters are read from regular files "
                                  "only") from None
        raise
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        raise NotARegularFile(f"{path.name} changed while it was opened; adapters are read from regular files only")
    with os.fdopen(fd, "rb") as f:
        yield f, opened.st_size


def read_small(path: Path, limit: int) -> bytes:
    """A regular file of at most `limit` bytes, whole (AdapterTooLarge past it, even if it grows)."""
    return bytes(read_checked(path, limit))


def read_checked(path: Path, limit: int | None = None, sha256: str | None = None) -> bytearray:
    """The bytes of a regular file of at most `limit` bytes; when `sha256` is given they must hash to
    it (ChecksumMismatch otherwise)."""
    with open_regular(path) as (f, size):
        return read_stream(f, size, path.name, limit, sha256)


def read_stream(f: BinaryIO, size: int, name: str, limit: int | None = None, sha256: str | None = None,
                digest: Any = None) -> bytearray:
    """Read the `size` bytes left in `f` (what fstat promised), refusing a file that is longer or
    shorter than that; `digest` (fed the file's earlier bytes, when the caller read some) gets these
    too and is checked against `sha256` at the end."""
    if limit is not None and size > limit:
        raise AdapterTooLarge(f"{name} is {size} bytes, over the {limit} byte limit")
    data = bytearray(size)
    view, done = memoryview(data), 0
    digest = digest or hashlib.sha256()
    while done < size:
        count = f.readinto(view[done:done + _CHUNK_BYTES])
        if not count:
            raise AdapterFormatError(f"{name} is shorter than its size on disk (changed while it was read)")
        digest.update(view[done:done + count])
        done += count
    if f.read(1):
        raise AdapterFormatError(f"{name} is longer than its size on disk (changed while it was read)")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ChecksumMismatch(f"{name} fails its sha256 check (changed on disk since it was published)")
    return data


def sha256_of(path: Path) -> str:
    """Hex sha256 of a regular file, read in 1 MiB blocks (never through a link, never blocking)."""
    digest = hashlib.sha256()
    with open_regular(path) as (f, _):
        for block in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_regular(source: Path, target: Path, limit: int | None) -> None:
    """Copy a regular file (not a link, FIFO or device) of at most `limit` bytes into a new file."""
    with open_regular(source) as (f, size), target.open("xb") as out:
        if limit is not None and size > limit:
            raise AdapterTooLarge(f"{source.name} is {size} bytes, over the {limit} byte limit")
        copied = 0
        for block in iter(lambda: f.read(_CHUNK_BYTES), b""):
            copied += len(block)
            if limit is not None and copied > limit:
                raise AdapterTooLarge(f"{source.name} is over the {limit} byte limit")
            out.write(block)
