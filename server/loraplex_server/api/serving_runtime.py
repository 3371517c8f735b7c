"""What the request path asks of the runtime (the engine loop and the adapter manager), in one place.

Every store call runs off the event loop, on a pool of its own: a lookup reads manifests and, for a
version seen for the first time, hashes its weights, and a slow or hostile file (a FIFO, a stalled
network mount) must stall only the requests that need it, never the loop that gRPC and HTTP share.
Lookups of the same reference already in flight are shared, so many requests for one stalled adapter
hold one thread, not the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from loraplex_adapters.manifest import Manifest, parse_reference
from loraplex_adapters.store_protocol import AdapterStoreLike
from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.engine import AdapterInUse, AdapterNotFound, Classification, Engine
from loraplex_server.engine.sequence import GenerationRequest, TokenEvent
from loraplex_server.runtime.adapter_manager import AdapterManager, PinRefused, WrongBase, adapter_key
from loraplex_server.runtime.engine_loop import EngineLoop, QueueFull

__all__ = ["AdapterInUse", "AdapterNotFound", "PinRefused", "QueueFull", "ServingRuntime", "WrongBase",
           "adapter_key"]
T = TypeVar("T")
STORE_THREADS = 8


class ServingRuntime:
    """The engine, its loop and the adapter manager, as the request path uses them."""

    def __init__(self, engine: Engine, adapters: AdapterManager, engine_loop: EngineLoop) -> None:
        self.engine, self._adapters, self.engine_loop = engine, adapters, engine_loop
        self._store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="loraplex-store")
        self._lookups: dict[str, asyncio.Future] = {}

    @classmethod
    def create(cls, engine: Engine, store: AdapterStoreLike, device_bytes: int, host_bytes: int, metrics: Metrics,
               max_pending: int) -> ServingRuntime:
        """The adapter manager over `store` and the engine loop that owns both (not started)."""
        adapters = AdapterManager(engine, store, device_bytes, host_bytes, metrics)
        return cls(engine, adapters, EngineLoop(engine, adapters, metrics, max_pending=max_pending))

    def start(self) -> None:
        self.engine_loop.start()

    def stop(self) -> None:
        self.engine_loop.stop()
        self._store_pool.shutdown(wait=False, cancel_futures=True)

    # -- the base ------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_positions(self) -> int:
        return self.engine.base.max_positions

    @property
    def base_id(self) -> str:
        """The base model's id in the OpenAI API: its folder's name."""
        return self.engine.base.path.name

    # -- the store, off the event loop ----------------------------------------------------------

    @property
    def store(self) -> AdapterStoreLike:
        return self._adapters.store

    async def in_store_thread(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

    async def resolve(self, reference: str) -> tuple[str, Manifest]:
        """'name' or 'name@N' -> (`name@version` key, manifest), read in a store thread; concurrent
        lookups of one reference share that read."""
        lookup = self._lookups.get(reference)
        if lookup is None:
            lookup = asyncio.ensure_future(self.in_store_thread(self._adapters.resolve, reference))
            self._lookups[reference] = lookup
            lookup.add_done_callback(lambda done: self._forget_lookup(reference, done))
        return await asyncio.shield(lookup)

    async def manifest(self, reference: str) -> Manifest:
        """A registered version's manifest, whatever base it was trained on (for showing it)."""
        name, version = parse_reference(reference)
        return await self.in_store_thread(self.store.lookup, name, version)

    def _forget_lookup(self, reference: str, done: asyncio.Future) -> None:
        if self._lookups.get(reference) is done:
            del self._lookups[reference]
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody awaits any more is not "never retrieved"

    def known(self, name: str) -> bool:
        """Whether the store held `name` when it last read it (no I/O: for metrics labels)."""
        return self.store.known(name)

    def residency(self, key: str) -> str:
        return self._adapters.residency(key)

    def is_pinned(self, key: str) -> bool:
        return self._adapters.is_pinned(key)

    # -- the engine loop --------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.engine_loop.in_flight

    async def classify(self, token_ids: list[list[int]], key: str) -> list[Classification]:
        return await self.engine_loop.classify(token_ids, key)

    async def embed(self, token_ids: list[list[int]], key: str | None):
        """Embeddings [texts, hidden] (a float32 CPU tensor) of the texts, on the adapter `key` or the base."""
        return await self.engine_loop.embed(token_ids, key)

    @property
    def pooling(self):
        """How embeddings are pooled (engine/pooling.py): mode, normalize, and the model's max_tokens."""
        return self.engine.runner.pooling

    @property
    def vocab_size(self) -> int:
        """Token ids a client may send are below this."""
        return int(self.engine.base.model.config.vocab_size)

    @property
    def embedding_size(self) -> int:
        return self.engine.base.hidden_size

    async def submit(self, request: GenerationRequest) -> asyncio.Queue[TokenEvent]:
        return await self.engine_loop.submit(request)

    def cancel(self, request_id: str) -> None:
        self.engine_loop.cancel(request_id)

    async def warm(self, key: str, pin: bool) -> None:
        await self.engine_loop.warm(key, pin)

    async def unload(self, key: str) -> None:
        adapters = self._adapters
        await self.engine_loop.call(lambda: adapters.unload(key))

    async def forget(self, keys: list[str]) -> None:
        """Drop the in-memory copies of deleted versions (a slot still in use goes once idle)."""
        adapters = self._adapters
        await self.engine_loop.call(lambda: [adapters.forget(key) for key in keys])
