"""Tool calls on the request path: the client's tools bounded and checked, rendered into the prompt by the
base's chat template (or, for a template that takes no tools, as a system message of plain text), the
call enforced with the grammar engine when tool_choice asks for one, and the output parsed back into calls.

The model calls a function by writing {"name": ..., "arguments": {...}}, bare or wrapped in
<tool_call>...</tool_call> (the Hermes and Qwen templates' habit), one per call. tool_choice "required" or a
function's name constrains the output to such an object (a JSON schema whose arguments are the function's
parameters), so even a small base emits a valid call. Tool definitions are client text: when the template
renders them as markup, they must not hold any of the tokenizer's added-token texts (which would become
control tokens); refused otherwise.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from loraplex_server.api.chat_template import NAME, ChatMessage, ToolCall
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.structured import StructuredInput, parsed_json

MAX_TOOLS = 64
MAX_TOOLS_BYTES = 64 << 10
_WRAPPED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_OPEN = "<tool_call>"
FALLBACK_PROMPT = ("You can call these functions (JSON schemas of their parameters follow). To call one, reply "
                   'with only a JSON object {{"name": <function name>, "arguments": <arguments object>}}.\n{tools}')


@dataclass(frozen=True)
class ToolsInput:
    """Tools as the client sent them: OpenAI tool objects (a list, or its JSON text) and tool_choice ("auto",
    "none", "required" or a function's name; None means auto)."""

    tools: object
    choice: str | None = None
    field: str = "tools"
    parallel: bool = True  # False: at most one call is returned (OpenAI's parallel_tool_calls)


@dataclass(frozen=True)
class PreparedTools:
    """Checked tools: their specs for the template, names for parsing, and the enforced call's constraint."""

    specs: list[dict]
    structured: StructuredInput | None  # set when tool_choice requires a call
    parser: CallParser | None  # None when tool_choice is "none": the output is left as text


def prepare(tools: ToolsInput) -> PreparedTools:
    """Bounds and shape of the tools and tool_choice (InvalidRequest naming the field otherwise)."""
    where = tools.field
    value = parsed_json(tools.tools, where, "the tools", MAX_TOOLS_BYTES)
    if not isinstance(value, list | tuple) or not value:
        raise InvalidRequest(f"{where} must be a non-empty list of tools", where)
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(f"{len(value)} tools; at most {MAX_TOOLS}", where)
    if len(json.dumps(value)) > MAX_TOOLS_BYTES:
        raise InvalidRequest(f"{where} is over {MAX_TOOLS_BYTES} bytes", where)
    specs = [_function(tool, f"{where}[{i}]") for i, tool in enumerate(value)]
    names = tuple(spec["function"]["name"] for spec in specs)
    if len(set(names)) != len(names):
        raise InvalidRequest(f"{where}: function names must be unique", where)
    choice = tools.choice or "auto"
    if choice not in ("auto", "none", "required") and choice not in names:
        raise InvalidRequest(f"tool_choice must be auto, none, required or the name of a given function, "
                             f"got {choice[:64]!r}", "tool_choice")
    called = names if choice == "required" else (choice,) if choice in names else ()
    structured = StructuredInput("json_schema", call_schema([s for s in specs if s["function"]["name"] in called]),
                                 where) if called else None
    return PreparedTools(specs, structured, CallParser(names, tools.parallel) if choice != "none" else None)


def _function(tool: object, where: str) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
        raise InvalidRequest(f'{where} must be {{"type": "function", "function": {{"name": ..., ...}}}}', where)
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(f"{where}.function.name must be 1 to 64 letters, digits, _, . or -", where)
    description = function.get("description", "")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(description, str) or not isinstance(parameters, dict):
        raise InvalidRequest(f"{where}.function: description must be a string and parameters a JSON schema", where)
    out = {"name": name, "parameters": parameters}
    if description:
        out["description"] = description
    return {"type": "function", "function": out}


def call_schema(specs: list[dict]) -> dict:
    """The JSON schema of one call to any of `specs`: {"name": <its name>, "arguments": <its parameters>}."""
    options = [{"type": "object", "properties": {"name": {"const": s["function"]["name"]},
                                                 "arguments": s["function"]["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for s in specs]
    return options[0] if len(options) == 1 else {"anyOf": options}


def supports_tools(tokenizer) -> bool:
    """Whether the chat template renders `tools` itself."""
    return _template_mentions(tokenizer, "tools")


def renders_tool_turns(tokenizer) -> bool:
    """Whether the chat template renders an assistant's tool_calls (and so the tool turns) itself."""
    return _template_mentions(tokenizer, "tool_calls")


def _template_mentions(tokenizer, name: str) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and name in template


def check_markup_safe(tokenizer, value: object, field: str) -> None:
    """Client text the template renders as markup (tools, earlier calls and their ids) must not hold text
    the tokenizer reads as an added token."""
    text = json.dumps(value, ensure_ascii=False)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        content = getattr(token, "content", "")
        if content and content in text:
            raise InvalidRequest(f"{field} contain the model's control text {content[:32]!r}; remove it", field)


def tool_turns_markup(messages: list[ChatMessage]) -> list:
    """What a template that renders tool turns writes as markup from them: the calls and the call ids."""
    return [[m.tool_call_id, [[c.id, c.name, c.arguments] for c in m.tool_calls]]
            for m in messages if m.tool_calls or m.tool_call_id]


def plain_tool_turns(messages: list[ChatMessage]) -> list[ChatMessage]:
    """For a template that does not render tool turns: an assistant's calls as the JSON it was asked to
    write (FALLBACK_PROMPT), and each run of tool results as one user message of plain text, each result
    named by its call's function (as Qwen's and Hermes' formats do; the opaque call id tells a model less)."""
    plain: list[ChatMessage] = []
    names: dict[str, str] = {}
    results: list[str] = []  # the run of tool results being gathered
    for message in messages:
        if message.role == "tool":
            results.append(f"Result of {names.get(message.tool_call_id, message.tool_call_id)}: {message.content}")
            continue
        if results:
            plain.append(ChatMessage("user", "\n".join(results)))
            results = []
        if message.tool_calls:
            names.update((c.id, c.name) for c in message.tool_calls)
            calls = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in message.tool_calls]
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            plain.append(ChatMessage("assistant", f"{message.content}\n{text}" if message.content else text))
        else:
            plain.append(message)
    if results:
        plain.append(ChatMessage("user", "\n".join(results)))
    return plain


def with_tools_message(messages: list[ChatMessage], specs: list[dict]) -> list[ChatMessage]:
    """For a template that does not render tools: the tools as plain text in the system message (added
    to the conversation's own, or a new one first)."""
    text = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(s["function"], ensure_ascii=False) for s in specs))
    if messages and messages[0].role == "system":
        return [ChatMessage("system", f"{messages[0].content}\n\n{text}"), *messages[1:]]
    return [ChatMessage("system", text), *messages]


# -- parsing the output ---------------------------------------------------------------------------

def parse_calls(text: str, names: tuple[str, ...]) -> list[ToolCall]:
    """The calls in `text` (bare JSON, a list of them, or <tool_call> blocks); [] when it is not calls only."""
    stripped = text.strip()
    bodies = _WRAPPED.findall(stripped) if stripped.startswith(_OPEN) else [stripped]
    if stripped.startswith(_OPEN) and _WRAPPED.sub("", stripped).strip():
        return []
    calls = []
    for body in bodies:
        try:
            value = json.loads(body)
        except (RecursionError, ValueError):
            return []
        for item in value if isinstance(value, list) else [value]:
            call = _call(item, names)
            if call is None:
                return []
            calls.append(call)
    return calls


def _call(item: object, names: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (RecursionError, ValueError):
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class CallParser:
    """Reads a generation's output as calls to `names` (at most one unless `parallel`)."""

    names: tuple[str, ...]
    parallel: bool = True

    def parse(self, text: str) -> list[ToolCall]:
        calls = parse_calls(text, self.names)
        return calls if self.parallel else calls[:1]

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


class ToolCallStream:
    """Streams text while it cannot be a call; holds it back while it may be one, and parses it at the end."""

    def __init__(self, parser: CallParser) -> None:
        self.parser = parser
        self._held: list[str] = []
        self._passing = False

    def feed(self, text: str) -> str:
        """The text to send now (possibly empty)."""
        if self._passing:
            return text
        self._held.append(text)
        held = "".join(self._held)
        start = held.lstrip()
        if not start or start[0] in "{[" or start.startswith(_OPEN) or _OPEN.startswith(start):
            return ""
        self._passing = True
        self._held = []
        return held

    def end(self) -> tuple[str, list[ToolCall]]:
        """(text still to send, the calls) once the generation ended."""
        if self._passing:
            return "", []
        held = "".join(self._held)
        calls = self.parser.parse(held)
        return ("", calls) if calls else (held, [])
