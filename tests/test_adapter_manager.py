"""The adapter manager and the engine loop, in process: one record per adapter version through its states
(disk -> loading -> host -> device), requests waiting for reads and for room, refcounts that keep a
running request's slot, deletes that never tear one, and the loop dispatching what steps return."""

from __future__ import annotations

import asyncio

import pytest

from loraplex_adapters.store import AdapterStore
from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import AdapterNotFound, Engine
from loraplex_server.engine.sampling import SamplingParams
from loraplex_server.engine.sequence import GenerationRequest
from loraplex_server.runtime.adapter_manager import AdapterManager
from loraplex_server.runtime.engine_loop import EngineLoop
from tiny_models import TEST_DEVICE

CLS, GEN, GEN2 = "cls3_r2", "gen_qv_r4", "gen_all_r8"
LABELS = ["a", "b", "c"]
PROMPT = [5, 6, 7, 8, 9]


def new_engine(tiny, max_adapters: int = 4) -> Engine:
    base_dir, _ = tiny("llama")
    return Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE),
                  max_adapters=max_adapters)


@pytest.fixture
def store(tiny, tmp_path) -> AdapterStore:
    _, adapters = tiny("llama")
    store = AdapterStore(tmp_path / "store")
    store.publish(adapters[CLS][0], "cls", labels=LABELS)
    store.publish(adapters[GEN][0], "gen")
    store.publish(adapters[GEN2][0], "other")
    return store


@pytest.fixture(scope="module")
def reference(tiny):
    """The same adapters loaded by name into an engine without a manager: what the loop must return."""
    _, adapters = tiny("llama")
    engine = new_engine(tiny)
    engine.load_adapter("cls", adapters[CLS][0], labels=LABELS)
    engine.load_adapter("gen", adapters[GEN][0])
    engine.load_adapter("other", adapters[GEN2][0])
    return engine


async def collect(events: asyncio.Queue) -> list:
    out = []
    while not out or not out[-1].finished:
        out.append(await asyncio.wait_for(events.get(), 60))
    return out


def serve(engine: Engine, store: AdapterStore, **budgets) -> tuple[AdapterManager, EngineLoop]:
    manager = AdapterManager(engine, store, budgets.get("device_bytes", 1 << 30), budgets.get("host_bytes", 1 << 30),
                             Metrics())
    loop = EngineLoop(engine, manager, manager.metrics)
    loop.start()
    return manager, loop


def test_the_loop_returns_what_the_engine_computes_and_every_count_returns_to_zero(tiny, store, reference):
    manager, loop = serve(new_engine(tiny), store)

    async def scenario():
        key = manager.resolve("cls")[0]
        assert manager.residency(key) == "disk"
        texts = [[5, 6, 7], [40, 41, 42, 43]]
        got = await loop.classify(texts, key)
        assert [g.scores for g in got] == [pytest.approx(r.scores, abs=1e-6)
                                           for r in reference.classify_ids(texts, ["cls", "cls"])]
        assert manager.residency(key) == "device" and manager.snapshot()[key].in_flight == 0
        gen = manager.resolve("gen")[0]
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        streams = [await loop.submit(GenerationRequest(PROMPT, k, params)) for k in (gen, None, gen)]
        ends = await asyncio.gather(*map(collect, streams))
        want = reference.generate([PROMPT] * 3, ["gen", None, "gen"], params)
        assert [[e.token_id for e in events] for events in ends] == [w.token_ids for w in want]
        assert [events[-1].finish_reason for events in ends] == ["length"] * 3
        assert "".join(e.text for e in ends[0]) == want[0].text
        assert loop.in_flight == 0 and manager.snapshot()[gen].in_flight == 0

    try:
        asyncio.run(scenario())
    finally:
        loop.stop()


def test_cancel_warm_pin_and_call_run_on_the_engine_thread(tiny, store):
    manager, loop = serve(new_engine(tiny), store)

    async def scenario():
        gen = manager.resolve("gen")[0]
        request = GenerationRequest(PROMPT, gen, SamplingParams(max_new_tokens=100, ignore_eos=True))
        events = await loop.submit(request)
        first = await events.get()
        assert first.token_id is not None and manager.snapshot()[gen].in_flight == 1
        loop.cancel(request.request_id)
        rest = await collect(events)
        assert rest[-1].finish_reason == "cancelled" and len(rest) < 100
        assert manager.snapshot()[gen].in_flight == 0 and loop.in_flight == 0
        cls = manager.resolve("cls")[0]
        await loop.warm(cls, pin=True)
        assert manager.residency(cls) == "device" and manager.is_pinned(cls)
        await loop.call(lambda: manager.unload(cls))
        assert manager.residency(cls) == "host" and not manager.is_pinned(cls)
        assert await loop.call(lambda: 42) == 42

    try:
        asyncio.run(scenario())
    finally:
        loop.stop()


