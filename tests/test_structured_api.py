"""Structured output over every door of a real server: the `openai` package (sync, async, streaming) with
response_format and vLLM's guided_* extras, our gRPC proto, and the SDK; each output validates against its
own constraint. Hostile constraints (huge, deeply nested, too many properties, regexes past the bounds,
invalid ones) are refused fast with 400 / INVALID_ARGUMENT, and the server serves others after."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import httpx
import jsonschema
import openai
import pytest
from server_process import serving_with_http
from test_chat import chat_base  # noqa: F401 - the fixture: the tiny base with a chat template

from loraplex import AsyncClient
from loraplex.cli import main as cli_main
from loraplex.errors import LoraplexError
from loraplex.v1 import inference_pb2 as pb

GEN = "gen_all_r8"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 4}},
          "required": ["ok", "name"], "additionalProperties": False}
CHAT = [{"role": "user", "content": "give me json"}]


@pytest.fixture(scope="module")
def server(chat_base, adapter_dir):  # noqa: F811
    with serving_with_http(chat_base, adapter_dir) as server:
        yield server


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_openai_chat_json_schema_sync_async_and_streaming(api, server):
    reply = api.chat.completions.create(model=GEN, messages=CHAT, max_tokens=40, temperature=0,
                                        response_format=_format(SCHEMA))
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    assert reply.choices[0].finish_reason == "stop"

    async def run_async():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0) as client:
            return await client.chat.completions.create(model=GEN, messages=CHAT, max_tokens=40, temperature=0.9,
                                                        seed=3, response_format=_format(SCHEMA))
    jsonschema.validate(json.loads(asyncio.run(run_async()).choices[0].message.content), SCHEMA)
    # any JSON object: a random tiny model may not close it within max_tokens, but it can only write JSON
    anything = api.chat.completions.create(model=GEN, messages=CHAT, max_tokens=40, temperature=0,
                                           response_format={"type": "json_object"}).choices[0]
    content = anything.message.content
    assert isinstance(json.loads(content), dict) if anything.finish_reason == "stop" else content[0] == "{"

    stream = api.chat.completions.create(model=GEN, messages=CHAT, max_tokens=40, temperature=0, stream=True,
                                         response_format=_format(SCHEMA))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content


@pytest.mark.parametrize("extra", [{"guided_regex": r"[a-c]{2,4}-(yes|no)"},
                                   {"structured_outputs": {"regex": r"[a-c]{2,4}-(yes|no)"}}])
def test_completions_regex_extras(api, extra):
    got = api.completions.create(model=GEN, prompt="hello world", max_tokens=20, temperature=0, extra_body=extra)
    assert re.fullmatch(r"[a-c]{2,4}-(yes|no)", got.choices[0].text)


def test_completions_guided_choice_and_guided_json(api, server):
    got = api.completions.create(model=server["base"], prompt="pick", max_tokens=10, temperature=1.0, seed=1,
                                 extra_body={"guided_choice": ["red", "green", "blue"]})
    assert got.choices[0].text in ("red", "green", "blue")
    got = api.completions.create(model=GEN, prompt="data", max_tokens=40, temperature=0,
                                 extra_body={"guided_json": json.dumps(SCHEMA)})
    jsonschema.validate(json.loads(got.choices[0].text), SCHEMA)


def test_grpc_and_sdk(server):
    request = pb.GenerateRequest(adapter=GEN, prompt="hello", sampling=pb.SamplingParameters(
        max_tokens=40, structured=pb.StructuredOutput(json_schema=json.dumps(SCHEMA))))
    reply = server["stub"].Generate(request, timeout=60)
    jsonschema.validate(json.loads(reply.text), SCHEMA)
    assert reply.finish_reason == pb.FINISH_REASON_EOS
    client = server["client"]
    assert client.generate("x", adapter=GEN, max_tokens=10, choice=["yes", "no"]).text in ("yes", "no")
    assert re.fullmatch("[0-9]{3}", client.chat(CHAT, adapter=GEN, max_tokens=10, regex="[0-9]{3}").text)
    streamed = "".join(c.text for c in client.generate_stream("x", adapter=GEN, max_tokens=40, json_schema=SCHEMA))
    jsonschema.validate(json.loads(streamed), SCHEMA)

    async def run_async():
        async with AsyncClient(f"127.0.0.1:{server['port']}") as aclient:
            return await aclient.generate("x", adapter=GEN, max_tokens=40, json_schema=json.dumps(SCHEMA))
    jsonschema.validate(json.loads(asyncio.run(run_async()).text), SCHEMA)
    with pytest.raises(ValueError):
        client.generate("x", regex="a", choice=["a"])


def _deep(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


HOSTILE = [
    ("guided_json", {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                                      for i in range(400)}}, "over"),  # huge
    ("guided_json", _deep(12), "nests deeper"),
    ("guided_json", {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}, "properties"),
    ("guided_json", {"type": 12}, "invalid"),
    ("guided_json", {"type": "string", "pattern": "[a-z]{1,5000}"}, "repetition bound"),  # 30 s to compile
    ("guided_json", {"type": "object", "patternProperties": {"[a-z]{1,5000}": {}}}, "repetition bound"),
    ("guided_json", {"$ref": "#"}, "invalid"),
    ("guided_json", "{not json", "not valid JSON"),
    ("guided_json", [1, 2], "must be a JSON object"),
    ("guided_regex", "[a-z]{1,100000}", "repetition bound"),
    ("guided_regex", "((((((((((((((((((a))))))))))))))))))", "nests groups"),
    ("guided_regex", "a" * 5000, "characters"),
    ("guided_regex", "(unclosed", "invalid"),
    ("guided_regex", "", "non-empty"),
    ("guided_choice", [], "non-empty list"),
    ("guided_choice", ["x"] * 1000, "choices"),
    ("guided_choice", ["ok", 5], "each choice"),
    ("response_format", {"type": "json_schema"}, "response_format"),
    ("response_format", {"type": "yaml"}, "response_format"),
    ("structured_outputs", {"grammar": "root ::= x"}, "structured_outputs"),
]


@pytest.mark.parametrize(("field", "value", "message"), HOSTILE)
def test_hostile_constraints_are_400_and_invalid_argument(server, field, value, message):
    body = {"model": GEN, "prompt": "hi", "max_tokens": 4, field: value}
    response = httpx.post(server["url"] + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and ".cc" not in error["message"]
    if field in ("guided_json", "guided_regex", "guided_choice") and value != ["ok", 5]:  # gRPC: strings only
        structured = {"guided_json": lambda v: pb.StructuredOutput(
                          json_schema=v if isinstance(v, str) else json.dumps(v)),
                      "guided_regex": lambda v: pb.StructuredOutput(regex=v),
                      "guided_choice": lambda v: pb.StructuredOutput(choice=pb.Choices(
                          choices=[str(c) for c in v]))}[field](value)
        request = pb.GenerateRequest(adapter=GEN, prompt="hi", sampling=pb.SamplingParameters(
            max_tokens=4, structured=structured))
        with pytest.raises(grpc.RpcError) as refused:
            server["stub"].Generate(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the server still serves others
    assert server["client"].generate("x", adapter=GEN, max_tokens=4, choice=["a", "b"]).text in ("a", "b")


def test_grpc_refuses_an_empty_constraint(server):
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(structured=pb.StructuredOutput()))
    with pytest.raises(grpc.RpcError) as refused:
        server["stub"].Generate(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(LoraplexError):
        server["client"].generate("x", adapter=GEN, max_tokens=4, regex="a{1,999}")


def test_one_constraint_per_request(server):
    body = {"model": GEN, "prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}
    assert httpx.post(server["url"] + "/v1/completions", json=body, timeout=30).status_code == 400


def test_cli_generate_with_a_choice_and_a_schema_file(server, tmp_path, capsys):
    target = ["--server", f"127.0.0.1:{server['port']}", "--adapter", GEN]
    assert cli_main(["generate", *target, "--choice", "yes", "--choice", "no", "x"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert cli_main(["generate", *target, "--max-tokens", "40", "--json-schema", str(schema), "x"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)


@pytest.mark.parametrize("extra", [{"guided_choice": ["a", "b"]}, {"response_format": {"type": "json_object"}},
                                   {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}])
@pytest.mark.parametrize("n", [2, 16])
def test_n_above_one_with_a_constraint_or_tools_is_refused(server, extra, n):
    """One grammar and one tool-call parse per request: several choices under them are refused, on every door."""
    body = {"model": GEN, "messages": CHAT, "max_tokens": 4, "n": n, **extra}
    response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"
    if "guided_choice" in extra:
        with pytest.raises(LoraplexError, match="n > 1"):
            server["client"].chat(CHAT, adapter=GEN, max_tokens=4, n=n, choice=extra["guided_choice"])
    assert len(api_choices := httpx.post(server["url"] + "/v1/chat/completions", timeout=30, json={
        "model": GEN, "messages": CHAT, "max_tokens": 2, "n": n}).json()["choices"]) == n, api_choices
