"""Client input -> engine input: every client-controlled value bounded before any work is done for it, then
texts and chats tokenized off the event loop (tokenizing a long text takes milliseconds, rendering a chat
template more), each checked against the model's context.

Text must be Unicode: a lone surrogate (a JSON "\\ud800" escape, or the raw bytes ED A0 80 that Python's
JSON decoder lets through) cannot be encoded, tokenized or logged, so it is refused by name here. Texts
are refused by length before tokenizing (CHARS_PER_TOKEN characters per token of context).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loraplex_server.api import chat_template
from loraplex_server.api.chat_template import ChatMessage, call_arguments, check_messages
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.requests import SamplingInput
from loraplex_server.engine.sampling import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, SamplingParams

__all__ = ["CHARS_PER_TOKEN", "MAX_STOP_STRINGS", "Limits", "chat_token_ids", "check_text", "check_texts",
           "check_tree_unicode", "check_unicode", "sampling", "text_token_ids"]

# Texts longer than this many characters per token of context are refused before tokenizing (real text
# averages about 4 characters per token; whitespace runs can be more).
CHARS_PER_TOKEN = 16


@dataclass
class Limits:
    max_texts: int = 64
    max_tokens: int = 1024
    default_max_tokens: int = 64
    max_embed_inputs: int = 256  # texts or token-id lists per embeddings request (api/embeddings.py)
    max_embed_tokens: int = 32768  # their tokens in all


def is_int(value) -> bool:
    """An integer as a decoded request holds one (a JSON or protobuf int; a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_unicode(text: str, what: str) -> str:
    """`text`, when it is valid Unicode (no lone surrogates); else InvalidRequest naming `what`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{what} is not valid Unicode text (a lone surrogate, U+{ord(text[exc.start]):04X}, "
                             f"at character {exc.start}); send UTF-8 text", what) from None
    return text


def check_tree_unicode(value: object, what: str) -> None:
    """Every string in a parsed JSON document, keys included, is valid Unicode (walked without recursion)."""
    stack = [(value, what)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            check_unicode(item, where)
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str):
                    check_unicode(key, f"a key in {where}")
                stack.append((child, f"{where}.{key}" if isinstance(key, str) and key.isidentifier() else where))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))


def sampling(values: SamplingInput, limits: Limits, longest_by_default: bool = False) -> SamplingParams:
    """The engine's sampling parameters, each checked; max_tokens defaults to the short default, or (the
    OpenAI API's rule) to the most the server allows."""
    max_tokens = values.max_tokens
    if max_tokens is None:
        max_tokens = limits.max_tokens if longest_by_default else limits.default_max_tokens
    if not is_int(max_tokens) or not 1 <= max_tokens <= limits.max_tokens:
        raise InvalidRequest(f"max_tokens must be in 1..{limits.max_tokens}, got {max_tokens}", "max_tokens")
    for i, stop in enumerate(values.stop):
        if isinstance(stop, str):
            check_unicode(stop, f"stop[{i}]")
    check_choices(values)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=values.temperature, top_p=values.top_p,
                            top_k=values.top_k, stop=list(values.stop), seed=values.seed)
    params.logprobs, params.n = values.logprobs, values.n
    try:
        params.validate()
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return params


def check_choices(values: SamplingInput) -> None:
    """logprobs (top alternatives) in 0..MAX_LOGPROBS or unset, n in 1..MAX_N; whether n choices of
    max_tokens fit the KV cache is the engine's check (it knows the cache)."""
    top = values.logprobs
    if top is not None and (not is_int(top) or not 0 <= top <= MAX_LOGPROBS):
        raise InvalidRequest(f"{values.logprobs_field} must be an integer in 0..{MAX_LOGPROBS}, got {top!r}"[:200],
                             values.logprobs_field)
    n = values.n
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise InvalidRequest(f"{values.n_field} must be an integer in 1..{MAX_N}, got {n!r}"[:200], values.n_field)


def check_texts(texts: list[str], what: str, max_texts: int, max_chars: int, context: int) -> None:
    """A non-empty list of at most max_texts non-empty Unicode texts, each within max_chars."""
    if not texts:
        raise InvalidRequest(f"{what} is empty; send at least one text", what)
    if len(texts) > max_texts:
        raise InvalidRequest(f"{len(texts)} texts; at most {max_texts} per request", what)
    for i, text in enumerate(texts):
        check_text(text, f"{what}[{i}]", max_chars, context)


def check_text(text: str, what: str, max_chars: int, context: int) -> None:
    if not isinstance(text, str) or not text:
        raise InvalidRequest(f"{what} is empty", what)
    if len(text) > max_chars:
        raise InvalidRequest(f"{what} has {len(text)} characters; the model's context is {context} tokens, so at "
                             f"most {max_chars} characters are accepted", what)
    check_unicode(text, what)


# -- tokenizing ---------------------------------------------------------------------------------

async def text_token_ids(tokenizer, texts: list[str], context: int, names: list[str]) -> list[list[int]]:
    """Token ids of each text (already bounded in characters); names[i] names text i in refusals."""
    batch = await asyncio.get_running_loop().run_in_executor(None, lambda: tokenizer(list(texts))["input_ids"])
    for ids, name in zip(batch, names, strict=True):
        check_length(ids, name, context)
    return batch


async def chat_token_ids(tokenizer, messages: list[ChatMessage], context: int, max_chars: int,
                         tools: list[dict] | None = None) -> list[int]:
    """Token ids of the rendered conversation: checked before rendering, rendered and tokenized off the
    event loop; message content becomes text tokens only, the template's markup its special tokens
    (chat_template.chat_token_ids). The one place chats are tokenized."""
    checked_messages(messages, max_chars)
    ids = await asyncio.get_running_loop().run_in_executor(None, chat_template.chat_token_ids, tokenizer, messages,
                                                           tools)
    check_length(ids, "the rendered messages", context)
    return ids


def checked_messages(messages: list[ChatMessage], max_chars: int) -> None:
    """Count, roles, tool fields and total size of a chat, before any work on it (InvalidRequest)."""
    if not messages:
        raise InvalidRequest("messages is empty; send at least one message", "messages")
    for i, message in enumerate(messages):
        for name, text in (("role", message.role), ("content", message.content),
                           ("tool_call_id", message.tool_call_id)):
            check_unicode(text, f"messages[{i}].{name}")
        for k, call in enumerate(message.tool_calls):
            check_unicode(call.id + call.arguments, f"messages[{i}].tool_calls[{k}]")
    try:
        check_messages(messages, max_chars)
        for i, message in enumerate(messages):  # parsed once bounded
            for k, call in enumerate(message.tool_calls):
                check_tree_unicode(call_arguments(call), f"messages[{i}].tool_calls[{k}].function.arguments")
    except InvalidRequest:
        raise
    except ValueError as exc:
        raise InvalidRequest(str(exc), "messages") from None


def check_length(ids: list[int], what: str, context: int) -> None:
    if not ids:
        raise InvalidRequest(f"{what} is empty")
    if len(ids) > context:
        raise InvalidRequest(f"{what} has {len(ids)} tokens; the model's context is {context}")