def test_requests_wait_for_device_room_and_a_delete_never_tears_a_running_stream(tiny, store, reference):
    """One slot: a classification waits while a stream holds the slot, runs after it; deleting the
    stream's version mid-stream lets it finish on that version, then the slot is freed."""
    manager, loop = serve(new_engine(tiny, max_adapters=1), store)

    async def scenario():
        gen, cls = manager.resolve("gen")[0], manager.resolve("cls")[0]
        params = SamplingParams(max_new_tokens=110, ignore_eos=True)  # long enough to outlast the read
        events = await loop.submit(GenerationRequest(PROMPT, gen, params))
        await events.get()
        classified = asyncio.ensure_future(loop.classify([[5, 6, 7]], cls))
        for _ in range(600):  # its read from disk (the loader thread) takes a moment on a busy machine
            await asyncio.sleep(0.05)
            if manager.residency(cls) != "disk":
                break
        assert not classified.done() and manager.residency(cls) == "host"  # read, waiting for the slot
        store.delete("gen")
        await loop.call(lambda: manager.forget(gen))
        assert manager.residency(gen) == "device"  # still running on it
        rest = await collect(events)
        want = reference.generate([PROMPT], ["gen"], params)[0].token_ids
        assert [e.token_id for e in rest] == want[1:]
        got = await asyncio.wait_for(classified, 60)
        assert got[0].scores == pytest.approx(reference.classify_ids([[5, 6, 7]], ["cls"])[0].scores, abs=1e-6)
        assert manager.residency(gen) == "disk" and gen not in manager.versions
        with pytest.raises(AdapterNotFound):
            await loop.submit(GenerationRequest(PROMPT, gen, params))  # its files are gone
        assert loop.in_flight == 0

    try:
        asyncio.run(scenario())
    finally:
        loop.stop()


def test_a_failed_read_fails_only_its_waiting_requests_and_the_version_returns_to_disk(tiny, store, reference):
    manager, loop = serve(new_engine(tiny), store)
    broken = store.resolve("other", None)[1] / "adapter_model.safetensors"

    async def scenario():
        other, cls = manager.resolve("other")[0], manager.resolve("cls")[0]
        broken.write_bytes(b"not safetensors")
        results = await asyncio.gather(loop.classify([[5, 6]], cls), loop.submit(GenerationRequest(PROMPT, other)),
                                       return_exceptions=True)
        assert not isinstance(results[0], BaseException) and isinstance(results[1], Exception)
        assert manager.residency(other) == "disk" and other not in manager.versions
        assert loop.in_flight == 0

    try:
        asyncio.run(scenario())
    finally:
        loop.stop()


def test_the_host_tier_drops_the_least_recently_used_copy_but_never_a_device_one(tiny, store):
    _, adapters = tiny("llama")
    manager = AdapterManager(new_engine(tiny), store, 1 << 30, 1 << 30, Metrics())
    keys = [manager.resolve(name)[0] for name in ("cls", "gen", "other")]
    manager.read(keys[0]).result()
    manager.placed()
    assert manager.place(keys[0])  # on the device, and the least recently used of the three
    for key in keys[1:]:
        manager.read(key).result()
        manager.placed()
    assert [manager.residency(k) for k in keys] == ["device", "host", "host"]
    sizes = [manager.versions[k].copy.host_bytes for k in keys]
    manager.host_bytes = sizes[0] + sizes[2] + sizes[1]  # room for three copies: the next read drops one
    store.publish(adapters[GEN][0], "gen")
    newest = manager.resolve("gen")[0]
    manager.read(newest).result()
    manager.placed()
    assert [manager.residency(k) for k in (*keys, newest)] == ["device", "disk", "host", "host"]
    assert keys[1] not in manager.versions  # one record per version in memory, none for one on disk
    manager.close()
