"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/completions, /v1/chat/completions,
/v1/embeddings (openai_embeddings.py), vLLM's /classify, /health and /metrics, as a codec over the request
path (api/request_path.py): read the body (bounded), decode it (openai_schema.py), call the path, encode the
result, or the failure with the HTTP status the status table gives it.

`model` is an adapter reference (`name` = latest, `name@version`), or the base's id (its folder's name)
for the base alone. A client that disconnects cancels its generation, streaming or not.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from loraplex_server.api.auth import bearer_token
from loraplex_server.api.errors import InvalidRequest, PayloadTooLarge
from loraplex_server.api.logprobs import ChoiceResult, TokenLogprob
from loraplex_server.api.request_path import Generation, RequestPath
from loraplex_server.api.requests import Call, ClassifyInput, GenerateInput
from loraplex_server.api.status import status_of
from loraplex_server.api.tools import ToolCall
from loraplex_server.frontends.openai_embeddings import EmbeddingsBody, embeddings_response, parse_embeddings
from loraplex_server.frontends.openai_logprobs import chat_logprobs, completion_logprobs, text_length
from loraplex_server.frontends.openai_schema import (
    GenerationBody,
    parse_chat,
    parse_classify,
    parse_completion,
    parse_json,
)
from loraplex_server.frontends.openai_structured import tool_calls_json

