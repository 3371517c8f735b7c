"""Hostile-input classes the one request path closes for every protocol, against a real server (in this
process) over real sockets: gRPC (ours and raw bytes), HTTP (the openai package and raw bodies), and
KServe's OIP (raw protobuf bytes: tritonclient cannot load beside our stubs, see test_oip.py).

- class 1: store I/O runs off the event loop: a version whose weights are a FIFO stalls only the
  requests for it, never /health, gRPC health or another adapter's request;
- class 5: text that is not Unicode (lone surrogates) is refused with 400 / INVALID_ARGUMENT in every field;
- class 7: JSON from clients is parsed with a depth bound (OIP's stop, HTTP bodies, upload metrics);
- class 9: a valid user token on an admin call is PERMISSION_DENIED (403), an unknown one UNAUTHENTICATED.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import free_port, start_server

from loraplex import Client, LoraplexError
from loraplex.oip import grpc_predict_v2_pb2 as oip
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import inference_pb2 as pb

GEN, CLS = "gen_qv_r4", "cls3_r2"
USER, ADMIN = "user-token", "admin-token"
SURROGATE = "\ud800"
RAW_SURROGATE = b"\xed\xa0\x80"  # what UTF-8 would be for U+D800, which UTF-8 forbids
PLACEHOLDER = "QQQQ"  # replaced by RAW_SURROGATE in serialized protobuf messages


@pytest.fixture(scope="module")
def server(tiny, adapter_dir, tmp_path_factory):
    base_dir, _ = tiny("llama")
    store = tmp_path_factory.mktemp("classes") / "store"
    shutil.copytree(adapter_dir, store)
    port, http_port = free_port(), free_port()
    process, client = start_server(base_dir, store, port, extra_args=[
        "--http-port", str(http_port), "--token", USER, "--admin-token", ADMIN], client_kwargs={"token": USER})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"client": client, "channel": channel, "url": f"http://127.0.0.1:{http_port}", "store": store,
           "port": port}
    channel.close()
    client.close()
    process.kill()
    process.wait()


def _auth(token: str = USER) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def _raw_call(channel, method: str, message, token: str = USER, surrogate: bool = True):
    """Send `message` serialized, its PLACEHOLDER bytes swapped for a raw surrogate; returns the RpcError."""
    data = message.SerializeToString()
    if surrogate:
        assert PLACEHOLDER.encode() in data
        data = data.replace(PLACEHOLDER.encode(), RAW_SURROGATE + b"Q")  # same length: 4 bytes
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as failure:
        call(data, timeout=30, metadata=_auth(token))
    return failure.value


def _http(server, path: str, body: bytes | dict, token: str = USER) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server["url"] + path, content=content, timeout=60,
                      headers={"authorization": f"Bearer {token}", "content-type": "application/json"})


# -- class 5: text that is not Unicode -----------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": GEN, "prompt": SURROGATE + "hello", "max_tokens": 2}),
    ("/v1/completions", {"model": GEN, "prompt": "x", "max_tokens": 2, "stop": ["a" + SURROGATE]}),
    ("/v1/completions", {"model": GEN + SURROGATE, "prompt": "x", "max_tokens": 2}),
    ("/v1/completions", {"model": GEN, "prompt": "x", "max_tokens": 2, "user": SURROGATE}),
    ("/v1/completions", {"model": GEN, "prompt": "x", "max_tokens": 2, SURROGATE: 1}),  # a key
    ("/v1/chat/completions", {"model": GEN, "messages": [{"role": "user", "content": "hi " + SURROGATE}]}),
    ("/v1/chat/completions", {"model": GEN, "messages": [{"role": "user", "content": [
        {"type": "text", "text": SURROGATE}]}]}),
    ("/v1/chat/completions", {"model": GEN, "messages": [{"role": SURROGATE, "content": "hi"}]}),
    ("/classify", {"model": CLS, "input": ["fine", "bad " + SURROGATE]}),
    ("/v1/classify", {"model": CLS, "input": SURROGATE}),
])
def test_http_lone_surrogates_are_400_in_every_field(server, path, body):
    response = _http(server, path, body)  # json.dumps writes the surrogate as the escape \ud800
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "not valid Unicode" in message, message
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")  # the raw bytes ED A0 80,
    assert RAW_SURROGATE in raw  # which Python's JSON decoder lets through as "\ud800"
    response = _http(server, path, raw)
    assert response.status_code == 400 and "Unicode" in response.json()["error"]["message"], response.text


@pytest.mark.parametrize(("method", "message"), [
    ("/loraplex.v1.InferenceService/Classify", pb.ClassifyRequest(adapter=CLS, texts=["ok", PLACEHOLDER])),
    ("/loraplex.v1.InferenceService/Classify", pb.ClassifyRequest(adapter=PLACEHOLDER, texts=["ok"])),
    ("/loraplex.v1.InferenceService/Generate", pb.GenerateRequest(adapter=GEN, prompt=PLACEHOLDER)),
    ("/loraplex.v1.InferenceService/Generate", pb.GenerateRequest(
        adapter=GEN, messages=[pb.ChatMessage(role="user", content=PLACEHOLDER)])),
    ("/loraplex.v1.InferenceService/Generate", pb.GenerateRequest(
        adapter=GEN, prompt="x", sampling=pb.SamplingParameters(stop=[PLACEHOLDER]))),
    ("/loraplex.v1.AdapterService/Get", apb.GetRequest(adapter=PLACEHOLDER)),
    ("/inference.GRPCInferenceService/ModelInfer", oip.ModelInferRequest(model_name=PLACEHOLDER)),
    ("/inference.GRPCInferenceService/ModelInfer", oip.ModelInferRequest(
        model_name=GEN, inputs=[oip.ModelInferRequest.InferInputTensor(
            name="text_input", datatype="BYTES", shape=[1],
            contents=oip.InferTensorContents(bytes_contents=[PLACEHOLDER.encode()]))])),
    ("/inference.GRPCInferenceService/ModelInfer", oip.ModelInferRequest(
        model_name=GEN, parameters={"stop": oip.InferParameter(string_param=PLACEHOLDER)}, inputs=[
            oip.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1],
                                                   contents=oip.InferTensorContents(bytes_contents=[b"hi"]))])),
])
def test_grpc_raw_surrogate_bytes_are_invalid_argument_in_every_field(server, method, message):
    error = _raw_call(server["channel"], method, message, token=ADMIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert "Traceback" not in error.details()
    assert server["client"].health() == "SERVING"


# -- class 7: JSON without a depth bound ------------------------------------------------------------

def _oip_generate(stop: str) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(model_name=GEN, parameters={"stop": oip.InferParameter(string_param=stop)}, inputs=[
        oip.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1],
                                               contents=oip.InferTensorContents(bytes_contents=[b"hi"]))])


@pytest.mark.parametrize("depth", [40, 2_000])
def test_deep_json_from_clients_is_refused_in_every_parser(server, depth):
    deep = "[" * depth + "]" * depth
    error = _raw_call(server["channel"], "/inference.GRPCInferenceService/ModelInfer", _oip_generate(deep),
                      surrogate=False)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested too deeply" in error.details()
    response = _http(server, "/v1/completions", ('{"model": "x", "prompt": ' + deep + "}").encode())
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as failure:
        _upload_with_metrics(server, '{"a": ' + deep + "}")
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested too deeply" in failure.value.details()
    assert server["client"].health() == "SERVING"


def _upload_with_metrics(server, metrics_json: str):
    channel = grpc.insecure_channel(f"127.0.0.1:{server['port']}")
    try:
        meta = apb.UploadMetadata(name="deep", size_bytes=10, sha256="0" * 64, metrics_json=metrics_json)
        stub = channel.stream_unary("/loraplex.v1.AdapterService/Upload",
                                    request_serializer=apb.UploadRequest.SerializeToString,
                                    response_deserializer=apb.UploadResponse.FromString)
        return stub(iter([apb.UploadRequest(metadata=meta)]), timeout=30, metadata=_auth(ADMIN))
    finally:
        channel.close()


# -- class 9: status codes of auth ------------------------------------------------------------------

ADMIN_CALLS = [
    ("Get", apb.GetRequest(adapter=CLS)), ("List", apb.ListRequest()), ("Delete", apb.DeleteRequest(adapter="x")),
    ("Load", apb.LoadRequest(adapter=CLS)), ("Unload", apb.UnloadRequest(adapter=CLS)),
]


@pytest.mark.parametrize(("name", "message"), ADMIN_CALLS)
def test_a_user_token_on_admin_calls_is_permission_denied_an_unknown_one_unauthenticated(server, name, message):
    method = f"/loraplex.v1.AdapterService/{name}"
    assert _raw_call(server["channel"], method, message, USER, False).code() == grpc.StatusCode.PERMISSION_DENIED
    assert _raw_call(server["channel"], method, message, "nobody", False).code() == grpc.StatusCode.UNAUTHENTICATED


def test_upload_with_a_user_token_is_permission_denied(server, tiny):
    with Client(f"127.0.0.1:{server['port']}", token=USER, retries=0) as user:
        with pytest.raises(LoraplexError) as refused:
            user.adapters.upload(tiny("llama")[1][CLS][0], name="by-user", labels=["a", "b", "c"])
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_http_and_oip_refuse_unknown_tokens_with_their_status(server):
    response = _http(server, "/v1/completions", {"model": GEN, "prompt": "x"}, token="nobody")
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    error = _raw_call(server["channel"], "/inference.GRPCInferenceService/ModelInfer", _oip_generate("a"),
                      token="nobody", surrogate=False)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_status_table_maps_permission_denied_to_403():
    from loraplex_server.api.errors import PermissionDenied, Unauthenticated
    from loraplex_server.api.status import status_of

    assert (status_of(PermissionDenied("x")).code, status_of(PermissionDenied("x")).http) == (
        grpc.StatusCode.PERMISSION_DENIED, 403)
    assert status_of(Unauthenticated("x")).http == 401


# -- class 1: store I/O off the event loop ----------------------------------------------------------

def _fifo_version(store, source: str, name: str) -> str:
    """A committed-looking version of `name` whose weights file is a FIFO: reading it blocks until a writer
    comes. Returns the FIFO's path."""
    folder = store / "adapters" / name / "1"
    shutil.copytree(store / "adapters" / source / "1", folder)
    manifest = json.loads((folder / "loraplex.json").read_text())
    manifest.update(name=name, version=1)
    (folder / "loraplex.json").write_text(json.dumps(manifest))
    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    return str(weights)


