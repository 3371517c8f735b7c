"""End to end over real gRPC: a `loraplex serve` process on 127.0.0.1, the SDK and raw stubs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loraplex import Client, FailedPrecondition, InvalidArgument, LoraplexError, NotFound
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from loraplex_adapters.manifest import Manifest, write_manifest
from loraplex_server.base_model import load_base_model
from loraplex_server.engine import Engine
from loraplex_server.sampling import SamplingParams

GEN, CLS = "gen_all_r8", "cls5_r6"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory):
    _, adapters = tiny("llama")
    root = tmp_path_factory.mktemp("adapters")
    for name, (folder, spec) in adapters.items():
        target = root / name
        shutil.copytree(folder, target)
        write_manifest(target, Manifest(name=name, version=2, labels=[f"{name}-{i}" for i in range(spec.num_labels)]))
    return root


def start_server(base_dir, adapter_dir, port):
    env = {**os.environ, "LORAPLEX_CPU_KERNEL": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex_server.serve", "--base", str(base_dir), "--adapter-dir", str(adapter_dir),
         "--port", str(port), "--dtype", "float32", "--device", "cpu", "--max-pending", "64"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = Client(f"127.0.0.1:{port}", timeout=5, retries=0)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read()}")
        try:
            if client.health() == "SERVING":
                return process, client
        except LoraplexError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become healthy")


@pytest.fixture(scope="module")
def server(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    port = free_port()
    process, client = start_server(base_dir, adapter_dir, port)
    yield process, client, port
    client.close()
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def reference(tiny, adapter_dir):
    """The same base and adapters in-process, to compare what the server returns."""
    base_dir, _ = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device="cpu"), max_adapters=8)
    for name in (GEN, CLS):
        engine.load_adapter(name, adapter_dir / name, labels=[f"{CLS}-{i}" for i in range(5)] if name == CLS else None)
    return engine


def test_classify_returns_the_engine_probabilities(server, reference):
    _, client, _ = server
    texts = ["great movie", "awful plot, fine acting", "hello world"]
    got = client.classify(texts, adapter=CLS)
    expected = reference.classify(texts, CLS)
    assert [g.label for g in got] == [e.label for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert list(g.scores) == list(e.scores)
        torch.testing.assert_close(torch.tensor(list(g.scores.values())), torch.tensor(list(e.scores.values())),
                                   atol=1e-5, rtol=0)
    assert client.classify(texts, adapter=f"{CLS}@2")[0].label == got[0].label


def test_generate_unary_and_stream_agree_with_the_engine(server, reference):
    _, client, _ = server
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
    _, _, port = server
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
    (lambda c: c.generate(""), InvalidArgument, "prompt is empty"),
    (lambda c: c.generate("x", max_tokens=5000), InvalidArgument, "max_tokens"),
    (lambda c: c.generate("x", max_tokens=-1), InvalidArgument, "max_tokens"),
    (lambda c: c.generate("x", temperature=-0.5), InvalidArgument, "temperature"),
    (lambda c: c.generate("x", top_p=1.5), InvalidArgument, "top_p"),
    (lambda c: c.generate("x", top_k=-2), InvalidArgument, "top_k"),
    (lambda c: c.generate("x", adapter="a@b@c"), InvalidArgument, "malformed adapter reference"),
    (lambda c: c.generate("x", adapter="../etc"), InvalidArgument, "invalid adapter name"),
])
def test_bad_input_gets_a_precise_status_and_the_server_keeps_serving(server, call, error, message):
    _, client, _ = server
    with pytest.raises(error, match=message):
        call(client)
    assert client.health() == "SERVING"
    assert len(client.classify(["still here"], adapter=CLS)) == 1


def test_reflection_lists_the_services(server):
    _, _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"loraplex.v1.InferenceService", "grpc.health.v1.Health"} <= services


def test_sigterm_drains_and_exits_zero(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    process, client = start_server(base_dir, adapter_dir, free_port())
    stream = client.generate_stream("hello", adapter=GEN, max_tokens=40)
    first = next(stream)
    process.send_signal(signal.SIGTERM)
    rest = list(stream)  # the in-flight request finishes within the grace period
    assert first.token_ids and rest[-1].finish_reason in ("eos", "length")
    assert process.wait(timeout=30) == 0
    client.close()
