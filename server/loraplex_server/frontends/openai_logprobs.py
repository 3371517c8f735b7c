"""Logprobs in OpenAI's two wire formats: the legacy completions object (tokens, token_logprobs,
top_logprobs, text_offset) and chat's `logprobs.content` list (token, logprob, bytes, top_logprobs)."""

from __future__ import annotations

from loraplex_server.api.logprobs import TokenLogprob


def completion_logprobs(tokens: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The legacy object; text_offset counts characters from `offset` (where these tokens' text starts). A
    token that is part of a character (`bytes:...`) adds no characters."""
    if tokens is None:
        return None
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += text_length(token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{top.token: top.logprob for top in t.top} for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob] | None) -> dict | None:
    if tokens is None:
        return None
    return {"content": [{**_entry(t), "top_logprobs": [_entry(top) for top in t.top]} for t in tokens],
            "refusal": None}


def _entry(token: TokenLogprob) -> dict:
    return {"token": token.token, "logprob": token.logprob, "bytes": list(token.bytes)}


def text_length(token: TokenLogprob) -> int:
    """Characters a token adds to text_offset: its text's; none for part of a character (`bytes:...`)."""
    return 0 if token.token.startswith("bytes:") and not token.bytes.startswith(b"bytes:") else len(token.token)
