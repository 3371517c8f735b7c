"""Load the frozen base model: a local Hugging Face folder or the embedded default, optionally quantized."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraplex_adapters.compute_dtype import auto_dtype
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.fingerprint import model_fingerprint
from loraplex_adapters.quantization import quantization_config

QUANTIZE_CHOICES = ("auto", "nf4", "int8", "none")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# bitsandbytes' CPU 4-bit fast path (AVX512-BF16) needs in_features to be a multiple of this.
_BNB_CPU_BLOCK = 64


class BaseModelError(RuntimeError):
    """The base model cannot be loaded as asked; the message says why and what to do."""


@dataclass
class BaseModel:
    model: nn.Module  # a *ForCausalLM, or a bare encoder (BertModel) for classification-only bases
    tokenizer: object
    kind: str  # "causal" or "encoder"
    device: torch.device
    dtype: torch.dtype  # the compute dtype (activations, adapters)
    quantize: str
    fingerprint: str
    path: Path

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if value:
                return int(value)
        return 2048

    @property
    def head_module(self) -> str:
        return "score" if self.kind == "causal" else "classifier"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"--device {device} asked for, but CUDA is not available")
    return resolved


def resolve_quantize(quantize: str, device: torch.device) -> str:
    if quantize not in QUANTIZE_CHOICES:
        raise BaseModelError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return quantize


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPE_CHOICES:
        raise BaseModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype == "auto":
        return auto_dtype(device)  # bf16 only where the hardware has it
    return getattr(torch, dtype)


def _is_encoder(config) -> bool:
    return not any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in (config.architectures or []))


def fix_bnb_cpu_fast_path(model: nn.Module) -> None:
    """bitsandbytes' CPU 4-bit fast path silently needs in_features % 64 == 0; turn it off elsewhere."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and module.in_features % _BNB_CPU_BLOCK:
            module.support_avx512bf16_for_cpu = False


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    # torch CPU trap: a frozen lm_head on a non-contiguous slice (logits_to_keep) copies the
    # whole vocab matrix per row; a contiguous input keeps it one GEMM.
    return (args[0].contiguous(), *args[1:])


def load_base_model(path: str | Path | None = None, quantize: str = "auto", dtype: str = "auto",
                    device: str = "auto") -> BaseModel:
    """Load a local HF folder (or the embedded default when path is None) frozen and in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A server log is read by people and collectors: no progress bars, and no load reports (a base loaded
    # without its task head reports "missing" weights that are expected here).
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch_device = resolve_device(device)
    quant = resolve_quantize(quantize, torch_device)
    compute_dtype = resolve_dtype(dtype, torch_device)
    folder = embedded_default_path() if path is None else Path(path)
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    kind = "encoder" if _is_encoder(config) else "causal"
    kwargs: dict = {"dtype": compute_dtype}
    if quant != "none":
        kwargs["quantization_config"] = quantization_config(quant, compute_dtype)
        kwargs["device_map"] = {"": (torch_device.index or 0) if torch_device.type == "cuda" else "cpu"}
    loader = AutoModelForCausalLM if kind == "causal" else AutoModel
    try:
        model = loader.from_pretrained(folder, **kwargs)
    except ImportError as exc:
        raise BaseModelError(f"cannot load {folder} with quantize={quant}: {exc}") from exc
    if quant == "none":
        model.to(torch_device)
    else:
        fix_bnb_cpu_fast_path(model)
    model.eval()
    model.requires_grad_(False)
    if kind == "causal":
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=model, tokenizer=tokenizer, kind=kind, device=torch_device, dtype=compute_dtype,
                     quantize=quant, fingerprint=model_fingerprint(folder), path=folder)
