"""Read a standard PEFT LoRA folder into plain tensors, refusing what the server cannot serve faithfully.

The module names an adapter touches are taken from the saved weight keys, not re-derived from
`target_modules`: the keys are exactly what PEFT matched at training time. Every check that needs
only shapes and dtypes runs on the safetensors header, before any tensor data is read.

Files are read as regular_files reads them (no links, no FIFOs, never blocking). Given the manifest's
checksums, each file is hashed while it is read into memory and the tensors are built from exactly
those bytes (no second read through safetensors' mmap), so a file rewritten after publish is refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .bounded_json import loads_bounded
from .format_errors import AdapterFormatError, AdapterTooLarge, brief
from .lora_config import check_config, scaling
from .regular_files import ChecksumMismatch, open_regular, read_checked, read_stream
from .safetensors_header import TensorEntry, read_header

__all__ = ["AdapterFormatError", "AdapterTooLarge", "LoraAdapter", "load_peft_folder"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_MAX_BYTES = 64 * 1024
MAX_LABELS = 4096
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_PEFT_PREFIX = "base_model.model."
# Classification heads PEFT saves through `modules_to_save` (causal LMs: `score`, BERT: `classifier`).
HEAD_MODULES = ("score", "classifier")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


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


@dataclass
class _Layout:
    """Which header key is which part: module -> {"A"/"B": key}, head module -> {"weight"/"bias": key}."""

    lora: dict[str, dict[str, str]] = field(default_factory=dict)
    head: dict[str, dict[str, str]] = field(default_factory=dict)


def _expected(checksums: Mapping[str, str] | None, file_name: str) -> str | None:
    if checksums is None:
        return None
    if file_name not in checksums:
        raise ChecksumMismatch(f"{file_name} has no sha256 in the manifest")
    return checksums[file_name]


def read_adapter_config(folder: Path, checksums: Mapping[str, str] | None = None) -> dict:
    try:
        data = read_checked(folder / CONFIG_FILE, CONFIG_MAX_BYTES, _expected(checksums, CONFIG_FILE))
    except FileNotFoundError:
        raise AdapterFormatError(f"no {CONFIG_FILE}; expected a PEFT LoRA folder") from None
    config = loads_bounded(bytes(data), CONFIG_FILE)
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE}: expected a JSON object")
    return config


def load_peft_folder(folder: str | Path, max_rank: int | None = None,
                     check_shapes: Callable[[LoraAdapter], None] | None = None,
                     checksums: Mapping[str, str] | None = None, max_bytes: int | None = None) -> LoraAdapter:
    """Parse a PEFT folder; raises AdapterFormatError naming the first problem found.

    Before any tensor data is read, ranks are checked against `max_rank` and `check_shapes` (which
    raises AdapterFormatError, e.g. when a shape does not fit the base) is called with the adapter
    built from the header alone, on tensors of the meta device. With `checksums` (file name -> hex
    sha256, a manifest's), every file read must hash to its entry (ChecksumMismatch otherwise).
    `max_bytes` bounds the weights file."""
    import torch  # the adapter format is torch-free to import; reading weights needs torch

    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder.name}: not a directory")
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterFormatError(f"pickle files are refused, save with safetensors: {', '.join(pickles)}")
    config = read_adapter_config(folder, checksums)
    check_config(config)
    expected = _expected(checksums, WEIGHTS_FILE)
    try:
        with open_regular(folder / WEIGHTS_FILE) as (f, size):
            if max_bytes is not None and size > max_bytes:
                raise AdapterTooLarge(f"{WEIGHTS_FILE} is {size} bytes, over the {max_bytes} byte limit")
            digest = hashlib.sha256()  # fed every byte read, header first, then the data the tensors view
            header, data_bytes = read_header(f, size, WEIGHTS_FILE, digest)
            layout = _layout(header)
            _check_shapes(layout, header, max_rank)
            if check_shapes is not None:
                check_shapes(_build(layout, config, lambda key: torch.empty(header[key].shape, device="meta")))
            data = read_stream(f, data_bytes, WEIGHTS_FILE, sha256=expected, digest=digest)
    except FileNotFoundError:
        raise AdapterFormatError(f"no {WEIGHTS_FILE} in the adapter folder") from None
    tensors = {key: _tensor(data, entry) for key, entry in header.items()}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"tensor {brief(key)} contains NaN or Inf")
    return _build(layout, config, tensors.__getitem__)


def _tensor(data: bytearray, entry: TensorEntry) -> torch.Tensor:  # noqa: F821
    """The tensor `entry` describes, over `data` (the data section, whose layout read_header checked)
    without a copy; copied when its offset is not aligned to its element size."""
    import torch

    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[entry.dtype]
    begin, end = entry.offsets
    if begin == end:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin)
    if begin % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).reshape(entry.shape)


def _layout(header: dict[str, TensorEntry]) -> _Layout:
    layout = _Layout()
    for key in header:
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if "lora_embedding_" in name:
            raise AdapterFormatError(f"unsupported embedding adapter weights: {brief(key)}")
        if "lora_magnitude_vector" in name:
            raise AdapterFormatError(f"unsupported LoRA variant: DoRA magnitude vector {brief(key)}")
        match = _LORA_KEY.match(name)
        if match:
            layout.lora.setdefault(match["module"], {})[match["part"]] = key
            continue
        if re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", name):
            raise AdapterFormatError(f"unsupported LoRA bias weights: {brief(key)}")
        module, _, param = name.rpartition(".")
        if module in HEAD_MODULES and param in ("weight", "bias"):
            layout.head.setdefault(module, {})[param] = key
            continue
        raise AdapterFormatError(f"unsupported weights {brief(key)}: only LoRA matrices and a classification head "
                                 f"({' or '.join(HEAD_MODULES)}) can be served")
    if not layout.lora:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: no LoRA weights (lora_A/lora_B) found")
    return layout


def _check_shapes(layout: _Layout, header: dict[str, TensorEntry], max_rank: int | None) -> None:
    for module, keys in layout.lora.items():
        if set(keys) != {"A", "B"}:
            raise AdapterFormatError(f"module {brief(module)}: lora_A and lora_B must both be present")
        a, b = header[keys["A"]].shape, header[keys["B"]].shape
        for label, shape in (("lora_A", a), ("lora_B", b)):
            if len(shape) != 2:
                raise AdapterFormatError(f"module {brief(module)}: {label} must be 2-D, got shape {shape}")
        if a[0] != b[1] or a[0] < 1:
            raise AdapterFormatError(f"module {brief(module)}: rank mismatch, lora_A {a} vs lora_B {b} (the rank "
                                     "is lora_A's rows and lora_B's columns, at least 1)")
        if max_rank is not None and a[0] > max_rank:
            raise AdapterFormatError(f"rank {a[0]} is above the server's max rank {max_rank}")
    if len(layout.head) > 1:
        raise AdapterFormatError(f"more than one classification head: {sorted(layout.head)}")
    for module, keys in layout.head.items():
        weight = header[keys["weight"]].shape if "weight" in keys else None
        if weight is None or len(weight) != 2 or weight[0] < 1:
            raise AdapterFormatError(f"classification head {module} needs a 2-D weight [labels, hidden]")
        if weight[0] > MAX_LABELS:
            raise AdapterFormatError(f"classification head {module} has {weight[0]} labels; at most {MAX_LABELS}")
        if "bias" in keys and header[keys["bias"]].shape != (weight[0],):
            raise AdapterFormatError(f"classification head {module}: bias shape {header[keys['bias']].shape} does "
                                     f"not match its {weight[0]} labels")


def _build(layout: _Layout, config: dict, tensor: Callable[[str], object]) -> LoraAdapter:
    modules = {}
    for module, keys in sorted(layout.lora.items()):
        a = tensor(keys["A"])
        modules[module] = LoraModuleWeights(A=a, B=tensor(keys["B"]), scaling=scaling(config, module, int(a.shape[0])))
    head = None
    for module, keys in layout.head.items():
        head = ClassificationHead(module=module, weight=tensor(keys["weight"]),
                                  bias=tensor(keys["bias"]) if "bias" in keys else None)
    return LoraAdapter(modules=modules, head=head, config=config)
