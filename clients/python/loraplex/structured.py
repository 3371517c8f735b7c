"""Constraints and tools of a generation request, as the SDK sends them: `structured_output` builds
SamplingParameters.structured from at most one of json_schema, json_object, regex and choice;
`tool_fields` the request's tools_json and tool_choice."""

from __future__ import annotations

import json

from loraplex.v1 import inference_pb2 as pb


def structured_output(json_schema: dict | str | None = None, regex: str | None = None,
                      choice: list[str] | None = None, json_object: bool = False) -> pb.StructuredOutput | None:
    """The constraint to send, or None when none is set; ValueError when several are."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                                      ("json_object", json_object or None)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"set one constraint, not {' and '.join(given)}")
    if json_schema is not None:
        return pb.StructuredOutput(json_schema=json_schema if isinstance(json_schema, str) else json.dumps(json_schema))
    if regex is not None:
        return pb.StructuredOutput(regex=regex)
    if choice is not None:
        return pb.StructuredOutput(choice=pb.Choices(choices=list(choice)))
    if json_object:
        return pb.StructuredOutput(json_object=True)
    return None


def tool_fields(tools: list[dict] | None, tool_choice: str | None, parallel_tool_calls: bool | None = None) -> dict:
    """tools_json, tool_choice and parallel_tool_calls of a chat request (OpenAI tool objects, as the OpenAI
    API takes them)."""
    fields = {} if parallel_tool_calls is None else {"parallel_tool_calls": parallel_tool_calls}
    if tools:
        fields["tools_json"] = json.dumps(tools)
    if tool_choice:
        fields["tool_choice"] = tool_choice
    return fields
