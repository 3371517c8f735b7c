"""End to end over real gRPC: a `loraplex serve` process on 127.0.0.1, the SDK and raw stubs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port, start_server

from loraplex import AsyncClient, Client, FailedPrecondition, InvalidArgument, LoraplexError, NotFound, Unavailable
from loraplex.cli import main as cli_main
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from loraplex_adapters import embedded_base as embedded
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

GEN, CLS, CLS2 = "gen_all_r8", "cls5_r6", "cls3_r2"


@pytest.fixture(scope="module")
def server(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    port, metrics_port = free_port(), free_port()
    process, client = start_server(base_dir, adapter_dir, port, metrics_port)
    yield process, client, port, metrics_port
    client.close()
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def reference(tiny, adapter_dir):
    """The same base and adapters in-process, to compare what the server returns."""
    base_dir, _ = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=8)
    for name in (GEN, CLS):
        engine.load_adapter(name, adapter_dir / "adapters" / name / "2",
                            labels=[f"{CLS}-{i}" for i in range(5)] if name == CLS else None)
    return engine


def test_classify_returns_the_engine_probabilities(server, reference):
    client = server[1]
    texts = ["great movie", "awful plot, fine acting", "hello world"]
    got = client.classify(texts, adapter=CLS)
    expected = reference.classify(texts, CLS)
    for g, e in zip(got, expected, strict=True):
        assert list(g.scores) == list(e.scores)
        torch.testing.assert_close(torch.tensor(list(g.scores.values())), torch.tensor(list(e.scores.values())),
                                   atol=1e-5, rtol=0)
        assert g.label == e.label and g.score == pytest.approx(e.score, abs=1e-5)
    assert client.classify(texts, adapter=f"{CLS}@2")[0].label == got[0].label


def test_generate_unary_and_stream_agree_with_the_engine(server, reference):
    client = server[1]
    prompt = "the quick brown fox"
    unary = client.generate(prompt, adapter=GEN, max_tokens=12)
    ids = reference.tokenizer(prompt)["input_ids"]
    expected = reference.generate([ids], [GEN], SamplingParams(max_new_tokens=12))[0]
    assert unary.token_ids == expected.token_ids and unary.text == expected.text
    assert unary.finish_reason == expected.finish_reason
    assert (unary.prompt_tokens, unary.completion_tokens) == (len(ids), len(expected.token_ids))
    chunks = list(client.generate_stream(prompt, adapter=GEN, max_tokens=12))
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason == unary.finish_reason
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids
    assert chunks[-1].completion_tokens == len(unary.token_ids)


def test_raw_stubs(server):
    port = server[2]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        response = stub.Classify(pb.ClassifyRequest(adapter=CLS, texts=["a", "b"]), timeout=10)
        assert len(response.results) == 2 and len(response.results[0].scores) == 5
        base = stub.Generate(pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParameters(max_tokens=3)),
                             timeout=10)
        assert base.completion_tokens == 3 and base.finish_reason == pb.FINISH_REASON_LENGTH
        stream = list(stub.GenerateStream(pb.GenerateStreamRequest(adapter=GEN, prompt="hello",
                                                                   sampling=pb.SamplingParameters(max_tokens=4)),
                                          timeout=10))
        assert [m.WhichOneof("event") for m in stream] == ["delta"] * 4 + ["done"]


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda c: c.classify(["x"], adapter="missing"), NotFound, "not registered"),
    (lambda c: c.classify(["x"], adapter=f"{CLS}@7"), NotFound, "no version 7"),
    (lambda c: c.generate("x", adapter="missing"), NotFound, "not registered"),
    (lambda c: c.classify(["x"], adapter=GEN), FailedPrecondition, "generation adapter"),
    (lambda c: c.generate("x", adapter=CLS), FailedPrecondition, "classification adapter"),
    (lambda c: c.classify(["x"], adapter=""), FailedPrecondition, "needs a classification adapter"),
    (lambda c: c.classify([], adapter=CLS), InvalidArgument, "texts is empty"),
    (lambda c: c.classify(["x"] * 65, adapter=CLS), InvalidArgument, "at most 64"),
    (lambda c: c.classify(["ok", ""], adapter=CLS), InvalidArgument, r"texts\[1\] is empty"),
    (lambda c: c.classify(["stop " * 200], adapter=CLS), InvalidArgument, "context"),
    # Over 16 characters per token of context (the tiny model's is 128): refused before tokenizing.
    (lambda c: c.classify(["ok", "y" * 2049], adapter=CLS), InvalidArgument, r"texts\[1\] has 2049 characters"),
    (lambda c: c.generate("é" * 100_000, adapter=GEN), InvalidArgument, "prompt has 100000 characters"),
    (lambda c: c.generate(""), InvalidArgument, "prompt is empty"),
    (lambda c: c.generate("x", max_tokens=5000), InvalidArgument, "max_tokens"),
    (lambda c: c.generate("x", max_tokens=-1), InvalidArgument, "max_tokens"),
    (lambda c: c.generate("x", max_tokens=0), InvalidArgument, "max_tokens"),
    (lambda c: c.generate("x", top_p=0.0), InvalidArgument, "top_p"),
    (lambda c: c.generate("x", temperature=-0.5), InvalidArgument, "temperature"),
    (lambda c: c.generate("x", top_p=1.5), InvalidArgument, "top_p"),
    (lambda c: c.generate("x", top_k=-2), InvalidArgument, "top_k"),
    (lambda c: c.generate("x", adapter="a@b@c"), InvalidArgument, "malformed adapter reference"),
    (lambda c: c.generate("x", adapter="../etc"), InvalidArgument, "invalid adapter name"),
])
def test_bad_input_gets_a_precise_status_and_the_server_keeps_serving(server, call, error, message):
    client = server[1]
    with pytest.raises(error, match=message):
        call(client)
    assert client.health() == "SERVING"
    assert len(client.classify(["still here"], adapter=CLS)) == 1


def test_reflection_lists_the_services(server):
    port = server[2]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"loraplex.v1.InferenceService", "grpc.health.v1.Health"} <= services


def scrape(metrics_port: int) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, parsed with prometheus_client's own parser."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, seconds: float = 20.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_metrics_count_requests_by_method_adapter_and_status(server):
    client, metrics_port = server[1], server[3]
    before = scrape(metrics_port)
    client.classify(["one", "two"], adapter=CLS)
    with pytest.raises(NotFound):
        client.classify(["x"], adapter="missing")
    client.generate("hello", adapter=GEN, max_tokens=5)
    after = scrape(metrics_port)
    grew = [sample(after, "loraplex_requests_total", method=m, adapter=a, code=c)
            - sample(before, "loraplex_requests_total", method=m, adapter=a, code=c)
            for m, a, c in (("Classify", CLS, "OK"), ("Classify", "unknown", "NOT_FOUND"), ("Generate", GEN, "OK"))]
    assert grew == [1.0, 1.0, 1.0]
    assert sample(after, "loraplex_generated_tokens_total", adapter=GEN) >= 5
    assert sample(after, "loraplex_request_seconds_count", method="Generate") >= 1
    assert sample(after, "loraplex_time_to_first_token_seconds_count") >= 1
    # Earlier tests in this module used CLS and GEN, so they are in slots: this test's calls are hits.
    assert sample(after, "loraplex_adapter_lookups_total", tier="device") \
        - sample(before, "loraplex_adapter_lookups_total", tier="device") >= 2
    assert sample(after, "loraplex_adapter_lookups_total", tier="disk") >= 2
    assert sample(after, "loraplex_adapter_load_seconds_count", source="disk") >= 2
    assert sample(after, "loraplex_device_adapters") >= 2


def test_deadline_and_client_cancel_free_the_row(server):
    client, port, metrics_port = server[1], server[2], server[3]
    cancelled = sample(scrape(metrics_port), "loraplex_generations_finished_total", reason="cancelled")
    with Client(f"127.0.0.1:{port}", timeout=0.1, retries=0) as hurried:
        with pytest.raises(LoraplexError) as failure:
            hurried.generate("the quick brown fox", adapter=GEN, max_tokens=1000)
    assert failure.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: sample(scrape(metrics_port), "loraplex_generations_finished_total",
                            reason="cancelled") == cancelled + 1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.InferenceServiceStub(channel).GenerateStream(
            pb.GenerateStreamRequest(adapter=GEN, prompt="hello", sampling=pb.SamplingParameters(max_tokens=1000)))
        next(call)
        call.cancel()
    wait_for(lambda: sample(scrape(metrics_port), "loraplex_generations_finished_total",
                            reason="cancelled") == cancelled + 2)
    samples = wait_for(lambda: (s := scrape(metrics_port)) and sample(s, "loraplex_running_rows") == 0
                       and sample(s, "loraplex_in_flight_requests") == 0 and s)
    assert sample(samples, "loraplex_queue_depth") == 0
    assert client.health() == "SERVING"


def test_concurrent_requests_for_different_adapters_share_forward_passes(server):
    client, metrics_port = server[1], server[3]
    before = scrape(metrics_port)
    stream = client.generate_stream("hello", adapter=GEN, max_tokens=60)  # keeps the engine stepping
    next(stream)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.classify([f"text {i}"], adapter=(CLS, CLS2)[i % 2]), range(48)))
    list(stream)
    assert all(len(r) == 1 for r in results)
    after = scrape(metrics_port)

    def multi_adapter_batches(samples):
        return (sample(samples, "loraplex_batch_adapters_count")
                - sample(samples, "loraplex_batch_adapters_bucket", le="1.0"))
    assert multi_adapter_batches(after) > multi_adapter_batches(before)


def test_backpressure_then_sigterm_drains_and_exits_zero(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    process, client = start_server(base_dir, adapter_dir, free_port(), max_pending=2)
    streams = [client.generate_stream("hello", adapter=GEN, max_tokens=60) for _ in range(2)]
    firsts = [next(s) for s in streams]  # both in flight now
    with pytest.raises(LoraplexError) as refused:
        client.classify(["x"], adapter=CLS)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: client.health() == "NOT_SERVING")  # draining, while both streams are still running
    rests = [list(s) for s in streams]  # in-flight requests finish within the grace period
    assert all(f.token_ids for f in firsts)
    assert all(r[-1].finish_reason in ("eos", "length") for r in rests)
    assert process.wait(timeout=30) == 0
    client.close()


def test_async_client_mirrors_the_client(server):
    client, port = server[1], server[2]

    async def run():
        async with AsyncClient(f"127.0.0.1:{port}", retries=0) as aclient:
            classified = await aclient.classify(["great movie"], adapter=CLS)
            generated = await aclient.generate("hello", adapter=GEN, max_tokens=6)
            chunks = [chunk async for chunk in aclient.generate_stream("hello", adapter=GEN, max_tokens=6)]
            with pytest.raises(NotFound):
                await aclient.generate("hello", adapter="missing")
        return classified, generated, chunks

    classified, generated, chunks = asyncio.run(run())
    assert classified == client.classify(["great movie"], adapter=CLS)
    assert generated == client.generate("hello", adapter=GEN, max_tokens=6)
    assert [t for c in chunks for t in c.token_ids] == generated.token_ids
    assert chunks[-1].finish_reason == generated.finish_reason


def _http_refused_while_loading(http_port: int) -> int:
    """1 when the HTTP API refused a completion with 503 + Retry-After (the base still loading), 0 when the
    load finished first; anything else fails."""
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", method="POST",
                                     data=json.dumps({"model": "x", "prompt": "hi", "max_tokens": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            assert exc.headers["Retry-After"] and "loading" in json.load(exc)["error"]["message"]
            return 1
        assert exc.code == 404, exc.code  # loaded meanwhile: model "x" does not exist
    except (urllib.error.URLError, ConnectionError):
        pass  # not listening yet
    return 0


def test_first_start_converts_the_embedded_base_once_serving_nothing_until_loaded(tmp_path, monkeypatch):
    """A fresh cache makes the embedded default convert its GGUF first: seconds of NOT_SERVING. Then the cache
    is what later starts load: nothing is rewritten, and it generates. (One conversion for both checks: it
    is the slowest part of the suite.)"""
    port, http_port = free_port(), free_port()
    env = {**os.environ, "LORAPLEX_CACHE_DIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "loraplex_server.app.serve", "--port", str(port),
                                "--metrics-port", "0", "--device", "cpu", "--http-port", str(http_port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, refused, http_refused = [], 0, 0
    try:
        with Client(f"127.0.0.1:{port}", timeout=2, retries=0) as client:
            deadline = time.time() + 180
            while time.time() < deadline and "SERVING" not in seen:
                try:
                    status = client.health()
                except LoraplexError:
                    time.sleep(0.05)
                    continue
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == "NOT_SERVING":
                    try:  # the load may finish between the health check and this call
                        client.generate("hello", max_tokens=2)
                    except Unavailable as exc:
                        assert "still loading" in exc.details
                        refused += 1
                    http_refused += _http_refused_while_loading(http_port)
                time.sleep(0.05)
            assert seen == ["NOT_SERVING", "SERVING"]
            assert refused > 0, "inference while loading should be refused with UNAVAILABLE"
            assert http_refused > 0, "the HTTP API should answer 503 while the base loads"
            assert client.generate("The capital of France is", max_tokens=4).completion_tokens == 4
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0

    cache = tmp_path / embedded.CACHE_NAME
    assert (cache / "config.json").is_file()
    written = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    base = load_base_model(None, quantize="none", dtype="bfloat16", device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == written, "the second start converted again"
    assert base.kind == "causal" and base.hidden_size == 576
    prompt = base.tokenizer("The capital of France is")["input_ids"]
    assert "Paris" in Engine(base, max_adapters=2).generate([prompt], [None], SamplingParams(max_new_tokens=6))[0].text


def test_store_adapters_for_another_base_are_refused_unless_allowed(tiny, tmp_path, capsys):
    base_dir, adapters = tiny("llama")
    gpt2_base, _ = tiny("gpt2")
    store = tmp_path / "store"
    publish = ["adapters", "publish", str(adapters[GEN][0]), "--store", str(store)]
    assert cli_main([*publish, "--name", "native", "--base", str(base_dir)]) == 0
    assert cli_main([*publish, "--name", "foreign", "--base", str(gpt2_base)]) == 0
    (tmp_path / "empty").mkdir()
    assert cli_main(["adapters", "publish", str(tmp_path / "empty"), "--name", "broken", "--store", str(store)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    for allow, expect_foreign in ((False, False), (True, True)):
        process, client = start_server(base_dir, store, free_port(),
                                       extra_args=["--allow-base-mismatch"] if allow else [])
        try:
            assert client.generate("hi", adapter="native", max_tokens=2).completion_tokens == 2
            if expect_foreign:
                assert client.generate("hi", adapter="foreign", max_tokens=2).completion_tokens == 2
            else:
                with pytest.raises(FailedPrecondition, match="trained on base"):
                    client.generate("hi", adapter="foreign", max_tokens=2)
        finally:
            client.close()
            process.terminate()
            process.wait(timeout=30)
