"""The loraplex manifest beside a PEFT folder (`loraplex.json`): what PEFT's config does not say.

The adapter's name, version and label names; the store adds in `extra` the task, rank, target
modules, size, creation time, sha256 of each file, base-model fingerprint and training metrics.
`check_manifest` is the one validation that both publishing and reading back (the index rebuild)
apply, so a manifest the store accepted is always one it can read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .bounded_json import loads_bounded
from .format_errors import AdapterFormatError, brief
from .peft_folder import MAX_LABELS
from .regular_files import read_small

MANIFEST_FILE = "loraplex.json"
MAX_LABEL_CHARS = 256
MAX_LABELS_BYTES = 256 * 1024  # all label names together, UTF-8: keeps one AdapterInfo well under 4 MB
MANIFEST_MAX_BYTES = 4 << 20  # labels and metrics at their limits, JSON-escaped, fit
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: `$` would let a trailing newline in
# Versions are 1..999,999,999 spelled in ASCII digits without leading zeros: one spelling per number, so a
# folder name, an S3 key, a reference and a cache key agree; nine digits fit every int32 field (protos,
# page tokens). re.ASCII keeps "٣" and "３" out; int() alone would take them, and " 3" and "3_0".
MAX_VERSION = 999_999_999
_VERSION = re.compile(r"[1-9][0-9]{0,8}", re.ASCII)
VERSION_RULE = f"a version is a whole number from 1 to {MAX_VERSION}, in ASCII digits without leading zeros"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_EXTRA_TYPES = {"task": str, "rank": int, "target_modules": list, "size": int, "created": str, "sha256": dict,
                "metrics": dict, "base_fingerprint": (str, type(None))}


@dataclass
class Manifest:
    name: str
    version: int = 1
    labels: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "labels": self.labels, **self.extra}


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise AdapterFormatError(
            f"invalid adapter name {brief(name)}: use letters, digits, '.', '_' and '-' (at most 128), starting "
            "with a letter or digit"
        )
    return name


def check_labels(labels: object) -> list[str]:
    """Label names in head order: at most 4096, each 1-256 characters without control characters,
    no duplicates (they would merge two outputs' scores)."""
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise AdapterFormatError("labels must be a list of strings")
    if len(labels) > MAX_LABELS:
        raise AdapterFormatError(f"{len(labels)} labels; at most {MAX_LABELS}")
    for i, label in enumerate(labels):
        if not 1 <= len(label) <= MAX_LABEL_CHARS:
            raise AdapterFormatError(f"label {i} has {len(label)} characters; labels need 1-{MAX_LABEL_CHARS}")
        if _CONTROL.search(label):
            raise AdapterFormatError(f"label {i} ({brief(label)}) contains a control character")
    if sum(len(label.encode("utf-8", "surrogatepass")) for label in labels) > MAX_LABELS_BYTES:
        raise AdapterFormatError(f"the label names take more than {MAX_LABELS_BYTES} bytes together")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise AdapterFormatError(f"label {brief(label)} appears twice; label names must be distinct")
        seen.add(label)
    return labels


def check_manifest(manifest: Manifest) -> Manifest:
    """Raise AdapterFormatError for a manifest the store may neither publish nor read back."""
    check_name(manifest.name)
    version = manifest.version
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise AdapterFormatError(f"invalid version {brief(version)}: {VERSION_RULE}")
    check_labels(manifest.labels)
    for key, kind in _EXTRA_TYPES.items():
        value = manifest.extra.get(key)
        if key in manifest.extra and (not isinstance(value, kind) or isinstance(value, bool)):
            raise AdapterFormatError(f"manifest field {key} has the wrong type ({brief(value)})")
    return manifest


def parse_version(text: str) -> int | None:
    """The number a folder name, key part or reference spells, by VERSION_RULE; None for anything else."""
    return int(text) if _VERSION.fullmatch(text) else None


def parse_reference(reference: str) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@3' -> (name, 3); anything else raises AdapterFormatError."""
    if not isinstance(reference, str) or not reference:
        raise AdapterFormatError(f"malformed adapter reference {brief(reference)}: expected NAME or NAME@VERSION")
    name, at, text = reference.partition("@")
    check_name(name)
    if not at:
        return name, None
    version = parse_version(text)
    if version is None:
        raise AdapterFormatError(f"malformed adapter reference {brief(reference)}: {VERSION_RULE}")
    return name, version


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, or defaults (name = folder name) when it has none; raises
    AdapterFormatError for any manifest that publishing would have refused (and for a link, FIFO or
    anything else that is not a regular file where the manifest belongs)."""
    try:
        raw = read_small(folder / MANIFEST_FILE, MANIFEST_MAX_BYTES)
    except FileNotFoundError:
        return Manifest(name=check_name(folder.name))
    data = loads_bounded(raw, MANIFEST_FILE)
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{MANIFEST_FILE}: expected a JSON object")
    extra = {k: v for k, v in data.items() if k not in ("name", "version", "labels")}
    manifest = Manifest(name=data.get("name", folder.name), version=data.get("version", 1),
                        labels=data.get("labels", []), extra=extra)
    return check_manifest(manifest)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
