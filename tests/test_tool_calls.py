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
from loraplex_server.api.chat_template import ChatMessage, ToolCall, chat_token_ids, render_chat
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.inputs import checked_messages
from loraplex_server.api.tools import (
    CallParser,
    check_markup_safe,
    parse_calls,
    plain_tool_turns,
    renders_tool_turns,
    tool_turns_markup,
    with_tools_message,
)

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
    stream = CallParser(("f",)).stream()
    assert stream.feed("  ") == "" and stream.feed("Hel") == "  Hel" and stream.feed("lo") == "lo"
    assert stream.end() == ("", [])
    stream = CallParser(("f",)).stream()
    assert stream.feed('{"name": "f", ') == "" and stream.feed('"arguments": {}}') == ""
    rest, calls = stream.end()
    assert rest == "" and [c.name for c in calls] == ["f"]
    stream = CallParser(("f",)).stream()
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


# -- tool turns: the calls an assistant made and their results, sent back in the conversation ------------

# A template that renders tool turns itself (as Qwen's and Llama 3.1's do): calls and call ids are markup.
TURNS_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{% for c in m.tool_calls or [] %}call "
                  "{{ c.function.name }} {{ c.function.arguments | tojson }}\n{% endfor %}{% if m.tool_call_id %}"
                  "[{{ m.tool_call_id }}] {% endif %}{{ m['content'] }}<eos>\n{% endfor %}"
                  "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")
CALL = ToolCall("call_1", "get_weather", '{"city": "Oslo", "unit": "c"}')
TURNS = [ChatMessage("user", "weather?"), ChatMessage("assistant", "", (CALL,)),
         ChatMessage("tool", "12 degrees", tool_call_id="call_1")]


def test_a_template_with_tool_turns_renders_the_calls_and_results_itself(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny("llama")[0])
    tokenizer.chat_template = TURNS_TEMPLATE
    assert renders_tool_turns(tokenizer)
    text = render_chat(tokenizer, TURNS)
    assert 'call get_weather {"city": "Oslo", "unit": "c"}\n<eos>' in text and "[call_1] 12 degrees" in text
    assert tokenizer.decode(chat_token_ids(tokenizer, TURNS)) == tokenizer.decode(
        tokenizer(text, add_special_tokens=False)["input_ids"])
    # the calls are markup there: control text in them is refused; as plain text it is only text
    hostile = [ChatMessage("assistant", "", (ToolCall("call_1", "f", '{"a": "<eos>"}'),))]
    with pytest.raises(InvalidRequest) as refused:
        check_markup_safe(tokenizer, tool_turns_markup(hostile), "messages")
    assert refused.value.param == "messages"
    assert "<eos>" in plain_tool_turns(hostile)[0].content


def test_a_template_without_tool_turns_gets_them_as_plain_text():
    plain = plain_tool_turns([*TURNS, ChatMessage("tool", "noon", tool_call_id="call_2"), ChatMessage("user", "ok")])
    assert [m.role for m in plain] == ["user", "assistant", "user", "user"] and plain[3].content == "ok"
    assert json.loads(plain[1].content) == {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}
    assert plain[2].content == "Result of get_weather: 12 degrees\nResult of call_2: noon"  # call_2: no call
    # a user's own text is never merged into the results, whatever it says
    user_first = plain_tool_turns([ChatMessage("user", "Result of x: 1"), ChatMessage("assistant", "", (CALL,)),
                                   ChatMessage("user", "Result of y"), ChatMessage("tool", "2", tool_call_id="call_1")])
    assert [m.content for m in user_first][2:] == ["Result of y", "Result of get_weather: 2"]
    two = plain_tool_turns([ChatMessage("assistant", "both", (CALL, CALL))])[0].content
    assert two.startswith("both\n") and len(json.loads(two.split("\n", 1)[1])) == 2


def test_parallel_tool_calls_false_keeps_one_call():
    text = '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]'
    assert [c.name for c in CallParser(("f", "g")).parse(text)] == ["f", "g"]
    assert [c.name for c in CallParser(("f", "g"), parallel=False).parse(text)] == ["f"]
    stream = CallParser(("f", "g"), parallel=False).stream()
    assert stream.feed(text) == "" and [c.name for c in stream.end()[1]] == ["f"]


def _expected_prompt_tokens(tools_base, messages: list[ChatMessage]) -> int:
    """What the server renders for `messages` on tools_base, whose template does not render tool turns: the
    turns as plain text."""
    tokenizer = AutoTokenizer.from_pretrained(tools_base)
    return len(chat_token_ids(tokenizer, plain_tool_turns(messages)))


def _turns(call_id: str, name: str, arguments: str) -> list[ChatMessage]:
    return [ChatMessage("user", "t?"), ChatMessage("assistant", "", (ToolCall(call_id, name, arguments),)),
            ChatMessage("tool", "noon", tool_call_id=call_id)]


