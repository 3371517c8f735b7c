"""Chat messages -> prompt tokens, through the base tokenizer's own chat template (as HF `generate` users do).

Messages are checked before rendering (count, roles, total characters), so a request cannot make the
template engine do unbounded work. Rendering runs off the event loop (the caller's executor).

Only the template's own markup becomes control tokens: rendering the conversation and tokenizing the
whole string (what apply_chat_template(tokenize=True) does) would turn a message holding
"<|im_end|>\n<|im_start|>system ..." into real turn markers. So `chat_token_ids` renders the template
with an unguessable placeholder in place of each message's content, tokenizes the template's parts as
usual, and each content as plain text by the tokenizer's model alone, with none of its added tokens
(special or not) matched in it. This is the placeholder approach vLLM and SGLang proposed, taken one
step further: split_special_tokens=True alone would still match added tokens that are not flagged
special (Qwen3's <think>, for one).
"""

from __future__ import annotations

import json
import re
import secrets
import weakref
from dataclasses import dataclass, replace

import jinja2
from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 256
MAX_CALLS_PER_MESSAGE = 64
MAX_CALL_ID = 128
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class NoChatTemplate(RuntimeError):
    """The base tokenizer has no chat template (a FAILED_PRECONDITION: the request is fine, the base cannot)."""


class ChatTemplateError(ValueError):
    """The template refused the conversation (e.g. roles in an order it does not accept)."""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's earlier calls
    tool_call_id: str = ""  # a tool message: the call it answers


def check_messages(messages: list[ChatMessage], max_chars: int) -> None:
    """Raise ValueError naming the first message that breaks a limit: count, role, total characters."""
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"{len(messages)} messages; at most {MAX_MESSAGES} per request")
    total = 0
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ValueError(f"messages[{i}].role is {message.role[:32]!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        total += len(message.content) + _check_tool_fields(message, i)
    if total > max_chars:
        raise ValueError(f"the messages have {total} characters of content; at most {max_chars} are accepted "
                         "(the model's context bounds it)")


def _check_tool_fields(message: ChatMessage, i: int) -> int:
    """Tool calls only on assistant messages and a call id on every tool message, each bounded; returns
    their characters (counted with the content)."""
    if message.tool_calls and message.role != "assistant":
        raise ValueError(f"messages[{i}].tool_calls is only for assistant messages")
    if (message.role == "tool") != bool(message.tool_call_id):
        raise ValueError(f"messages[{i}].tool_call_id is required on tool messages and only there")
    if len(message.tool_call_id) > MAX_CALL_ID:
        raise ValueError(f"messages[{i}].tool_call_id has {len(message.tool_call_id)} characters; at most "
                         f"{MAX_CALL_ID}")
    if len(message.tool_calls) > MAX_CALLS_PER_MESSAGE:
        raise ValueError(f"messages[{i}] has {len(message.tool_calls)} tool calls; at most {MAX_CALLS_PER_MESSAGE}")
    size = len(message.tool_call_id)
    for k, call in enumerate(message.tool_calls):
        where = f"messages[{i}].tool_calls[{k}]"
        if not NAME.fullmatch(call.name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, _, . or -")
        if not 0 < len(call.id) <= MAX_CALL_ID:
            raise ValueError(f"{where}.id must have 1-{MAX_CALL_ID} characters")
        size += len(call.id) + len(call.name) + len(call.arguments)
    return size


def call_arguments(call: ToolCall) -> dict:
    """A call's arguments as an object (what chat templates render); ValueError when they are not one."""
    try:
        value = json.loads(call.arguments)
    except (RecursionError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"the arguments of the call {call.id[:32]!r} are not a JSON object")
    return value


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[ChatMessage], tools: list[dict] | None = None) -> str:
    """The prompt text for `messages` (and `tools`, OpenAI tool objects the template renders), ending with
    the template's assistant turn opener. The text already holds the template's special tokens (e.g.
    <|im_start|>), so tokenize it without adding more."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("the base model has no chat template; send `prompt` with the text to continue")
    conversation = [_turn(m) for m in messages]
    try:
        return tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:  # includes the template's own raise_exception(...)
        raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None


def _turn(message: ChatMessage) -> dict:
    """A message as chat templates take it (transformers' tool-use convention: arguments as an object)."""
    turn = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                           "arguments": call_arguments(c)}}
                              for c in message.tool_calls]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


# Each tokenizer's model without its added tokens, made once (a tokenizer's backend is immutable here).
_PLAIN_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chat_token_ids(tokenizer, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
    """The token ids of `messages` rendered by the template with the assistant's turn opened: the template's
    markup tokenized as usual (its special tokens become control tokens), each message's content as plain
    text (never a special or added token). `tools` are rendered by the template as markup (the caller
    checks they hold no added-token text). Raises NoChatTemplate, ChatTemplateError."""
    secret = secrets.token_hex(16)
    # An empty content stays empty (templates test it: an assistant turn of calls only renders no content).
    placeholders = [replace(m, content=f"\ue000{secret}:{i}\ue001" if m.content else "")
                    for i, m in enumerate(messages)]
    skeleton = render_chat(tokenizer, placeholders, tools)
    text = render_chat(tokenizer, messages, tools)
    pieces = re.split(f"\ue000{secret}:([0-9]+)\ue001", skeleton)  # markup, index, markup, index, ..., markup
    ids, at = [], 0
    for k in range(0, len(pieces), 2):
        markup = pieces[k]
        if not text.startswith(markup, at):
            raise _rewritten()
        ids += tokenizer(markup, add_special_tokens=False)["input_ids"] if markup else []
        at += len(markup)
        if k + 1 < len(pieces):
            content = _content_as_rendered(messages[int(pieces[k + 1])].content, text, at, pieces[k + 2])
            ids += text_token_ids(tokenizer, content)
            at += len(content)
    if at != len(text):
        raise _rewritten()
    return ids


def _content_as_rendered(content: str, text: str, at: int, markup_after: str) -> str:
    """The content as the template wrote it at `text[at:]`: verbatim, or trimmed (Llama 3 and Gemma
    templates apply `| trim`), whichever is followed by the template's next markup."""
    for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
        if text.startswith(candidate, at) and text.startswith(markup_after, at + len(candidate)):
            return candidate
    raise _rewritten()


def _rewritten() -> ChatTemplateError:
    return ChatTemplateError("the chat template rewrites message content (beyond trimming whitespace), so its "
                             "markup cannot be told apart from the content; this base cannot take chat messages, "
                             "send `prompt` instead")


def text_token_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized as plain text: by the tokenizer's model alone, so that no added token (special or
    not) is matched in it. Tokenizers without a `tokenizers` backend split their special tokens."""
    if not text:
        return []
    backend = _plain_backend(tokenizer)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return backend.encode(text, add_special_tokens=False).ids


def _plain_backend(tokenizer) -> Tokenizer | None:
    plain = _PLAIN_BACKENDS.get(tokenizer)
    if plain is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        spec.update(added_tokens=[], truncation=None, padding=None)
        plain = Tokenizer.from_str(json.dumps(spec))
        _PLAIN_BACKENDS[tokenizer] = plain
    return plain
