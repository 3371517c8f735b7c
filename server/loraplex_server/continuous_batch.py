"""Continuous batching: requests join the running batch between decode steps and leave when done.

Each `step()` is one forward pass: a prefill of the waiting requests (they join the batch with their
first token) when there are any and there is room, otherwise one decode step for every running row.
Each row keeps its own adapter slot and sampling state.
"""

from __future__ import annotations

from collections import deque

import torch
from transformers import DynamicCache

from .kv_cache import BatchKVCache, pad_rows, positions
from .sampling import sample
from .sequence import Sequence, TokenEvent
from .slot_table import SlotTable


class ContinuousBatch:
    def __init__(self, model, slots: SlotTable, pad_id: int, device: torch.device, max_batch: int = 64) -> None:
        self.model = model
        self.slots = slots
        self.pad_id = pad_id
        self.device = device
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv: BatchKVCache | None = None
        self._cancelled: set[str] = set()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        """The request leaves at the start of the next step (a finished event is emitted then)."""
        self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self, tokenizer) -> list[TokenEvent]:
        events = self._drop_cancelled()
        if self.waiting and len(self.running) < self.max_batch:
            events += self._prefill(tokenizer)
        elif self.running:
            events += self._decode(tokenizer)
        return events

    def _drop_cancelled(self) -> list[TokenEvent]:
        if not self._cancelled:
            return []
        events = []
        for seq in [s for s in self.waiting if s.request_id in self._cancelled]:
            self.waiting.remove(seq)
            events.append(seq.cancel())
        gone = [s for s in self.running if s.request_id in self._cancelled]
        for seq in gone:
            events.append(seq.cancel())
        self._cancelled.clear()
        if gone:
            self._keep_unfinished()
        return events

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: DynamicCache, rows: list[Sequence]) -> torch.Tensor:
        self.slots.state.set_rows([s.slot for s in rows], self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _prefill(self, tokenizer) -> list[TokenEvent]:
        joining = []
        while self.waiting and len(self.running) + len(joining) < self.max_batch:
            joining.append(self.waiting.popleft())
        ids, mask = pad_rows([s.request.prompt_ids for s in joining], self.pad_id, self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions(mask), cache, joining)
        new_kv = BatchKVCache(cache, mask)
        if self.kv is None:
            self.kv = new_kv
        else:
            self.kv.merge(new_kv)
        self.running.extend(joining)
        return self._sample(logits, joining, tokenizer)

    def _decode(self, tokenizer) -> list[TokenEvent]:
        rows = self.running
        ids = torch.tensor([[s.output_ids[-1]] for s in rows], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[s.num_tokens - 1] for s in rows], dtype=torch.long, device=self.device)
        logits = self._forward(ids, self.kv.extend_mask(), position_ids, self.kv.cache, rows)
        return self._sample(logits, rows, tokenizer)

    def _sample(self, logits: torch.Tensor, rows: list[Sequence], tokenizer) -> list[TokenEvent]:
        tokens = sample(logits, [s.params for s in rows], [s.seed for s in rows], [len(s.output_ids) for s in rows])
        events = [seq.append(tok, tokenizer) for seq, tok in zip(rows, tokens, strict=True)]
        if any(s.finished for s in rows):
            self._keep_unfinished()
        return events

    def _keep_unfinished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if not s.finished]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.kv = None
        else:
            self.kv.select(keep)
