"""gRPC InferenceService: validate, hand work to the scheduler, map every failure to a precise status."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator

import grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from loraplex_server.api.chat_template import ChatMessage
from loraplex_server.api.metrics import Metrics
from loraplex_server.api.request_builder import CHARS_PER_TOKEN, InvalidRequest, Limits, RequestBuilder
from loraplex_server.api.status import abort_for
from loraplex_server.engine.engine import Engine, WrongTask
from loraplex_server.engine.sampling import SamplingParams
from loraplex_server.engine.sequence import GenerationRequest
from loraplex_server.runtime.adapter_manager import AdapterManager
from loraplex_server.runtime.engine_loop import EngineLoop

FINISH_REASONS = {"eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
__all__ = ["CHARS_PER_TOKEN", "InferenceService", "InvalidRequest", "Limits", "observed"]


def _status(context, error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


# One line per RPC; off unless `loraplex serve --access-log` (or this logger's level) turns it on.
access_log = logging.getLogger("loraplex.access")


def observed(method):
    """Count the RPC by method, adapter and final status, and time it."""
    name = method.__name__

    def finish(self, request, context, started, error):
        self.metrics.latency.labels(name).observe(time.perf_counter() - started)
        reference = getattr(request, "adapter", None)  # None: an RPC about no single adapter (List, Upload)
        adapter_name = (reference or "").split("@")[0]
        registered = self.cache is not None and self.cache.store.known(adapter_name)
        if reference is None:
            adapter = "none"
        else:
            adapter = self.metrics.adapter_label(adapter_name) if registered or not adapter_name else "unknown"
        status = _status(context, error)
        self.metrics.requests.labels(name, adapter, status).inc()
        # %r: the reference is the client's text, so a newline in it cannot forge a log line.
        access_log.info("%s adapter=%r status=%s %.1f ms", name, reference or "", status,
                        1000 * (time.perf_counter() - started))

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
        self.requests = RequestBuilder(metrics, limits)  # shared with the HTTP API (openai_api.py)

    def attach(self, engine: Engine, scheduler: EngineLoop, cache: AdapterManager) -> None:
        self.requests.attach(engine, scheduler, cache)

    @property
    def limits(self) -> Limits:
        return self.requests.limits

    @property
    def cache(self) -> AdapterManager | None:
        return self.requests.cache

    @property
    def scheduler(self) -> EngineLoop | None:
        return self.requests.scheduler

    # -- helpers --------------------------------------------------------------------------------

    async def _ready(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.requests.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the base model is still loading; retry shortly")
        return self.requests.engine

    def _sampling(self, sampling: pb.SamplingParameters) -> SamplingParams:
        return self.requests.sampling(
            max_tokens=sampling.max_tokens if sampling.HasField("max_tokens") else None,
            temperature=sampling.temperature, top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
            top_k=sampling.top_k, stop=list(sampling.stop), seed=sampling.seed if sampling.HasField("seed") else None)

    # -- RPCs -----------------------------------------------------------------------------------

    @observed
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        await self._ready(context)
        try:
            if not request.adapter:
                raise WrongTask("classification needs a classification adapter; set `adapter`")
            key = self.requests.adapter_key(request.adapter, "classification")
            if not request.texts:
                raise InvalidRequest("texts is empty; send at least one text")
            if len(request.texts) > self.limits.max_texts:
                raise InvalidRequest(f"{len(request.texts)} texts; at most {self.limits.max_texts} per request")
            ids = await self.requests.tokens(list(request.texts), lambda i: f"texts[{i}]")
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
            key = self.requests.adapter_key(request.adapter, "generation") if request.adapter else None
            params = self._sampling(request.sampling)
            messages = [ChatMessage(m.role, m.content) for m in request.messages]
            prompt = await self.requests.prompt_ids(request.prompt, messages)
            return await self.requests.start(key, prompt, params)
        except Exception as exc:
            await abort_for(context, exc)

    async def _events(self, generation: GenerationRequest, events: asyncio.Queue, context):
        """Token events until the finish; a caller that goes away frees its row (RequestBuilder.events),
        and a row the engine failed ends the RPC with its status."""
        try:
            async for event in self.requests.events(generation, events):
                yield event
        except Exception as exc:
            await abort_for(context, exc)

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
