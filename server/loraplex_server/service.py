"""gRPC InferenceService: validate, hand work to the scheduler, map every failure to a precise status."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

from .adapter_cache import AdapterCache
from .engine import Engine, WrongTask
from .metrics import Metrics
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import GenerationRequest
from .status import abort_for

FINISH_REASONS = {"eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@dataclass
class Limits:
    max_texts: int = 64
    max_tokens: int = 1024
    default_max_tokens: int = 64


# Texts longer than this many characters per token of context are refused before tokenizing (real text
# averages about 4 characters per token; whitespace runs can be more).
CHARS_PER_TOKEN = 16


class InvalidRequest(ValueError):
    pass


def _status(context, error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def observed(method):
    """Count the RPC by method, adapter and final status, and time it."""
    name = method.__name__

    def finish(self, request, context, started, error):
        self.metrics.latency.labels(name).observe(time.perf_counter() - started)
        reference = getattr(request, "adapter", None)  # None: an RPC about no single adapter (List, Upload)
        adapter_name = (reference or "").split("@")[0]
        registered = self.cache is not None and self.cache.store.has(adapter_name)
        if reference is None:
            adapter = "none"
        else:
            adapter = self.metrics.adapter_label(adapter_name) if registered or not adapter_name else "unknown"
        self.metrics.requests.labels(name, adapter, _status(context, error)).inc()

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            started, error = time.perf_counter(), None
            try:
                async for message in method(self, request, context):
                    yield message
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(self, request, context, started, error)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        started, error = time.perf_counter(), None
        try:
            return await method(self, request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            finish(self, request, context, started, error)
    return unary


class InferenceService(pb_grpc.InferenceServiceServicer):
    def __init__(self, metrics: Metrics, limits: Limits | None = None) -> None:
        self.metrics = metrics
        self.limits = limits or Limits()
        self.engine: Engine | None = None  # set once the base model is loaded
        self.scheduler: Scheduler | None = None
        self.cache: AdapterCache | None = None

    def attach(self, engine: Engine, scheduler: Scheduler, cache: AdapterCache) -> None:
        self.engine, self.scheduler, self.cache = engine, scheduler, cache

    # -- helpers --------------------------------------------------------------------------------

    async def _ready(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the base model is still loading; retry shortly")
        return self.engine

    def _adapter_key(self, reference: str, task: str) -> str:
        """The `name@version` key of a registered adapter for `task`."""
        key, manifest = self.cache.resolve(reference)
        actual = manifest.extra.get("task")
        if actual != task:
            other = "Classify" if actual == "classification" else "Generate"
            raise WrongTask(f"adapter {key} is a {actual} adapter; use {other}")
        return key

    async def _tokens(self, texts: list[str], what: Callable[[int], str]) -> list[list[int]]:
        """Token ids of each text (`what(i)` names text i in messages). A text over CHARS_PER_TOKEN
        characters per token of context is refused before tokenizing, and tokenizing runs off the
        event loop: a huge text neither stalls other RPCs nor costs its tokenizing first."""
        limit = self.engine.base.max_positions
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"{what(i)} is empty")
            if len(text) > limit * CHARS_PER_TOKEN:
                raise InvalidRequest(f"{what(i)} has {len(text)} characters; the model's context is {limit} "
                                     f"tokens, so at most {limit * CHARS_PER_TOKEN} characters are accepted")
        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(None, lambda: self.engine.tokenizer(list(texts))["input_ids"])
        for i, ids in enumerate(batch):
            self._check_length(ids, what(i))
        return batch

    def _check_length(self, ids: list[int], what: str) -> None:
        if not ids:
            raise InvalidRequest(f"{what} is empty")
        limit = self.engine.base.max_positions
        if len(ids) > limit:
            raise InvalidRequest(f"{what} has {len(ids)} tokens; the model's context is {limit}")

    def _sampling(self, sampling: pb.SamplingParameters) -> SamplingParams:
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else self.limits.default_max_tokens
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be in 1..{self.limits.max_tokens}, got {max_tokens}")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p if sampling.HasField("top_p") else 1.0, top_k=sampling.top_k,
                                stop=list(sampling.stop), seed=sampling.seed if sampling.HasField("seed") else None)
        try:
            params.validate()
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        return params

    # -- RPCs -----------------------------------------------------------------------------------

    @observed
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        await self._ready(context)
        try:
            if not request.adapter:
                raise WrongTask("classification needs a classification adapter; set `adapter`")
            key = self._adapter_key(request.adapter, "classification")
            if not request.texts:
                raise InvalidRequest("texts is empty; send at least one text")
            if len(request.texts) > self.limits.max_texts:
                raise InvalidRequest(f"{len(request.texts)} texts; at most {self.limits.max_texts} per request")
            ids = await self._tokens(list(request.texts), lambda i: f"texts[{i}]")
            results = await self.scheduler.classify(ids, key)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.ClassifyResponse(results=[
            pb.Classification(label=r.label, score=r.score,
                              scores=[pb.LabelScore(label=k, score=v) for k, v in r.scores.items()])
            for r in results
        ])

    async def _start(self, request, context) -> tuple[GenerationRequest, asyncio.Queue]:
        await self._ready(context)
        try:
            key = self._adapter_key(request.adapter, "generation") if request.adapter else None
            params = self._sampling(request.sampling)
            prompt = (await self._tokens([request.prompt], lambda _: "prompt"))[0]
            generation = GenerationRequest(prompt, key, params)
            events = await self.scheduler.submit(generation)
        except Exception as exc:
            await abort_for(context, exc)
        return generation, events

    async def _events(self, generation: GenerationRequest, events: asyncio.Queue, context):
        """Token events until the finish; a caller that goes away (cancel, deadline) frees its row, and
        a row the engine failed ends the RPC with its status."""
        finished, started, first = False, time.perf_counter(), True
        tokens = self.metrics.tokens.labels(self.metrics.adapter_label(generation.adapter))
        try:
            while not finished:
                event = await events.get()
                finished = event.finished
                if event.error is not None:
                    await abort_for(context, event.error)
                if event.token_id is not None:
                    tokens.inc()
                    if first:
                        self.metrics.first_token.observe(time.perf_counter() - started)
                        first = False
                yield event
        finally:
            if not finished:
                self.scheduler.cancel(generation.request_id)

    @observed
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        generation, events = await self._start(request, context)
        text, tokens, reason = [], [], None
        async for event in self._events(generation, events, context):
            text.append(event.text)
            if event.token_id is not None:
                tokens.append(event.token_id)
            reason = event.finish_reason
        return pb.GenerateResponse(text="".join(text), token_ids=tokens, finish_reason=FINISH_REASONS.get(reason, 0),
                                   prompt_tokens=len(generation.prompt_ids), completion_tokens=len(tokens))

    @observed
    async def GenerateStream(self, request: pb.GenerateStreamRequest, context
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        generation, events = await self._start(request, context)
        completion = 0
        async for event in self._events(generation, events, context):
            if event.token_id is not None:
                completion += 1
                yield pb.GenerateStreamResponse(delta=pb.TokenDelta(text=event.text, token_ids=[event.token_id]))
            if event.finished:
                yield pb.GenerateStreamResponse(done=pb.GenerationDone(
                    finish_reason=FINISH_REASONS.get(event.finish_reason, 0),
                    prompt_tokens=len(generation.prompt_ids), completion_tokens=completion))
