"""Every client-controlled value of an embeddings request, bounded before work: the whole class of bad inputs
(wrong kinds, empty, too many, too long, token ids outside the vocabulary, bad options) is refused with
400 over the OpenAI HTTP API and INVALID_ARGUMENT over gRPC, with a message that names the field and no
internals, and the server goes on serving. Against a real server on the tiny Llama base (context 128)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import free_port, start_server

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from loraplex_server.api.embeddings import check_total
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.inputs import Limits

CONTEXT, VOCAB = 128, 320  # tests/tiny_models.py's Llama
TOO_LONG = "fox " * 300  # well over 128 tokens, well under the character bound
INTERNALS = ("Traceback", "File \"", "torch", "Error(", "0x")

finite = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or Infinity (httpx refuses to send them)
bad_items = st.one_of(
    st.just(""), st.none(), st.booleans(), finite, st.dictionaries(st.text(max_size=3), st.text()),
    st.just([]), st.lists(st.text(min_size=1), min_size=1, max_size=3),  # a list of strings inside the list
    st.lists(st.integers(min_value=VOCAB, max_value=2**62), min_size=1, max_size=3),  # ids past the vocabulary
    st.lists(st.integers(max_value=-1, min_value=-2**62), min_size=1, max_size=3),  # negative ids
    st.lists(st.booleans(), min_size=1, max_size=3),  # booleans are not token ids
    st.just([5, "x"]), st.just([1.5, 2]), st.just(TOO_LONG), st.just(list(range(1, CONTEXT + 2))),
)
# A whole `input` that is bad: one bad item among good ones, too many inputs, or not a list at all.
bad_inputs = st.one_of(
    st.tuples(st.lists(st.text(alphabet="abc ", min_size=1), max_size=3), bad_items,
              st.lists(st.text(alphabet="abc ", min_size=1), max_size=3)).map(lambda t: [*t[0], t[1], *t[2]]),
    st.just([]), st.just(""), st.just(["a"] * 257), st.integers(), st.none(), st.just({"text": "a"}),
)
bad_options = st.one_of(
    st.fixed_dictionaries({"encoding_format": st.one_of(st.text().filter(lambda s: s not in ("float", "base64")),
                                                        st.integers())}),
    st.fixed_dictionaries({"dimensions": st.one_of(st.integers().filter(lambda n: n != 64), st.text(),
                                                   st.booleans(), finite)}),
    st.fixed_dictionaries({"truncate": st.one_of(st.text(), st.integers(), st.just([]))}),
    st.fixed_dictionaries({"n": st.integers()}), st.fixed_dictionaries({"model": st.one_of(st.integers(),
                                                                                            st.just(""))}),
)
bad_texts = st.one_of(
    st.tuples(st.lists(st.text(alphabet="abc ", min_size=1), max_size=3), st.sampled_from(["", TOO_LONG]))
    .map(lambda t: [*t[0], t[1]]),
    st.just([]), st.just(["a"] * 257), st.just(["x" * (CONTEXT * 16 + 1)]),
)


@pytest.fixture(scope="module")
def server(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    port, http_port = free_port(), free_port()
    process, client = start_server(base_dir, adapter_dir, port, extra_args=["--http-port", str(http_port)])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
        yield {"http": http, "stub": pb_grpc.InferenceServiceStub(channel), "model": base_dir.name}
    channel.close()
    client.close()
    process.kill()
    process.wait()


def refused_http(server, body: dict) -> dict:
    response = server["http"].post("/v1/embeddings", json=body)
    assert response.status_code == 400, (body, response.text)
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and not any(s in error["message"] for s in INTERNALS)
    return error


def still_serving(server) -> None:
    response = server["http"].post("/v1/embeddings", json={"model": server["model"], "input": "abc"})
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 64


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=bad_inputs)
def test_bad_inputs_are_400(server, inputs):
    error = refused_http(server, {"model": server["model"], "input": inputs})
    assert error["param"] is None or error["param"].startswith("input")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=bad_options)
def test_bad_options_are_400(server, options):
    refused_http(server, {"model": server["model"], "input": "abc", **options})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=bad_texts)
def test_bad_texts_are_invalid_argument_over_grpc(server, texts):
    with pytest.raises(grpc.RpcError) as refused:
        server["stub"].Embed(pb.EmbedRequest(texts=texts), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("texts") and not any(s in refused.value.details() for s in INTERNALS)


def test_what_is_accepted_and_the_server_goes_on(server):
    still_serving(server)
    # Truncation instead of refusal, and token ids at the edges of the vocabulary and the context.
    cut = server["http"].post("/v1/embeddings", json={"model": server["model"], "input": TOO_LONG, "truncate": True})
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == CONTEXT
    edges = {"model": server["model"], "input": [[0, VOCAB - 1], list(range(CONTEXT))], "dimensions": 64}
    assert server["http"].post("/v1/embeddings", json=edges).status_code == 200
    with pytest.raises(grpc.RpcError) as unknown:
        server["stub"].Embed(pb.EmbedRequest(adapter="nope", texts=["a"]), timeout=60)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    reply = server["stub"].Embed(pb.EmbedRequest(adapter="gen_qv_r4", texts=["a", TOO_LONG], truncate=True),
                                 timeout=60)
    assert len(reply.embeddings) == 2 and reply.prompt_tokens > CONTEXT
    still_serving(server)


def test_total_tokens_are_bounded():
    limits = Limits(max_embed_tokens=10)
    assert check_total([[1] * 4, [2] * 6], limits, "input") == 10
    with pytest.raises(InvalidRequest, match="11 tokens in all; at most 10"):
        check_total([[1] * 5, [2] * 6], limits, "input")
