"""How a base model is quantized, shared by the server and the trainer so both load the same base."""

from __future__ import annotations

import torch


def quantization_config(quantize: str, dtype: torch.dtype):
    """bitsandbytes settings for an "nf4" or "int8" base."""
    from transformers import BitsAndBytesConfig

    # Keep the output projections unquantized: PEFT's reference does the same.
    skip = ["lm_head", "score", "classifier", "pooler"]
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
