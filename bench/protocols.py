"""One client per protocol the server speaks, each with the same two calls, and a closed-loop load runner.

- grpc: our API through the SDK's AsyncClient (GenerateStream, Classify);
- openai: the `openai` package's AsyncOpenAI (streamed /v1/completions) and httpx for vLLM's /classify;
- oip: tritonclient's asyncio gRPC client (ModelInfer; a generation is unary, `text_output` at the end).

tritonclient's stubs and `loraplex.oip`'s share the protobuf package `inference`: this module (and the
benchmark process) never imports `loraplex.oip`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

PROTOCOLS = ("grpc", "openai", "oip")
CLIENT_TIMEOUT_S = 600.0


@dataclass
class Reply:
    """What one generation gave back: its text, completion tokens (None when the protocol does not say)
    and the seconds to its first text (None for a unary reply)."""

    text: str
    tokens: int | None = None
    first_text_s: float | None = None


class GrpcDriver:
    def __init__(self, target: str, generator: str, classifier: str) -> None:
        from loraplex import AsyncClient

        self.client = AsyncClient(target, timeout=CLIENT_TIMEOUT_S, retries=0)
        self.generator, self.classifier = generator, classifier

    async def generate(self, prompt: str, max_tokens: int) -> Reply:
        start, reply, pieces = time.perf_counter(), Reply(""), []
        async for chunk in self.client.generate_stream(prompt, adapter=self.generator, max_tokens=max_tokens,
                                                       temperature=0.0):
            if chunk.text and reply.first_text_s is None:
                reply.first_text_s = time.perf_counter() - start
            pieces.append(chunk.text)
            if chunk.finish_reason is not None:
                reply.tokens = chunk.completion_tokens
        reply.text = "".join(pieces)
        return reply

    async def classify(self, text: str) -> str:
        return (await self.client.classify([text], adapter=self.classifier))[0].label

    async def close(self) -> None:
        await self.client.close()


class OpenAIDriver:
    def __init__(self, base_url: str, generator: str, classifier: str) -> None:
        import httpx
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                  timeout=CLIENT_TIMEOUT_S)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S)
        self.generator, self.classifier = generator, classifier

    async def generate(self, prompt: str, max_tokens: int) -> Reply:
        start, reply, pieces = time.perf_counter(), Reply(""), []
        stream = await self.client.completions.create(model=self.generator, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0.0, stream=True,
                                                      stream_options={"include_usage": True})
        async for event in stream:
            if event.choices and event.choices[0].text:
                if reply.first_text_s is None:
                    reply.first_text_s = time.perf_counter() - start
                pieces.append(event.choices[0].text)
            if event.usage is not None:
                reply.tokens = event.usage.completion_tokens
        reply.text = "".join(pieces)
        return reply

    async def classify(self, text: str) -> str:
        response = await self.http.post("/classify", json={"model": self.classifier, "input": [text]})
        response.raise_for_status()
        return response.json()["data"][0]["label"]

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()


class OipDriver:
    def __init__(self, target: str, generator: str, classifier: str) -> None:
        import tritonclient.grpc.aio as triton

        self.triton = triton
        self.client = triton.InferenceServerClient(url=target)
        self.generator, self.classifier = generator, classifier

    def _texts(self, name: str, text: str):
        import numpy as np

        tensor = self.triton.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        return [tensor]

    async def generate(self, prompt: str, max_tokens: int) -> Reply:
        result = await self.client.infer(self.generator, self._texts("text_input", prompt),
                                         parameters={"max_tokens": max_tokens}, client_timeout=CLIENT_TIMEOUT_S)
        return Reply(result.as_numpy("text_output")[0].decode())

    async def classify(self, text: str) -> str:
        result = await self.client.infer(self.classifier, self._texts("text", text),
                                         outputs=[self.triton.InferRequestedOutput("label")],
                                         client_timeout=CLIENT_TIMEOUT_S)
        return result.as_numpy("label")[0].decode()

    async def close(self) -> None:
        await self.client.close()


Driver = GrpcDriver | OpenAIDriver | OipDriver


def open_driver(protocol: str, grpc_target: str, http_url: str, generator: str, classifier: str) -> Driver:
    if protocol == "grpc":
        return GrpcDriver(grpc_target, generator, classifier)
    if protocol == "openai":
        return OpenAIDriver(http_url, generator, classifier)
    return OipDriver(grpc_target, generator, classifier)


@dataclass
class Figures:
    """One protocol's closed-loop run of one workload."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    tokens_per_s: float | None = None  # generation, when the protocol reports completion tokens
    first_text_p50_ms: float | None = None  # streaming generation


async def closed_loop(call: Callable[[], Awaitable[Reply | str]], requests: int, concurrency: int) -> Figures:
    """`concurrency` workers, each sending its next request when its last one is answered, until
    `requests` are done; the rate is over the wall time of the whole run."""
    remaining, latencies, replies = requests, [], []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            replies.append(await call())
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    figures = Figures(len(latencies) / elapsed, 1000 * cuts[49], 1000 * cuts[98])
    generations = [r for r in replies if isinstance(r, Reply)]
    if generations and all(r.tokens is not None for r in generations):
        figures.tokens_per_s = sum(r.tokens for r in generations) / elapsed
    if generations and all(r.first_text_s is not None for r in generations):
        figures.first_text_p50_ms = 1000 * statistics.median(r.first_text_s for r in generations)
    return figures
