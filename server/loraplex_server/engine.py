"""The engine: one frozen base, adapters in device slots, batched classify / logits / generate.

Not thread-safe by design: one scheduler thread owns it and calls it between batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex_adapters.peft_folder import LoraAdapter, load_peft_folder

from .base_model import BaseModel
from .continuous_batch import ContinuousBatch
from .kv_cache import pad_rows, positions
from .sampling import SamplingParams
from .sequence import GenerationRequest, Sequence, TokenEvent
from .slot_table import SlotTable


class AdapterNotFound(KeyError):
    pass


class AdapterInUse(RuntimeError):
    pass


class WrongTask(ValueError):
    """A classification call on a generation adapter, or the reverse."""


@dataclass
class LoadedAdapter:
    name: str
    slot: int
    task: str
    labels: list[str]
    in_flight: int = 0


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class Generation:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    def __init__(self, base: BaseModel, max_adapters: int = 64, max_batch: int = 64) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.slots = SlotTable(base.model, max_adapters + 1, base.dtype, base.device, base.hidden_size,
                               base.head_module)
        self.adapters: dict[str, LoadedAdapter] = {}
        self.batch: ContinuousBatch | None = None
        self._sequences: dict[str, Sequence] = {}
        if base.kind == "causal":
            self.batch = ContinuousBatch(base.model, self.slots, self.tokenizer.pad_token_id, base.device, max_batch)
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.base.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
        return ids

    # -- adapters -------------------------------------------------------------------------------

    def load_adapter(self, name: str, source: str | Path | LoraAdapter, labels: list[str] | None = None,
                     validate: bool = True) -> LoadedAdapter:
        """Write an adapter into a free slot; validate=False skips the fit check for an adapter this
        engine has already loaded once (a swap back in from the host tier)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        adapter = source if isinstance(source, LoraAdapter) else load_peft_folder(source)
        if adapter.head is not None:
            labels = list(labels) if labels else [f"LABEL_{i}" for i in range(adapter.head.num_labels)]
            if len(labels) != adapter.head.num_labels:
                raise ValueError(f"{len(labels)} label names for a head with {adapter.head.num_labels} outputs")
        elif self.base.kind != "causal":
            raise ValueError("an encoder base serves classification adapters only (this one has no head)")
        slot = self.slots.allocate(adapter, validate)
        loaded = LoadedAdapter(name=name, slot=slot, task=adapter.task, labels=labels or [])
        self.adapters[name] = loaded
        return loaded

    def unload_adapter(self, name: str) -> None:
        loaded = self._adapter(name)
        if loaded.in_flight:
            raise AdapterInUse(f"adapter {name!r} is used by {loaded.in_flight} running request(s)")
        self.slots.release(loaded.slot)
        del self.adapters[name]

    def _adapter(self, name: str) -> LoadedAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise AdapterNotFound(f"adapter {name!r} is not loaded") from None

    def _slot(self, name: str | None, task: str) -> int:
        if name is None:
            return 0
        loaded = self._adapter(name)
        if loaded.task != task:
            raise WrongTask(f"adapter {name!r} is a {loaded.task} adapter, not {task}")
        return loaded.slot

    # -- one forward over rows of different adapters ---------------------------------------------

    @torch.inference_mode()
    def logits(self, token_ids: list[list[int]], adapters: list[str | None], last_only: bool = False
               ) -> list[torch.Tensor]:
        """Language-model logits [len, vocab] for every row, each under its own adapter (None = base);
        with last_only, just the last position's [1, vocab] (what a prefill needs)."""
        if self.base.kind != "causal":
            raise WrongTask("an encoder base has no language-model head")
        slots = [0 if a is None else self._adapter(a).slot for a in adapters]
        ids, mask = pad_rows(token_ids, self.tokenizer.pad_token_id, self.base.device)
        self.slots.state.set_rows(slots, self.base.device)
        out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                              logits_to_keep=1 if last_only else 0)
        if last_only:
            return [row.float() for row in out.logits]
        return [out.logits[row, ids.shape[1] - len(seq):].float() for row, seq in enumerate(token_ids)]

    @torch.inference_mode()
    def classify_ids(self, token_ids: list[list[int]], adapters: list[str]) -> list[Classification]:
        """One forward for rows of (possibly) different classification adapters."""
        loaded = [self._adapter(a) for a in adapters]
        slots = [self._slot(a, "classification") for a in adapters]
        self.slots.state.set_rows(slots, self.base.device)
        if self.base.kind == "causal":
            ids, mask = pad_rows(token_ids, self.tokenizer.pad_token_id, self.base.device)
            hidden = self.base.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                                use_cache=False).last_hidden_state[:, -1]
        else:
            ids, mask = pad_rows(token_ids, self.tokenizer.pad_token_id, self.base.device, left=False)
            hidden = self.base.model(input_ids=ids, attention_mask=mask).pooler_output
        results = []
        for adapter, row_logits in zip(loaded, self.slots.heads.logits(hidden, slots), strict=True):
            probs = row_logits.softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            scores = dict(zip(adapter.labels, probs, strict=True))
            results.append(Classification(adapter.labels[best], probs[best], scores))
        return results

    def classify(self, texts: list[str], adapter: str) -> list[Classification]:
        return self.classify_ids([self.tokenizer(t)["input_ids"] for t in texts], [adapter] * len(texts))

    # -- generation -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the running batch at the next step."""
        if self.batch is None:
            raise WrongTask("an encoder base cannot generate")
        request.params.validate()
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        if len(request.prompt_ids) >= self.base.max_positions:
            raise ValueError(f"prompt has {len(request.prompt_ids)} tokens; the model's context is "
                             f"{self.base.max_positions}")
        slot = self._slot(request.adapter, "generation")
        seq = Sequence(request, slot, self.eos_ids, self.base.max_positions)
        if request.adapter is not None:
            self.adapters[request.adapter].in_flight += 1
        self._sequences[request.request_id] = seq
        self.batch.add(seq)

    def cancel(self, request_id: str) -> None:
        if self.batch is not None and request_id in self._sequences:
            self.batch.cancel(request_id)

    def running_request_ids(self) -> list[str]:
        return list(self._sequences)

    @property
    def has_work(self) -> bool:
        return self.batch is not None and self.batch.has_work

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One forward pass of the running batch; returns every row's new token (or finish)."""
        if not self.has_work:
            return []
        events = self.batch.step(self.tokenizer)
        for event in events:
            seq = self._sequences[event.request_id]
            if event.finished:
                del self._sequences[event.request_id]
                if seq.request.adapter is not None:
                    self.adapters[seq.request.adapter].in_flight -= 1
            if seq.request.on_event is not None:
                seq.request.on_event(event)
        return events

    def generate(self, prompts: list[list[int]], adapters: list[str | None], params: SamplingParams | None = None
                 ) -> list[Generation]:
        """Run requests to completion through the continuous batch (a convenience for tests and benches)."""
        done: dict[str, Generation] = {}
        requests = [GenerationRequest(p, a, params or SamplingParams()) for p, a in zip(prompts, adapters, strict=True)]
        seqs = {}
        for request in requests:
            self.submit(request)
            seqs[request.request_id] = self._sequences[request.request_id]
        while any(r.request_id not in done for r in requests):
            for event in self.step():
                if event.finished and event.request_id in seqs:
                    done[event.request_id] = self.result(seqs[event.request_id])
        return [done[r.request_id] for r in requests]

    @staticmethod
    def result(seq: Sequence) -> Generation:
        return Generation(seq.request_id, seq.text, list(seq.output_ids), seq.finish_reason or "",
                          len(seq.request.prompt_ids), len(seq.output_ids))
