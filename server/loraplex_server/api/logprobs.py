"""Engine logprobs (token ids and floats) -> what clients read: each token's text and exact bytes, and the
choices of an n > 1 generation collected from their interleaved events.

A token's bytes: for byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) the token's own bytes, which
may be part of a UTF-8 character; otherwise the UTF-8 of its decoded text. Its text is those bytes
decoded, or, for a token that is part of a character, `bytes:` and the bytes escaped (`bytes:\\xe2\\x80`),
as OpenAI writes such tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from loraplex_server.engine.logprobs import TokenLogprobs
from loraplex_server.engine.sequence import TokenEvent


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: bytes
    top: list[TokenLogprob] = field(default_factory=list)  # most probable first; theirs are empty


@dataclass
class ChoiceResult:
    """One of a generation's n choices, whole."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable characters standing for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTES = _byte_decoder()


class TokenTexts:
    """Token id -> (text, bytes) for one tokenizer, remembered (a vocabulary is bounded)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, tuple[str, bytes]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = set(tokenizer.all_special_ids)

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        known = self._known.get(token_id)
        if known is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if self._byte_level and piece and token_id not in self._special and all(c in _BYTES for c in piece):
                raw = bytes(_BYTES[c] for c in piece)
            else:
                raw = self.tokenizer.decode([token_id]).encode("utf-8")
            known = self._known[token_id] = (_text(raw), raw)
        return known

    def describe(self, logprobs: TokenLogprobs) -> TokenLogprob:
        described = self._token(logprobs.token_id, logprobs.logprob)
        described.top = [self._token(token_id, value) for token_id, value in logprobs.top]
        return described

    def _token(self, token_id: int, logprob: float) -> TokenLogprob:
        text, raw = self(token_id)
        return TokenLogprob(token_id, text, logprob, raw)


def _text(raw: bytes) -> str:
    """The token's text; a token that is not whole UTF-8 (part of a character) as OpenAI writes it,
    `bytes:\\xe2\\x80`, so tokens with different bytes never share a text."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@lru_cache(maxsize=4)
def token_texts(tokenizer) -> TokenTexts:
    """The one TokenTexts of a tokenizer (its cache is shared by every request)."""
    return TokenTexts(tokenizer)


def collect_choices(events: list[TokenEvent], n: int, texts: TokenTexts | None) -> list[ChoiceResult]:
    """The n choices of a generation's events (choice i's events carry index i), in index order."""
    choices = [ChoiceResult(i, "", [], None, [] if texts is not None else None) for i in range(n)]
    parts: list[list[str]] = [[] for _ in range(n)]
    for event in events:
        choice = choices[event.index]
        parts[event.index].append(event.text)
        if event.token_id is not None:
            choice.token_ids.append(event.token_id)
            if texts is not None and event.logprobs is not None:
                choice.logprobs.append(texts.describe(event.logprobs))
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
    for choice, text in zip(choices, parts, strict=True):
        choice.text = "".join(text)
    return choices
