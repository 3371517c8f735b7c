"""Clients that go away, and a server that stops, in every protocol and mode.

- class 3: a client that disconnects (or cancels, or whose deadline passes) frees its generation's row
  and KV at once: gRPC unary and streaming, HTTP non-streaming and SSE, OIP. Six long generations each
  (1,000 tokens, two rows at a time) are abandoned; none may run to its length.
- class 8: on SIGTERM, streams still open at the end of the grace end with a clear error (an SSE error
  event then [DONE]; gRPC UNAVAILABLE "shutting down"), and nothing is logged as a traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time

import grpc
import httpx
import pytest
from server_process import free_port, start_server

from loraplex.oip import grpc_predict_v2_pb2 as oip
from loraplex.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

GEN = "gen_all_r8"
LONG = 1000  # tokens: far more than the time to abandon the request
ABANDONED = 6


@pytest.fixture(scope="module")
def long_base(tiny, tmp_path_factory):
    """The tiny Llama with a 2,048-token context, so a generation can run long (rotary: same weights)."""
    base, _ = tiny("llama")
    folder = tmp_path_factory.mktemp("long") / "base"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _flags(http_port: int) -> list[str]:
    return ["--http-port", str(http_port), "--allow-base-mismatch", "--max-batch", "2"]


@pytest.fixture(scope="module")
def server(long_base, adapter_dir):
    port, http_port = free_port(), free_port()
    process, client = start_server(long_base, adapter_dir, port, extra_args=_flags(http_port))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"channel": channel, "url": f"http://127.0.0.1:{http_port}", "client": client}
    channel.close()
    client.close()
    process.kill()
    process.wait()


def _samples(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def _wait_reached(url: str, count: int, timeout: float = 120) -> None:
    """Until `count` requests reached the server: in flight now, or already finished (a stream whose first
    rows ran while the last were still connecting may end on its length or the tiny model's EOS first)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _samples(url)
        finished = sum(v for k, v in samples.items() if k.startswith("loraplex_generations_finished_total{"))
        if samples.get("loraplex_in_flight_requests", 0) + finished >= count:
            return
        assert time.monotonic() < deadline, f"fewer than {count} requests reached the server"
        time.sleep(0.05)


def _finished(samples: dict, reason: str) -> float:
    return samples.get(f'loraplex_generations_finished_total{{reason="{reason}"}}', 0.0)


def _sampling() -> pb.SamplingParameters:
    return pb.SamplingParameters(max_tokens=LONG)


def grpc_unary(server) -> None:
    stub = pb_grpc.InferenceServiceStub(server["channel"])
    calls = [stub.Generate.future(pb.GenerateRequest(adapter=GEN, prompt="hello", sampling=_sampling()), timeout=300)
             for _ in range(ABANDONED)]
    time.sleep(0.5)
    for call in calls:
        call.cancel()


def grpc_stream(server) -> None:
    stub = pb_grpc.InferenceServiceStub(server["channel"])
    streams = [stub.GenerateStream(pb.GenerateStreamRequest(adapter=GEN, prompt="hello", sampling=_sampling()),
                                   timeout=300) for _ in range(ABANDONED)]
    next(streams[0])
    for stream in streams:
        stream.cancel()


def grpc_deadline(server) -> None:
    stub = pb_grpc.InferenceServiceStub(server["channel"])
    calls = [stub.Generate.future(pb.GenerateRequest(adapter=GEN, prompt="hello", sampling=_sampling()), timeout=0.5)
             for _ in range(ABANDONED)]
    for call in calls:
        with pytest.raises(grpc.RpcError):
            call.result()


def oip_infer(server) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(server["channel"])
    request = oip.ModelInferRequest(
        model_name=GEN, parameters={"max_tokens": oip.InferParameter(int64_param=LONG)},
        inputs=[oip.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1],
                                                       contents=oip.InferTensorContents(bytes_contents=[b"hello"]))])
    calls = [stub.ModelInfer.future(request, timeout=300) for _ in range(ABANDONED)]
    time.sleep(0.5)
    for call in calls:
        call.cancel()


