"""Random request fields and random bytes through the raw generated stubs, against one real server.

Properties: every RPC ends with a documented status (never UNKNOWN or INTERNAL, never a stall), no
message carries a traceback, an exception class or the server's store path; the server keeps serving;
and a witness that runs the same greedy stream over and over, beside the random traffic, always gets
exactly what it got alone.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_process import free_port, start_server

from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc as apb_grpc
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

GENERATION = ["gen_qv_r4", "gen_all_r8", "gen_mlp_r2"]
CLASSIFICATION = ["cls3_r2", "cls5_r6"]
REGISTERED = GENERATION + CLASSIFICATION
INT32, INT64 = (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1)
RPC_TIMEOUT = 120  # a stall past this is a failure (DEADLINE_EXCEEDED is not an allowed status here)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
WITNESS = pb.GenerateStreamRequest(adapter="gen_all_r8", prompt="the quick brown fox",
                                   sampling=pb.SamplingParameters(max_tokens=24))
PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

# -- strategies ---------------------------------------------------------------------------------

odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200),  # any code point, controls included
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=20),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", " ", "\n", "é", "\u202e", "\x00", "🙂"]),
              st.integers(1000, 40_000)),  # long; the longest pass the character check before tokenizing
)
adapter_reference = st.one_of(
    st.sampled_from(REGISTERED + [""]),
    st.builds(lambda n, v: f"{n}@{v}", st.sampled_from(REGISTERED), st.one_of(
        st.integers(*INT64).map(str), st.sampled_from(["", "latest", "1.0", "+1", " 1", "0x1", "١"]))),
    st.builds(lambda n, s: n + s, st.sampled_from(REGISTERED), st.sampled_from(["\n", " ", "\x00", "/", "@", "@@1"])),
    st.sampled_from(["unknown", "@", "@1", "..", "../cls3_r2", "/etc/passwd", "名前", "CLS3_R2"]),
    st.integers(200, 20_000).map(lambda n: "a" * n),
    odd_text,
)
any_float32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
stop_strings = st.one_of(
    st.lists(st.text(max_size=8), max_size=20),
    st.lists(odd_text, max_size=4),
    st.builds(lambda s, n: [s] * n, st.text(min_size=1, max_size=3), st.integers(17, 5000)),  # too many
)
# Each request starts valid, then up to two of its fields take a hostile value: about a third of the
# requests run (beside the witness), the others are refused for one or two reasons at once.
VALID_SAMPLING = {
    "max_tokens": st.integers(1, 8), "temperature": st.one_of(st.just(0.0), st.floats(0.0625, 2.0, width=32)),
    "top_p": st.floats(0.0625, 1.0, width=32), "top_k": st.integers(0, 50),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "seed": st.integers(*INT64),
}
HOSTILE_SAMPLING = {
    "max_tokens": st.integers(*INT32), "temperature": any_float32, "top_p": any_float32,
    "top_k": st.integers(*INT32), "stop": stop_strings, "seed": st.sampled_from(INT64),
}
messages = st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(["system", "user", "assistant"]),
                                                              odd_text),
                              content=odd_text), max_size=6)
texts = st.one_of(st.lists(odd_text, max_size=4), st.lists(st.just("hi"), min_size=60, max_size=80),
                  st.lists(st.just(""), min_size=1, max_size=3))
valid_text = st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "Zs", "P"]), min_size=1, max_size=60)


def _hostile_fields(draw, names: list[str]) -> set[str]:
    return draw(st.sets(st.sampled_from(names), max_size=2))


@st.composite
def generation(draw, message):
    hostile = _hostile_fields(draw, ["adapter", "prompt", "messages", *HOSTILE_SAMPLING])
    params = {name: draw(HOSTILE_SAMPLING[name] if name in hostile else VALID_SAMPLING[name])
              for name in VALID_SAMPLING}
    request = message(adapter=draw(adapter_reference if "adapter" in hostile else st.sampled_from(GENERATION + [""])),
                      sampling=pb.SamplingParameters(**params))
    if "messages" in hostile:
        request.messages.extend(draw(messages))
    if "prompt" in hostile:
        request.prompt = draw(odd_text)
    elif "messages" not in hostile and draw(st.booleans()):
        request.messages.append(pb.ChatMessage(role="user", content=draw(valid_text)))
    else:
        request.prompt = draw(valid_text)
    return request


@st.composite
def classification(draw):
    hostile = _hostile_fields(draw, ["adapter", "texts"])
    return pb.ClassifyRequest(
        adapter=draw(adapter_reference if "adapter" in hostile else st.sampled_from(CLASSIFICATION)),
        texts=draw(texts if "texts" in hostile else st.lists(valid_text, min_size=1, max_size=4)))


@st.composite
def embedding(draw):
    hostile = _hostile_fields(draw, ["adapter", "texts"])
    adapter = st.sampled_from(CLASSIFICATION + GENERATION + [""])  # embeddings take an adapter of either task
    return pb.EmbedRequest(adapter=draw(adapter_reference if "adapter" in hostile else adapter),
                           texts=draw(texts if "texts" in hostile else st.lists(valid_text, min_size=1, max_size=4)),
                           truncate=draw(st.booleans()))


def _upload_parts(meta, chunks):
    parts = [apb.UploadRequest(metadata=meta)] if meta is not None else []
    return parts + [apb.UploadRequest(chunk=c) for c in chunks]


upload = st.builds(
    _upload_parts,
    st.one_of(st.none(), st.builds(apb.UploadMetadata, name=st.one_of(adapter_reference, st.just("fresh")),
                                   labels=st.lists(odd_text, max_size=5), size_bytes=st.integers(*INT64),
                                   sha256=st.one_of(st.text(max_size=70), st.just("0" * 64)),
                                   metrics_json=st.one_of(st.just(""), st.just("{}"), odd_text),
                                   base_fingerprint=st.one_of(st.just(""), odd_text))),
    st.lists(st.binary(max_size=2048), max_size=3))
# Delete is left out of the random calls: it would remove the witness's adapter (it is exercised with
# references that name nothing below).
admin_call = st.one_of(
    st.tuples(st.just("Get"), st.builds(apb.GetRequest, adapter=adapter_reference)),
    st.tuples(st.just("Load"), st.builds(apb.LoadRequest, adapter=adapter_reference, pin=st.booleans())),
    st.tuples(st.just("Unload"), st.builds(apb.UnloadRequest, adapter=adapter_reference)),
    st.tuples(st.just("List"), st.builds(apb.ListRequest, page_size=st.integers(*INT32),
                                         page_token=st.one_of(odd_text, st.binary(max_size=40).map(bytes.hex)))),
    st.tuples(st.just("Delete"), st.builds(apb.DeleteRequest, adapter=adapter_reference.filter(
        lambda ref: ref.split("@")[0] not in REGISTERED))),
    st.tuples(st.just("Upload"), upload),
)
inference_call = {"Classify": classification(), "Generate": generation(pb.GenerateRequest),
                  "GenerateStream": generation(pb.GenerateStreamRequest), "Embed": embedding()}
# Inference requests three times as often as adapter management (whose six methods share one draw).
call = st.sampled_from([*inference_call] * 3 + ["admin"]).flatmap(
    lambda name: admin_call if name == "admin" else st.tuples(st.just(name), inference_call[name]))

# -- the server and the witness -----------------------------------------------------------------


class Witness(threading.Thread):
    """Runs WITNESS again and again until stopped; records each run's status and text."""

    def __init__(self, stub) -> None:
        super().__init__(daemon=True)
        self.stub, self.stopping, self.runs = stub, threading.Event(), []

    def run(self) -> None:
        while not self.stopping.is_set():
            self.runs.append(stream_text(self.stub, WITNESS))


