"""The OpenAI embeddings API (`POST /v1/embeddings`): its request body -> api.embeddings.EmbedInput, and its
result -> OpenAI's list of embedding objects (floats, or base64 of little-endian float32, which the `openai`
package asks for by default). `truncate` (a boolean) is our extension; `dimensions` is accepted only at
the model's own size (api/embeddings.py says why)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from loraplex_server.api.embeddings import EmbedInput, EmbedOutput
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.inputs import is_int
from loraplex_server.frontends.openai_schema import check_fields

EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "truncate"}
ENCODINGS = ("float", "base64")


@dataclass
class EmbeddingsBody:
    model: str
    request: EmbedInput  # its adapter is `model` as sent: the API maps the base's id to None
    encoding_format: str = "float"


def parse_embeddings(body: dict) -> EmbeddingsBody:
    """Shapes only: a string, a list of strings, a list of token ids, or a list of those lists. What each item
    holds (kinds, sizes, ids, counts) is checked on the request path."""
    check_fields(body, EMBEDDING_FIELDS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a non-empty string", "model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidRequest("user must be a string", "user")
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise InvalidRequest("encoding_format must be float or base64", "encoding_format")
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    elif isinstance(inputs, list) and inputs and all(map(is_int, inputs)):
        inputs = [inputs]  # one input as token ids
    if not isinstance(inputs, list):
        raise InvalidRequest("input must be a string, a list of strings, a list of token ids, or a list of "
                             "token-id lists", "input")
    truncate = body.get("truncate", False)
    return EmbeddingsBody(model, EmbedInput(model, inputs, truncate, body.get("dimensions")), encoding)


def embeddings_response(output: EmbedOutput, model: str, encoding: str) -> dict:
    vectors = output.vectors
    if encoding == "base64":
        rows = vectors.numpy().astype("<f4", copy=False)
        data = [base64.b64encode(np.ascontiguousarray(row).tobytes()).decode("ascii") for row in rows]
    else:
        data = vectors.tolist()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": output.prompt_tokens, "total_tokens": output.prompt_tokens}}
