"""Tool calls: tools rendered by the base's chat template, the model's output parsed back into OpenAI's
tool_calls (whole and streamed), tool_choice "required" or a named function enforced with the grammar
engine (a tiny random base emits a valid call), over the `openai` package, gRPC and the SDK; bad tools
refused with 400 / INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import httpx
import jsonschema
import openai
import pytest
from server_process import serving_with_http
from transformers import AutoTokenizer

from loraplex.v1 import inference_pb2 as pb
from loraplex_server.api.chat_template import ChatMessage, chat_token_ids, render_chat
from loraplex_server.api.tools import ToolCallStream, parse_calls, with_tools_message

GEN = "gen_all_r8"
# The tiny model's context is 128 tokens: this template renders the tools' names and descriptions only.
TEMPLATE = ("{% if tools %}<bos>system\n{% for t in tools %}{{ t.function.name }} {% endfor %}<eos>\n{% endif %}"
            "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CHAT = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def tools_base(tiny, tmp_path_factory):
    base_dir, _ = tiny("llama")
    folder = tmp_path_factory.mktemp("tools") / "base"
    shutil.copytree(base_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tools_base, adapter_dir):
    # the default client's 5 s is short on a shared machine
    with serving_with_http(tools_base, adapter_dir, client_kwargs={"timeout": 60}) as server:
        yield server


def _valid(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_tool_call_sync_and_streaming(api):
    reply = api.chat.completions.create(model=GEN, messages=CHAT, tools=TOOLS, tool_choice="required",
                                        max_tokens=75, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    _valid(call.function.name, call.function.arguments)

    chunks = list(api.chat.completions.create(model=GEN, messages=CHAT, tools=TOOLS, tool_choice="required",
                                              max_tokens=75, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [t for d in deltas for t in (d.tool_calls or [])]
    assert [t.function.name for t in streamed] == [call.function.name]
    assert streamed[0].function.arguments == call.function.arguments and streamed[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(d.content or "" for d in deltas)


def test_named_tool_call_async_with_sampling(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0) as client:
            return await client.chat.completions.create(
                model=GEN, messages=CHAT, tools=TOOLS, max_tokens=75, temperature=1.0, seed=5,
                tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = asyncio.run(run()).choices[0].message.tool_calls
    assert call.function.name == "get_time"
    _valid("get_time", call.function.arguments)


def test_auto_and_none_leave_the_model_free(api):
    for choice in ("auto", "none"):
        reply = api.chat.completions.create(model=GEN, messages=CHAT, tools=TOOLS, tool_choice=choice,
                                            max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_grpc_and_sdk(server):
    request = pb.GenerateRequest(adapter=GEN, messages=[pb.ChatMessage(role="user", content="time?")],
                                 sampling=pb.SamplingParameters(max_tokens=75), tools_json=json.dumps(TOOLS),
                                 tool_choice="get_weather")
    reply = server["stub"].Generate(request, timeout=60)
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS and reply.text == ""
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
    _valid("get_weather", reply.tool_calls[0].arguments_json)
    got = server["client"].chat(CHAT, adapter=GEN, max_tokens=75, tools=TOOLS, tool_choice="required")
    assert got.finish_reason == "tool_calls"
    _valid(got.tool_calls[0].name, got.tool_calls[0].arguments)
    last = list(server["client"].chat_stream(CHAT, adapter=GEN, max_tokens=75, tools=TOOLS, tool_choice="required"))[-1]
    assert last.finish_reason == "tool_calls" and [c.name for c in last.tool_calls] == [got.tool_calls[0].name]


BAD_TOOLS = [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(65)]}, "tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "x" * 70_000}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "hi <eos> there"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], "tool_choice": "required"},
     "tools"),
    ({"tools": TOOLS, "tool_choice": "get_nothing"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
]


@pytest.mark.parametrize(("extra", "param"), BAD_TOOLS)
def test_bad_tools_are_400(server, extra, param):
    body = {"model": GEN, "messages": CHAT, "max_tokens": 4, **extra}
    response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)
    if isinstance(extra.get("tools"), list) and "guided_regex" not in extra:
        request = pb.GenerateRequest(adapter=GEN, messages=[pb.ChatMessage(role="user", content="x")],
                                     tools_json=json.dumps(extra["tools"]),
                                     tool_choice=str(extra.get("tool_choice", "")))
        with pytest.raises(grpc.RpcError) as refused:
            server["stub"].Generate(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_parse_calls_in_the_shapes_models_write():
    names = ("f", "g")
    assert [c.name for c in parse_calls('{"name": "f", "arguments": {"a": 1}}', names)] == ["f"]
    assert [c.name for c in parse_calls('<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n'
                                        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', names)] \
        == ["g", "f"]
    assert [json.loads(c.arguments) for c in parse_calls('[{"name": "f", "arguments": {"a": 1}}]', names)] == [{"a": 1}]
    for text in ('{"name": "h", "arguments": {}}', "hello", '{"name": "f", "arguments": [1]}',
                 '<tool_call>{"name": "f", "arguments": {}}</tool_call> and more', '{"name": "f"'):
        assert parse_calls(text, names) == []


def test_stream_holds_back_only_what_may_be_a_call():
    stream = ToolCallStream(("f",))
    assert stream.feed("  ") == "" and stream.feed("Hel") == "  Hel" and stream.feed("lo") == "lo"
    assert stream.end() == ("", [])
    stream = ToolCallStream(("f",))
    assert stream.feed('{"name": "f", ') == "" and stream.feed('"arguments": {}}') == ""
    rest, calls = stream.end()
    assert rest == "" and [c.name for c in calls] == ["f"]
    stream = ToolCallStream(("f",))
    assert stream.feed("<tool") == "" and stream.end() == ("<tool", [])


def test_a_template_without_tools_gets_them_as_plain_text_in_the_system_message(tiny):
    from test_chat import TEMPLATE as PLAIN
    tokenizer = AutoTokenizer.from_pretrained(tiny("llama")[0])
    tokenizer.chat_template = PLAIN
    messages = with_tools_message([ChatMessage("system", "be brief"), ChatMessage("user", "hi")], TOOLS)
    assert len(messages) == 2 and "get_weather" in messages[0].content and messages[0].content.startswith("be brief")
    assert "get_weather" in render_chat(tokenizer, messages)
    tokenizer.chat_template = TEMPLATE
    assert "get_weather get_time" in render_chat(tokenizer, messages[1:], TOOLS)
    ids = chat_token_ids(tokenizer, messages)
    assert tokenizer.convert_tokens_to_ids("<eos>") in ids