# OpenAI's names: EOS is a natural stop
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable"}
_RETRY_AFTER = {429: "1", 503: "5"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def failure_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    headers = {"Retry-After": _RETRY_AFTER[status.http]} if status.http in _RETRY_AFTER else None
    return JSONResponse(error_body(status.http, status.message, status.param), status_code=status.http,
                        headers=headers)


class OpenAIApi:
    def __init__(self, path: RequestPath, max_body_bytes: int = 4 << 20) -> None:
        self.path, self.max_body_bytes = path, max_body_bytes
        self.draining = False
        self.app = Starlette(routes=[
            Route("/v1/models", self._endpoint(self.http_models), methods=["GET"]),
            Route("/v1/completions", self._endpoint(self.http_completions), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.http_chat_completions), methods=["POST"]),
            Route("/v1/embeddings", self._endpoint(self.http_embeddings), methods=["POST"]),
            Route("/classify", self._endpoint(self.http_classify), methods=["POST"]),
            Route("/v1/classify", self._endpoint(self.http_classify), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ])

    async def respond(self, request: Request) -> Response:
        """The response to one request, for hosts that hand us Starlette requests (Ray Serve's HTTP proxy)."""
        for route in self.app.routes:
            match, child = route.matches(request.scope)
            if match is Match.FULL:
                request.scope.update(child)
                return await route.endpoint(request)
        allowed = any(route.matches(request.scope)[0] is Match.PARTIAL for route in self.app.routes)
        return JSONResponse(error_body(405 if allowed else 404, "no such endpoint"), status_code=405 if allowed
                            else 404)

    # -- plumbing -------------------------------------------------------------------------------

    def _endpoint(self, handler: Callable[[Request, Call], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            call = Call(handler.__name__, bearer_token(request.headers.get("authorization")))
            try:
                return await handler(request, call)
            except Exception as exc:
                return failure_response(exc)
        return endpoint

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

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is over {self.max_body_bytes} bytes (the server's "
                               "--max-message-bytes)")

    def _adapter(self, model: str) -> str | None:
        """`model` as an adapter reference; None for the base's id."""
        return None if model == self.path.ready().base_id else model

    # -- open endpoints -------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.path.runtime is None:
            return JSONResponse(error_body(503, "the base model is still loading"), status_code=503)
        if self.draining:
            return JSONResponse(error_body(503, "the server is shutting down"), status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.path.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- inference endpoints (each named like its metrics label) ----------------------------------

    async def http_models(self, request: Request, call: Call) -> Response:
        base, manifests = await self.path.models(call)
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "loraplex"}]
        latest = {}
        for manifest in manifests:
            entry = {"object": "model", "created": _epoch(manifest.extra.get("created")), "owned_by": "loraplex",
                     "root": manifest.name, "parent": base}
            data.append({"id": f"{manifest.name}@{manifest.version}", **entry})
            latest[manifest.name] = {"id": manifest.name, **entry}  # in version order: the last wins
        data.extend(latest.values())
        return JSONResponse({"object": "list", "data": data})

    async def http_completions(self, request: Request, call: Call) -> Response:
        return await self._generate(request, call, parse_completion, chat=False)

    async def http_chat_completions(self, request: Request, call: Call) -> Response:
        return await self._generate(request, call, parse_chat, chat=True)

    async def _generate(self, request: Request, call: Call, parse: Callable[[dict], GenerationBody],
                        chat: bool) -> Response:
        bodies: list[GenerationBody] = []

        async def decode() -> GenerateInput:
            body = parse(await self._json(request))
            bodies.append(body)
            adapter = self._adapter(body.model)
            return dataclasses.replace(body.request, adapter=adapter, longest_by_default=True)

        generation = await self.path.generate(call, decode)
        body = bodies[0]
        reply = _Reply(body.model, chat)
        if body.stream:
            return StreamingResponse(_sse(reply, generation, body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await _until_disconnected(request, generation.collect())
        return JSONResponse(reply.whole_choices(result.choices, _usage(result.prompt_tokens, result.completion_tokens),
                                                result.tool_calls))

    async def http_embeddings(self, request: Request, call: Call) -> Response:
        bodies: list[EmbeddingsBody] = []

        async def decode():
            body = parse_embeddings(await self._json(request))
            bodies.append(body)
            return dataclasses.replace(body.request, adapter=self._adapter(body.model))

        output = await _until_disconnected(request, self.path.embed(call, decode))
        return JSONResponse(embeddings_response(output, bodies[0].model, bodies[0].encoding_format))

    async def http_classify(self, request: Request, call: Call) -> Response:
        models: list[str] = []

        async def decode() -> ClassifyInput:
            body = parse_classify(await self._json(request))
            models.append(body.model)
            if self._adapter(body.model) is None:
                raise InvalidRequest("the base model has no classification head; use a classification adapter as "
                                     "model", "model")
            return body.request

        output = await _until_disconnected(request, self.path.classify(call, decode))
        return JSONResponse({
            "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": models[0],
            "data": [{"index": i, "label": r.label, "probs": list(r.scores.values()), "num_classes": len(r.scores)}
                     for i, r in enumerate(output.results)],
            "usage": {"prompt_tokens": output.prompt_tokens, "total_tokens": output.prompt_tokens,
                      "completion_tokens": 0, "prompt_tokens_details": None}})


async def _until_disconnected(request: Request, work: Awaitable):
    """`work`'s result; the client disconnecting first cancels it (so its generation frees its row)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
    return await task


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is read already, so only http.disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(reply: _Reply, generation: Generation, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that disconnects cancels this generator, which frees the row. A failure
    after the headers went out (the engine failed the row, the server is stopping) is an error event."""
    try:
        n = generation.request.params.n
        offsets = [0] * n  # each choice's text so far, for completions' text_offset
        if reply.chat:
            for index in range(n):
                yield _data(reply.chunk({"role": "assistant", "content": ""}, None, include_usage, index))
        calls = generation.tool_parser.stream() if generation.tool_parser else None  # n is 1 with tools
        async for event in generation.events():
            logprobs = generation.logprobs(event)
            text = calls.feed(event.text) if calls is not None else event.text
            if text or logprobs is not None:
                yield _data(reply.chunk(text, None, include_usage, event.index,
                                        reply.logprobs([logprobs] if logprobs else None, offsets[event.index])))
                offsets[event.index] += text_length(logprobs) if logprobs else 0
            if event.finish_reason is not None and (event.finished or n > 1):
                reason = FINISH_REASONS.get(event.finish_reason)
                rest, called = calls.end() if calls is not None else ("", [])
                if rest:
                    yield _data(reply.chunk(rest, None, include_usage, event.index))
                if called:
                    yield _data(reply.chunk({"tool_calls": tool_calls_json(called, delta=True)}, None, include_usage))
                    reason = "tool_calls"
                yield _data(reply.chunk("", reason, include_usage, event.index))
        if include_usage:
            yield _data(reply.usage_chunk(_usage(generation.prompt_tokens, generation.completion_tokens)))
    except Exception as exc:
        status = status_of(exc)
        yield _data(error_body(status.http, status.message, status.param))
    finally:
        generation.close()
    yield "data: [DONE]\n\n"


class _Reply:
    """The OpenAI response objects of one completion or chat completion."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole_choices(self, choices: list[ChoiceResult], usage: dict, tool_calls: list[ToolCall] = ()) -> dict:
        """The response of every choice (n >= 1), each with its logprobs when asked; the tool calls replace
        the first choice's content (n is 1 with tools)."""
        body = [{"index": c.index,
                 **({"message": {"role": "assistant", "content": c.text}} if self.chat else {"text": c.text}),
                 "logprobs": self.logprobs(c.logprobs), "finish_reason": FINISH_REASONS.get(c.finish_reason)}
                for c in choices]
        if tool_calls:
            body[0].update(finish_reason="tool_calls", message={
                "role": "assistant", "content": None, "tool_calls": tool_calls_json(tool_calls)})
        return {**self._envelope("chat.completion" if self.chat else "text_completion", body), "usage": usage}

    def logprobs(self, tokens: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
        return chat_logprobs(tokens) if self.chat else completion_logprobs(tokens, offset)

    def chunk(self, delta: str | dict, finish_reason: str | None, include_usage: bool, index: int = 0,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
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
