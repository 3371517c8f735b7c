"""Embeddings on the request path: the request and result types, every bound on the client's input, and the
run (resolve the adapter, tokenize off the event loop, queue the texts into the engine loop).

Inputs are texts or token-id lists (the OpenAI API allows both), at most `Limits.max_embed_inputs` of them
and `Limits.max_embed_tokens` tokens in all. Each input may have at most the model's embedding length: its
sentence-transformers max_seq_length where it has one (256 for MiniLM), else its context. A longer input
is refused with INVALID_ARGUMENT / 400, unless the request sets `truncate`: then it is cut to that length
as sentence-transformers cuts it (a text keeps its final special token). `dimensions` is accepted only
when it equals the model's size: truncating an embedding that was not trained for it (Matryoshka) would
silently lose quality, so it is refused rather than done.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from loraplex_server.api import inputs as bounds
from loraplex_server.api.errors import InvalidRequest

INPUT_KINDS = "a non-empty string or a non-empty list of token ids (integers)"


@dataclass(frozen=True)
class EmbedInput:
    adapter: str | None  # `name`, `name@version`, or None for the base model alone
    inputs: list  # each a text (str) or token ids (list of int), as the client sent them: checked here
    truncate: bool = False  # cut inputs longer than the model's embedding length instead of refusing them
    dimensions: int | None = None  # must equal the model's embedding size when set
    field: str = "input"  # the wire's name for the inputs, in refusals


@dataclass
class EmbedOutput:
    key: str | None  # the adapter version that answered, `name@version`; None for the base
    vectors: torch.Tensor  # [inputs, dimensions] float32 on the CPU, in input order
    prompt_tokens: int


def max_input_tokens(runtime) -> int:
    """The most tokens one input may have: the model's sentence-transformers length, within its context."""
    limit = runtime.pooling.max_tokens
    return min(limit, runtime.max_positions) if limit else runtime.max_positions


def check_inputs(request: EmbedInput, limits: bounds.Limits, runtime) -> None:
    """Count, kind and size of every input, and `dimensions`, before any tokenizing."""
    what, items = request.field, request.inputs
    if not isinstance(items, list) or not items:
        raise InvalidRequest(f"{what} is empty; send at least one input", what)
    if len(items) > limits.max_embed_inputs:
        raise InvalidRequest(f"{what} has {len(items)} inputs; at most {limits.max_embed_inputs} per request", what)
    if not isinstance(request.truncate, bool):
        raise InvalidRequest("truncate must be a boolean", "truncate")
    dimensions = request.dimensions
    if dimensions is not None and (not bounds.is_int(dimensions) or dimensions != runtime.embedding_size):
        raise InvalidRequest(f"this model's embeddings have {runtime.embedding_size} dimensions; leave dimensions "
                             f"out or set it to {runtime.embedding_size}", "dimensions")
    longest, vocab = max_input_tokens(runtime), runtime.vocab_size
    # Refused by length before tokenizing: past the embedding length unless truncating, else the context.
    chars_of = runtime.max_positions if request.truncate else longest
    for i, item in enumerate(items):
        name = f"{what}[{i}]"
        if isinstance(item, str):
            bounds.check_text(item, name, chars_of * bounds.CHARS_PER_TOKEN, chars_of)
        elif isinstance(item, list) and item and all(map(bounds.is_int, item)):
            if not all(0 <= t < vocab for t in item):
                raise InvalidRequest(f"{name} holds a token id outside the vocabulary (0..{vocab - 1})", name)
            if len(item) > longest and not request.truncate:
                raise _too_long(name, len(item), longest)
        else:
            raise InvalidRequest(f"{name} must be {INPUT_KINDS}", name)


async def token_ids(request: EmbedInput, runtime) -> list[list[int]]:
    """Each input's token ids (texts tokenized off the event loop, as sentence-transformers tokenizes them),
    cut or refused past the embedding length."""
    longest = max_input_tokens(runtime)
    texts = [(i, item) for i, item in enumerate(request.inputs) if isinstance(item, str)]
    ids: list[list[int]] = [list(item[:longest]) if not isinstance(item, str) else [] for item in request.inputs]
    if texts:
        kwargs = {"truncation": True, "max_length": longest} if request.truncate else {}
        tokenizer = runtime.tokenizer
        batch = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tokenizer([text for _, text in texts], **kwargs)["input_ids"])
        for (i, _), tokens in zip(texts, batch, strict=True):
            if not tokens:
                raise InvalidRequest(f"{request.field}[{i}] is empty once tokenized", f"{request.field}[{i}]")
            if len(tokens) > longest:
                raise _too_long(f"{request.field}[{i}]", len(tokens), longest)
            ids[i] = tokens
    return ids


def check_total(ids: list[list[int]], limits: bounds.Limits, what: str) -> int:
    total = sum(map(len, ids))
    if total > limits.max_embed_tokens:
        raise InvalidRequest(f"the inputs have {total} tokens in all; at most {limits.max_embed_tokens} per request",
                             what)
    return total


async def embed(request: EmbedInput, limits: bounds.Limits, runtime, key: str | None) -> EmbedOutput:
    """Bounds, tokens, then the engine loop; `key` is the resolved adapter (None: the base)."""
    check_inputs(request, limits, runtime)
    ids = await token_ids(request, runtime)
    total = check_total(ids, limits, request.field)
    return EmbedOutput(key, await runtime.embed(ids, key), total)


def _too_long(name: str, tokens: int, longest: int) -> InvalidRequest:
    return InvalidRequest(f"{name} has {tokens} tokens; this model embeds at most {longest} (set truncate to cut "
                          "longer inputs)", name)