def stream_text(stub, request) -> tuple[grpc.StatusCode, str, int]:
    text, reason = [], 0
    try:
        for message in stub.GenerateStream(request, timeout=RPC_TIMEOUT):
            text.append(message.delta.text)
            reason = message.done.finish_reason or reason
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), 0
    return grpc.StatusCode.OK, "".join(text), reason


@pytest.fixture(scope="module")
def server(tiny, adapter_dir):
    port = free_port()
    process, client = start_server(tiny("llama")[0], adapter_dir, port)
    client.close()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])
    inference, admin = pb_grpc.InferenceServiceStub(channel), apb_grpc.AdapterServiceStub(channel)
    alone = stream_text(inference, WITNESS)
    assert alone[0] == grpc.StatusCode.OK and alone[2] != 0, alone
    witness = Witness(inference)
    witness.start()
    yield {"process": process, "channel": channel, "inference": inference, "admin": admin,
           "store": str(adapter_dir)}
    witness.stopping.set()
    witness.join(timeout=RPC_TIMEOUT)
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert process.poll() is None
        assert len(witness.runs) >= 2, "the witness did not run beside the random traffic"
        assert all(run == alone for run in witness.runs), {run for run in witness.runs if run != alone}
    finally:
        channel.close()
        process.kill()
        process.wait()


