"""A copy of a tiny base whose tokenizer has a small chat template, and the text that template renders."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoTokenizer

TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")


def rendered(messages: list[dict]) -> str:
    """What TEMPLATE gives for `messages` plus the assistant's turn start, written out by hand."""
    return "".join(f"<bos>{m['role']}\n{m['content']}<eos>\n" for m in messages) + "<bos>assistant\n"


def chat_base(base: Path, folder: Path) -> Path:
    """Same weights (so the same fingerprint: the store's adapters load), plus the template."""
    shutil.copytree(base, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder
