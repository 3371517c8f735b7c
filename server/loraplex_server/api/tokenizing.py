"""Texts and chats -> token ids, off the event loop (tokenizing a long text takes milliseconds, rendering a
chat template more), each checked against the model's context."""

from __future__ import annotations

import asyncio

from loraplex_server.api.chat_template import ChatMessage, check_messages, render_chat
from loraplex_server.api.errors import InvalidRequest


async def text_token_ids(tokenizer, texts: list[str], context: int, names: list[str]) -> list[list[int]]:
    """Token ids of each text (already bounded in characters); names[i] names text i in refusals."""
    batch = await asyncio.get_running_loop().run_in_executor(None, lambda: tokenizer(list(texts))["input_ids"])
    for ids, name in zip(batch, names, strict=True):
        check_length(ids, name, context)
    return batch


async def chat_token_ids(tokenizer, messages: list[ChatMessage], context: int, max_chars: int) -> list[int]:
    """Token ids of the rendered conversation: checked before rendering, rendered and tokenized off the
    event loop. The template writes its own special tokens, so none are added (as HF's
    apply_chat_template(tokenize=True) does). The one place chats are tokenized."""
    if not messages:
        raise InvalidRequest("messages is empty; send at least one message", "messages")
    try:
        check_messages(messages, max_chars)
    except ValueError as exc:
        raise InvalidRequest(str(exc), "messages") from None

    def render_and_tokenize() -> list[int]:
        return tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]

    ids = await asyncio.get_running_loop().run_in_executor(None, render_and_tokenize)
    check_length(ids, "the rendered messages", context)
    return ids


def check_length(ids: list[int], what: str, context: int) -> None:
    if not ids:
        raise InvalidRequest(f"{what} is empty")
    if len(ids) > context:
        raise InvalidRequest(f"{what} has {len(ids)} tokens; the model's context is {context}")
