"""The OpenAI-compatible HTTP API of a real `loraplex serve` process, through the real `openai` package
(sync, async, streaming) and httpx; greedy outputs must equal the gRPC API's for the same adapter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port, serving_with_http, start_server
from test_chat import chat_base  # noqa: F401 - the fixture: the tiny base with a chat template

from loraplex.v1 import inference_pb2 as pb

GEN, CLS = "gen_all_r8", "cls5_r6"
TOKEN = "user-secret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(chat_base, adapter_dir):  # noqa: F811
    with serving_with_http(chat_base, adapter_dir, ["--token", TOKEN], client_kwargs={"token": TOKEN}) as server:
        yield server


def grpc_generate(server, adapter: str, max_tokens: int, prompt: str = "", messages=(), stop=()):
    request = pb.GenerateRequest(adapter=adapter, prompt=prompt,
                                 messages=[pb.ChatMessage(**m) for m in messages],
                                 sampling=pb.SamplingParameters(max_tokens=max_tokens, stop=list(stop)))
    return server["stub"].Generate(request, metadata=AUTH, timeout=60)


def model_of(server, adapter: str) -> str:
    return adapter or server["base"]


def test_models_lists_the_base_and_every_adapter_latest_and_pinned(api, server):
    ids = [m.id for m in api.models.list().data]
    assert ids[0] == server["base"]
    for name in (GEN, CLS):
        assert {name, f"{name}@1", f"{name}@2"} <= set(ids)


@pytest.mark.parametrize("adapter", ["", GEN, f"{GEN}@1"])
def test_greedy_completion_equals_grpc(api, server, adapter):
    expected = grpc_generate(server, adapter, 8, prompt="hello world")
    got = api.completions.create(model=model_of(server, adapter), prompt="hello world", max_tokens=8, temperature=0)
    choice = got.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        expected.prompt_tokens, expected.completion_tokens, expected.prompt_tokens + expected.completion_tokens)
    assert got.model == model_of(server, adapter) and got.object == "text_completion"


def test_greedy_chat_equals_grpc_chat(api, server):
    expected = grpc_generate(server, GEN, 8, messages=CHAT)
    got = api.chat.completions.create(model=GEN, messages=CHAT, max_completion_tokens=8, temperature=0)
    assert got.choices[0].message.content == expected.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == expected.prompt_tokens


def test_a_stop_string_ends_with_finish_reason_stop(api, server):
    text = grpc_generate(server, GEN, 8, prompt="hello world").text
    stop = text[3:5]
    expected = grpc_generate(server, GEN, 8, prompt="hello world", stop=[stop])
    got = api.completions.create(model=GEN, prompt="hello world", max_tokens=8, temperature=0, stop=stop)
    assert got.choices[0].text == expected.text == text[:text.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_async_streaming_chat_equals_grpc_and_reports_usage(server):
    expected = grpc_generate(server, GEN, 10, messages=CHAT)

    async def run():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=TOKEN, max_retries=0) as client:
            stream = await client.chat.completions.create(model=GEN, messages=CHAT, max_tokens=10, temperature=0,
                                                          stream=True, stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)


def test_sync_streaming_completion_and_raw_sse_end_with_done(api, server):
    expected = grpc_generate(server, "", 6, prompt="the quick")
    chunks = list(api.completions.create(model=server["base"], prompt="the quick", max_tokens=6, temperature=0,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    body = {"model": server["base"], "prompt": "the quick", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_an_unknown_model_is_404(api):
    with pytest.raises(openai.NotFoundError, match="not registered"):
        api.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="classification adapter"):
        api.completions.create(model=CLS, prompt="x", max_tokens=2)


def post(server, path: str, body, token: str | None = TOKEN, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, bytes | str):
        return httpx.post(server["url"] + path, content=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=60, **kwargs)


COMPLETION = {"prompt": "hi", "max_tokens": 2}
CHAT_BODY = {"messages": CHAT, "max_tokens": 2}


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"presence_penalty": 1}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": 1}, "frequency_penalty"),
    ("/v1/chat/completions", {"surprise": 1}, "surprise"),  # unknown fields are refused, like OpenAI does
])
def test_unsupported_options_are_400_never_ignored(server, path, extra, param):
    body = {**(COMPLETION if path == "/v1/completions" else CHAT_BODY), "model": GEN, **extra}
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_neutral_values_of_unsupported_options_are_accepted(server):
    body = {**CHAT_BODY, "model": GEN, "n": 1, "logprobs": False, "presence_penalty": 0.0, "tools": [],
            "response_format": {"type": "text"}, "user": "someone"}
    assert post(server, "/v1/chat/completions", body).status_code == 200


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature must be a finite number"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 1.5}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 100000}, 400, "max_tokens must be in"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens must be in"),
    ("/v1/completions", {**COMPLETION, "stop": 5}, 400, "stop must be a string"),
    ("/v1/completions", {**COMPLETION, "stop": ["x"] * 10_000}, 400, "stop must be a string or a list of at most"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream must be a boolean"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, 400, "only allowed when stream"),
    ("/v1/completions", {**COMPLETION, "seed": "x"}, 400, "seed must be an integer"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**COMPLETION, "temperature": 1000}, 400, "temperature"),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2}, 400, "token-id prompts are not supported"),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "é" * 100_000}, 400, "prompt has 100000 characters"),
    ("/v1/completions", {**COMPLETION, "model": 7}, 400, "model must be a non-empty string"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "function", "content": "x"}]}, 400, "role is 'function'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "content must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "a"}]}, 400, "name is not"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "max_completion_tokens": 3}, 400, "not both"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 300}, 400, "at most 256"),
])
def test_bad_values_and_types_are_400(server, path, body, status, message):
    response = post(server, path, {"model": GEN, **body})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"model": "gen_all_r8", "prompt": "x", "temperature": NaN}', 400, "numbers must be finite"),
    (b'{"model": "gen_all_r8", "prompt": "x", "temperature": Infinity}', 400, "numbers must be finite"),
    (b'{"model": "gen_all_r8", "prompt": "x", "temperature": 1e999}', 400, "temperature must be a finite number"),
    (b'{"model": "gen_all_r8", "prompt": ', 400, "not valid JSON"),
    (b'[1, 2]', 400, "must be a JSON object"),
    (b'[' * 100_000, 400, "nested too deeply"),
    (b'{"model": "x", "prompt": "' + b"a" * (5 << 20) + b'"}', 413, "over 4194304 bytes"),
])
def test_bodies_that_are_not_acceptable_json(server, body, status, message):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_tokens_are_required_like_grpc_but_health_and_metrics_are_open(server):
    for token in (None, "wrong"):
        response = post(server, "/v1/completions", {"model": GEN, **COMPLETION}, token=token)
        assert response.status_code == 401 and "bearer token" in response.json()["error"]["message"]
        assert httpx.get(server["url"] + "/v1/models",
                         headers={"Authorization": f"Bearer {token}"} if token else {}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    assert httpx.get(server["url"] + "/metrics").status_code == 200


def test_classify_has_vllm_shape_and_grpc_probabilities(server):
    texts = ["great movie", "awful plot"]
    response = post(server, "/classify", {"model": CLS, "input": texts})
    assert response.status_code == 200, response.text
    got = response.json()
    assert set(got) == {"id", "object", "created", "model", "data", "usage"} and got["object"] == "list"
    expected = server["stub"].Classify(pb.ClassifyRequest(adapter=CLS, texts=texts), metadata=AUTH, timeout=60)
    for i, (row, result) in enumerate(zip(got["data"], expected.results, strict=True)):
        assert row["index"] == i and row["label"] == result.label and row["num_classes"] == 5
        assert row["probs"] == pytest.approx([s.score for s in result.scores], abs=1e-6)
    assert got["usage"]["prompt_tokens"] > 0 and got["usage"]["completion_tokens"] == 0
    single = post(server, "/classify", {"model": CLS, "input": "one text"}).json()
    assert len(single["data"]) == 1
    assert post(server, "/classify", {"model": GEN, "input": "x"}).status_code == 400
    assert post(server, "/classify", {"model": "nope", "input": "x"}).status_code == 404
    assert post(server, "/classify", {"model": CLS, "input": []}).status_code == 400


def scrape(server) -> dict:
    text = httpx.get(server["url"] + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def counted(samples, method: str, code: str) -> float:
    return sum(v for (name, labels), v in samples.items() if name == "loraplex_requests_total"
               and dict(labels).get("method") == method and dict(labels).get("code") == code)


def test_http_requests_are_counted_and_a_disconnect_cancels_the_row(server):
    before = scrape(server)
    post(server, "/v1/chat/completions", {"model": GEN, **CHAT_BODY})
    post(server, "/v1/chat/completions", {"model": GEN, **CHAT_BODY, "n": 17})
    body = {"model": GEN, "prompt": "hello", "max_tokens": 120, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as response:
        next(response.iter_lines())  # one event, then the client goes away
    cancelled = ("loraplex_generations_finished_total", (("reason", "cancelled"),))
    deadline = time.time() + 60
    while scrape(server).get(cancelled, 0) <= before.get(cancelled, 0):
        assert time.time() < deadline, "the abandoned stream's row was not cancelled"
        time.sleep(0.2)
    after = scrape(server)
    assert counted(after, "http_chat_completions", "OK") == counted(before, "http_chat_completions", "OK") + 1
    assert counted(after, "http_chat_completions", "INVALID_ARGUMENT") == counted(
        before, "http_chat_completions", "INVALID_ARGUMENT") + 1


def test_a_busy_http_port_is_refused_with_the_flag_to_change(server, chat_base, tmp_path):  # noqa: F811
    second = subprocess.run(
        [sys.executable, "-m", "loraplex_server.app.serve", "--base", str(chat_base), "--adapter-dir", str(tmp_path),
         "--port", str(free_port()), "--metrics-port", "0", "--http-port", str(server["http_port"]),
         "--quantize", "none", "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert f":{server['http_port']}" in second.stderr and "--http-port" in second.stderr
    assert "Traceback" not in second.stderr


def test_overload_is_429_with_retry_after(chat_base, adapter_dir):  # noqa: F811
    """Past --max-pending requests in flight, the HTTP API refuses at once, as gRPC does with
    RESOURCE_EXHAUSTED, and tells the client when to retry."""
    port, http_port = free_port(), free_port()
    process, client = start_server(chat_base, adapter_dir, port, max_pending=1,
                                   extra_args=["--http-port", str(http_port)])
    body = {"model": GEN, "prompt": "hello", "max_tokens": 64, "temperature": 0}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(8)))

    try:
        replies = asyncio.run(flood())
        refused = [r for r in replies if r.status_code == 429]
        assert refused and {r.status_code for r in replies} <= {200, 429}
        assert all(r.headers["retry-after"].isdigit() for r in refused)
        assert all(r.json()["error"]["message"] for r in refused)
        assert any(r.status_code == 200 for r in replies)
    finally:
        client.close()
        process.kill()
        process.wait()
