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
class TokenLogprob:
    """A token's log-probability under the distribution it was sampled from (after temperature, top-k,
    top-p; greedy: the raw logits), with the most probable tokens at its position in `top` (their own
    `top` is empty). `bytes` are the token's exact bytes; `token` their text."""

    token_id: int
    token: str
    logprob: float
    bytes: bytes
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Choice:
    """One of the n choices of a generation."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int  # of every choice
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked (choice 0's)
    choices: list[Choice] = field(default_factory=list)  # every choice (n >= 1), in index order
    tool_calls: list[ToolCall] = field(default_factory=list)  # finish_reason "tool_calls"


@dataclass
class GenerationChunk:
    """A streamed piece: new text and token ids; the last chunk has finish_reason and token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0  # the choice it belongs to (n > 1: each choice has its own last chunk)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # on the last chunk


@dataclass
class Embeddings:
    """One embedding per input text, in order, and the tokens they took (after truncation)."""

    vectors: list[list[float]]
    prompt_tokens: int

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, index: int) -> list[float]:
        return self.vectors[index]


def _tool_calls(calls) -> list[ToolCall]:
    return [ToolCall(c.id, c.name, c.arguments_json) for c in calls]


def sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, stop: list[str] | None,
             seed: int | None, logprobs: bool = False, top_logprobs: int = 0, n: int = 1) -> pb.SamplingParameters:
    """top_logprobs > 0 implies logprobs."""
    params = pb.SamplingParameters(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                   stop=stop or [])
    if seed is not None:
        params.seed = seed
    if logprobs or top_logprobs:
        params.logprobs.top_logprobs = top_logprobs
    if n != 1:
        params.n = n
    return params


def token_logprobs(entries) -> list[TokenLogprob]:
    return [TokenLogprob(t.token_id, t.token, t.logprob, t.bytes, token_logprobs(t.top_logprobs)) for t in entries]


def classifications(response: pb.ClassifyResponse) -> list[Classification]:
    return [Classification(r.label, r.score, {s.label: s.score for s in r.scores}) for r in response.results]


def generation(r: pb.GenerateResponse) -> Generation:
    logprobs = token_logprobs(r.logprobs)
    choices = [Choice(c.index, c.text, list(c.token_ids), FINISH_REASONS.get(c.finish_reason, ""),
                      token_logprobs(c.logprobs)) for c in r.choices]
    finish = FINISH_REASONS.get(r.finish_reason, "")
    return Generation(r.text, list(r.token_ids), finish, r.prompt_tokens, r.completion_tokens, logprobs,
                      choices or [Choice(0, r.text, list(r.token_ids), finish, logprobs)],
                      _tool_calls(r.tool_calls))


def chunk(message: pb.GenerateStreamResponse) -> GenerationChunk:
    if message.HasField("delta"):
        delta = message.delta
        return GenerationChunk(delta.text, list(delta.token_ids), index=delta.index,
                               logprobs=token_logprobs(delta.logprobs))
    done = message.done
    return GenerationChunk(finish_reason=FINISH_REASONS.get(done.finish_reason, ""),
                           prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, index=done.index,
                           tool_calls=_tool_calls(done.tool_calls))


def embeddings(response: pb.EmbedResponse) -> Embeddings:
    return Embeddings([list(e.values) for e in response.embeddings], response.prompt_tokens)
