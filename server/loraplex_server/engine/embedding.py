"""Embedding requests inside the engine: texts whose rows run in the same steps as classification texts
and generation rows, and come back pooled (pooling.py) instead of through a head.

An embedding row is a text row (`EmbedRow` is a `ClassifyRow`): it needs no KV cache, is admitted whole,
and shares the text rows' side of the planner's fairness with classification texts, in arrival order.
Its adapter, if any, is only its slot: the LoRA deltas apply on the per-row slot path, a head is unused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from loraplex_server.engine.planner import ClassifyRow
from loraplex_server.engine.requests import SlotAdapter

_embed_ids = itertools.count(1)


@dataclass
class EmbedRequest:
    """Texts (as token ids) to embed, on one adapter or the base; its result comes out of a step as Embedded."""

    token_ids: list[list[int]]
    adapter: str | None = None  # the adapter's name or key (for logs; the slot runs it); None for the base
    request_id: str = field(default_factory=lambda: f"emb-{next(_embed_ids)}")


@dataclass
class Embedded:
    """An embedding request ended: its embeddings [texts, hidden] (float32, on the CPU), or why it failed.
    The same shape as Classified, so the loop that owns the engine dispatches both alike."""

    request_id: str
    results: torch.Tensor | None
    error: BaseException | None = None


@dataclass
class EmbedRow(ClassifyRow):
    """One text of an embedding request."""


@dataclass
class Embedding:
    """An embedding request inside the engine: its slot and the vectors so far."""

    request: EmbedRequest
    adapter: SlotAdapter | None
    results: list[torch.Tensor | None]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def slot(self) -> int:
        return self.adapter.slot if self.adapter is not None else 0

    def rows(self) -> list[EmbedRow]:
        return [EmbedRow(self, i, ids, self.slot, self.request_id) for i, ids in enumerate(self.request.token_ids)]

    def done(self, row: EmbedRow, vector: torch.Tensor) -> Embedded | None:
        """Record one text's vector; the request's result once every text has one."""
        self.results[row.index] = vector
        if any(v is None for v in self.results):
            return None
        return Embedded(self.request_id, torch.stack(self.results).cpu())
