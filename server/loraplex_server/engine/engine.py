"""The engine: one frozen base, adapters in device slots, and a step loop over rows of every kind.

`step()` = plan (StepPlanner: token budget, KV blocks) -> one forward over the packed rows (each on its
own adapter) -> postprocess (sample, detokenize, finish, classify), and returns what happened: token
events and finished classifications. It calls nobody back; the loop that owns it dispatches. Not
thread-safe by design: one thread owns it.

The engine knows adapters only as slots (`SlotAdapter`): the caller that placed an adapter (the
runtime's AdapterManager) passes its slot with each request. `load_adapter` names adapters for tests
and benchmarks that run an engine without a manager.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex_adapters.peft_folder import LoraAdapter, load_peft_folder
from loraplex_server.engine.base_model import BaseModel
from loraplex_server.engine.choices import choice_ended, fits_choices, fork, forks_now
from loraplex_server.engine.embedding import Embedded, Embedding, EmbedRequest, EmbedRow
from loraplex_server.engine.grammar import RowGrammar, mask_logits
from loraplex_server.engine.kv_cache import PagedKVCache, bytes_per_token
from loraplex_server.engine.logprobs import token_logprobs, wants_logprobs
from loraplex_server.engine.model_runner import ModelRunner
from loraplex_server.engine.planner import ClassifyRow, PlannedRow, StepPlanner
from loraplex_server.engine.pooling import Pooling
from loraplex_server.engine.requests import (
    AdapterInUse,
    AdapterNotFound,
    Classification,
    Classified,
    ClassifyRequest,
    EngineFailure,
    Generation,
    SlotAdapter,
    StepOutput,
    WrongTask,
    adapter_labels,
)
from loraplex_server.engine.sampling import SamplingParams, sample
from loraplex_server.engine.sequence import GenerationRequest, Sequence
from loraplex_server.engine.step_threads import StepThreads
from loraplex_server.lora.slot_table import SlotTable

log = logging.getLogger(__name__)


@dataclass
class _Classifying:
    """A classification request inside the engine: its adapter and the results so far."""

    request: ClassifyRequest
    adapter: SlotAdapter
    results: list[Classification | None]

    @property
    def request_id(self) -> str:
        return self.request.request_id


_writes = itertools.count(1)


def default_batch_tokens(device: torch.device, kind: str = "causal", max_batch: int = 64) -> int:
    """Tokens per step: on a CPU a step of 128 prompt tokens costs a few decode steps, so running rows
    never stall long while a long prompt is prefilled in chunks; a GPU takes far more at the same cost. An
    encoder has no decoding rows to keep waiting: a step takes a full batch of texts of up to 256 tokens
    (what sentence-transformers' encode batches)."""
    if kind != "causal":
        return max_batch * 256
    return 2048 if device.type == "cuda" else 128


def default_chunk_pairs(device: torch.device, batch_tokens: int) -> int | None:
    """A prompt chunk's query-key pairs beside decoding rows (planner.py): on a CPU, a full chunk's up to a
    context of 128, so a 2,048-token prompt's chunks shrink to 16 tokens. torch's CPU flash attention ran about
    80 GFLOP/s in bf16 here: a 112-token chunk late in that prompt made a step of 16 decode rows 5x longer
    (`bench.generation`: max_stall_vs_step 11.3; 6.4 at 512 pairs a token, 3.9 at 128). The prompt's own
    first token then comes later (2.6x its time alone, from 1.1x). A GPU's attention is not what makes its
    steps long: unbounded there."""
    return None if device.type == "cuda" else batch_tokens * 128


def default_kv_memory(base: BaseModel, rows: int) -> int:
    """Enough for `rows` rows at the model's full context, bounded by a share of the free memory."""
    wanted = rows * base.max_positions * bytes_per_token(base.model.config, base.dtype)
    if base.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(base.device)
        return min(wanted, int(free * 0.5))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(wanted, available // 4)


class Engine:
    def __init__(self, base: BaseModel, max_adapters: int = 64, max_batch: int = 64,
                 max_batch_tokens: int | None = None, kv_cache_memory: int | None = None,
                 prefix_caching: bool = True, pooling: Pooling | None = None,
                 threads: StepThreads | None = None) -> None:
        self.base = base
        self.threads = threads  # CPU threads per step (a server's, step_threads.py); None: torch's as they are
        self.tokenizer = base.tokenizer
        self.slots = SlotTable(base.model, max_adapters + 1, base.dtype, base.device, base.hidden_size,
                               base.head_module)
        self.adapters: dict[str, SlotAdapter] = {}  # named by load_adapter (tests, benchmarks); never by the server
        self.kv: PagedKVCache | None = None
        if base.kind == "causal":
            self.kv = PagedKVCache(base.model.config, base.dtype, base.device,
                                   kv_cache_memory or default_kv_memory(base, max_batch))
        self.runner = ModelRunner(base, self.slots, self.kv, max_rows=max_batch)
        if pooling is not None:  # else the model's own (pooling.pooling_of)
            self.runner.pooling = pooling
        batch_tokens = max_batch_tokens or default_batch_tokens(base.device, base.kind, max_batch)
        self.planner = StepPlanner(self.kv, batch_tokens, max_batch, prefix_caching=prefix_caching,
                                   chunk_pairs=default_chunk_pairs(base.device, batch_tokens))
        self._requests: dict[str, Sequence | _Classifying | Embedding] = {}
        self._cancelled: set[str] = set()
        self._grammars: dict[str, RowGrammar] = {}  # the matchers of constrained rows, by request id
        self.last_step: tuple[tuple[int, ...], int] = ((), 0)  # the rows' slots and the tokens (metrics)
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.base.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
        return ids

    # -- adapters -------------------------------------------------------------------------------

    def write_adapter(self, adapter: LoraAdapter, labels: list[str] | None = None, validate: bool = True,
                      identity: str | None = None) -> SlotAdapter:
        """Write an adapter into a free slot; validate=False skips the fit check for an adapter this
        engine has already written once (a swap back in from the host tier). `identity` keys its
        prefix-cache blocks: the same for the same weights (an adapter version swapped back in finds its
        blocks again), never reused for other weights; by default one of its own."""
        if adapter.head is None and self.base.kind != "causal":
            raise ValueError("an encoder base serves classification adapters only (this one has no head)")
        names = adapter_labels(adapter, labels)
        identity = identity if identity is not None else f"write-{next(_writes)}"
        return SlotAdapter(self.slots.allocate(adapter, validate), adapter.task, names, identity)

    def forget_prefixes(self, identity: str) -> None:
        """No new row may reuse blocks computed with this adapter (it was deleted)."""
        if self.kv is not None:
            self.kv.forget(identity)

    def free_adapter(self, adapter: SlotAdapter) -> None:
        """Free its slot; refused while a queued or running request uses it."""
        users = sum(r.adapter.slot == adapter.slot if isinstance(r, _Classifying) else r.slot == adapter.slot
                    for r in self._requests.values())  # an Embedding has its slot too
        if users:
            raise AdapterInUse(f"the adapter in slot {adapter.slot} is used by {users} running request(s)")
        self.slots.release(adapter.slot)

    def load_adapter(self, name: str, source: str | Path | LoraAdapter, labels: list[str] | None = None,
                     validate: bool = True) -> SlotAdapter:
        """Read (a folder) and write an adapter under a name the conveniences below and `submit` accept."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        adapter = source if isinstance(source, LoraAdapter) else load_peft_folder(source)
        self.adapters[name] = self.write_adapter(adapter, labels, validate)
        return self.adapters[name]

    def unload_adapter(self, name: str) -> None:
        self.free_adapter(self._named(name))
        del self.adapters[name]

    def _named(self, name: str) -> SlotAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise AdapterNotFound(f"adapter {name!r} is not loaded") from None

    def _placed(self, name: str | None, adapter: SlotAdapter | None, task: str) -> SlotAdapter | None:
        """The slot a request runs on: the one given, else the adapter named by load_adapter."""
        if adapter is None and name is not None:
            adapter = self._named(name)
        if adapter is not None and adapter.task != task:
            raise WrongTask(f"adapter {name!r} is a {adapter.task} adapter, not {task}")
        return adapter

    # -- requests -------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, adapter: SlotAdapter | None = None) -> None:
        """Queue a generation on `adapter` (default: the one load_adapter named request.adapter; none for
        the base); it joins the running rows when the budget and the KV cache allow."""
        if self.kv is None:
            raise WrongTask("an encoder base cannot generate")
        request.params.validate()
        prompt = len(request.prompt_ids)
        if not prompt:
            raise ValueError("empty prompt")
        if prompt >= self.base.max_positions:
            raise ValueError(f"prompt has {prompt} tokens; the model's context is {self.base.max_positions}")
        longest = min(prompt + request.params.max_new_tokens, self.base.max_positions)
        if longest > self.kv.capacity_tokens:
            raise ValueError(f"prompt ({prompt} tokens) plus max_tokens ({request.params.max_new_tokens}) can "
                             f"never fit the KV cache of {self.kv.capacity_tokens} tokens; send less")
        if request.params.n > 1 and request.grammar is not None:  # one matcher per request, not per choice
            raise ValueError("n > 1 cannot be combined with a constraint on the output; send n requests")
        if request.params.n > 1 and not fits_choices(prompt, longest - prompt, request.params.n, self.kv):
            raise ValueError(f"n ({request.params.n}) choices of max_tokens ({request.params.max_new_tokens}) "
                             f"after a prompt of {prompt} tokens can never fit the KV cache of "
                             f"{self.kv.capacity_tokens} tokens; send a smaller n or max_tokens")
        placed = self._placed(request.adapter, adapter, "generation")
        seq = Sequence(request, placed.slot if placed else 0, self.eos_ids, self.base.max_positions,
                       placed.identity if placed else "")
        self._requests[request.request_id] = seq
        if request.grammar is not None:
            self._grammars[request.request_id] = RowGrammar(request.grammar, restart=request.params.ignore_eos)
        self.planner.add(seq)

    def submit_classify(self, request: ClassifyRequest, adapter: SlotAdapter | None = None) -> None:
        """Queue classification texts on `adapter` (default: the one load_adapter named request.adapter);
        each text becomes a row of the coming steps."""
        placed = self._placed(request.adapter, adapter, "classification")
        if placed is None:
            raise WrongTask("classification needs a classification adapter")
        if not request.token_ids or any(not ids for ids in request.token_ids):
            raise ValueError("empty input")
        classifying = _Classifying(request, placed, [None] * len(request.token_ids))
        self._requests[request.request_id] = classifying
        for index, ids in enumerate(request.token_ids):
            self.planner.add(ClassifyRow(classifying, index, ids, placed.slot, request.request_id))

    def submit_embed(self, request: EmbedRequest, adapter: SlotAdapter | None = None) -> None:
        """Queue texts to embed on `adapter` (an adapter of any task: its LoRA deltas apply, a head is unused;
        default: the one load_adapter named request.adapter, or the base); each text is a row of the coming
        steps, beside classification texts."""
        if adapter is None and request.adapter is not None:
            adapter = self._named(request.adapter)
        if not request.token_ids or any(not ids for ids in request.token_ids):
            raise ValueError("empty input")
        longest = max(map(len, request.token_ids))
        if longest > self.base.max_positions:
            raise ValueError(f"a text has {longest} tokens; the model's context is {self.base.max_positions}")
        embedding = Embedding(request, adapter, [None] * len(request.token_ids))
        self._requests[request.request_id] = embedding
        # Shortest first, as sentence-transformers' encode orders a batch: each step's texts are of similar
        # length, so an encoder's padded batch wastes little (results are kept in input order).
        for row in sorted(embedding.rows(), key=lambda r: len(r.token_ids)):
            self.planner.add(row)

    def cancel(self, request_id: str) -> None:
        """The request leaves at the start of the next step (a finished event is emitted then)."""
        if request_id in self._requests:
            self._cancelled.add(request_id)

    def running_request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def has_work(self) -> bool:
        return self.planner.has_work

    # -- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One forward pass over this step's rows; returns the events and classifications it produced."""
        out = StepOutput()
        for request_id in list(self._cancelled):
            self._end(request_id, None, out)
        self._cancelled.clear()
        planned = self.planner.schedule()
        self.last_step = tuple(p.row.slot for p in planned), sum(len(p.token_ids) for p in planned)
        if not planned:
            return out
        if self.threads is not None:
            self.threads.apply(self.last_step[1])
        try:
            self._postprocess(planned, *self.runner.run(planned), out)
        except Exception:  # noqa: BLE001 - one row's failure must not end the others: find it
            self._isolate(planned, out)
        return out

    def _isolate(self, planned: list[PlannedRow], out: StepOutput) -> None:
        """The step failed: run each of its rows alone, so only a row that fails alone ends, with its
        error. Safe to repeat: a row's state moves only once its own step succeeded, and a retried
        row rewrites the same cache positions with the same keys and values."""
        for p in planned:
            if p.row.request_id not in self._requests:  # a classification request that already ended
                continue
            try:
                self._postprocess([p], *self.runner.run([p]), out)
            except Exception as exc:  # noqa: BLE001
                log.warning("request %s failed in the engine: %s", p.row.request_id, exc)
                self._end(p.row.request_id, exc, out)

    def _postprocess(self, planned: list[PlannedRow], sample_logits: torch.Tensor | None,
                     class_logits: list[torch.Tensor], out: StepOutput) -> None:
        for p, output in zip([p for p in planned if not p.is_generation], class_logits, strict=True):
            if isinstance(p.row, EmbedRow):
                self._embedded(p.row, output, out)
            else:
                self._classified(p.row, output, out)
        generation = [p for p in planned if p.is_generation]
        for p in generation:
            self.planner.computed(p)
        sampling = [p.row for p in generation if p.samples]
        if not sampling:
            return
        if self._grammars:  # no grammar work at all in a step without constrained rows (n is 1 for those)
            sample_logits = mask_logits(sample_logits, [self._grammars.get(s.request_id) for s in sampling])
        forking = [i for i, s in enumerate(sampling) if forks_now(s)]
        if forking:  # n > 1: the other choices draw their first token from the same logits
            rows = [i for i in forking for _ in range(sampling[i].params.n - 1)]
            sampling = sampling + [c for i in forking for c in fork(sampling[i], self.planner)]
            sample_logits = torch.cat([sample_logits, sample_logits[rows]])
        params = [s.params for s in sampling]
        tokens = sample(sample_logits, params, [s.seed for s in sampling], [len(s.output_ids) for s in sampling])
        logprobs = (token_logprobs(sample_logits, params, tokens) if any(map(wants_logprobs, params))
                    else [None] * len(tokens))
        for seq, token, token_logprob in zip(sampling, tokens, logprobs, strict=True):
            event = seq.append(token, self.tokenizer)
            event.logprobs, event.index = token_logprob, seq.index
            if self._grammars:
                self._advance_grammar(seq, token)
            if seq.finished:
                if seq in self.planner.running:
                    self.planner.finish(seq)
                else:  # a choice forked into the queue (no block was free) that ended on its first token
                    self.planner.waiting.remove(seq)
                event.finished = choice_ended(seq)
                if event.finished:
                    self._requests.pop(seq.request_id, None)
            out.events.append(event)

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        grammar = self._grammars.get(seq.request_id)
        if grammar is not None and not grammar.accept(token):
            log.warning("request %s: its grammar refused token %d despite the mask", seq.request_id, token)
        if seq.finished:
            self._grammars.pop(seq.request_id, None)

    def _classified(self, row: ClassifyRow, logits: torch.Tensor, out: StepOutput) -> None:
        request: _Classifying = row.request
        labels = request.adapter.labels
        probs = logits.softmax(-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        request.results[row.index] = Classification(labels[best], probs[best], dict(zip(labels, probs, strict=True)))
        if all(r is not None for r in request.results):
            self._requests.pop(request.request_id, None)
            out.classified.append(Classified(request.request_id, list(request.results)))

    def _embedded(self, row: EmbedRow, vector: torch.Tensor, out: StepOutput) -> None:
        done = row.request.done(row, vector)
        if done is not None:
            self._requests.pop(done.request_id, None)
            out.embedded.append(done)

    def _end(self, request_id: str, error: BaseException | None, out: StepOutput) -> None:
        """Take a request out (cancelled, or its step failed with `error`); its end goes into `out`."""
        request = self._requests.pop(request_id, None)
        self._grammars.pop(request_id, None)
        if request is None:
            return
        self.planner.remove(request_id)
        failure = EngineFailure(error) if error else None
        if isinstance(request, _Classifying):
            out.classified.append(Classified(request_id, None, failure or RuntimeError("cancelled")))
        elif isinstance(request, Embedding):
            out.embedded.append(Embedded(request_id, None, failure or RuntimeError("cancelled")))
        else:
            out.events.append(request.cancel(failure))

    # -- conveniences for tests and benchmarks ----------------------------------------------------

    @torch.inference_mode()
    def logits(self, token_ids: list[list[int]], adapters: list[str | None], last_only: bool = False
               ) -> list[torch.Tensor]:
        """Language-model logits [len, vocab] for every row, each under its own adapter (None = base),
        in one packed forward without the KV cache; with last_only, just the last position's [1, vocab]."""
        if self.kv is None:
            raise WrongTask("an encoder base has no language-model head")
        if any(not ids for ids in token_ids):
            raise ValueError("empty input")
        slots = [self._placed(a, None, "generation").slot if a is not None else 0 for a in adapters]
        rows = [PlannedRow(ClassifyRow(None, i, ids, slot, ""), 0, ids)
                for i, (ids, slot) in enumerate(zip(token_ids, slots, strict=True))]
        # Single tokens first, then by length: what the batched LoRA path groups (as the planner does).
        order = sorted(range(len(rows)), key=lambda i: (len(token_ids[i]) != 1, len(token_ids[i])))
        hidden = self.runner.hidden([rows[i] for i in order])
        out, start = {}, 0
        for index in order:
            n = len(token_ids[index])
            part = hidden[start + n - 1:start + n] if last_only else hidden[start:start + n]
            out[index] = self.runner.lm_logits(part).float()
            start += n
        return [out[i] for i in range(len(rows))]

    def classify_ids(self, token_ids: list[list[int]], adapters: list[str]) -> list[Classification]:
        """Classify rows of (possibly) different named adapters through the step loop."""
        requests = [ClassifyRequest([ids], adapter) for ids, adapter in zip(token_ids, adapters, strict=True)]
        for request in requests:
            self.submit_classify(request)
        done: dict[str, Classified] = {}
        while len(done) < len(requests):
            done.update((c.request_id, c) for c in self.step().classified)
        for request in requests:
            if done[request.request_id].error is not None:
                raise done[request.request_id].error
        return [done[r.request_id].results[0] for r in requests]

    def embed_ids(self, token_ids: list[list[int]], adapter: str | None = None) -> torch.Tensor:
        """Embed rows on one named adapter (None: the base) through the step loop: [rows, hidden] float32."""
        request = EmbedRequest(token_ids, adapter)
        self.submit_embed(request)
        while True:
            for done in self.step().embedded:
                if done.request_id == request.request_id:
                    if done.error is not None:
                        raise done.error
                    return done.results

    def classify(self, texts: list[str], adapter: str) -> list[Classification]:
        return self.classify_ids([self.tokenizer(t)["input_ids"] for t in texts], [adapter] * len(texts))

    def generate(self, prompts: list[list[int]], adapters: list[str | None], params: SamplingParams | None = None
                 ) -> list[Generation]:
        """Run requests to completion through the step loop."""
        requests = [GenerationRequest(p, a, params or SamplingParams()) for p, a in zip(prompts, adapters, strict=True)]
        seqs = {}
        for request in requests:
            self.submit(request)
            seqs[request.request_id] = self._requests[request.request_id]
        done: dict[str, Generation] = {}
        while len(done) < len(requests):
            for event in self.step().events:
                if event.finished and event.request_id in seqs:
                    done[event.request_id] = self.result(seqs[event.request_id])
        return [done[r.request_id] for r in requests]

    @staticmethod
    def result(seq: Sequence) -> Generation:
        return Generation(seq.request_id, seq.text, list(seq.output_ids), seq.finish_reason or "",
                          len(seq.request.prompt_ids), len(seq.output_ids))
