"""`loraplex base path|export DIR`: the embedded base model's Hugging Face folder, for training with PEFT."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SERVER_EXTRA = "pip install 'loraplex[server]' (torch, transformers, gguf)"


class BaseUnavailable(Exception):
    pass


def embedded_base_folder() -> Path:
    """The safetensors folder of the embedded base, converted from its GGUF on first use (as the server does)."""
    # Lazily: converting needs torch and transformers, which the client alone never imports.
    from loraplex_adapters.embedded_base import CACHE_NAME, EmbeddedModelMissing, cache_root, embedded_default_path

    if not (cache_root() / CACHE_NAME / "config.json").is_file():
        print("converting the embedded base model to a safetensors folder (once; takes seconds)", file=sys.stderr)
    try:
        return embedded_default_path()
    except EmbeddedModelMissing as exc:
        raise BaseUnavailable(str(exc)) from None
    except ImportError as exc:
        raise BaseUnavailable(f"converting the embedded base needs {exc.name}: {SERVER_EXTRA}") from None


def export(target: Path) -> Path:
    """Copy the folder to `target`, which must not exist or be an empty folder."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BaseUnavailable(f"{target} already exists and is not an empty folder; choose a new one")
    source = embedded_base_folder()
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target
