"""Chat messages as callers write them -> the proto's ChatMessage list."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from loraplex.v1 import inference_pb2 as pb

# {"role": "user", "content": "hi"}, ("user", "hi"), or anything with .role and .content (a pb.ChatMessage).
Message = Mapping[str, str] | tuple[str, str] | Any


def _role_and_content(message: Message) -> tuple[object, object]:
    if isinstance(message, Mapping):
        return message.get("role"), message.get("content")
    if isinstance(message, tuple | list) and len(message) == 2:
        return message[0], message[1]
    return getattr(message, "role", None), getattr(message, "content", None)


def chat_messages(messages: Iterable[Message]) -> list[pb.ChatMessage]:
    """Shape checks only; the server checks the roles and the sizes."""
    if isinstance(messages, str | bytes | Mapping):
        raise TypeError("messages is a list of {'role': ..., 'content': ...} dicts or (role, content) tuples")
    converted = []
    for index, message in enumerate(messages):
        role, content = _role_and_content(message)
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"message {index}: expected {{'role': str, 'content': str}} or (role, content), "
                            f"got {type(message).__name__}")
        converted.append(pb.ChatMessage(role=role, content=content))
    if not converted:
        raise ValueError("chat needs at least one message")
    return converted