def _release(fifo: str) -> None:
    try:  # a blocked reader is waiting: give it a few bytes and EOF (its sha256 check then fails)
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader: the store refused the FIFO without opening it
        return
    os.write(fd, b"not weights")
    os.close(fd)


def test_a_stalled_store_read_delays_only_the_requests_that_need_it(server):
    fifo = _fifo_version(server["store"], CLS, "stalled")
    health = health_pb2_grpc.HealthStub(server["channel"])
    pool = ThreadPoolExecutor(4)
    stalled = [pool.submit(server["client"].classify, ["x"], "stalled") for _ in range(3)]
    try:
        time.sleep(0.5)  # the three lookups are now reading the FIFO (or were refused)
        for _ in range(3):
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert httpx.get(server["url"] + "/health", timeout=30).status_code == 200
            assert server["client"].classify(["fine"], adapter=CLS)[0].label.startswith(CLS)
            response = _http(server, "/v1/completions", {"model": GEN, "prompt": "hi", "max_tokens": 2})
            assert response.status_code == 200, response.text
    finally:
        deadline = time.time() + 60
        while not all(f.done() for f in stalled) and time.time() < deadline:
            _release(fifo)
            time.sleep(0.2)
        pool.shutdown(wait=False)
    for future in stalled:  # refused: the FIFO is not a valid adapter, whichever way the store found out
        with pytest.raises(LoraplexError):
            future.result(timeout=1)
    assert server["client"].health() == "SERVING"

