"""The loraplex manifest beside a PEFT folder (`loraplex.json`): what PEFT's config does not say.

The adapter's name, version and label names; the store adds in `extra` the task, rank, target
modules, size, creation time, sha256 of each file, base-model fingerprint and training metrics.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .peft_folder import AdapterFormatError

MANIFEST_FILE = "loraplex.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REFERENCE = re.compile(r"^(?P<name>[^@]+)(?:@(?P<version>[0-9]+))?$")


@dataclass
class Manifest:
    name: str
    version: int = 1
    labels: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "labels": self.labels, **self.extra}


def check_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise AdapterFormatError(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def parse_reference(reference: str) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@3' -> (name, 3); anything else raises AdapterFormatError."""
    match = _REFERENCE.match(reference)
    if not match:
        raise AdapterFormatError(f"malformed adapter reference {reference!r}: expected NAME or NAME@VERSION")
    version = match["version"]
    return check_name(match["name"]), None if version is None else int(version)


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, or defaults (name = folder name) when it has none."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return Manifest(name=check_name(folder.name))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    labels = data.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(label, str) and label for label in labels):
        raise AdapterFormatError(f"{path}: labels must be a list of non-empty strings")
    version = data.get("version", 1)
    if not isinstance(version, int) or version < 1:
        raise AdapterFormatError(f"{path}: version must be a positive integer")
    extra = {k: v for k, v in data.items() if k not in ("name", "version", "labels")}
    return Manifest(name=check_name(str(data.get("name", folder.name))), version=version, labels=labels, extra=extra)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
