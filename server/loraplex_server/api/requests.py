"""The request path's own request and result types, free of any transport: each front end decodes its wire
format into these and encodes the results back."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex_adapters.manifest import Manifest
from loraplex_server.api.chat_template import ChatMessage
from loraplex_server.api.logprobs import ChoiceResult, TokenLogprob
from loraplex_server.api.structured import StructuredInput
from loraplex_server.api.tools import ToolCall, ToolsInput
from loraplex_server.engine.engine import Classification

__all__ = ["AdapterView", "Call", "ChatMessage", "ClassifyInput", "ClassifyOutput", "GenerateInput",
           "GenerationResult", "SamplingInput"]


@dataclass(frozen=True)
class Call:
    """Who calls, through which method: what auth, metrics and the access log need."""

    method: str  # the metrics label: an RPC name (Classify) or an HTTP one (http_chat_completions)
    token: str | None = None  # the bearer token sent, if any


@dataclass(frozen=True)
class SamplingInput:
    """Sampling values as the client sent them; None for max_tokens means the default."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its top k alternatives
    n: int = 1  # choices of the prompt
    logprobs_field: str = "top_logprobs"  # the wire's names of those two, in refusals
    n_field: str = "n"


@dataclass(frozen=True)
class ClassifyInput:
    adapter: str  # `name` or `name@version`
    texts: list[str]
    field: str = "texts"  # the wire's name for the texts, in refusals ("texts[2] is empty")


@dataclass
class ClassifyOutput:
    key: str  # the adapter version that answered, `name@version`
    manifest: Manifest
    results: list[Classification]
    prompt_tokens: int


@dataclass(frozen=True)
class GenerateInput:
    adapter: str | None  # `name`, `name@version`, or None for the base model alone
    prompt: str = ""  # text to continue, or
    messages: tuple[ChatMessage, ...] = ()  # a chat, rendered with the base's chat template
    sampling: SamplingInput = field(default_factory=SamplingInput)
    longest_by_default: bool = False  # no max_tokens means as many as allowed (OpenAI), not the short default
    prompt_field: str = "prompt"
    structured: StructuredInput | None = None  # what the output must match (api/structured.py)
    tools: ToolsInput | None = None  # functions the model may call (api/tools.py); needs messages


@dataclass
class GenerationResult:
    """A whole generation (unary calls)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # eos, stop, length
    prompt_tokens: int
    completion_tokens: int  # of every choice
    logprobs: list[TokenLogprob] | None = None  # choice 0's, when asked
    choices: list[ChoiceResult] = field(default_factory=list)  # every choice, in index order
    tool_calls: list[ToolCall] = field(default_factory=list)  # then finish_reason is "tool_calls" and text ""


@dataclass
class AdapterView:
    """A registered adapter version and where it is now."""

    manifest: Manifest
    residency: str  # device, host or disk
    pinned: bool


@dataclass(frozen=True)
class UploadInput:
    """What precedes an upload's archive bytes."""

    name: str
    size_bytes: int
    sha256: str  # of the archive, lowercase hex
    labels: list[str]
    base_fingerprint: str = ""
    metrics_json: str = ""