def outcome(stubs, method: str, request) -> tuple[grpc.StatusCode, str]:
    try:
        if method == "GenerateStream":
            for _ in stubs["inference"].GenerateStream(request, timeout=RPC_TIMEOUT):
                pass
        elif method == "Upload":
            stubs["admin"].Upload(iter(request), timeout=RPC_TIMEOUT)
        elif method in ("Classify", "Generate", "Embed"):
            getattr(stubs["inference"], method)(request, timeout=RPC_TIMEOUT)
        else:
            getattr(stubs["admin"], method)(request, timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_documented(code: grpc.StatusCode, details: str, store: str) -> None:
    assert code in ALLOWED, (code, details)
    for leak in ("Traceback", "<class '", "Error:", "Exception", store):
        assert leak not in details, (code, details)


# -- properties ---------------------------------------------------------------------------------


@PROPERTY
@given(call=call)
def test_random_request_fields_get_a_documented_status(server, call):
    method, request = call
    code, details = outcome(server, method, request)
    event(f"{method}: {code.name}")  # the spread of outcomes, with --hypothesis-show-statistics
    assert_documented(code, details, server["store"])


METHODS = [  # (path, kind, request message)
    ("/loraplex.v1.InferenceService/Classify", "unary", pb.ClassifyRequest),
    ("/loraplex.v1.InferenceService/Generate", "unary", pb.GenerateRequest),
    ("/loraplex.v1.InferenceService/GenerateStream", "stream", pb.GenerateStreamRequest),
    ("/loraplex.v1.InferenceService/Embed", "unary", pb.EmbedRequest),
    ("/loraplex.v1.AdapterService/Get", "unary", apb.GetRequest),
    ("/loraplex.v1.AdapterService/List", "unary", apb.ListRequest),
    ("/loraplex.v1.AdapterService/Upload", "upload", apb.UploadRequest),
]
undecodable = st.one_of(st.binary(min_size=1, max_size=64),
                        st.sampled_from([b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\xff" * 9, b"\x12\x80\x80\x80\x80\x10",
                                         b"\x0a\x01\x80", b"\x08" + b"\xff" * 11]))


@PROPERTY
@given(method=st.sampled_from(METHODS), raw=undecodable)
def test_bytes_that_are_not_the_request_message_get_invalid_argument(server, method, raw):
    path, kind, message = method
    channel = server["channel"]
    try:
        if kind == "unary":
            channel.unary_unary(path)(raw, timeout=RPC_TIMEOUT)
        elif kind == "stream":
            for _ in channel.unary_stream(path)(raw, timeout=RPC_TIMEOUT):
                pass
        else:
            channel.stream_unary(path)(iter([raw]), timeout=RPC_TIMEOUT)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    event(f"{path.rsplit('/', 1)[1]}: {code.name}")
    assert_documented(code, details, server["store"])
    try:
        message.FromString(raw)
    except Exception:  # not a valid message: the refusal names it
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert f"request is not a valid {message.DESCRIPTOR.full_name}" in details
