"""Chat messages -> prompt text, through the base tokenizer's own chat template (as HF `generate` users do).

Messages are checked before rendering (count, roles, total characters), so a request cannot make the
template engine do unbounded work. Rendering runs off the event loop (the caller's executor).
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256


class NoChatTemplate(RuntimeError):
    """The base tokenizer has no chat template (a FAILED_PRECONDITION: the request is fine, the base cannot)."""


class ChatTemplateError(ValueError):
    """The template refused the conversation (e.g. roles in an order it does not accept)."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


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
        total += len(message.content)
    if total > max_chars:
        raise ValueError(f"the messages have {total} characters of content; at most {max_chars} are accepted "
                         "(the model's context bounds it)")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt text for `messages`, ending with the template's assistant turn opener. The text already
    holds the template's special tokens (e.g. <|im_start|>), so tokenize it without adding more."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("the base model has no chat template; send `prompt` with the text to continue")
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:  # includes the template's own raise_exception(...)
        raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None
