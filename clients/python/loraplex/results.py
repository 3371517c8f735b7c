"""The SDK's typed results and the request pieces shared by the sync and async clients."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.v1 import inference_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}


@dataclass
class ToolCall:
    """A function call the model made: its id, the function's name, and the arguments (a JSON object's text)."""

    id: str
    name: str
    arguments: str


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
    tool_calls: list[ToolCall] = field(default_factory=list)  # finish_reason "tool_calls"


@dataclass
class GenerationChunk:
    """A streamed piece: new text and token ids; the last chunk has finish_reason and token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[ToolCall] = field(default_factory=list)  # on the last chunk


def _tool_calls(calls) -> list[ToolCall]:
    return [ToolCall(c.id, c.name, c.arguments_json) for c in calls]


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
                      r.completion_tokens, _tool_calls(r.tool_calls))


def chunk(message: pb.GenerateStreamResponse) -> GenerationChunk:
    if message.HasField("delta"):
        return GenerationChunk(message.delta.text, list(message.delta.token_ids))
    done = message.done
    return GenerationChunk(finish_reason=FINISH_REASONS.get(done.finish_reason, ""),
                           prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                           tool_calls=_tool_calls(done.tool_calls))
