"""Cache tiers and hot swap through a real server: many adapters in little device room, replace and delete
under load, and a server killed in the middle of an upload."""

from __future__ import annotations

import hashlib
import random
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from server_process import free_port, start_server

from loraplex import NotFound
from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc
from loraplex_adapters.store import AdapterStore
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

CLS, GEN_V1, GEN_V2 = "cls3_r2", "gen_qv_r4", "gen_all_r8"
LABELS = ["a", "b", "c"]
TEXTS = ["great movie", "the lazy dog", "hello world, how are you today?"]


def random_copies(source, root, count: int) -> list:
    """`count` adapters shaped like `source`, each with its own random weights."""
    tensors, folders = load_file(source / "adapter_model.safetensors"), []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        folder = root / f"copy{i}"
        folder.mkdir(parents=True)
        shutil.copy(source / "adapter_config.json", folder)
        save_file({k: torch.randn(v.shape, generator=generator) * v.std() for k, v in tensors.items()},
                  folder / "adapter_model.safetensors")
        folders.append(folder)
    return folders


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels} | {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
        for s in f.samples if s.labels}


def stop(process) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_200_adapters_with_device_room_for_8(tiny, tmp_path):
    base_dir, adapters = tiny("llama")
    folders = random_copies(adapters[CLS][0], tmp_path / "src", 200)
    store = AdapterStore(tmp_path / "store")
    for i, folder in enumerate(folders):
        store.publish(folder, f"a{i}", labels=LABELS)

    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=1)
    want = {}
    for i, folder in enumerate(folders):
        engine.load_adapter("x", folder, labels=LABELS)
        want[i] = engine.classify(TEXTS, "x")
        engine.unload_adapter("x")
    assert len({tuple(w[0].scores.values()) for w in want.values()}) == 200  # the adapters differ

    one = sum(t.numel() * 4 for t in load_file(folders[0] / "adapter_model.safetensors").values())
    port, metrics_port = free_port(), free_port()
    process, client = start_server(base_dir, tmp_path / "store", port, metrics_port, extra_args=[
        "--adapter-memory", str(8 * one + one // 2), "--host-adapter-memory", str(50 * one)])
    try:
        def request(seed: int) -> tuple[int, int, list]:
            rng = random.Random(seed)
            i, t = rng.randrange(200), rng.randrange(len(TEXTS))
            return i, t, client.classify([TEXTS[t]], adapter=f"a{i}")

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(request, range(400)))
        for i, t, (got,) in answers:
            assert got.label == want[i][t].label
            assert got.scores == pytest.approx(want[i][t].scores, abs=1e-4)
        metrics = scrape(metrics_port)
        assert metrics["loraplex_device_adapters"] <= 8
        assert metrics["loraplex_device_adapter_bytes"] <= 8 * one + one // 2
        assert metrics["loraplex_host_adapter_bytes"] <= 50 * one
        assert metrics["loraplex_adapter_evictions_total"] >= 100
        assert metrics[("loraplex_adapter_lookups_total", (("tier", "disk"),))] >= len({a[0] for a in answers})
    finally:
        client.close()
        stop(process)


def test_replace_and_delete_under_load(tiny, tmp_path):
    base_dir, adapters = tiny("llama")
    store = AdapterStore(tmp_path / "store")
    for name in ("steady1", "steady2", "victim"):
        store.publish(adapters[CLS][0], name, labels=LABELS)
    store.publish(adapters[GEN_V1][0], "gen")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=2)
    engine.load_adapter("v1", adapters[GEN_V1][0])
    engine.load_adapter("v2", adapters[GEN_V2][0])
    prompt_ids = engine.tokenizer("hello")["input_ids"]
    params = SamplingParams(max_new_tokens=100)
    want_v1, want_v2 = (engine.generate([prompt_ids], [v], params)[0].token_ids for v in ("v1", "v2"))
    assert want_v1 != want_v2

    # A generous deadline: a 100-token stream beside four hammering clients takes seconds on a busy
    # 2-core machine (every step still decodes it first: nothing starves, it is only slow).
    process, client = start_server(base_dir, tmp_path / "store", free_port(), client_kwargs={"timeout": 120})
    done, failures, victim_codes = threading.Event(), [], set()

    def hammer(name: str) -> None:
        while not done.is_set():
            try:
                client.classify(TEXTS, adapter=name)
                victim_codes.add("OK") if name == "victim" else None
            except NotFound:
                victim_codes.add("NOT_FOUND") if name == "victim" else failures.append((name, "NOT_FOUND"))
            except Exception as exc:  # noqa: BLE001 - any other failure is a test failure
                failures.append((name, repr(exc)))

    def stream_tokens(after_first) -> tuple[list[int], float]:
        tokens, stream = [], client.generate_stream("hello", adapter="gen", max_tokens=100)
        for chunk in stream:
            if not tokens and chunk.token_ids:
                after_first()
            tokens += chunk.token_ids
        return tokens, time.perf_counter()

    threads = [threading.Thread(target=hammer, args=(n,)) for n in ("steady1", "steady2", "steady1", "victim")]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        swapped = []
        tokens, ended = stream_tokens(lambda: swapped.append(
            (client.adapters.upload(adapters[GEN_V2][0], name="gen"), time.perf_counter())))
        assert swapped[0][0].version == 2 and swapped[0][1] < ended, "the upload must land mid-generation"
        assert tokens == want_v1  # started on version 1, finished on it
        assert client.generate("hello", adapter="gen", max_tokens=100).token_ids == want_v2

        deleted = []
        tokens, ended = stream_tokens(lambda: deleted.append((client.adapters.delete("gen"), time.perf_counter())))
        assert deleted[0][0] == [1, 2] and deleted[0][1] < ended
        assert tokens == want_v2
        with pytest.raises(NotFound):
            client.generate("hello", adapter="gen")

        assert client.adapters.delete("victim") == [1]
        time.sleep(0.5)
    finally:
        done.set()
        for thread in threads:
            thread.join()
        client.close()
        stop(process)
    assert failures == []
    assert victim_codes == {"OK", "NOT_FOUND"}


def test_kill_9_mid_upload_then_restart_serves_every_earlier_adapter(tiny, tmp_path):
    base_dir, adapters = tiny("llama")
    store_dir = tmp_path / "store"
    store = AdapterStore(store_dir)
    for name in ("first", "second"):
        store.publish(adapters[CLS][0], name, labels=LABELS)
    port = free_port()
    process, client = start_server(base_dir, store_dir, port, in_process=False)  # SIGKILLed below
    before = {name: client.classify(TEXTS, adapter=name) for name in ("first", "second")}

    payload = torch.randint(0, 256, (300_000,), dtype=torch.uint8).numpy().tobytes()
    release = threading.Event()

    def messages():
        yield pb.UploadRequest(metadata=pb.UploadMetadata(
            name="half", labels=LABELS, size_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest()))
        yield pb.UploadRequest(chunk=payload[:200_000])
        release.wait(30)

    stub = pb_grpc.AdapterServiceStub(client._channel)
    upload = ThreadPoolExecutor(1).submit(lambda: stub.Upload(messages(), timeout=60))
    try:
        deadline = time.time() + 30
        while not any(p.stat().st_size for p in (store_dir / "staging").glob("*/upload-*")):
            assert time.time() < deadline, "the upload never reached the server's staging folder"
            time.sleep(0.05)
        process.kill()  # SIGKILL: no cleanup runs
        process.wait()
        release.set()
        with pytest.raises(grpc.RpcError):
            upload.result(timeout=30)
        client.close()
        process, client = start_server(base_dir, store_dir, port)
        assert [a.reference for a in client.adapters.list()] == ["first@1", "second@1"]
        assert [p for p in (store_dir / "staging").rglob("*") if p.is_file() and p.suffix != ".lock"] == []
        for name, answer in before.items():
            assert client.classify(TEXTS, adapter=name) == answer
    finally:
        release.set()
        client.close()
        stop(process)


def test_pins_leave_room_and_pinned_or_running_adapters_are_never_evicted(tiny, tmp_path):
    """In-process: the adapter manager on the engine thread's side, with device room for 2 adapters."""
    from loraplex_server.api.metrics import Metrics
    from loraplex_server.engine.sequence import GenerationRequest
    from loraplex_server.runtime.adapter_manager import AdapterManager, PinRefused

    base_dir, adapters = tiny("llama")
    store = AdapterStore(tmp_path / "store")
    for i, folder in enumerate(random_copies(adapters[CLS][0], tmp_path / "src", 2)):
        store.publish(folder, f"c{i}", labels=LABELS)
    store.publish(adapters[GEN_V1][0], "g")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=8)
    manager = AdapterManager(engine, store, device_bytes=1 << 30, host_bytes=1 << 30, metrics=Metrics())
    keys = {name: manager.resolve(name)[0] for name in ("c0", "c1", "g")}
    for key in keys.values():
        manager.read(key).result()
    assert manager.placed() == [] and {manager.residency(k) for k in keys.values()} == {"host"}
    size = {name: manager.versions[key].copy.device_bytes for name, key in keys.items()}
    manager.device_bytes = size["c0"] + size["g"] + 64  # room for c0 and g, or c0 and c1, not all three

    def on_device() -> set[str]:
        return {k for k, r in manager.snapshot().items() if r.tier == "device"}

    assert manager.place(keys["c0"]) and manager.place(keys["c1"])
    manager.pin(keys["c0"])
    with pytest.raises(PinRefused):
        manager.pin(keys["c1"])  # over half the device bytes pinned would starve the rest
    assert manager.place(keys["g"])  # evicts c1, the unpinned one
    assert on_device() == {keys["c0"], keys["g"]} and manager.is_pinned(keys["c0"])
    manager.request(keys["g"], "a generation")
    [(waiter, placed)] = manager.placed()
    request = GenerationRequest(engine.tokenizer("hello")["input_ids"], keys["g"], SamplingParams(max_new_tokens=50))
    engine.submit(request, placed)
    assert waiter == "a generation" and manager.snapshot()[keys["g"]].in_flight == 1
    assert manager.place(keys["c1"]) is None  # c0 pinned, g running: no room, and nothing torn
    assert on_device() == {keys["c0"], keys["g"]}
    engine.cancel(request.request_id)
    assert engine.step().events[0].finish_reason == "cancelled"
    manager.release(keys["g"])
    assert manager.place(keys["c1"])  # g is idle now: it goes back to the host tier
    assert on_device() == {keys["c0"], keys["c1"]} and manager.residency(keys["g"]) == "host"
    manager.close()
