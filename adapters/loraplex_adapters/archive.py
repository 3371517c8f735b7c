"""Unpacking an uploaded .tar/.tar.gz of one PEFT folder, refusing what could escape or amplify.

The archive is read once, as a stream, member by member: each member's type, path and size are
checked from its header before its data is read, and its bytes are counted again while they are
copied out, so a member never writes more than its limit whatever its header says. Only gzip
compression is accepted (bz2 and xz decompressors can be told to use gigabytes of memory).
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

from .format_errors import AdapterFormatError, AdapterTooLarge, brief
from .manifest import MANIFEST_FILE, MANIFEST_MAX_BYTES
from .peft_folder import CONFIG_FILE, CONFIG_MAX_BYTES, PICKLE_SUFFIXES, WEIGHTS_FILE

__all__ = ["AdapterTooLarge", "extract_archive", "file_limit"]

README_FILE = "README.md"
README_MAX_BYTES = 64 * 1024
MAX_MEMBERS = 16
MAX_EXTENDED_HEADER_BYTES = 16 * 1024
_CHUNK_BYTES = 1 << 20
_EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)
_CORRUPT = "not a .tar or .tar.gz archive, or it is truncated or corrupt"


def file_limit(name: str, max_bytes: int) -> int | None:
    """The most bytes the file `name` of an adapter folder may hold; None when a folder may not hold it."""
    limits = {CONFIG_FILE: CONFIG_MAX_BYTES, README_FILE: README_MAX_BYTES, MANIFEST_FILE: MANIFEST_MAX_BYTES,
              WEIGHTS_FILE: max_bytes}
    return limits.get(name)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads extended headers (pax, GNU long names) whole into memory and sparse maps without
    bound: refuse those before it does."""

    def _proc_member(self, tar):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise AdapterFormatError(f"archive member {brief(self.name)} is a sparse file; sparse files are refused")
        if self.type in _EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise AdapterFormatError(f"archive has an extended header of {self.size} bytes; at most "
                                     f"{MAX_EXTENDED_HEADER_BYTES}")
        return super()._proc_member(tar)


def extract_archive(archive: Path, target: Path, max_bytes: int) -> Path:
    """Unpack a .tar/.tar.gz of one PEFT folder into `target`, refusing links, special files, paths that
    leave the folder, files a PEFT folder does not hold, more than 16 members, members over their size
    limit and archives that unpack past max_bytes. Returns the folder holding adapter_config.json."""
    with archive.open("rb") as f:
        compression = "gz" if f.read(2) == b"\x1f\x8b" else ""
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode=f"r|{compression}", tarinfo=_BoundedTarInfo) as tar:
            _extract_members(tar, target, max_bytes)
    except (tarfile.TarError, EOFError, zlib.error, RecursionError):
        raise AdapterFormatError(_CORRUPT) from None
    configs = sorted(target.rglob(CONFIG_FILE))
    if len(configs) != 1:
        raise AdapterFormatError(f"the archive must hold exactly one {CONFIG_FILE}, found {len(configs)}")
    return configs[0].parent


def _extract_members(tar: tarfile.TarFile, target: Path, max_bytes: int) -> None:
    total, seen = 0, set()
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise AdapterFormatError(f"the archive has more than {MAX_MEMBERS} members; an adapter folder holds "
                                     "a handful of files")
        relative = _member_path(member)
        if member.isfile():
            limit = min(_name_limit(relative.name, max_bytes), max_bytes - total)
            if member.size > limit:
                raise _too_large(member.name, max_bytes)
        if relative in seen:
            raise AdapterFormatError(f"archive member {brief(member.name)} appears twice")
        seen.add(relative)
        if member.isdir():
            (target / relative).mkdir(parents=True, exist_ok=True)
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        total += _copy_out(tar, member, destination, limit, max_bytes)


def _member_path(member: tarfile.TarInfo) -> Path:
    name = member.name
    if member.issym() or member.islnk():
        raise AdapterFormatError(f"archive member {brief(name)} is a link; links are refused")
    if not (member.isfile() or member.isdir()):
        raise AdapterFormatError(f"archive member {brief(name)} is not a regular file or folder")
    relative = Path(name)
    if name.startswith("/") or ".." in relative.parts or not relative.parts:
        raise AdapterFormatError(f"archive member {brief(name)} escapes the adapter folder")
    return relative


def _name_limit(name: str, max_bytes: int) -> int:
    if name.endswith(PICKLE_SUFFIXES):
        raise AdapterFormatError(f"pickle file {brief(name)} refused; save with safetensors")
    limit = file_limit(name, max_bytes)
    if limit is None:
        raise AdapterFormatError(f"unexpected file {brief(name)}; an adapter archive holds {CONFIG_FILE}, "
                                 f"{WEIGHTS_FILE}, {README_FILE} and {MANIFEST_FILE}")
    return limit


def _too_large(name: str, max_bytes: int) -> AdapterTooLarge:
    return AdapterTooLarge(f"archive member {brief(name)} is over its byte limit ({README_MAX_BYTES} bytes for "
                           f"{README_FILE} and {CONFIG_FILE}, {max_bytes} for the whole archive unpacked)")


def _copy_out(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, limit: int, max_bytes: int) -> int:
    """Copy the member's data, counting it: the header's size is not trusted to bound the copy."""
    source, written = tar.extractfile(member), 0
    with destination.open("xb") as out:
        while chunk := source.read(_CHUNK_BYTES):
            written += len(chunk)
            if written > limit:
                raise _too_large(member.name, max_bytes)
            out.write(chunk)
    return written
