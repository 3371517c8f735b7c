"""The loraplex client: typed results, typed errors, retries on UNAVAILABLE only. No torch."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

from .adapters import Adapters
from .errors import error_from

FINISH_REASONS = {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationChunk:
    """A streamed piece: new text and token ids; the last chunk has finish_reason and token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, stop: list[str] | None,
             seed: int | None) -> pb.SamplingParameters:
    params = pb.SamplingParameters(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                   stop=stop or [])
    if seed is not None:
        params.seed = seed
    return params


def _classifications(response: pb.ClassifyResponse) -> list[Classification]:
    return [Classification(r.label, r.score, {s.label: s.score for s in r.scores}) for r in response.results]


def _generation(r: pb.GenerateResponse) -> Generation:
    return Generation(r.text, list(r.token_ids), FINISH_REASONS.get(r.finish_reason, ""), r.prompt_tokens,
                      r.completion_tokens)


def _chunk(message: pb.GenerateStreamResponse) -> GenerationChunk:
    if message.HasField("delta"):
        return GenerationChunk(message.delta.text, list(message.delta.token_ids))
    done = message.done
    return GenerationChunk(finish_reason=FINISH_REASONS.get(done.finish_reason, ""),
                           prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)


def _credentials(tls: bool, ca_cert: str | None) -> grpc.ChannelCredentials | None:
    if not (tls or ca_cert):
        return None
    roots = open(ca_cert, "rb").read() if ca_cert else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _backoff(attempt: int) -> float:
    return min(2.0, 0.1 * 2 ** attempt)


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
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise error_from(exc) from None
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def classify(self, texts: list[str], adapter: str) -> list[Classification]:
        return _classifications(self._call(self._stub.Classify, pb.ClassifyRequest(adapter=adapter, texts=texts)))

    def generate(self, prompt: str, adapter: str | None = None, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None, seed: int | None = None
                 ) -> Generation:
        request = pb.GenerateRequest(adapter=adapter or "", prompt=prompt,
                                     sampling=sampling(max_tokens, temperature, top_p, top_k, stop, seed))
        return _generation(self._call(self._stub.Generate, request))

    def generate_stream(self, prompt: str, adapter: str | None = None, max_tokens: int = 64,
                        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                        stop: list[str] | None = None, seed: int | None = None) -> Iterator[GenerationChunk]:
        request = pb.GenerateStreamRequest(adapter=adapter or "", prompt=prompt,
                                           sampling=sampling(max_tokens, temperature, top_p, top_k, stop, seed))
        try:
            for message in self._stub.GenerateStream(request, timeout=self.timeout, metadata=self._metadata):
                yield _chunk(message)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    def health(self, service: str = "") -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout,
                                  metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncClient:
    """The asyncio twin of Client: `await c.classify(...)`, `async for chunk in c.generate_stream(...)`."""

    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None, timeout: float = 30.0,
                 retries: int = 3, tls: bool = False, ca_cert: str | None = None) -> None:
        credentials = _credentials(tls, ca_cert)
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials
                         else grpc.aio.insecure_channel(target))
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(token)
        self.timeout, self.retries = timeout, retries

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        import asyncio

        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise error_from(exc) from None
                await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    async def classify(self, texts: list[str], adapter: str) -> list[Classification]:
        return _classifications(await self._call(self._stub.Classify, pb.ClassifyRequest(adapter=adapter,
                                                                                          texts=texts)))

    async def generate(self, prompt: str, adapter: str | None = None, max_tokens: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
                       seed: int | None = None) -> Generation:
        request = pb.GenerateRequest(adapter=adapter or "", prompt=prompt,
                                     sampling=sampling(max_tokens, temperature, top_p, top_k, stop, seed))
        return _generation(await self._call(self._stub.Generate, request))

    async def generate_stream(self, prompt: str, adapter: str | None = None, max_tokens: int = 64,
                              temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                              stop: list[str] | None = None, seed: int | None = None
                              ) -> AsyncIterator[GenerationChunk]:
        request = pb.GenerateStreamRequest(adapter=adapter or "", prompt=prompt,
                                           sampling=sampling(max_tokens, temperature, top_p, top_k, stop, seed))
        try:
            async for message in self._stub.GenerateStream(request, timeout=self.timeout, metadata=self._metadata):
                yield _chunk(message)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
