"""What one engine step runs: rows of every kind under a token budget and the KV cache's blocks.

The nano-vllm scheduler shape. Each step first gives every running generation row its next tokens
(one for a decode, a chunk for a prompt still being prefilled), then admits waiting rows in arrival
order while tokens and KV blocks last. A long prompt is prefilled in chunks across steps while the
running rows keep decoding. When a running row needs a block and none is free, the most recently
admitted row is preempted: its blocks are returned and it goes back to the front of the queue, to
recompute its prompt and output later (sampling is counter-based, so its tokens do not change).
Classification rows need no KV: they are admitted whole when their tokens fit the budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loraplex_server.engine.kv_cache import PagedKVCache
from loraplex_server.engine.sequence import Sequence


@dataclass
class ClassifyRow:
    """One text of a classification request; `request` collects the rows' results."""

    request: object
    index: int
    token_ids: list[int]
    slot: int
    request_id: str


@dataclass
class PlannedRow:
    row: Sequence | ClassifyRow
    start: int  # first token of the row processed this step
    token_ids: list[int]

    @property
    def is_generation(self) -> bool:
        return isinstance(self.row, Sequence)

    @property
    def samples(self) -> bool:
        """The step reaches the row's last known token, so a new one is sampled after it."""
        return self.is_generation and self.start + len(self.token_ids) == self.row.num_tokens


class StepPlanner:
    def __init__(self, kv: PagedKVCache | None, max_batch_tokens: int, max_rows: int) -> None:
        self.kv = kv
        self.max_batch_tokens = max_batch_tokens
        self.max_rows = max_rows
        self.waiting: deque[Sequence | ClassifyRow] = deque()
        self.running: list[Sequence] = []  # admitted generation rows, oldest first
        self.preemptions = 0

    def add(self, row: Sequence | ClassifyRow) -> None:
        self.waiting.append(row)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def waiting_for_kv(self) -> int:
        return sum(isinstance(r, Sequence) for r in self.waiting)

    def remove(self, request_id: str) -> list[Sequence | ClassifyRow]:
        """Take every row of a request out (cancel, failure); its blocks go back to the cache."""
        gone = [r for r in (*self.waiting, *self.running) if r.request_id == request_id]
        for row in gone:
            if row in self.running:
                self.finish(row)
            else:
                self.waiting.remove(row)
        return gone

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq.blocks)

    def _preempt(self, seq: Sequence) -> None:
        self.finish(seq)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> list[PlannedRow]:
        """This step's rows: single-token generation rows first (what the batched LoRA path wants),
        then chunks, then classification texts."""
        budget, planned = self.max_batch_tokens, []
        for seq in list(self.running):
            if budget == 0 or len(planned) == self.max_rows:
                break
            if seq not in self.running:  # preempted for an older row in this loop
                continue
            count = min(seq.num_tokens - seq.num_cached, budget)
            while not self.kv.grow(seq.blocks, seq.num_cached + count):
                victim = next((r for r in reversed(self.running) if r is not seq
                               and all(p.row is not r for p in planned)), None)
                if victim is None:
                    count = 0
                    break
                self._preempt(victim)
            if count:
                planned.append(self._plan(seq, count))
                budget -= count
        kv_blocked = False  # a generation row waits for blocks: later ones wait behind it, texts need none
        for row in list(self.waiting):
            if budget == 0 or len(planned) == self.max_rows:
                break
            if isinstance(row, ClassifyRow):
                # A text longer than the whole budget runs beside decode rows only, rather than never.
                if len(row.token_ids) > budget and any(len(p.token_ids) > 1 for p in planned):
                    break
                planned.append(PlannedRow(row, 0, row.token_ids))
                budget = max(budget - len(row.token_ids), 0)
            elif kv_blocked:
                continue
            else:
                count = min(row.num_tokens - row.num_cached, budget)
                # Blocks for the whole prompt at once: it joins only when all of it fits, and its blocks
                # come out as one run, which attention reads without a gather.
                if not self.kv.grow(row.blocks, row.num_tokens):
                    kv_blocked = True
                    continue
                self.running.append(row)
                planned.append(self._plan(row, count))
                budget -= count
            self.waiting.remove(row)
        # Within each kind, by shape: the attention buckets then are runs of the packed step.
        planned.sort(key=lambda p: (not p.is_generation, len(p.token_ids) != 1, len(p.token_ids),
                                    p.start + len(p.token_ids)))
        return planned

    @staticmethod
    def _plan(seq: Sequence, count: int) -> PlannedRow:
        start = seq.num_cached
        return PlannedRow(seq, start, seq.all_token_ids(start, start + count))
