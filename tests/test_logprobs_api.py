"""Logprobs and n > 1 over every front end of a real server: the `openai` package (sync, async, streaming)
on completions and chat, our gRPC API and SDK (sync, async, streaming); the same values on each; the
prompt of n choices computed once (the server's own step-token metric); every bad value refused."""

from __future__ import annotations

import asyncio
import time

import grpc
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import serving_with_http
from test_chat import chat_base  # noqa: F401 - the fixture: the tiny base with a chat template
from test_openai_api import post, scrape

from loraplex import AsyncClient, Client, InvalidArgument
from loraplex.v1 import inference_pb2 as pb

GEN = "gen_all_r8"
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(chat_base, adapter_dir):  # noqa: F811
    with serving_with_http(chat_base, adapter_dir) as server:
        yield server


def test_completion_logprobs_equal_grpc_and_sdk(api, server):
    completion = api.completions.create(model=GEN, prompt="the quick brown", max_tokens=6, temperature=0, logprobs=3)
    choice = completion.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == completion.usage.completion_tokens
    def chars(token: str) -> int:  # part of a character: OpenAI's "bytes:\\x.." text, no characters
        return 0 if token.startswith("bytes:") else len(token)
    if not any(t.startswith("bytes:") for t in lp.tokens):
        assert "".join(lp.tokens).startswith(choice.text)
    assert lp.text_offset == [sum(chars(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and value <= 0
        assert max(top.values()) == pytest.approx(value)  # greedy: the sampled token is the most probable
        assert top[token] == pytest.approx(value)
    sdk = server["client"].generate("the quick brown", adapter=GEN, max_tokens=6, top_logprobs=3)
    assert sdk.text == choice.text
    assert [t.token for t in sdk.logprobs] == lp.tokens
    assert [t.logprob for t in sdk.logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert all(len(t.top) == 3 and t.top[0].logprob >= t.top[-1].logprob for t in sdk.logprobs)
    streamed = [t for piece in server["client"].generate_stream("the quick brown", adapter=GEN, max_tokens=6,
                                                                 top_logprobs=3) for t in piece.logprobs]
    assert streamed == sdk.logprobs
    plain = server["client"].generate("the quick brown", adapter=GEN, max_tokens=6)
    assert plain.logprobs == [] and plain.text == sdk.text


def assert_same_logprobs(got, expected) -> None:
    """The same tokens, and logprobs equal to fp32's last digits: a repeated prompt reuses its cached prefix
    blocks, so its tail runs as a GEMM of fewer rows, and BLAS sums a few rows in another order (MKL's kernel
    for 1-3 rows differs by ulps on some CPUs)."""
    assert [e.token for e in got] == [e.token for e in expected]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in expected], abs=1e-5)


def test_chat_logprobs_whole_and_streamed_sync_and_async(api, server):
    whole = api.chat.completions.create(model=GEN, messages=CHAT, max_tokens=5, temperature=0.7, seed=3,
                                        logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        raw = bytes(entry.bytes)
        assert entry.token == (raw.decode("utf-8", errors="ignore") if not entry.token.startswith("bytes:")
                               else "bytes:" + "".join(f"\\x{b:02x}" for b in raw))
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = []
    for chunk in api.chat.completions.create(model=GEN, messages=CHAT, max_tokens=5, temperature=0.7, seed=3,
                                             logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert_same_logprobs(streamed, content)

    async def stream_async():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0) as client:
            got = []
            async for chunk in await client.chat.completions.create(
                    model=GEN, messages=CHAT, max_tokens=5, temperature=0.7, seed=3, logprobs=True, stream=True):
                if chunk.choices and chunk.choices[0].logprobs:
                    got += chunk.choices[0].logprobs.content
            return got
    got = asyncio.run(stream_async())
    assert all(e.top_logprobs == [] for e in got)
    assert_same_logprobs(got, content)
    sdk = server["client"].chat(CHAT, adapter=GEN, max_tokens=5, temperature=0.7, seed=3, logprobs=True)
    assert [t.logprob for t in sdk.logprobs] == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_n_choices_each_seeded_and_streamed_interleaved(api, server):
    many = api.completions.create(model=GEN, prompt="hello world", max_tokens=5, temperature=1.0, seed=5, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for i, choice in enumerate(many.choices):
        alone = api.completions.create(model=GEN, prompt="hello world", max_tokens=5, temperature=1.0, seed=5 + i)
        assert choice.text == alone.choices[0].text, f"choice {i}"
    texts, finished = ["", "", ""], {}
    for chunk in api.completions.create(model=GEN, prompt="hello world", max_tokens=5, temperature=1.0, seed=5, n=3,
                                        stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == [c.text for c in many.choices] and set(finished) == {0, 1, 2}
    chat = api.chat.completions.create(model=GEN, messages=CHAT, max_tokens=4, temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    sdk = server["client"].generate("hello world", adapter=GEN, max_tokens=5, temperature=1.0, seed=5, n=3,
                                    logprobs=True)
    assert [c.text for c in sdk.choices] == texts
    assert all(len(c.logprobs) == len(c.token_ids) for c in sdk.choices)
    assert sdk.completion_tokens == sum(len(c.token_ids) for c in sdk.choices)

    async def stream_async():
        async with AsyncClient(server["target"], timeout=60) as client:
            parts, dones = ["", "", ""], 0
            async for piece in client.generate_stream("hello world", adapter=GEN, max_tokens=5, temperature=1.0,
                                                      seed=5, n=3, top_logprobs=1):
                parts[piece.index] += piece.text
                dones += piece.finish_reason is not None
                assert all(len(t.top) == 1 for t in piece.logprobs)
            return parts, dones
    assert asyncio.run(stream_async()) == (texts, 3)


def settled(read) -> float:
    """A metric once it stopped moving (the engine thread records a step just after sending its events)."""
    last = read()
    while True:
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now


def test_the_prompt_of_n_choices_is_computed_once(api, server):
    def step_tokens() -> float:
        return scrape(server).get(("loraplex_step_tokens_sum", ()), 0.0)
    prompt = "adapters share one frozen base model on the device " * 3  # a prompt of its own: no cached blocks
    before = settled(step_tokens)
    many = api.completions.create(model=GEN, prompt=prompt, max_tokens=6, temperature=1.0, seed=1, n=4)
    shared = settled(step_tokens) - before
    tokens = [len(server["client"].generate(prompt, adapter=GEN, max_tokens=6, temperature=1.0, seed=1 + i)
                  .token_ids) for i in range(4)]
    # The prompt once, then each choice's tokens after its first (sampled from the prompt's logits).
    assert shared == many.usage.prompt_tokens + sum(t - 1 for t in tokens)
    assert many.usage.completion_tokens == sum(tokens)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=st.integers(min_value=21, max_value=2**32 - 1),
       n=st.one_of(st.integers(min_value=-2**31, max_value=0), st.integers(min_value=17, max_value=2**31 - 1)))
def test_bad_grpc_values_are_invalid_argument(server, top, n):
    client: Client = server["client"]
    with pytest.raises(InvalidArgument, match=r"sampling.logprobs.top_logprobs must be an integer in 0..20"):
        client.generate("hi", adapter=GEN, max_tokens=2, top_logprobs=top)
    sampling = pb.SamplingParameters(max_tokens=2, n=n)
    with pytest.raises(grpc.RpcError) as refused:
        server["stub"].Generate(pb.GenerateRequest(adapter=GEN, prompt="hi", sampling=sampling), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.n must be an integer in 1..16" in refused.value.details()


_NOT_INT = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5), st.booleans(),
                     st.lists(st.integers(), max_size=2))
_BAD_COMPLETION = st.one_of(
    st.fixed_dictionaries({"logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=6), _NOT_INT)}),
    st.fixed_dictionaries({"n": st.one_of(st.integers(max_value=0), st.integers(min_value=17), _NOT_INT)}))
_BAD_CHAT = st.one_of(
    st.fixed_dictionaries({"logprobs": st.one_of(st.integers(), st.text(max_size=5),
                                                st.floats(allow_nan=False, allow_infinity=False))}),
    st.fixed_dictionaries({"logprobs": st.just(True), "top_logprobs": st.one_of(
        st.integers(max_value=-1), st.integers(min_value=21), _NOT_INT)}),
    st.fixed_dictionaries({"top_logprobs": st.integers(min_value=0, max_value=20)}),  # without logprobs: true
    st.fixed_dictionaries({"n": st.one_of(st.integers(max_value=0), st.integers(min_value=17), _NOT_INT)}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(completion=_BAD_COMPLETION, chat=_BAD_CHAT)
def test_bad_http_values_are_400(server, completion, chat):
    for path, body in (("/v1/completions", {"prompt": "hi", **completion}),
                       ("/v1/chat/completions", {"messages": CHAT, **chat})):
        body = {**body, "model": GEN, "max_tokens": 2}
        response = post(server, path, body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] in {"logprobs", "top_logprobs", "n"} and "Traceback" not in error["message"]