def http_whole(server) -> None:
    body = {"model": GEN, "prompt": "hello", "max_tokens": LONG}

    def post() -> None:
        with pytest.raises(httpx.TimeoutException):  # the client gives up and closes its connection
            httpx.post(server["url"] + "/v1/completions", json=body, timeout=0.5)

    threads = [threading.Thread(target=post) for _ in range(ABANDONED)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def http_sse(server) -> None:
    body = {"model": GEN, "prompt": "hello", "max_tokens": LONG, "stream": True}
    with httpx.Client(timeout=300) as first:
        with first.stream("POST", server["url"] + "/v1/completions", json=body) as response:
            next(response.iter_lines())  # running; then the client leaves mid-stream
    others = [httpx.Client(timeout=300) for _ in range(ABANDONED - 1)]
    contexts = [c.stream("POST", server["url"] + "/v1/completions", json=body) for c in others]
    for context in contexts:
        context.__enter__()
    time.sleep(0.5)
    for context, client in zip(contexts, others, strict=True):
        context.__exit__(None, None, None)
        client.close()


@pytest.mark.parametrize("abandon", [grpc_unary, grpc_stream, grpc_deadline, oip_infer, http_whole, http_sse],
                         ids=lambda f: f.__name__)
def test_abandoned_generations_stop_at_once(server, abandon):
    before = _samples(server["url"])
    abandon(server)
    deadline = time.time() + 120
    while time.time() < deadline:
        samples = _samples(server["url"])
        if samples.get("loraplex_in_flight_requests") == 0 and samples.get("loraplex_running_rows") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"requests still in flight: {samples}")
    assert _finished(samples, "length") == _finished(before, "length"), "an abandoned generation ran to its length"
    assert _finished(samples, "cancelled") > _finished(before, "cancelled")
    assert server["client"].generate("hi", adapter=GEN, max_tokens=2).completion_tokens == 2


def _stream_end(stream) -> grpc.StatusCode | tuple:
    try:
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK


def test_sigterm_ends_open_streams_with_a_clear_error_and_no_traceback(long_base, adapter_dir):
    """Six long streams on two engine rows: at the end of a short grace some are still running or queued."""
    port, http_port = free_port(), free_port()
    process, client = start_server(long_base, adapter_dir, port, in_process=False,
                                   extra_args=[*_flags(http_port), "--grace", "0.3", "--drain-delay", "0"])
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    clients = [httpx.Client(timeout=120) for _ in range(4)]
    try:
        body = {"model": GEN, "prompt": "hello", "max_tokens": LONG, "stream": True}
        contexts = [c.stream("POST", url, json=body) for c in clients]  # kept: collected, they close the stream
        lines = [context.__enter__().iter_lines() for context in contexts]
        stub = pb_grpc.InferenceServiceStub(channel)
        streams = [stub.GenerateStream(pb.GenerateStreamRequest(adapter=GEN, prompt="hi", sampling=_sampling()),
                                       timeout=120) for _ in range(2)]
        assert next(lines[0]).startswith("data: ")  # generating
        _wait_reached(f"http://127.0.0.1:{http_port}", 6)  # every stream reached the server before the signal
        process.send_signal(signal.SIGTERM)
        endings = [[line for line in rest if line] for rest in lines]
        ends = [_stream_end(stream) for stream in streams]
        assert process.wait(timeout=120) == 0
    finally:
        for c in clients:
            c.close()
        channel.close()
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    errors = []
    for ending in endings:
        assert ending[-1] == "data: [DONE]", ending[-3:]  # every stream ends properly
        last = json.loads(ending[-2].removeprefix("data: "))
        if "error" in last:
            errors.append(last["error"])
        else:
            assert last["choices"][0]["finish_reason"] in ("length", "stop")  # the tiny model may sample its EOS
    for end in ends:
        assert end == grpc.StatusCode.OK or (end[0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in end[1])
    assert errors or any(end != grpc.StatusCode.OK for end in ends), "every stream finished within the grace"
    assert all(e["code"] == 503 and "shutting down" in e["message"] for e in errors), errors
    output = "".join(process.output)
    assert "Traceback" not in output and "CancelledError" not in output, output[-3000:]
