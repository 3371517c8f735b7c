"""The adapter format's refusals (a module of its own so every format module can raise them)."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """The folder is not a LoRA adapter we can serve; the message says what to change."""


class AdapterTooLarge(AdapterFormatError):
    """Past a size limit (an upload, an archive member, a file of the folder)."""


def brief(value: object, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: refusals quote client input without echoing megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
