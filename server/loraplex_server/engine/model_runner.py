"""One forward over a step's planned rows: pack them, set each row's adapter and attention context,
run the base, and return what postprocessing needs (nano-vllm's ModelRunner role).

Llama-family bases run on our own forward (engine/models/); others, or LORAPLEX_OWN_FORWARD=0, on the
Hugging Face modules with our paged attention registered as their attention function.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from loraplex_server.engine.base_model import BaseModel
from loraplex_server.engine.embedding import EmbedRow
from loraplex_server.engine.kv_cache import PagedKVCache
from loraplex_server.engine.models import own_forward
from loraplex_server.engine.models.step_graphs import StepGraphs, compile_mode
from loraplex_server.engine.padded_batch import pad_rows
from loraplex_server.engine.paged_attention import ATTENTION, RowShape, StepAttention, plan_buckets
from loraplex_server.engine.planner import PlannedRow
from loraplex_server.engine.pooling import Pooling, pool, pooling_of
from loraplex_server.lora.slot_table import SlotTable


class ModelRunner:
    def __init__(self, base: BaseModel, slots: SlotTable, kv: PagedKVCache | None, max_rows: int = 64) -> None:
        self.base, self.slots, self.kv = base, slots, kv
        self.pooling: Pooling = pooling_of(base.path, base.kind)  # the engine sets the server's choice
        self.forward = None
        self.graphs: StepGraphs | None = None  # pure decode steps replayed per bucket (step_graphs.py)
        if kv is not None:
            if os.environ.get("LORAPLEX_OWN_FORWARD", "1") != "0":
                self.forward = own_forward(base.model, base.quantize, slots.state)
            base.model.set_attn_implementation(ATTENTION)
            config = base.model.config
            heads = getattr(config, "num_attention_heads", None) or config.n_head
            self._group = heads // kv.keys[0].shape[1]  # query heads per key/value head
        if self.forward is not None:
            mode = compile_mode(base.device)
            if mode != "off":
                self.graphs = StepGraphs(self.forward, kv, base.device, mode, max_rows, base.max_positions)
                if mode != "eager":
                    with torch.inference_mode():
                        self.graphs.warm_up()

    def run(self, planned: list[PlannedRow]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Logits of the rows that sample, and each text row's output: a classification row's head logits,
        an embedding row's pooled vector."""
        slots = [p.row.slot for p in planned]
        if self.kv is None:  # an encoder: text rows only, padded, bidirectional
            device = self.base.device
            ids, mask = pad_rows([p.token_ids for p in planned], self.base.tokenizer.pad_token_id, device, left=False)
            self.slots.state.set_rows(slots, device)
            out = self.base.model(input_ids=ids, attention_mask=mask)
            states = [out.last_hidden_state[i, :len(p.token_ids)] for i, p in enumerate(planned)]
            return None, self._text_outputs(planned, states, lambda rows: out.pooler_output[rows])
        hidden = self.hidden(planned)
        last = torch.tensor([len(p.token_ids) for p in planned], device=hidden.device).cumsum(0) - 1
        samples = [i for i, p in enumerate(planned) if p.samples]
        sample_logits = self.lm_logits(hidden[last[samples]]) if samples else None
        starts = (last + 1).tolist()
        states = [hidden[end - len(p.token_ids):end] for p, end in zip(planned, starts, strict=True)]
        return sample_logits, self._text_outputs(planned, states, lambda rows: hidden[last[rows]])

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language-model head's logits [rows, vocab] of final hidden states [rows, hidden]."""
        if self.forward is not None:  # our forward holds the head's weights (maybe in its own layout)
            return self.forward.logits(hidden)
        return self.base.model.get_output_embeddings()(hidden)

    def _text_outputs(self, planned: list[PlannedRow], states: list[torch.Tensor],
                      head_inputs: Callable[[list[int]], torch.Tensor]) -> list[torch.Tensor]:
        """Per text row, in order: head logits of the classification rows (their heads batched, on what
        `head_inputs` gives for those rows), pooled vectors of the embedding rows (all in one pool call)."""
        texts = [i for i, p in enumerate(planned) if not p.is_generation]
        embed = [i for i in texts if isinstance(planned[i].row, EmbedRow)]
        classify = [i for i in texts if not isinstance(planned[i].row, EmbedRow)]
        outputs: dict[int, torch.Tensor] = {}
        if classify:
            logits = self.slots.heads.logits(head_inputs(classify), [planned[i].row.slot for i in classify])
            outputs.update(zip(classify, logits, strict=True))
        if embed:
            outputs.update(zip(embed, pool([states[i] for i in embed], self.pooling), strict=True))
        return [outputs[i] for i in texts]

    def hidden(self, planned: list[PlannedRow]) -> torch.Tensor:
        """The last hidden states [tokens, hidden] of the rows packed back to back."""
        if self.graphs is not None and self.graphs.accepts(planned):
            self.forward.bind(self.slots.layers)
            return self.graphs.run(planned)
        device, ids, positions, lengths = self.base.device, [], [], []
        for p in planned:
            ids += p.token_ids
            positions += range(p.start, p.start + len(p.token_ids))
            lengths.append(len(p.token_ids))
        self.slots.state.set_rows([p.row.slot for p in planned], device, lengths)
        if self.forward is not None:
            self.forward.bind(self.slots.layers)
            return self.forward(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                self._attention(planned))
        return self.base.model.base_model(input_ids=torch.tensor([ids], device=device),
                                          position_ids=torch.tensor([positions], device=device),
                                          step=self._attention(planned), use_cache=False).last_hidden_state[0]

    def _attention(self, planned: list[PlannedRow]) -> StepAttention:
        writes, rows, offset = [], [], 0
        for p in planned:
            n = len(p.token_ids)
            if p.is_generation:
                blocks, length = p.row.blocks, p.start + n
                context = self.kv.slot_index(blocks, 0, length)
                writes.append(context[p.start:])
                run = blocks[0] * self.kv.block_size if self.kv.contiguous(blocks, length) else None
                rows.append(RowShape(offset, n, context, run))
            else:
                rows.append(RowShape(offset, n, None))
            offset += n
        write_index = torch.cat(writes).to(self.base.device) if writes else None
        return StepAttention(self.kv, write_index, plan_buckets(rows, self._group, self.base.device))
