"""Read a standard PEFT LoRA folder into plain tensors, refusing what the server cannot serve faithfully.

The module names an adapter touches are taken from the saved weight keys, not re-derived from
`target_modules`: the keys are exactly what PEFT matched at training time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_PEFT_PREFIX = "base_model.model."
# Classification heads PEFT saves through `modules_to_save` (causal LMs: `score`, BERT: `classifier`).
HEAD_MODULES = ("score", "classifier")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


class AdapterFormatError(ValueError):
    """The folder is not a LoRA adapter we can serve; the message says what to change."""


@dataclass
class LoraModuleWeights:
    """One adapted linear layer: delta(x) = (x @ A.T) @ B.T * scaling."""

    A: torch.Tensor  # noqa: F821 - [r, in]
    B: torch.Tensor  # noqa: F821 - [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class ClassificationHead:
    module: str  # "score" or "classifier"
    weight: torch.Tensor  # noqa: F821 - [num_labels, hidden]
    bias: torch.Tensor | None  # noqa: F821 - [num_labels]

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])


@dataclass
class LoraAdapter:
    modules: dict[str, LoraModuleWeights]
    head: ClassificationHead | None = None
    config: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return "classification" if self.head is not None else "generation"

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})


def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{folder}: no {CONFIG_FILE}; expected a PEFT LoRA folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    return config


def _check_config(config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"unsupported PEFT type {peft_type}: only LoRA adapters are served")
    unsupported = {
        "use_dora": "DoRA (use_dora=true)",
        "lora_bias": "LoRA bias (lora_bias=true)",
        "use_qalora": "QALoRA (use_qalora=true)",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise AdapterFormatError(f"unsupported LoRA variant: {what}")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"unsupported bias training (bias={config['bias']!r}); train with bias='none'")
    for key in ("layers_to_transform", "trainable_token_indices", "target_parameters", "alora_invocation_tokens"):
        if config.get(key):
            raise AdapterFormatError(f"unsupported adapter option {key}={config[key]!r}")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name when it is its dotted suffix (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_peft_folder(folder: str | Path) -> LoraAdapter:
    """Parse a PEFT folder; raises AdapterFormatError naming the first problem found."""
    import torch  # the adapter format is torch-free to import; reading weights needs torch

    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder}: not a directory")
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterFormatError(f"pickle files are refused, save with safetensors: {', '.join(pickles)}")
    config = read_adapter_config(folder)
    _check_config(config)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterFormatError(f"{folder}: no {WEIGHTS_FILE}")

    parts: dict[str, dict[str, torch.Tensor]] = {}
    head_tensors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                tensor = f.get_tensor(key)
                _classify_key(key, tensor, parts, head_tensors)
    except AdapterFormatError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterFormatError(f"{weights_path}: unreadable safetensors file ({exc})") from exc

    modules: dict[str, LoraModuleWeights] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"module {module}: lora_A and lora_B must both be present")
        A, B = ab["A"], ab["B"]
        for label, t in (("lora_A", A), ("lora_B", B)):
            if t.dim() != 2:
                raise AdapterFormatError(f"module {module}: {label} must be 2-D, got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise AdapterFormatError(f"module {module}: {label} has non-float dtype {t.dtype}")
            if not torch.isfinite(t).all():
                raise AdapterFormatError(f"module {module}: {label} contains NaN or Inf")
        if A.shape[0] != B.shape[1]:
            raise AdapterFormatError(
                f"module {module}: rank mismatch, lora_A {tuple(A.shape)} vs lora_B {tuple(B.shape)}"
            )
        modules[module] = LoraModuleWeights(A=A, B=B, scaling=_scaling(config, module, int(A.shape[0])))
    if not modules:
        raise AdapterFormatError(f"{weights_path}: no LoRA weights (lora_A/lora_B) found")
    return LoraAdapter(modules=modules, head=_build_head(head_tensors), config=config)


def _classify_key(key: str, tensor, parts: dict, head_tensors: dict) -> None:
    name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    if "lora_embedding_" in name:
        raise AdapterFormatError(f"unsupported embedding adapter weights: {key}")
    if "lora_magnitude_vector" in name:
        raise AdapterFormatError(f"unsupported LoRA variant: DoRA magnitude vector {key}")
    match = _LORA_KEY.match(name)
    if match:
        parts.setdefault(match["module"], {})[match["part"]] = tensor
        return
    if re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", name):
        raise AdapterFormatError(f"unsupported LoRA bias weights: {key}")
    module, _, param = name.rpartition(".")
    if module in HEAD_MODULES and param in ("weight", "bias"):
        head_tensors.setdefault(module, {})[param] = tensor
        return
    raise AdapterFormatError(
        f"unsupported weights {key}: only LoRA matrices and a classification head "
        f"({' or '.join(HEAD_MODULES)}) can be served"
    )


def _build_head(head_tensors: dict) -> ClassificationHead | None:
    if not head_tensors:
        return None
    if len(head_tensors) > 1:
        raise AdapterFormatError(f"more than one classification head: {sorted(head_tensors)}")
    (module, tensors), = head_tensors.items()
    weight = tensors.get("weight")
    if weight is None or weight.dim() != 2:
        raise AdapterFormatError(f"classification head {module} needs a 2-D weight")
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise AdapterFormatError(f"classification head {module}: bias shape {tuple(bias.shape)} does not match")
    return ClassificationHead(module=module, weight=weight, bias=bias)
