"""Incremental detokenizing and stop strings, at a cost per token that does not grow with the output.

Decoding the whole output every token (and searching it for stop strings) is quadratic in its length.
Instead, as vLLM and Hugging Face's TextStreamer do, decode only a small window: the tokens that gave
the previous piece of text (the context, so the tokenizer sees the same neighbours: leading-space rules,
byte fallback) plus the tokens not yet turned into text. The new text is what the window decodes to past
what its context alone decodes to. While that ends in "\\ufffd" (the tail of a multi-byte character still
to come) nothing is released: the same rule as "wait while decode(all ids) ends in \\ufffd".

Matches `tokenizer.decode(ids, skip_special_tokens=True)` for byte-level BPE and SentencePiece-style
tokenizers; a tokenizer with `clean_up_tokenization_spaces` may differ where a cleanup rule straddles a
window edge (vLLM has the same limit).
"""

from __future__ import annotations

# A run of held tokens longer than this (bytes that never complete a character, or skipped special tokens
# inside such a run) is split so the window stays small; a UTF-8 character spans at most 4 bytes.
_MAX_HELD = 8
_KEEP_HELD = 4


class IncrementalDetokenizer:
    """Token ids in, new stable text out; keeps the text so far as pieces (no quadratic re-joining)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # context tokens, then tokens not yet turned into text
        self._read = 0  # len(context) in _window
        self._context_text = ""  # decode(_window[:_read])
        self._held = ""  # settled text of a long held run, released with the rest of it
        self._pieces: list[str] = []
        self._length = 0
        self._joined: str | None = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character or stop is pending)."""
        self._window.append(token_id)
        text = self._decode(self._window)
        if text.endswith("\ufffd"):
            if len(self._window) - self._read > _MAX_HELD:
                self._settle(text)
            return ""
        new = self._held + text[len(self._context_text):]
        self._held = ""
        if not new:  # tokens without text (skipped specials): drop them, they change no later decode
            del self._window[self._read:]
            return ""
        # The tokens just read become the next context.
        del self._window[:self._read]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        self._append(new)
        return new

    def _settle(self, text: str) -> None:
        """Move the settled front of a long held run into _held, keeping the last few tokens pending.

        A split point is settled when the text before it is a strict prefix of the window's text: later
        bytes can then only extend the unfinished character at the very end, never reach back past it.
        """
        split = len(self._window) - _KEEP_HELD
        before = self._decode(self._window[:split])
        if not (len(text) > len(before) and text.startswith(before) and before.startswith(self._context_text)):
            return
        context = self._window[split - 1:split]
        context_text = self._decode(context)
        # The new, shorter context must decode the rest exactly as the old window did.
        if self._decode(self._window[split - 1:]) != context_text + text[len(before):]:
            return
        self._held += before[len(self._context_text):]
        self._window = self._window[split - 1:]
        self._read = 1
        self._context_text = context_text

    def _append(self, piece: str) -> None:
        self._pieces.append(piece)
        self._length += len(piece)
        self._joined = None

    def __len__(self) -> int:
        return self._length

    @property
    def text(self) -> str:
        """All text released so far (joined once per change; cheap to read repeatedly)."""
        if self._joined is None:
            self._joined = "".join(self._pieces)
            self._pieces = [self._joined]
        return self._joined

    def tail(self, n: int) -> str:
        """The last n characters, reading only the pieces that hold them."""
        if n <= 0:
            return ""
        parts = []
        for piece in reversed(self._pieces):
            if len(piece) >= n:  # slice, never copy a whole long piece (the text after a .text read is one)
                parts.append(piece[len(piece) - n:])
                break
            parts.append(piece)
            n -= len(piece)
        return "".join(reversed(parts))

    def truncate(self, length: int) -> None:
        """Drop the text after `length` characters (a stop string and what followed it)."""
        while self._length > length:
            piece = self._pieces.pop()
            self._length -= len(piece)
            if self._length < length:
                self._pieces.append(piece[:length - self._length])
                self._length = length
        self._joined = None


def find_stop(tail: str, stops: list[str]) -> int:
    """Index in `tail` of the earliest stop string, or -1.

    The caller passes only the last len(new text) + longest stop - 1 characters: an earlier match would
    have ended before the new text and been found at an earlier token.
    """
    return min((i for i in (tail.find(s) for s in stops) if i >= 0), default=-1)


def pending_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string (held back)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
