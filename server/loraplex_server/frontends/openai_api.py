"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/completions, /v1/chat/completions, vLLM's
/classify, /health and /metrics. It calls the scheduler through the same RequestBuilder as the gRPC
service, and derives each HTTP status from the gRPC status the failure maps to (status.py).

`model` is an adapter reference (`name` = latest, `name@version`), or the base's id (its folder's name)
for the base alone.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraplex_server.api.auth import _matches
from loraplex_server.api.metrics import Metrics
from loraplex_server.api.request_builder import BaseLoading, RequestBuilder
from loraplex_server.api.status import http_status, status_of
from loraplex_server.engine.sequence import GenerationRequest
from loraplex_server.frontends.openai_schema import (
    BadRequestBody,
    GenerationBody,
    parse_chat,
    parse_classify,
    parse_completion,
    parse_json,
)

log = logging.getLogger(__name__)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # OpenAI's names: EOS is a natural stop
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class HttpRefusal(Exception):
    """A refusal that is HTTP's own (body too large, bad token), with the gRPC code it counts as."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIApi:
    def __init__(self, requests: RequestBuilder, metrics: Metrics, tokens: list[str] = (),
                 max_body_bytes: int = 4 << 20) -> None:
        self.requests, self.metrics = requests, metrics
        self.tokens = list(tokens)  # user and admin tokens: every endpoint here is inference
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.app = Starlette(routes=[
            Route("/v1/models", self._endpoint("http_models", self.models), methods=["GET"]),
            Route("/v1/completions", self._endpoint("http_completions", self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint("http_chat_completions", self.chat), methods=["POST"]),
            Route("/classify", self._endpoint("http_classify", self.classify), methods=["POST"]),
            Route("/v1/classify", self._endpoint("http_classify", self.classify), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ])

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def base_id(self) -> str:
        return self.requests.engine.base.path.name

    def _endpoint(self, method: str, handler: Callable[[Request, dict], Awaitable[Response]]):
        """Auth, then the handler; every failure becomes OpenAI's error JSON with the HTTP status of its
        gRPC status; the request is counted like an RPC (method, adapter, gRPC code name)."""
        async def endpoint(request: Request) -> Response:
            labels = {"method": method, "adapter": "none", "started": time.perf_counter(), "streaming": False}
            code = "OK"
            try:
                self._authenticate(request)
                self.requests.ready()
                return await handler(request, labels)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                labels["streaming"] = False
                response, code = await self._refusal(exc)
                return response
            finally:
                if not labels["streaming"]:  # a stream is counted when it ends (_sse)
                    self._count(labels, code)
        return endpoint

    def _count(self, labels: dict, code: str) -> None:
        self.metrics.latency.labels(labels["method"]).observe(time.perf_counter() - labels["started"])
        self.metrics.requests.labels(labels["method"], labels["adapter"], code).inc()

    async def _refusal(self, exc: Exception) -> tuple[Response, str]:
        if isinstance(exc, HttpRefusal):
            return error_response(exc.status, str(exc)), exc.code.name
        if isinstance(exc, BaseLoading):
            return error_response(503, str(exc), headers={"Retry-After": "5"}), "UNAVAILABLE"
        known = status_of(exc)
        if known is None:  # a bug: the log has the traceback, the client a message without internals
            log.exception("HTTP request failed")
            return error_response(500, "the server failed this request"), "INTERNAL"
        code, message = known
        status = http_status(code)
        headers = {"Retry-After": "1"} if status == 429 else None
        return error_response(status, message, getattr(exc, "param", None), headers), code.name

    def _authenticate(self, request: Request) -> None:
        if not self.tokens:
            return
        header = request.headers.get("authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else None
        if not _matches(token, self.tokens):
            reason = "missing" if token is None else "invalid"
            raise HttpRefusal(401, grpc.StatusCode.UNAUTHENTICATED,
                              f"{reason} bearer token; send the header `Authorization: Bearer <token>`")

    async def _json(self, request: Request) -> dict:
        """The body, refused past max_body_bytes before it is all read, then parsed."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def _too_large(self) -> HttpRefusal:
        return HttpRefusal(413, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the request body is over {self.max_body_bytes} bytes (the server's --max-message-bytes)")

    def _model(self, model: str, labels: dict) -> str:
        """The adapter reference of `model` ("" for the base), and its metrics label."""
        if model == self.base_id:
            labels["adapter"] = "base"
            return ""
        name = model.split("@")[0]
        registered = self.requests.cache.store.has(name)  # before the lookup: this refreshes the name
        labels["adapter"] = self.metrics.adapter_label(name) if registered else "unknown"
        return model

    # -- open endpoints -------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.requests.engine is None:
            return error_response(503, "the base model is still loading")
        if self.draining:
            return error_response(503, "the server is shutting down")
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- inference endpoints --------------------------------------------------------------------

    async def models(self, request: Request, labels: dict) -> Response:
        manifests = await asyncio.get_running_loop().run_in_executor(None, self.requests.cache.store.list)
        base = self.base_id
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "loraplex"}]
        latest = {}
        for manifest in manifests:
            created = _epoch(manifest.extra.get("created"))
            entry = {"object": "model", "created": created, "owned_by": "loraplex", "root": manifest.name,
                     "parent": base}
            data.append({"id": f"{manifest.name}@{manifest.version}", **entry})
            latest[manifest.name] = {"id": manifest.name, **entry}  # list() is in version order: the last wins
        data.extend(latest.values())
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request, labels: dict) -> Response:
        return await self._generate(parse_completion(await self._json(request)), labels, chat=False)

    async def chat(self, request: Request, labels: dict) -> Response:
        return await self._generate(parse_chat(await self._json(request)), labels, chat=True)

    async def _generate(self, body: GenerationBody, labels: dict, chat: bool) -> Response:
        requests = self.requests
        reference = self._model(body.model, labels)
        key = requests.adapter_key(reference, "generation") if reference else None
        s = body.sampling
        max_tokens = requests.limits.max_tokens if s.max_tokens is None else s.max_tokens  # OpenAI: up to context
        params = requests.sampling(max_tokens, s.temperature, s.top_p, s.top_k, s.stop, s.seed)
        prompt = await (requests.chat_tokens(body.messages) if chat else requests.prompt_ids(body.prompt, []))
        generation, events = await requests.start(key, prompt, params)
        reply = _Reply(body.model, chat)
        if body.stream:
            labels["streaming"] = True
            return StreamingResponse(self._sse(reply, generation, events, body.include_usage, labels),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, reason, completion = [], None, 0
        async for event in requests.events(generation, events):
            text.append(event.text)
            completion += event.token_id is not None
            reason = event.finish_reason
        return JSONResponse(reply.whole("".join(text), FINISH_REASONS.get(reason),
                                        _usage(len(generation.prompt_ids), completion)))

    async def _sse(self, reply: _Reply, generation: GenerationRequest, events: asyncio.Queue, include_usage: bool,
                   labels: dict) -> AsyncIterator[str]:
        """Server-sent events; a client that disconnects cancels this generator, which frees the row."""
        completion, code = 0, "CANCELLED"  # until it ends on its own
        try:
            if reply.chat:
                yield _data(reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
            async for event in self.requests.events(generation, events):
                completion += event.token_id is not None
                if event.text:
                    yield _data(reply.chunk(event.text, None, include_usage))
                if event.finished:
                    yield _data(reply.chunk("", FINISH_REASONS.get(event.finish_reason), include_usage))
            if include_usage:
                yield _data(reply.usage_chunk(_usage(len(generation.prompt_ids), completion)))
            code = "OK"
        except Exception as exc:  # the engine failed the row after the headers went out: say so in the stream
            known = status_of(exc)
            code = known[0].name if known else "INTERNAL"
            message = known[1] if known else "the server failed this request"
            yield _data({"error": {"message": message, "type": "server_error", "param": None, "code": 500}})
        finally:
            self._count(labels, code)
        yield "data: [DONE]\n\n"

    async def classify(self, request: Request, labels: dict) -> Response:
        requests = self.requests
        body = parse_classify(await self._json(request), requests.limits.max_texts)
        reference = self._model(body.model, labels)
        if not reference:
            raise BadRequestBody("the base model has no classification head; use a classification adapter as "
                                 "model", "model")
        key = requests.adapter_key(reference, "classification")
        ids = await requests.tokens(body.texts, lambda i: f"input[{i}]")
        results = await requests.scheduler.classify(ids, key)
        prompt_tokens = sum(map(len, ids))
        return JSONResponse({
            "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": body.model,
            "data": [{"index": i, "label": r.label, "probs": list(r.scores.values()), "num_classes": len(r.scores)}
                     for i, r in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}})


class _Reply:
    """The OpenAI response objects of one completion or chat completion."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope("chat.completion" if self.chat else "text_completion", [choice]), "usage": usage}

    def chunk(self, delta: str | dict, finish_reason: str | None, include_usage: bool) -> dict:
        if self.chat:
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        return {**chunk, "usage": None} if include_usage else chunk

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion", []), "usage": usage}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _epoch(created: object) -> int:
    """A manifest's ISO-8601 UTC `created` as Unix seconds (0 when absent or unreadable)."""
    try:
        return calendar.timegm(time.strptime(str(created), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return 0
