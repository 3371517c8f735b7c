"""Hashes: the base-model fingerprint adapters are checked against (config plus tensor names and
shapes), and the sha256 of a file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def model_fingerprint(folder: Path) -> str:
    """Identifies the base an adapter was trained on; stable across dtype conversions and re-saves."""
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    from safetensors import safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            for key in sorted(f.keys()):
                digest.update(f"{key}:{f.get_slice(key).get_shape()}".encode())
    return "sha256:" + digest.hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
