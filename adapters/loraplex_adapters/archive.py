"""Unpacking an uploaded .tar/.tar.gz of one PEFT folder, refusing what could escape or amplify."""

from __future__ import annotations

import tarfile
from pathlib import Path

from .peft_folder import CONFIG_FILE, AdapterFormatError


class AdapterTooLarge(AdapterFormatError):
    """Past the store's size limit (an upload or archive that is too big)."""


def extract_archive(archive: Path, target: Path, max_bytes: int) -> Path:
    """Unpack a .tar/.tar.gz of one PEFT folder, refusing links, special files, paths that leave the
    folder and archives that unpack past max_bytes. Returns the folder holding adapter_config.json."""
    total = 0
    try:
        tar = tarfile.open(archive)
    except tarfile.TarError as exc:
        raise AdapterFormatError(f"not a .tar or .tar.gz archive ({exc})") from None
    with tar:
        members = tar.getmembers()
        for member in members:
            name = member.name
            if member.issym() or member.islnk():
                raise AdapterFormatError(f"archive member {name!r} is a link; links are refused")
            if not (member.isfile() or member.isdir()):
                raise AdapterFormatError(f"archive member {name!r} is not a regular file or folder")
            parts = Path(name).parts
            if name.startswith("/") or ".." in parts:
                raise AdapterFormatError(f"archive member {name!r} escapes the adapter folder")
            total += member.size
            if total > max_bytes:
                raise AdapterTooLarge(f"archive unpacks to more than the {max_bytes} byte limit")
        tar.extractall(target, filter="data")
    configs = sorted(target.rglob(CONFIG_FILE))
    if len(configs) != 1:
        raise AdapterFormatError(f"the archive must hold exactly one {CONFIG_FILE}, found {len(configs)}")
    return configs[0].parent
