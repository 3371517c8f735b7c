"""What one engine step runs: rows of every kind under a token budget and the KV cache's blocks.

The nano-vllm scheduler shape. Each step first gives running generation rows their next tokens (one for
a decode, a chunk for a prompt still being prefilled), then admits waiting generation rows in arrival
order while tokens and KV blocks last, then classification texts in arrival order (embedding texts,
engine/embedding.py, are text rows too: they share this queue and its share). A long prompt is
prefilled in chunks across steps while the running rows keep decoding. When a running row needs a
block and none is free, the most recently admitted row is preempted: its blocks are returned and it
goes back to the front of its queue, to recompute its prompt and output later (sampling is
counter-based, so its tokens do not change). Classification rows need no KV: they are admitted whole.

A prompt chunk beside decoding rows is also held to `chunk_pairs` query-key pairs (tokens x context) where
that is set (on a CPU): its attention grows with the context it has already cached, so a late chunk of a
long prompt made one step of the decode rows beside it last as long as eleven of theirs. Its chunks shrink
(never below 16 tokens), and the rows waiting on each step stall for a bounded time; alone, it keeps the
whole budget.

Fairness between the two kinds: while both have work, each is sure of a share of every step's tokens
and rows (`share`, half by default), and a step that runs generation rows takes no more classification
tokens than that share. So a flood of texts neither delays a generation's admission (it no longer
waits behind every text queued before it) nor makes each of its decode steps cost a full budget of
prompt tokens; and a full batch of decoding rows or a long prefill never starves classification. What
one kind leaves of its share goes to generation rows; running rows that do not all fit take turns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loraplex_server.engine.kv_cache import PagedKVCache
from loraplex_server.engine.sequence import Sequence

MIN_CHUNK = 16  # tokens of a prompt chunk however long its context: a long prompt still makes progress


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
    def __init__(self, kv: PagedKVCache | None, max_batch_tokens: int, max_rows: int, share: float = 0.5,
                 prefix_caching: bool = True, chunk_pairs: int | None = None) -> None:
        self.kv = kv
        self.prefix_caching = prefix_caching
        self.chunk_pairs = chunk_pairs  # a prompt chunk's query-key pairs beside decoding rows (None: unbounded)
        self.max_batch_tokens = max_batch_tokens
        self.max_rows = max_rows
        # While both kinds have work, classification is sure of (and beside generation rows, held to)
        # this many tokens and rows of each step.
        self.classify_tokens = max(1, int(max_batch_tokens * share))
        self.classify_rows = max(1, int(max_rows * share)) if max_rows > 1 else 0
        self.waiting: deque[Sequence] = deque()  # generation rows not yet admitted, in arrival order
        self.texts: deque[ClassifyRow] = deque()  # classification rows, in arrival order
        self.running: list[Sequence] = []  # admitted generation rows, oldest first
        self.preemptions = 0
        self._turn = 0  # where the running rows start when they do not all fit a step

    def add(self, row: Sequence | ClassifyRow) -> None:
        (self.texts if isinstance(row, ClassifyRow) else self.waiting).append(row)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.texts or self.running)

    @property
    def waiting_for_kv(self) -> int:
        return len(self.waiting)

    def remove(self, request_id: str) -> list[Sequence | ClassifyRow]:
        """Take every row of a request out (cancel, failure); its blocks go back to the cache."""
        gone = [r for r in (*self.waiting, *self.texts, *self.running) if r.request_id == request_id]
        for row in gone:
            if isinstance(row, ClassifyRow):
                self.texts.remove(row)
            elif row in self.running:
                self.finish(row)
            else:
                self.waiting.remove(row)
        return gone

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq.blocks)

    def _preempt(self, seq: Sequence) -> None:
        self.finish(seq)
        seq.num_cached = seq.registered = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def computed(self, p: PlannedRow) -> None:
        """A generation row's step succeeded: its tokens up to the step's end are in the cache, and the
        blocks that became full are registered for other rows (same adapter, same tokens) to find."""
        seq = p.row
        seq.num_cached = p.start + len(p.token_ids)
        if not self.prefix_caching:
            return
        full = seq.num_cached // self.kv.block_size
        if full > seq.registered:
            keys = seq.keys(full, self.kv.block_size)
            for index in range(seq.registered, full):
                self.kv.register(seq.blocks[index], keys[index], seq.identity)
            seq.registered = full

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a new row from the longest run of its leading blocks in the prefix cache; at least its
        last token is left to compute (its logits give the next token)."""
        if self.prefix_caching and not seq.blocks:
            seq.blocks = self.kv.match(seq.keys((seq.num_tokens - 1) // self.kv.block_size, self.kv.block_size))
            seq.num_cached = seq.registered = len(seq.blocks)
            seq.num_cached *= self.kv.block_size

    def schedule(self) -> list[PlannedRow]:
        """This step's rows: generation rows under their share, then classification texts under theirs;
        within each kind, single-token rows first (what the batched LoRA path wants), then by length."""
        tokens, rows = self.max_batch_tokens, self.max_rows
        if self.texts and (self.running or self.waiting):  # keep classification's share free
            share_tokens, share_rows = self._texts_in_share()
            tokens, rows = tokens - share_tokens, rows - share_rows
        planned = self._generation(tokens, rows)
        used = sum(len(p.token_ids) for p in planned)
        tokens = self.max_batch_tokens - used
        if planned:  # a decode row pays for at most classification's share of tokens
            tokens = min(tokens, self.classify_tokens)
        planned += self._classification(tokens, self.max_rows - len(planned),
                                        chunked=any(len(p.token_ids) > 1 for p in planned))
        # Within each kind, by shape: the attention buckets then are runs of the packed step.
        planned.sort(key=lambda p: (not p.is_generation, len(p.token_ids) != 1, len(p.token_ids),
                                    p.start + len(p.token_ids)))
        return planned

    def _texts_in_share(self) -> tuple[int, int]:
        """Tokens and rows of the waiting texts that classification's share takes next (at least one
        text, at most the share's rows)."""
        tokens = rows = 0
        for row in self.texts:
            if rows == self.classify_rows or (rows and tokens + len(row.token_ids) > self.classify_tokens):
                break
            tokens, rows = tokens + len(row.token_ids), rows + 1
        return min(tokens, self.classify_tokens), rows

    def _generation(self, budget: int, rows: int) -> list[PlannedRow]:
        """Running rows' next tokens, then new rows admitted in arrival order while tokens, rows and KV
        blocks last. Running rows that do not all fit the rows take turns, starting after the last
        one served."""
        planned: list[PlannedRow] = []
        if len(self.running) > rows > 0:
            self._turn %= len(self.running)
            order = self.running[self._turn:] + self.running[:self._turn]
            self._turn += rows
        else:
            order = list(self.running)
        decoding = any(seq.num_tokens - seq.num_cached == 1 for seq in self.running)
        for seq in order:
            if budget <= 0 or len(planned) >= rows:
                break
            if seq not in self.running:  # preempted for an older row in this loop
                continue
            count = self._chunk(seq, budget, decoding)
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
        while self.waiting and budget > 0 and len(planned) < rows:
            seq = self.waiting[0]
            self._reuse_prefix(seq)
            # Blocks for the whole prompt at once: it joins only when all of it fits, and its blocks
            # come out as one run, which attention reads without a gather.
            if not self.kv.grow(seq.blocks, seq.num_tokens):
                self.kv.release(seq.blocks)  # the shared prefix too: it waits without holding blocks
                seq.num_cached = seq.registered = 0
                break  # later rows wait behind it
            self.waiting.popleft()
            self.running.append(seq)
            count = self._chunk(seq, budget, decoding)
            planned.append(self._plan(seq, count))
            budget -= count
        return planned

    def _chunk(self, seq: Sequence, budget: int, beside_decoding: bool) -> int:
        """The row's tokens this step: what it has left, within the budget and, beside decoding rows, within
        chunk_pairs for its context so far."""
        count = min(seq.num_tokens - seq.num_cached, budget)
        if count > MIN_CHUNK and beside_decoding and self.chunk_pairs:
            count = min(count, max(MIN_CHUNK, self.chunk_pairs // max(1, seq.num_cached + count)))
        return count

    def _classification(self, budget: int, rows: int, chunked: bool) -> list[PlannedRow]:
        """Waiting texts in arrival order while tokens and rows last. The first text of a step may be
        longer than what is left (a text longer than the budget would never run otherwise), unless a
        prefill chunk already makes the step long."""
        planned: list[PlannedRow] = []
        while self.texts and len(planned) < rows:
            row = self.texts[0]
            if len(row.token_ids) > budget and (planned or chunked or budget <= 0):
                break
            self.texts.popleft()
            planned.append(PlannedRow(row, 0, row.token_ids))
            budget -= len(row.token_ids)
        return planned

    @staticmethod
    def _plan(seq: Sequence, count: int) -> PlannedRow:
        start = seq.num_cached
        return PlannedRow(seq, start, seq.all_token_ids(start, start + count))
