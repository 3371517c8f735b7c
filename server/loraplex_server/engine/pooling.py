"""Sentence embeddings from a base's last hidden states: which pooling, and the pooling itself.

A base with a sentence-transformers config (modules.json naming a Pooling module and maybe a Normalize
one, and sentence_bert_config.json's max_seq_length) is pooled exactly as sentence-transformers pools
it: the embedded MiniLM encoder is mean pooling over the real tokens, then L2-normalized, on at most
256 tokens. A base without one: an encoder mean-pools, a decoder takes its last token (a causal model's
last position is the only one that has read the whole text: what decoder embedding models such as
e5-mistral and gte-Qwen use); both normalized. `serve --embed-pooling` / `--no-embed-normalize` override
the model's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "last", "cls")
# sentence-transformers' Pooling config flags -> our modes (max and mean-sqrt-len pooling are not served).
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last", "pooling_mode_cls_token": "cls"}


class PoolingConfigError(ValueError):
    """The model's sentence-transformers config asks for a pooling this server does not implement."""


@dataclass(frozen=True)
class Pooling:
    mode: str  # mean, last or cls
    normalize: bool
    max_tokens: int | None = None  # sentence-transformers' max_seq_length, when the model has one


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pooling_of(folder: Path, kind: str, mode: str | None = None, normalize: bool | None = None) -> Pooling:
    """The pooling of the base in `folder` ("causal" or "encoder"): its sentence-transformers config where it
    has one, else the default of its kind; `mode` and `normalize` (server options) override either."""
    default_mode, default_normalize, max_tokens = ("last" if kind == "causal" else "mean"), True, None
    modules = _read_json(folder / "modules.json")
    if isinstance(modules, list):
        types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
        if "Pooling" in types:
            config = _read_json(folder / str(types["Pooling"].get("path", "")) / "config.json") or {}
            chosen = [ours for flag, ours in _ST_MODES.items() if config.get(flag)]
            others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _ST_MODES]
            if others or len(chosen) > 1:
                if mode is None:
                    raise PoolingConfigError(f"{folder}: sentence-transformers pooling {others or chosen} is not "
                                             f"supported; choose one of {', '.join(POOLING_MODES)} with "
                                             "--embed-pooling")
            elif chosen:
                default_mode = chosen[0]
            default_normalize = "Normalize" in types
        settings = _read_json(folder / "sentence_bert_config.json")
        if isinstance(settings, dict) and isinstance(settings.get("max_seq_length"), int):
            max_tokens = settings["max_seq_length"]
    if mode is not None and mode not in POOLING_MODES:
        raise PoolingConfigError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLING_MODES)}")
    return Pooling(mode or default_mode, default_normalize if normalize is None else normalize, max_tokens)


def pool(rows: list[torch.Tensor], pooling: Pooling) -> torch.Tensor:
    """rows[i] = the last hidden states [tokens_i, hidden] of text i -> embeddings [texts, hidden] in float32."""
    if pooling.mode == "mean":
        vectors = torch.stack([row.float().mean(0) for row in rows])
    elif pooling.mode == "last":
        vectors = torch.stack([row[-1].float() for row in rows])
    else:
        vectors = torch.stack([row[0].float() for row in rows])
    # sentence-transformers' Normalize: F.normalize (eps 1e-12) over the embedding.
    return F.normalize(vectors, p=2, dim=-1) if pooling.normalize else vectors
