"""One generation request as it moves through the engine: its tokens, KV blocks, text and finish state."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraplex_server.engine.detokenizer import IncrementalDetokenizer, find_stop, pending_stop_prefix
from loraplex_server.engine.kv_cache import block_hash
from loraplex_server.engine.logprobs import TokenLogprobs
from loraplex_server.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

_ids = itertools.count(1)


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None for a finish without a new token (cancel)
    text: str  # the new text since the previous event (may be empty while a stop string is pending)
    finished: bool = False
    finish_reason: str | None = None  # "eos", "stop", "length", "cancelled", "error"
    error: BaseException | None = None  # why the engine could not go on with this row ("error")
    logprobs: TokenLogprobs | None = None  # when the request asked (params.logprobs)
    # Which of the request's n choices this token is of. With n > 1, finish_reason says a choice ended and
    # `finished` says the request did (its last choice ended).
    index: int = 0


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"gen-{next(_ids)}")
    grammar: CompiledGrammar | None = None  # what the output must match (engine/grammar.py), compiled


class Sequence:
    # Choices of one request (engine/choices.py): choice `index`, forked from `parent` after the prompt.
    index = 0
    parent: Sequence | None = None
    open_choices = 1  # on the first choice: its request's choices not yet ended

    def __init__(self, request: GenerationRequest, slot: int, eos_ids: set[int], max_total_tokens: int,
                 identity: str = "") -> None:
        self.request = request
        self.slot = slot
        self.identity = identity  # the adapter's identity in prefix-cache keys ("" for the base)
        self.seed = request.params.resolved_seed()  # fixed for the request: its sampling noise is keyed on it
        self.eos_ids = eos_ids
        self.max_total_tokens = max_total_tokens
        self.output_ids: list[int] = []
        self._detok: IncrementalDetokenizer | None = None  # made at the first token: append brings the tokenizer
        self._longest_stop = max(map(len, request.params.stop), default=0)
        self._emitted = 0
        self.finish_reason: str | None = None
        self.blocks: list[int] = []  # its KV cache blocks (the planner grows and releases them)
        self.num_cached = 0  # leading tokens whose keys and values are in those blocks
        self.block_keys: list[bytes] = []  # prefix-cache keys of its first full blocks (tokens never change)
        self.registered = 0  # leading blocks registered in the prefix cache (or found there)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    def all_token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output (a prefill chunk, or a recompute after preemption)."""
        prompt = self.request.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt[start:] if start < len(prompt) else []) + self.output_ids[max(start - len(prompt), 0):
                                                                                end - len(prompt)]

    def keys(self, count: int, block_size: int) -> list[bytes]:
        """Prefix-cache keys of its first `count` full blocks, each chained over every token before it."""
        while len(self.block_keys) < count:
            start = len(self.block_keys) * block_size
            parent = self.block_keys[-1] if self.block_keys else b""
            self.block_keys.append(block_hash(parent, self.all_token_ids(start, start + block_size), self.identity))
        return self.block_keys[:count]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The finished-so-far output text, stop strings cut off."""
        return self._detok.text if self._detok is not None else ""

    def append(self, token_id: int, tokenizer) -> TokenEvent:
        """Record one generated token and work out the text it adds and whether the request ends.

        Cost per token is bounded by the stop strings, not the output: only a small window of tokens is
        decoded, and only the tail that the new text could complete is searched.
        """
        self.output_ids.append(token_id)
        stops = self.params.stop
        if self._detok is None:
            self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        detok = self._detok
        if token_id in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "eos"
        else:
            new = detok.add(token_id)
            window = len(new) + self._longest_stop - 1 if new and stops else 0
            cut = find_stop(detok.tail(window), stops)
            if cut >= 0:
                detok.truncate(len(detok) - min(window, len(detok)) + cut)
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.params.max_new_tokens or self.num_tokens >= self.max_total_tokens:
                self.finish_reason = "length"
        size = len(detok)
        ready = size if self.finished else size - pending_stop_prefix(detok.tail(self._longest_stop - 1), stops)
        delta = detok.tail(size - self._emitted)[:ready - self._emitted] if ready > self._emitted else ""
        self._emitted = max(self._emitted, ready)
        return TokenEvent(self.request_id, token_id, delta, self.finished, self.finish_reason)

    def cancel(self, error: BaseException | None = None) -> TokenEvent:
        """End without a new token: cancelled, or failed with `error`."""
        self.finish_reason = "cancelled" if error is None else "error"
        return TokenEvent(self.request_id, None, "", True, self.finish_reason, error)
