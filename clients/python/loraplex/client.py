"""The loraplex client: typed results, typed errors, retries on UNAVAILABLE only. No torch.

`Client` and `AsyncClient` have the same methods; the async ones are awaited (streams: `async for`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

from .adapters import Adapters, AsyncAdapters
from .chat import Message, chat_messages
from .errors import LoraplexError, error_from
from .health import HealthStatus, health_request, health_status, health_stub, not_serving_after
from .results import (
    Classification,
    Embeddings,
    Generation,
    GenerationChunk,
    chunk,
    classifications,
    embeddings,
    generation,
    sampling,
)
from .structured import structured_output, tool_fields

__all__ = ["AsyncClient", "Classification", "Client", "Embeddings", "Generation", "GenerationChunk", "HealthStatus"]

HEALTH_POLL_SECONDS = 0.2
_INFERENCE_REQUESTS = (pb.ClassifyRequest, pb.GenerateRequest, pb.GenerateStreamRequest, pb.EmbedRequest)


def _credentials(tls: bool, ca_cert: str | None) -> grpc.ChannelCredentials | None:
    if not (tls or ca_cert):
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_cert).read_bytes() if ca_cert else None)


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _routed(metadata: list[tuple[str, str]], request) -> list[tuple[str, str]]:
    """The metadata of an inference call: Ray Serve's gRPC proxy routes by `multiplexed_model_id` to a
    replica that holds the adapter (loraplex_server.frontends.ray_app); a single server ignores it."""
    adapter = getattr(request, "adapter", "") if isinstance(request, _INFERENCE_REQUESTS) else ""
    # Only a value gRPC can carry: a malformed reference still reaches the server, which says what is wrong.
    routable = adapter and len(adapter) <= 256 and adapter.isascii() and adapter.isprintable()
    return [*metadata, ("multiplexed_model_id", adapter)] if routable else metadata


def _backoff(attempt: int) -> float:
    return min(2.0, 0.1 * 2 ** attempt)


def _request(kind, adapter: str | None, prompt: str, messages: Iterable[Message] | None, max_tokens: int,
             temperature: float, top_p: float, top_k: int, stop: list[str] | None, seed: int | None,
             *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1, json_schema: dict | str | None = None,
             regex: str | None = None, choice: list[str] | None = None, json_object: bool = False,
             tools: list[dict] | None = None, tool_choice: str | None = None,
             parallel_tool_calls: bool | None = None):
    """A GenerateRequest or GenerateStreamRequest carrying either the prompt or the chat messages.

    logprobs: return each token's logprob (Generation.logprobs, GenerationChunk.logprobs); top_logprobs
    (0..20, implies logprobs): that many most probable alternatives per token. n (1..16): choices of the
    prompt (Generation.choices; chunks carry their choice's index), sharing its prefill; choice i samples
    with seed + i. At most one constraint on the output (json_schema, regex, choice, json_object); tools,
    tool_choice and parallel_tool_calls (False: at most one call) for chat (Generation.tool_calls)."""
    params = sampling(max_tokens, temperature, top_p, top_k, stop, seed, logprobs, top_logprobs, n)
    constraint = structured_output(json_schema, regex, choice, json_object)
    if constraint is not None:
        params.structured.CopyFrom(constraint)
    return kind(adapter=adapter or "", prompt=prompt, messages=chat_messages(messages) if messages is not None else [],
                sampling=params, **tool_fields(tools, tool_choice, parallel_tool_calls))


class Client:
    """`Client("127.0.0.1:50051").classify(["great movie"], adapter="sentiment")`"""

    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None, timeout: float = 30.0,
                 retries: int = 3, tls: bool = False, ca_cert: str | None = None) -> None:
        """tls (or a ca_cert PEM path, for a private CA) connects over TLS."""
        credentials = _credentials(tls, ca_cert)
        self._channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(token)
        self.timeout, self.retries = timeout, retries
        self.adapters = Adapters(self._channel, self._metadata, timeout, self._call)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout, metadata=_routed(self._metadata, request))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise error_from(exc) from None
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def _stream(self, request) -> Iterator[GenerationChunk]:
        try:
            for message in self._stub.GenerateStream(request, timeout=self.timeout,
                                                      metadata=_routed(self._metadata, request)):
                yield chunk(message)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    def classify(self, texts: list[str], adapter: str) -> list[Classification]:
        return classifications(self._call(self._stub.Classify, pb.ClassifyRequest(adapter=adapter, texts=texts)))

    def embed(self, texts: list[str], adapter: str | None = None, truncate: bool = False) -> Embeddings:
        """One embedding per text, on the base model or through `adapter`'s LoRA; `truncate` cuts texts longer
        than the model's embedding length instead of refusing them."""
        return embeddings(self._call(self._stub.Embed, pb.EmbedRequest(adapter=adapter or "", texts=texts,
                                                                       truncate=truncate)))

    def generate(self, prompt: str, adapter: str | None = None, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None, seed: int | None = None,
                 *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                 json_schema: dict | str | None = None, regex: str | None = None, choice: list[str] | None = None,
                 json_object: bool = False
                 ) -> Generation:
        request = _request(pb.GenerateRequest, adapter, prompt, None, max_tokens, temperature, top_p, top_k, stop,
                           seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                           json_schema=json_schema, regex=regex, choice=choice, json_object=json_object)
        return generation(self._call(self._stub.Generate, request))

    def generate_stream(self, prompt: str, adapter: str | None = None, max_tokens: int = 64,
                        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                        stop: list[str] | None = None, seed: int | None = None,
                        *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                        json_schema: dict | str | None = None, regex: str | None = None,
                        choice: list[str] | None = None,
                        json_object: bool = False) -> Iterator[GenerationChunk]:
        return self._stream(_request(pb.GenerateStreamRequest, adapter, prompt, None, max_tokens, temperature, top_p,
                                     top_k, stop, seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                                     json_schema=json_schema, regex=regex, choice=choice, json_object=json_object))

    def chat(self, messages: Iterable[Message], adapter: str | None = None, max_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
             seed: int | None = None, *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
             json_schema: dict | str | None = None, regex: str | None = None, choice: list[str] | None = None,
             json_object: bool = False, tools: list[dict] | None = None, tool_choice: str | None = None,
             parallel_tool_calls: bool | None = None) -> Generation:
        """The assistant's reply to `messages` ({"role", "content"} dicts or (role, content) tuples), rendered
        with the base model's chat template by the server. A tool-calling conversation goes on with the
        reply's calls ({"role": "assistant", "content": "", "tool_calls": reply.tool_calls}) and each call's
        result ({"role": "tool", "tool_call_id": call.id, "content": ...})."""
        request = _request(pb.GenerateRequest, adapter, "", messages, max_tokens, temperature, top_p, top_k, stop,
                           seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                           json_schema=json_schema, regex=regex, choice=choice, json_object=json_object,
                           tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
        return generation(self._call(self._stub.Generate, request))

    def chat_stream(self, messages: Iterable[Message], adapter: str | None = None, max_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
                    seed: int | None = None, *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                    json_schema: dict | str | None = None, regex: str | None = None, choice: list[str] | None = None,
                    json_object: bool = False,
                    tools: list[dict] | None = None, tool_choice: str | None = None,
                    parallel_tool_calls: bool | None = None) -> Iterator[GenerationChunk]:
        # Built now, not on the first next(): a malformed message fails at the call.
        return self._stream(_request(pb.GenerateStreamRequest, adapter, "", messages, max_tokens, temperature, top_p,
                                     top_k, stop, seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                                     json_schema=json_schema, regex=regex, choice=choice, json_object=json_object,
                                     tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls))

    def health(self, service: str = "", timeout: float | None = None) -> HealthStatus:
        """`if client.health(): ...` is true only while the server is SERVING."""
        try:
            response = health_stub(self._channel).Check(health_request(service), timeout=timeout or self.timeout,
                                                        metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return health_status(response)

    def is_serving(self) -> bool:
        """True if the server answers SERVING; False if it answers otherwise or cannot be reached."""
        try:
            return bool(self.health())
        except LoraplexError:
            return False

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll the health service until SERVING; TimeoutError (naming the last answer) after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                status = self.health(timeout=max(remaining, 0.01))
                if status:
                    return
                last = status.value
            except LoraplexError as exc:
                last = exc.code.name
            if deadline - time.monotonic() <= 0:
                raise not_serving_after(timeout, last)
            time.sleep(min(HEALTH_POLL_SECONDS, max(deadline - time.monotonic(), 0)))


class AsyncClient:
    """The asyncio twin of Client: `await c.classify(...)`, `async for chunk in c.generate_stream(...)`,
    `await c.adapters.list()`."""

    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None, timeout: float = 30.0,
                 retries: int = 3, tls: bool = False, ca_cert: str | None = None) -> None:
        credentials = _credentials(tls, ca_cert)
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials
                         else grpc.aio.insecure_channel(target))
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(token)
        self.timeout, self.retries = timeout, retries
        self.adapters = AsyncAdapters(self._channel, self._metadata, timeout, self._call)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout, metadata=_routed(self._metadata, request))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise error_from(exc) from None
                await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    async def _stream(self, request) -> AsyncIterator[GenerationChunk]:
        try:
            async for message in self._stub.GenerateStream(request, timeout=self.timeout,
                                                            metadata=_routed(self._metadata, request)):
                yield chunk(message)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    async def classify(self, texts: list[str], adapter: str) -> list[Classification]:
        return classifications(await self._call(self._stub.Classify, pb.ClassifyRequest(adapter=adapter,
                                                                                         texts=texts)))

    async def embed(self, texts: list[str], adapter: str | None = None, truncate: bool = False) -> Embeddings:
        return embeddings(await self._call(self._stub.Embed, pb.EmbedRequest(adapter=adapter or "", texts=texts,
                                                                             truncate=truncate)))

    async def generate(self, prompt: str, adapter: str | None = None, max_tokens: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
                       seed: int | None = None, *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                       json_schema: dict | str | None = None, regex: str | None = None, choice: list[str] | None = None,
                       json_object: bool = False) -> Generation:
        request = _request(pb.GenerateRequest, adapter, prompt, None, max_tokens, temperature, top_p, top_k, stop,
                           seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                           json_schema=json_schema, regex=regex, choice=choice, json_object=json_object)
        return generation(await self._call(self._stub.Generate, request))

    def generate_stream(self, prompt: str, adapter: str | None = None, max_tokens: int = 64,
                        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                        stop: list[str] | None = None, seed: int | None = None,
                        *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                        json_schema: dict | str | None = None, regex: str | None = None,
                        choice: list[str] | None = None,
                        json_object: bool = False) -> AsyncIterator[GenerationChunk]:
        return self._stream(_request(pb.GenerateStreamRequest, adapter, prompt, None, max_tokens, temperature, top_p,
                                     top_k, stop, seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                                     json_schema=json_schema, regex=regex, choice=choice, json_object=json_object))

    async def chat(self, messages: Iterable[Message], adapter: str | None = None, max_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
                   seed: int | None = None, *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                   json_schema: dict | str | None = None, regex: str | None = None, choice: list[str] | None = None,
                   json_object: bool = False,
                   tools: list[dict] | None = None, tool_choice: str | None = None,
                   parallel_tool_calls: bool | None = None) -> Generation:
        request = _request(pb.GenerateRequest, adapter, "", messages, max_tokens, temperature, top_p, top_k, stop,
                           seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                           json_schema=json_schema, regex=regex, choice=choice, json_object=json_object,
                           tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
        return generation(await self._call(self._stub.Generate, request))

    def chat_stream(self, messages: Iterable[Message], adapter: str | None = None, max_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
                    seed: int | None = None, *, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                    json_schema: dict | str | None = None, regex: str | None = None, choice: list[str] | None = None,
                    json_object: bool = False,
                    tools: list[dict] | None = None, tool_choice: str | None = None,
                    parallel_tool_calls: bool | None = None) -> AsyncIterator[GenerationChunk]:
        return self._stream(_request(pb.GenerateStreamRequest, adapter, "", messages, max_tokens, temperature, top_p,
                                     top_k, stop, seed, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                                     json_schema=json_schema, regex=regex, choice=choice, json_object=json_object,
                                     tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls))

    async def health(self, service: str = "", timeout: float | None = None) -> HealthStatus:
        try:
            response = await health_stub(self._channel).Check(health_request(service),
                                                              timeout=timeout or self.timeout,
                                                              metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return health_status(response)

    async def is_serving(self) -> bool:
        try:
            return bool(await self.health())
        except LoraplexError:
            return False

    async def wait_until_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = await self.health(timeout=max(deadline - time.monotonic(), 0.01))
                if status:
                    return
                last = status.value
            except LoraplexError as exc:
                last = exc.code.name
            if deadline - time.monotonic() <= 0:
                raise not_serving_after(timeout, last)
            await asyncio.sleep(min(HEALTH_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
