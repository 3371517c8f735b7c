"""One generation request as it moves through the running batch: its tokens, text and finish state."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams

_ids = itertools.count(1)


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None for a finish without a new token (cancel)
    text: str  # the new text since the previous event (may be empty while a stop string is pending)
    finished: bool = False
    finish_reason: str | None = None  # "eos", "stop", "length", "cancelled"


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"gen-{next(_ids)}")
    on_event: Callable[[TokenEvent], None] | None = None


def _pending_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Sequence:
    def __init__(self, request: GenerationRequest, slot: int, generator: torch.Generator | None,
                 eos_ids: set[int], max_total_tokens: int) -> None:
        self.request = request
        self.slot = slot
        self.generator = generator
        self.eos_ids = eos_ids
        self.max_total_tokens = max_total_tokens
        self.output_ids: list[int] = []
        self.text = ""  # the finished-so-far output text, stop strings cut off
        self._emitted = 0
        self.finish_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, tokenizer) -> TokenEvent:
        """Record one generated token and work out the text it adds and whether the request ends."""
        self.output_ids.append(token_id)
        stops = self.params.stop
        if token_id in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "eos"
        else:
            full = tokenizer.decode(self.output_ids, skip_special_tokens=True)
            if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self.text = full
            cut = min((i for i in (self.text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.params.max_new_tokens or self.num_tokens >= self.max_total_tokens:
                self.finish_reason = "length"
        ready = len(self.text) if self.finished else len(self.text) - _pending_stop_prefix(self.text, stops)
        delta = self.text[self._emitted:ready]
        self._emitted = max(self._emitted, ready)
        return TokenEvent(self.request_id, token_id, delta, self.finished, self.finish_reason)

    def cancel(self) -> TokenEvent:
        self.finish_reason = "cancelled"
        return TokenEvent(self.request_id, None, "", True, "cancelled")
