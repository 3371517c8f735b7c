"""Chat messages as callers write them -> the proto's ChatMessage list."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from loraplex.v1 import inference_pb2 as pb

# {"role": "user", "content": "hi"}, ("user", "hi"), or anything with .role and .content (a pb.ChatMessage).
# Tool turns as dicts: {"role": "assistant", "content": "", "tool_calls": [...]} with the calls as a reply's
# ToolCall objects or OpenAI's {"id", "type", "function": {"name", "arguments"}}, and {"role": "tool",
# "tool_call_id": ..., "content": ...}.
Message = Mapping[str, Any] | tuple[str, str] | Any


def _role_and_content(message: Message) -> tuple[object, object]:
    if isinstance(message, Mapping):
        content = message.get("content")
        return message.get("role"), "" if content is None and message.get("tool_calls") else content
    if isinstance(message, tuple | list) and len(message) == 2:
        return message[0], message[1]
    return getattr(message, "role", None), getattr(message, "content", None)


def _tool_call(call: object, where: str) -> pb.ToolCall:
    if isinstance(call, Mapping):
        function = call.get("function", call)
        fields = (call.get("id"), function.get("name") if isinstance(function, Mapping) else None,
                  function.get("arguments") if isinstance(function, Mapping) else None)
    else:
        fields = (getattr(call, "id", None), getattr(call, "name", None),
                  getattr(call, "arguments", getattr(call, "arguments_json", None)))
    if not all(isinstance(f, str) for f in fields):
        raise TypeError(f"{where}: a tool call needs a string id, name and arguments (JSON text)")
    return pb.ToolCall(id=fields[0], name=fields[1], arguments_json=fields[2])


def _tool_fields(message: Message, index: int) -> dict:
    if not isinstance(message, Mapping):
        return {}
    fields = {}
    if message.get("tool_calls"):
        fields["tool_calls"] = [_tool_call(c, f"message {index}") for c in message["tool_calls"]]
    if message.get("tool_call_id") is not None:
        if not isinstance(message["tool_call_id"], str):
            raise TypeError(f"message {index}: tool_call_id must be a string")
        fields["tool_call_id"] = message["tool_call_id"]
    return fields


def chat_messages(messages: Iterable[Message]) -> list[pb.ChatMessage]:
    """Shape checks only; the server checks the roles and the sizes."""
    if isinstance(messages, str | bytes | Mapping):
        raise TypeError("messages is a list of {'role': ..., 'content': ...} dicts or (role, content) tuples")
    converted = []
    for index, message in enumerate(messages):
        if isinstance(message, pb.ChatMessage):
            converted.append(message)
            continue
        role, content = _role_and_content(message)
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"message {index}: expected {{'role': str, 'content': str}} or (role, content), "
                            f"got {type(message).__name__}")
        converted.append(pb.ChatMessage(role=role, content=content, **_tool_fields(message, index)))
    if not converted:
        raise ValueError("chat needs at least one message")
    return converted
