"""The OpenAI API's ways to constrain output, decoded into one StructuredInput: OpenAI's `response_format`
(`text`, `json_object`, `json_schema`) and vLLM's extras (`guided_json`, `guided_regex`, `guided_choice`,
and the newer `structured_outputs` object with `json`, `regex` or `choice`). At most one may be set.
Also `tools` and `tool_choice` (decoded into ToolsInput), and tool calls encoded back (whole or as deltas).
The sizes are bounded by the request path (api/structured.py, api/tools.py), not here."""

from __future__ import annotations

from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.structured import StructuredInput
from loraplex_server.api.tools import ToolCall, ToolsInput

STRUCTURED_FIELDS = {"response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs"}
_OUTPUTS_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice"}


def structured_input(body: dict) -> StructuredInput | None:
    """The one constraint the body sets, or None."""
    found = [name for name in sorted(STRUCTURED_FIELDS) if body.get(name) is not None
             and not (name == "response_format" and body[name] == {"type": "text"})]
    if len(found) > 1:
        raise InvalidRequest(f"set one way to constrain the output, not {' and '.join(found)}", found[1])
    if not found:
        return None
    name = found[0]
    value = body[name]
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        return StructuredInput("json_schema", value, name)
    if name == "guided_regex":
        return StructuredInput("regex", value, name)
    if name == "guided_choice":
        return StructuredInput("choice", value, name)
    return _structured_outputs(value)


def _response_format(value: object) -> StructuredInput:
    where = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object" and set(value) == {"type"}:
        return StructuredInput("json_object", None, where)
    if kind == "json_schema" and set(value) == {"type", "json_schema"} and isinstance(value["json_schema"], dict):
        spec = value["json_schema"]
        unknown = set(spec) - {"name", "schema", "strict", "description"}
        if unknown or not isinstance(spec.get("name"), str) or "schema" not in spec:
            raise InvalidRequest("response_format.json_schema takes name, schema, strict and description; name "
                                 "and schema are required", "response_format.json_schema")
        return StructuredInput("json_schema", spec["schema"], "response_format.json_schema.schema")
    raise InvalidRequest('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                         '"json_schema", "json_schema": {"name": ..., "schema": {...}}}', where)


def _structured_outputs(value: object) -> StructuredInput:
    where = "structured_outputs"
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _OUTPUTS_KINDS:
        raise InvalidRequest("structured_outputs takes exactly one of json, regex and choice", where)
    key, inner = next(iter(value.items()))
    return StructuredInput(_OUTPUTS_KINDS[key], inner, f"{where}.{key}")


def tools_input(body: dict) -> ToolsInput | None:
    """`tools`, `tool_choice` ("none", "auto", "required" or {"type": "function", "function": {"name"}}) and
    `parallel_tool_calls`."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        choice = function.get("name") if isinstance(function, dict) else None
        if not isinstance(choice, str):
            raise InvalidRequest('tool_choice must be "none", "auto", "required" or {"type": "function", '
                                 '"function": {"name": ...}}', "tool_choice")
    elif choice is not None and choice not in ("none", "auto", "required"):
        raise InvalidRequest('tool_choice must be "none", "auto", "required" or {"type": "function", '
                             '"function": {"name": ...}}', "tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", "tool_choice")
        return None
    return ToolsInput(tools, choice, "tools", parallel is not False)


def tool_calls_json(calls: list[ToolCall], delta: bool = False) -> list[dict]:
    """OpenAI's tool_calls of a message, or of a streamed delta (with each call's index)."""
    return [{**({"index": i} if delta else {}), "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for i, call in enumerate(calls)]
