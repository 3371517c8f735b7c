"""adapter_config.json: what the server honours, checked as values before any of it is used.

PEFT matches `alpha_pattern`/`rank_pattern` keys as regular expressions (`(.*\\.)?(KEY)$`). A regex
built from client input can backtrack for seconds with the GIL held, so keys must be plain dotted
module names and are matched here as literal dotted suffixes, which is what PEFT's match does for
such keys.
"""

from __future__ import annotations

import math
import re

from .format_errors import AdapterFormatError, brief

MAX_PATTERN_ENTRIES = 4096
_PLAIN_MODULE = re.compile(r"[A-Za-z0-9_.]{1,1024}")
_UNSUPPORTED_VARIANTS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias (lora_bias=true)",
    "use_qalora": "QALoRA (use_qalora=true)",
}
_UNSUPPORTED_OPTIONS = ("layers_to_transform", "trainable_token_indices", "target_parameters",
                        "alora_invocation_tokens")


def check_config(config: dict) -> None:
    """Raise AdapterFormatError for a variant the server cannot serve or a value it cannot use."""
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterFormatError(f"unsupported PEFT type {brief(peft_type)}: only LoRA adapters are served")
    for key, what in _UNSUPPORTED_VARIANTS.items():
        if config.get(key):
            raise AdapterFormatError(f"unsupported LoRA variant: {what}")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"unsupported bias training (bias={brief(config['bias'])}); train with bias='none'")
    for key in _UNSUPPORTED_OPTIONS:
        if config.get(key):
            raise AdapterFormatError(f"unsupported adapter option {key}={brief(config[key])}")
    if "lora_alpha" in config:
        _positive_number("lora_alpha", config["lora_alpha"])
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterFormatError(f"use_rslora must be true or false, got {brief(config['use_rslora'])}")
    for field in ("alpha_pattern", "rank_pattern"):
        _check_patterns(field, config.get(field))


def _positive_number(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise AdapterFormatError(f"{what} must be a finite number > 0, got {brief(value)}")
    return value


def _check_patterns(field: str, patterns: object) -> None:
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"{field} must be an object of module name -> value, got {brief(patterns)}")
    if len(patterns) > MAX_PATTERN_ENTRIES:
        raise AdapterFormatError(f"{field} has {len(patterns)} entries; at most {MAX_PATTERN_ENTRIES}")
    for key, value in patterns.items():
        if not _PLAIN_MODULE.fullmatch(key):
            raise AdapterFormatError(f"{field} key {brief(key)} is not a plain module name: use letters, digits, "
                                     "'_' and '.' (regular expressions are not accepted)")
        _positive_number(f"{field}[{key!r}]", value)


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """The value of the first key (in the config's order) that is `module` or a dotted suffix of it."""
    if not patterns:
        return default
    order = {key: i for i, key in enumerate(patterns)}
    parts = module.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    matches = [s for s in suffixes if s in order]
    return patterns[min(matches, key=order.__getitem__)] if matches else default


def scaling(config: dict, module: str, rank: int) -> float:
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
