"""The SDK's typed results and the request pieces shared by the sync and async clients."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.v1 import inference_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationChunk:
    """A streamed piece: new text and token ids; the last chunk has finish_reason and token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Embeddings:
    """One embedding per input text, in order, and the tokens they took (after truncation)."""

    vectors: list[list[float]]
    prompt_tokens: int

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, index: int) -> list[float]:
        return self.vectors[index]


def sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, stop: list[str] | None,
             seed: int | None) -> pb.SamplingParameters:
    params = pb.SamplingParameters(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                   stop=stop or [])
    if seed is not None:
        params.seed = seed
    return params


def classifications(response: pb.ClassifyResponse) -> list[Classification]:
    return [Classification(r.label, r.score, {s.label: s.score for s in r.scores}) for r in response.results]


def generation(r: pb.GenerateResponse) -> Generation:
    return Generation(r.text, list(r.token_ids), FINISH_REASONS.get(r.finish_reason, ""), r.prompt_tokens,
                      r.completion_tokens)


def chunk(message: pb.GenerateStreamResponse) -> GenerationChunk:
    if message.HasField("delta"):
        return GenerationChunk(message.delta.text, list(message.delta.token_ids))
    done = message.done
    return GenerationChunk(finish_reason=FINISH_REASONS.get(done.finish_reason, ""),
                           prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)


def embeddings(response: pb.EmbedResponse) -> Embeddings:
    return Embeddings([list(e.values) for e in response.embeddings], response.prompt_tokens)