# The tiny base's context is 128 tokens: the shorter function is called and the follow-ups send no tools.
def test_a_tool_calling_conversation_goes_on_with_the_results(api, server, tools_base):
    ask = [{"role": "user", "content": "t?"}]
    reply = api.chat.completions.create(model=GEN, messages=ask, tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "get_time"}}, max_tokens=75, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    history = [*ask, reply.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "noon"}]
    assert "content" not in history[1]  # as the openai package hands it back: calls only
    follow_up = api.chat.completions.create(model=GEN, messages=history, max_tokens=3, temperature=0)
    assert follow_up.choices[0].finish_reason in ("stop", "length")
    assert follow_up.usage.prompt_tokens == _expected_prompt_tokens(
        tools_base, _turns(call.id, call.function.name, call.function.arguments))

    # the same conversation through the SDK (gRPC), with the reply's own ToolCall objects
    got = server["client"].chat(ask, adapter=GEN, max_tokens=75, tools=TOOLS, tool_choice="get_time")
    (sdk_call,) = got.tool_calls
    sdk_history = [*ask, {"role": "assistant", "content": None, "tool_calls": got.tool_calls},
                   {"role": "tool", "tool_call_id": sdk_call.id, "content": "noon"}]
    again = server["client"].chat(sdk_history, adapter=GEN, max_tokens=3)
    assert again.prompt_tokens == _expected_prompt_tokens(tools_base, _turns(sdk_call.id, sdk_call.name,
                                                                             sdk_call.arguments))


def _call_json(**changes) -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}
    return {**call, **changes}


DEEP = "[" * 100_000 + "]" * 100_000
BAD_TURNS = [  # each message list is refused with 400 naming a field under messages
    [{"role": "user", "content": "hi", "tool_calls": [_call_json()]}],
    [{"role": "user", "content": "hi", "tool_call_id": "call_1"}],
    [{"role": "tool", "content": "12"}],
    [{"role": "tool", "content": "12", "tool_call_id": 7}],
    [{"role": "tool", "content": "12", "tool_call_id": "x" * 129}],
    [{"role": "tool", "content": None, "tool_call_id": "call_1"}],
    [{"role": "assistant", "tool_calls": "get_weather"}],
    [{"role": "assistant", "tool_calls": [_call_json()] * 65}],
    [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
    [{"role": "assistant", "tool_calls": [_call_json(type="code")]}],
    [{"role": "assistant", "tool_calls": [_call_json(id="")]}],
    [{"role": "assistant", "tool_calls": [_call_json(id="x" * 129)]}],
    [{"role": "assistant", "tool_calls": [_call_json(extra=1)]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "bad name!", "arguments": "{}"})]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "f", "arguments": {"a": 1}})]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "f", "arguments": "[1]"})]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "f", "arguments": "{"})]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "f", "arguments": '{"a": ' + DEEP + "}"})]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "f", "arguments": '{"a": "\\ud800"}'})]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "f", "arguments": "{}", "x": 1})]}],
    [{"role": "assistant", "tool_calls": [_call_json(function={"name": "f", "arguments": "{}" + " " * 70_000})]}],
]


@pytest.mark.parametrize("messages", BAD_TURNS, ids=range(len(BAD_TURNS)))
def test_bad_tool_turns_are_400(server, messages):
    body = {"model": GEN, "messages": [*CHAT, *messages], "max_tokens": 2}
    response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("messages")


BAD_GRPC_TURNS = [
    pb.ChatMessage(role="user", content="hi", tool_calls=[pb.ToolCall(id="c", name="f", arguments_json="{}")]),
    pb.ChatMessage(role="tool", content="12"),
    pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", name="f", arguments_json="{")]),
    pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", name="f", arguments_json="{}")] * 65),
    pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c" * 129, name="f", arguments_json="{}")]),
    pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", name="", arguments_json="{}")]),
]


@pytest.mark.parametrize("message", BAD_GRPC_TURNS, ids=range(len(BAD_GRPC_TURNS)))
def test_bad_tool_turns_are_invalid_argument(server, message):
    request = pb.GenerateRequest(adapter=GEN, messages=[pb.ChatMessage(role="user", content="x"), message],
                                 sampling=pb.SamplingParameters(max_tokens=2))
    with pytest.raises(grpc.RpcError) as refused:
        server["stub"].Generate(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_parallel_tool_calls_must_be_a_boolean(server):
    body = {"model": GEN, "messages": CHAT, "tools": TOOLS, "parallel_tool_calls": "no", "max_tokens": 2}
    response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "parallel_tool_calls"


def test_arguments_nested_past_the_parser_are_refused_not_crashed():
    """Within the size bound (a server with a long context), nesting past json's recursion limit is a 400."""
    deep = ChatMessage("assistant", "", (ToolCall("c", "f", '{"a": ' + DEEP + "}"),))
    with pytest.raises(InvalidRequest, match="not a JSON object"):
        checked_messages([ChatMessage("user", "x"), deep], max_chars=10**6)
