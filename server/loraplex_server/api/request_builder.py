"""What both front ends (gRPC and the OpenAI-compatible HTTP API) do before and after the scheduler:
resolve the adapter, check and build sampling parameters, render chat messages, tokenize off the event
loop, and follow a generation's token events. One copy, so the two APIs cannot drift apart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loraplex_server.api.chat_template import ChatMessage, check_messages, render_chat
from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.engine import Engine, WrongTask
from loraplex_server.engine.sampling import SamplingParams
from loraplex_server.engine.sequence import GenerationRequest, TokenEvent
from loraplex_server.runtime.adapter_manager import AdapterManager
from loraplex_server.runtime.engine_loop import EngineLoop

# Texts longer than this many characters per token of context are refused before tokenizing (real text
# averages about 4 characters per token; whitespace runs can be more).
CHARS_PER_TOKEN = 16


class InvalidRequest(ValueError):
    pass


class BaseLoading(RuntimeError):
    """The base model is still loading (UNAVAILABLE / 503)."""


@dataclass
class Limits:
    max_texts: int = 64
    max_tokens: int = 1024
    default_max_tokens: int = 64


class RequestBuilder:
    def __init__(self, metrics: Metrics, limits: Limits | None = None) -> None:
        self.metrics = metrics
        self.limits = limits or Limits()
        self.engine: Engine | None = None  # set once the base model is loaded
        self.scheduler: EngineLoop | None = None
        self.cache: AdapterManager | None = None

    def attach(self, engine: Engine, scheduler: EngineLoop, cache: AdapterManager) -> None:
        self.engine, self.scheduler, self.cache = engine, scheduler, cache

    def ready(self) -> Engine:
        if self.engine is None:
            raise BaseLoading("the base model is still loading; retry shortly")
        return self.engine

    @property
    def max_chars(self) -> int:
        return self.engine.base.max_positions * CHARS_PER_TOKEN

    def adapter_key(self, reference: str, task: str) -> str:
        """The `name@version` key of a registered adapter for `task`."""
        key, manifest = self.cache.resolve(reference)
        actual = manifest.extra.get("task")
        if actual != task:
            other = "Classify" if actual == "classification" else "Generate"
            raise WrongTask(f"adapter {key} is a {actual} adapter; use {other}")
        return key

    def sampling(self, max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 stop: list[str] | None = None, seed: int | None = None) -> SamplingParams:
        max_tokens = self.limits.default_max_tokens if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) \
                or not 1 <= max_tokens <= self.limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be in 1..{self.limits.max_tokens}, got {max_tokens}")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=list(stop or []), seed=seed)
        try:
            params.validate()
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        return params

    async def tokens(self, texts: list[str], what: Callable[[int], str]) -> list[list[int]]:
        """Token ids of each text (`what(i)` names text i in messages). A text over CHARS_PER_TOKEN
        characters per token of context is refused before tokenizing, and tokenizing runs off the
        event loop: a huge text neither stalls other requests nor costs its tokenizing first."""
        limit = self.engine.base.max_positions
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"{what(i)} is empty")
            if len(text) > self.max_chars:
                raise InvalidRequest(f"{what(i)} has {len(text)} characters; the model's context is {limit} "
                                     f"tokens, so at most {self.max_chars} characters are accepted")
        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(None, lambda: self.engine.tokenizer(list(texts))["input_ids"])
        for i, ids in enumerate(batch):
            self._check_length(ids, what(i))
        return batch

    async def chat_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of the rendered conversation: checked before rendering, rendered and tokenized off
        the event loop. The template writes its own special tokens, so none are added (as HF's
        apply_chat_template(tokenize=True) does)."""
        if not messages:
            raise InvalidRequest("messages is empty; send at least one message")
        try:
            check_messages(messages, self.max_chars)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        tokenizer = self.engine.tokenizer

        def render_and_tokenize() -> list[int]:
            return tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]

        ids = await asyncio.get_running_loop().run_in_executor(None, render_and_tokenize)
        self._check_length(ids, "the rendered messages")
        return ids

    async def prompt_ids(self, prompt: str, messages: list[ChatMessage]) -> list[int]:
        """Exactly one of a raw prompt and chat messages."""
        if prompt and messages:
            raise InvalidRequest("set either prompt or messages, not both")
        if messages:
            return await self.chat_tokens(messages)
        if not prompt:
            raise InvalidRequest("prompt is empty; set prompt (text to continue) or messages (a chat)")
        return (await self.tokens([prompt], lambda _: "prompt"))[0]

    def _check_length(self, ids: list[int], what: str) -> None:
        if not ids:
            raise InvalidRequest(f"{what} is empty")
        limit = self.engine.base.max_positions
        if len(ids) > limit:
            raise InvalidRequest(f"{what} has {len(ids)} tokens; the model's context is {limit}")

    async def start(self, key: str | None, prompt_ids: list[int], params: SamplingParams
                    ) -> tuple[GenerationRequest, asyncio.Queue]:
        """Queue a generation on the adapter `key` (from adapter_key; None for the base)."""
        generation = GenerationRequest(prompt_ids, key, params)
        return generation, await self.scheduler.submit(generation)

    async def events(self, generation: GenerationRequest, events: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        """Token events until the finish; a caller that goes away (cancel, deadline, disconnect) frees its
        row, and a row the engine failed raises its error."""
        finished, started, first = False, time.perf_counter(), True
        tokens = self.metrics.tokens.labels(self.metrics.adapter_label(generation.adapter))
        try:
            while not finished:
                event = await events.get()
                finished = event.finished
                if event.error is not None:
                    raise event.error
                if event.token_id is not None:
                    tokens.inc()
                    if first:
                        self.metrics.first_token.observe(time.perf_counter() - started)
                        first = False
                yield event
        finally:
            if not finished:
                self.scheduler.cancel(generation.request_id)
