"""Request bodies of the OpenAI-compatible HTTP API, checked field by field before any work.

Every field is either used, refused with a 400 naming it (an option we do not implement, unless it
holds its neutral value, e.g. n=1), or unknown and refused like OpenAI itself does. The one field
accepted and ignored is `user` (an end-user id for the provider's abuse monitoring). `top_k` is
accepted as an extension, as vLLM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from loraplex_adapters.bounded_json import loads_bounded
from loraplex_server.api.chat_template import MAX_CALLS_PER_MESSAGE, ToolCall
from loraplex_server.api.errors import InvalidRequest as BadRequestBody
from loraplex_server.api.inputs import MAX_STOP_STRINGS, check_tree_unicode, is_int
from loraplex_server.api.requests import ChatMessage, ClassifyInput, GenerateInput, SamplingInput
from loraplex_server.frontends.openai_structured import STRUCTURED_FIELDS, structured_input, tools_input

COMPLETION_MAX_LOGPROBS = 5  # the legacy completions API's bound on `logprobs`

# Options we do not implement -> their neutral value(s): anything else is a 400, never a silent ignore.
_NEUTRAL = {
    "best_of": (None, 1), "echo": (None, False),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "functions": (None, []), "function_call": (None, "none"),
}
_SAMPLING = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
             "user"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "n", "best_of", "logprobs", "echo", "suffix", "logit_bias",
                                 "presence_penalty", "frequency_penalty"} | STRUCTURED_FIELDS
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "n", "logprobs", "top_logprobs", "tools",
                           "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
                           "logit_bias", "presence_penalty", "frequency_penalty"} | STRUCTURED_FIELDS
CLASSIFY_FIELDS = {"model", "input", "user"}


@dataclass
class GenerationBody:
    model: str
    request: GenerateInput  # its adapter is `model` as sent: the API maps the base's id to None
    stream: bool = False
    include_usage: bool = False


@dataclass
class ClassifyBody:
    model: str
    request: ClassifyInput


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object, through the bounded parser (depth; NaN and Infinity refused, as
    standard JSON has neither); every string in it, keys included, must be valid Unicode."""
    value = loads_bounded(body, "the request body", finite=True)
    check_tree_unicode(value, "the request body")
    if not isinstance(value, dict):
        raise BadRequestBody("the request body must be a JSON object")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequestBody(f"{name} must be a finite number", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and not is_int(value):
        raise BadRequestBody(f"{name} must be an integer", name)
    return value


def _string(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequestBody(f"{name} must be a non-empty string", name)
    return value


def _is_neutral(value, neutral: tuple) -> bool:
    """Equal to a neutral value and of its kind (True is not 1, but 0.0 is 0)."""
    def kind(v):
        return "number" if isinstance(v, int | float) and not isinstance(v, bool) else type(v)
    return any(value == n and kind(value) == kind(n) for n in neutral)


def check_fields(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise BadRequestBody(f"unrecognized request argument supplied: {str(name)[:64]}", str(name)[:64])
    for name, neutral in _NEUTRAL.items():
        if name in body and not _is_neutral(body[name], neutral):
            raise BadRequestBody(f"{name} is not supported by this server; leave it out", name)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise BadRequestBody(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    return stop


def _sampling(body: dict, max_tokens_field: str = "max_tokens") -> SamplingInput:
    max_tokens = _integer(body, "max_tokens")
    if max_tokens_field != "max_tokens" and body.get(max_tokens_field) is not None:
        if max_tokens is not None:
            raise BadRequestBody(f"set max_tokens or {max_tokens_field}, not both", max_tokens_field)
        max_tokens = _integer(body, max_tokens_field)
    top_k = _integer(body, "top_k")
    return SamplingInput(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0),  # OpenAI's default
                         top_p=_number(body, "top_p", 1.0), top_k=0 if top_k in (None, -1) else top_k,
                         stop=tuple(_stop(body)), seed=_integer(body, "seed"))


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequestBody("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise BadRequestBody("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise BadRequestBody("stream_options takes only include_usage (a boolean)", "stream_options")
    return True, options.get("include_usage", False)


def _user(body: dict) -> None:
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequestBody("user must be a string", "user")


def _choices(body: dict, sampling: SamplingInput, chat: bool) -> SamplingInput:
    """n, and logprobs as each API asks for them: completions' `logprobs` is the number of alternatives
    (0..5); chat's `logprobs` is a boolean and `top_logprobs` the number (0..20, only with logprobs)."""
    n = body.get("n")
    if n is not None and not is_int(n):
        raise BadRequestBody("n must be an integer", "n")
    top = None
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise BadRequestBody("logprobs must be a boolean", "logprobs")
        top = _integer(body, "top_logprobs")
        if top is not None and not wanted:
            raise BadRequestBody("top_logprobs needs logprobs set to true", "top_logprobs")
        top = (top or 0) if wanted else None
    elif body.get("logprobs") is not None:
        top = body["logprobs"]
        if not is_int(top) or not 0 <= top <= COMPLETION_MAX_LOGPROBS:
            raise BadRequestBody(f"logprobs must be an integer in 0..{COMPLETION_MAX_LOGPROBS}", "logprobs")
    return replace(sampling, logprobs=top, n=1 if n is None else n,
                   logprobs_field="top_logprobs" if chat else "logprobs")


def parse_completion(body: dict) -> GenerationBody:
    check_fields(body, COMPLETION_FIELDS)
    _user(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise BadRequestBody("one prompt per request (a list of several prompts is not supported)", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequestBody("prompt must be a non-empty string (token-id prompts are not supported)", "prompt")
    stream, usage = _stream(body)
    model = _string(body, "model")
    return GenerationBody(model, GenerateInput(model, prompt=prompt, sampling=_choices(body, _sampling(body), False),
                                               longest_by_default=True, structured=structured_input(body)),
                          stream, usage)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None and message.get("tool_calls"):  # an assistant turn of calls only
        return ""
    if isinstance(content, list):  # content parts: only text parts
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   and set(p) == {"type", "text"} for p in content):
            raise BadRequestBody(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequestBody(f"messages[{i}].content must be a string or a list of text parts",
                             f"messages[{i}].content")
    return content


# The fields a message may carry besides role and content, by role (the request path bounds them).
_MESSAGE_FIELDS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}


def _tool_calls(message: dict, i: int) -> tuple[ToolCall, ...]:
    """An assistant's earlier calls, as OpenAI returned them: {id, type: "function", function: {name,
    arguments (JSON text)}}."""
    calls = message.get("tool_calls")
    if calls is None:
        return ()
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or len(calls) > MAX_CALLS_PER_MESSAGE:
        raise BadRequestBody(f"{where} must be a list of at most {MAX_CALLS_PER_MESSAGE} calls", where)
    parsed = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or set(call) - {"id", "type", "function"} or call.get("type") != "function"
                or not isinstance(call.get("id"), str) or not isinstance(function, dict)
                or set(function) != {"name", "arguments"}
                or not all(isinstance(function[key], str) for key in ("name", "arguments"))):
            raise BadRequestBody(f'{where}[{k}] must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                                 '"arguments": <JSON text>}}', f"{where}[{k}]")
        parsed.append(ToolCall(call["id"], function["name"], function["arguments"]))
    return tuple(parsed)


def _messages(body: dict) -> list[ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestBody("messages must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequestBody(f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        extra = set(message) - {"role", "content"} - _MESSAGE_FIELDS.get(message["role"], set())
        if extra:
            name = sorted(map(str, extra))[0][:64]
            raise BadRequestBody(f"messages[{i}].{name} is not supported on a {message['role'][:32]!r} message",
                                 f"messages[{i}].{name}")
        call_id = message.get("tool_call_id", "")
        if not isinstance(call_id, str):
            raise BadRequestBody(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name for it
        parsed.append(ChatMessage(role, _content(message, i), _tool_calls(message, i), call_id))
    return parsed


def parse_chat(body: dict) -> GenerationBody:
    check_fields(body, CHAT_FIELDS)
    _user(body)
    stream, usage = _stream(body)
    model = _string(body, "model")
    request = GenerateInput(model, messages=tuple(_messages(body)),
                            sampling=_choices(body, _sampling(body, "max_completion_tokens"), True),
                            longest_by_default=True, structured=structured_input(body), tools=tools_input(body))
    return GenerationBody(model, request, stream, usage)


def parse_classify(body: dict) -> ClassifyBody:
    check_fields(body, CLASSIFY_FIELDS)
    _user(body)
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequestBody("input must be a string or a non-empty list of strings", "input")
    model = _string(body, "model")
    return ClassifyBody(model, ClassifyInput(model, texts, "input"))
