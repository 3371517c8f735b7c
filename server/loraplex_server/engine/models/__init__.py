"""Our own model code (the Llama family), run by the model runner instead of the Hugging Face modules.

`own_forward` is the one place that picks the path: our forward where the base allows it, else None
(the Hugging Face modules: GPT-2, encoders, quantized bases, unusual rope or attention), logged either way.
"""

from __future__ import annotations

import logging

from torch import nn

from loraplex_server.engine.models.llama import LlamaForward, unsupported_reason
from loraplex_server.lora.layers import BatchState

log = logging.getLogger(__name__)


def own_forward(model: nn.Module, quantize: str, state: BatchState) -> LlamaForward | None:
    """Our forward over `model`'s weights, or None where the Hugging Face path must run (says why)."""
    reason = "quantized base (bitsandbytes)" if quantize != "none" else unsupported_reason(model)
    if reason is None:
        log.info("model forward: loraplex Llama-family forward (%s)", model.config.model_type)
        return LlamaForward(model, state)
    log.info("model forward: Hugging Face modules (%s)", reason)
    return None
