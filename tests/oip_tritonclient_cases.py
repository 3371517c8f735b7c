"""KServe's Open Inference Protocol v2 over gRPC, spoken by the unmodified tritonclient against a real
`loraplex serve` process; results compared with our own API on the same server.

This process must never import loraplex.oip: its stubs and tritonclient's share the protobuf package
`inference` and cannot both load in one descriptor pool. So test_oip.py runs this file in a pytest of
its own, and its server is a process (an in-process server would load loraplex.oip). Malformed requests are built with
tritonclient's own protobuf classes (the same wire contract) and sent over a plain gRPC channel.
"""

from __future__ import annotations

import json
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import unknown_fields
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_process import free_port, start_server
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

GEN, CLS = "gen_all_r8", "cls5_r6"
CLS_LABELS = [f"{CLS}-{i}" for i in range(5)]
TEXTS = ["great movie", "awful plot, fine acting", "hello world"]
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _stop(process) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    port = free_port()
    process, client = start_server(base_dir, adapter_dir, port, in_process=False)
    triton_client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    yield client, triton_client, port
    triton_client.close()
    client.close()
    _stop(process)


@pytest.fixture(scope="module")
def raw_stub(server):
    """tritonclient's generated stub over a plain channel, for requests tritonclient would not send."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server[2]}")
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def text_input(name: str, texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def length_prefixed(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def infer_request(model: str, name: str = "text", shape=(1,), raw: list[bytes] | None = None, **fields):
    request = service_pb2.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name=name, datatype="BYTES", shape=list(shape))
    request.raw_input_contents.extend(raw or [])
    return request


def test_health_server_metadata_and_reflection(server):
    _, client, port = server
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "loraplex" and metadata["version"]
    assert {"classification", "parameters"} <= set(metadata["extensions"])
    assert client.is_model_ready(CLS) and client.is_model_ready(CLS, "1") and client.is_model_ready(f"{GEN}@2")
    assert not client.is_model_ready("no-such-adapter") and not client.is_model_ready(CLS, "9")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert "inference.GRPCInferenceService" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_model_metadata_lists_tensors_and_label_names(server):
    client = server[1]
    metadata = client.get_model_metadata(CLS)
    assert (metadata.name, list(metadata.versions), metadata.platform) == (CLS, ["1", "2"], "loraplex_classification")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, 5])]
    # The label names ride in TensorMetadata field 4 (MLServer's `parameters`), which tritonclient's proto
    # lacks: it keeps them as an unknown field, a map entry laid out like any other parameters entry.
    (field,) = unknown_fields.UnknownFieldSet(metadata.outputs[1])
    entry = service_pb2.ModelInferRequest.ParametersEntry.FromString(field.data)
    assert (field.field_number, entry.key, json.loads(entry.value.string_param)) == (4, "labels", CLS_LABELS)
    generation = client.get_model_metadata(GEN, "1", as_json=True)
    assert generation["platform"] == "loraplex_generation" and generation["versions"] == ["1", "2"]
    assert generation["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": ["1"]}]
    assert generation["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": ["1"]}]


def test_classification_equals_classify(server):
    ours, client, _ = server
    expected = ours.classify(TEXTS, adapter=CLS)
    for model, version in ((CLS, ""), (f"{CLS}@2", ""), (CLS, "2")):
        result = client.infer(model, [text_input("text", TEXTS)], model_version=version, request_id="r1")
        assert [label.decode() for label in result.as_numpy("label")] == [e.label for e in expected]
        probabilities = result.as_numpy("probabilities")
        assert probabilities.dtype == np.float32 and probabilities.shape == (3, 5)
        np.testing.assert_allclose(probabilities, [[e.scores[label] for label in CLS_LABELS] for e in expected],
                                   atol=1e-5, rtol=0)
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == (model, "2", "r1")
    only = client.infer(CLS, [text_input("text", TEXTS[:1])], outputs=[triton.InferRequestedOutput("label")])
    assert only.get_output("probabilities") is None and only.as_numpy("label")[0].decode() == expected[0].label


def test_classification_extension_names_the_top_classes(server):
    ours, client, _ = server
    expected = ours.classify(TEXTS, adapter=CLS)
    result = client.infer(CLS, [text_input("text", TEXTS)], outputs=[triton.InferRequestedOutput("probabilities",
                                                                                                  class_count=2)])
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 2) and result.get_output("label") is None
    for row, e in zip(top, expected, strict=True):
        best = sorted(e.scores.items(), key=lambda item: -item[1])[:2]
        parsed = [element.decode().split(":") for element in row]
        assert [(int(index), label) for _, index, label in parsed] == [(CLS_LABELS.index(k), k) for k, _ in best]
        np.testing.assert_allclose([float(p) for p, _, _ in parsed], [v for _, v in best], atol=1e-5)
    assert client.infer(CLS, [text_input("text", TEXTS[:1])], outputs=[triton.InferRequestedOutput(
        "probabilities", class_count=99)]).as_numpy("probabilities").shape == (1, 5)


def test_generation_equals_generate(server):
    ours, client, _ = server
    prompt = "the quick brown fox"
    greedy = client.infer(GEN, [text_input("text_input", [prompt])], parameters={"max_tokens": 12})
    assert greedy.as_numpy("text_output")[0].decode() == ours.generate(prompt, adapter=GEN, max_tokens=12).text
    sampling = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "top_k": 20, "seed": 7}
    sampled = client.infer(f"{GEN}@1", [text_input("text_input", [prompt])], parameters=sampling)
    assert sampled.as_numpy("text_output")[0].decode() == ours.generate(prompt, adapter=f"{GEN}@1", **sampling).text
    stop = greedy.as_numpy("text_output")[0].decode()[2:5]
    stopped = client.infer(GEN, [text_input("text_input", [prompt])], parameters={"max_tokens": 12, "stop": stop})
    assert stopped.as_numpy("text_output")[0].decode() == ours.generate(prompt, adapter=GEN, max_tokens=12,
                                                                        stop=[stop]).text


def test_typed_bytes_contents_equal_raw_contents(server, raw_stub):
    request = service_pb2.ModelInferRequest(model_name=CLS)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)])
    tensor.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    typed = raw_stub.ModelInfer(request, timeout=60)
    raw = raw_stub.ModelInfer(infer_request(CLS, shape=[len(TEXTS)], raw=[length_prefixed(
        *(t.encode() for t in TEXTS))]), timeout=60)
    assert [o.name for o in typed.outputs] == ["label", "probabilities"] and not typed.outputs[0].HasField("contents")
    assert typed.raw_output_contents == raw.raw_output_contents


def _one_text(name="text") -> list[triton.InferInput]:
    return [text_input(name, ["hello"])]


def _fp32_text() -> list[triton.InferInput]:
    tensor = triton.InferInput("text", [2], "FP32")
    tensor.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    return [tensor]


def _matrix_text() -> list[triton.InferInput]:
    tensor = triton.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"hello"]], dtype=np.object_))
    return [tensor]


TRITON_REFUSALS = [  # (model, inputs, infer keyword arguments, status)
    ("no-such-adapter", _one_text, {}, "NOT_FOUND"),
    (CLS, _one_text, {"model_version": "9"}, "NOT_FOUND"),
    ("bad name!", _one_text, {}, "INVALID_ARGUMENT"),
    (CLS, lambda: _one_text("text_input"), {}, "FAILED_PRECONDITION"),
    (GEN, _one_text, {}, "FAILED_PRECONDITION"),
    (CLS, lambda: _one_text("image"), {}, "INVALID_ARGUMENT"),
    (CLS, _fp32_text, {}, "INVALID_ARGUMENT"),
    (CLS, _matrix_text, {}, "INVALID_ARGUMENT"),
    (CLS, lambda: [text_input("text", ["x"] * 65)], {}, "INVALID_ARGUMENT"),
    (CLS, lambda: [text_input("text", [""])], {}, "INVALID_ARGUMENT"),
    (GEN, lambda: [text_input("text_input", ["a", "b"])], {}, "INVALID_ARGUMENT"),
    (CLS, _one_text, {"outputs": [triton.InferRequestedOutput("logits")]}, "INVALID_ARGUMENT"),
    (CLS, _one_text, {"outputs": [triton.InferRequestedOutput("label", class_count=2)]}, "INVALID_ARGUMENT"),
    (CLS, _one_text, {"outputs": [triton.InferRequestedOutput("probabilities", class_count=-1)]}, "INVALID_ARGUMENT"),
    (f"{CLS}@1", _one_text, {"model_version": "2"}, "INVALID_ARGUMENT"),
    (CLS, _one_text, {"parameters": {"max_tokens": 4}}, "INVALID_ARGUMENT"),
    (GEN, lambda: _one_text("text_input"), {"parameters": {"beam_width": 4}}, "INVALID_ARGUMENT"),
    (GEN, lambda: _one_text("text_input"), {"parameters": {"max_tokens": 0}}, "INVALID_ARGUMENT"),
    (GEN, lambda: _one_text("text_input"), {"parameters": {"temperature": "hot"}}, "INVALID_ARGUMENT"),
    (GEN, lambda: _one_text("text_input"), {"parameters": {"top_p": 1.5}}, "INVALID_ARGUMENT"),
    (GEN, lambda: _one_text("text_input"), {"parameters": {"stop": "[1, 2]"}}, "INVALID_ARGUMENT"),
]


@pytest.mark.parametrize(("model", "inputs", "kwargs", "status"), TRITON_REFUSALS)
def test_tritonclient_refusals(server, model, inputs, kwargs, status):
    with pytest.raises(InferenceServerException) as refused:
        server[1].infer(model, inputs(), **kwargs)
    assert refused.value.status() == f"StatusCode.{status}", refused.value.message()
    assert "Traceback" not in refused.value.message() and "/" not in refused.value.message()


def _two_inputs():
    request = infer_request(CLS, raw=[length_prefixed(b"a"), length_prefixed(b"b")])
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    return request


def _raw_and_typed():
    request = infer_request(CLS, raw=[length_prefixed(b"a")])
    request.inputs[0].contents.bytes_contents.append(b"a")
    return request


def _typed_count_mismatch():
    request = service_pb2.ModelInferRequest(model_name=CLS)
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.append(b"a")
    return request


def _typed_wrong_field():
    request = service_pb2.ModelInferRequest(model_name=CLS)
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.fp32_contents.append(1.0)
    return request


RAW_REFUSALS = {
    "length past the buffer": lambda: infer_request(CLS, raw=[(1000).to_bytes(4, "little") + b"short"]),
    "length prefix cut short": lambda: infer_request(CLS, raw=[b"\x05\x00"]),
    "fewer elements than the shape": lambda: infer_request(CLS, shape=[2], raw=[length_prefixed(b"one")]),
    "bytes after the last element": lambda: infer_request(CLS, raw=[length_prefixed(b"one") + b"extra"]),
    "not UTF-8": lambda: infer_request(CLS, raw=[length_prefixed(b"\xff\xfe")]),
    "two inputs": _two_inputs,
    "raw and typed contents": _raw_and_typed,
    "two raw buffers for one input": lambda: infer_request(CLS, raw=[length_prefixed(b"a"), length_prefixed(b"b")]),
    "typed count differs from the shape": _typed_count_mismatch,
    "typed data in the wrong field": _typed_wrong_field,
    "negative shape": lambda: infer_request(CLS, shape=[-1], raw=[length_prefixed(b"a")]),
}


@pytest.mark.parametrize("case", RAW_REFUSALS)
def test_malformed_contents_are_invalid_argument(server, raw_stub, case):
    with pytest.raises(grpc.RpcError) as refused:
        raw_stub.ModelInfer(RAW_REFUSALS[case](), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert server[1].is_server_live()


def test_auth_leaves_liveness_and_readiness_open(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    port = free_port()
    process, ours = start_server(base_dir, adapter_dir, port, extra_args=["--token", "secret"],
                                 client_kwargs={"token": "secret"}, in_process=False)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_metadata(CLS)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as refused:
            client.infer(CLS, _one_text())
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        headers = {"authorization": "Bearer secret"}
        assert client.get_model_metadata(CLS, headers=headers).name == CLS
        assert client.infer(CLS, _one_text(), headers=headers).as_numpy("label").shape == (1,)
    finally:
        client.close()
        ours.close()
        _stop(process)


def test_this_process_never_loaded_our_oip_stubs():
    assert "loraplex.oip.grpc_predict_v2_pb2" not in sys.modules
