"""The one request path of every protocol: `classify(call, request)` returns a result, `generate(call, request)`
returns a Generation whose events arrive as an async iterator. Each step is done here once, in this order:
metrics and the access log (around everything), the auth policy, readiness, bounds, adapter resolution
with the task check, tokenizing off the event loop, then admission into the engine loop.

Every request is counted once in metrics (method, bounded adapter label, final status, latency) and
logged once in the access log, whatever its protocol (Observation, below). Front ends (frontends/) only
decode their wire format into api.requests types, call this, and encode the result or the failure (the
status table, api/status.py, maps it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from loraplex_adapters.manifest import Manifest
from loraplex_server.api import embeddings
from loraplex_server.api import inputs as bounds
from loraplex_server.api import structured as constraints
from loraplex_server.api import tools as tool_calls
from loraplex_server.api.auth import TokenPolicy
from loraplex_server.api.errors import BaseLoading, InvalidRequest, ShuttingDown, WrongTask
from loraplex_server.api.inputs import CHARS_PER_TOKEN, Limits, chat_token_ids, text_token_ids
from loraplex_server.api.logprobs import TokenLogprob, TokenTexts, collect_choices, token_texts
from loraplex_server.api.metrics import Metrics
from loraplex_server.api.requests import (
    Call,
    ChatMessage,
    ClassifyInput,
    ClassifyOutput,
    GenerateInput,
    GenerationResult,
)
from loraplex_server.api.serving_runtime import ServingRuntime
from loraplex_server.api.status import code_name
from loraplex_server.engine.sequence import GenerationRequest, TokenEvent

access_log = logging.getLogger("loraplex.access")  # one line per request; off unless `serve --access-log`
T = TypeVar("T")
R = TypeVar("R", ClassifyInput, GenerateInput, embeddings.EmbedInput)
Decode = Callable[[], Awaitable[R]]
OTHER_CALL = {"classification": "Classify", "generation": "Generate"}


class RequestPath:
    def __init__(self, metrics: Metrics, policy: TokenPolicy, limits: Limits | None = None) -> None:
        self.metrics, self.policy = metrics, policy
        self.limits = limits or Limits()
        self.runtime: ServingRuntime | None = None  # set once the base model is loaded
        self.draining = False
        self._generations: set[Generation] = set()

    def attach(self, runtime: ServingRuntime) -> None:
        self.runtime = runtime

    # -- the steps ------------------------------------------------------------------------------

    def ready(self) -> ServingRuntime:
        if self.runtime is None:
            raise BaseLoading("the base model is still loading; retry shortly")
        return self.runtime

    def observe(self, call: Call, reference: str | None) -> Observation:
        runtime = self.runtime
        return Observation(self.metrics, call.method, reference,
                           runtime.known if runtime is not None else lambda _: False)

    async def observed(self, call: Call, reference: str | None, work: Callable[[ServingRuntime], Awaitable[T]],
                       admin: bool = False) -> T:
        """Run `work` after auth and readiness, counted and logged as one request."""
        return await self._answered(call, reference, None, lambda runtime, _: work(runtime), admin)

    async def _answered(self, call: Call, reference: str | None, request: R | Decode[R] | None,
                        work: Callable[[ServingRuntime, R], Awaitable[T]], admin: bool = False) -> T:
        """`work` on the request after auth and readiness (a body is decoded only once both passed), counted
        and logged as one request."""
        observation = self.observe(call, reference)
        try:
            self.policy.check(call.token, admin)
            runtime = self.ready()
            result = await work(runtime, await _decoded(request, observation))
        except BaseException as exc:
            observation.finish(exc)
            raise
        observation.finish()
        return result

    def max_chars(self, runtime: ServingRuntime) -> int:
        return runtime.max_positions * CHARS_PER_TOKEN

    async def adapter(self, runtime: ServingRuntime, reference: str, task: str | None) -> tuple[str, Manifest]:
        """The key and manifest of a registered adapter (read off the event loop), checked for `task`."""
        key, manifest = await runtime.resolve(bounds.check_unicode(reference, "adapter"))
        actual = manifest.extra.get("task")
        if task is not None and actual != task:
            raise WrongTask(f"adapter {key} is a {actual} adapter; use {OTHER_CALL.get(actual, 'another call')}")
        return key, manifest

    # -- classification -------------------------------------------------------------------------

    async def classify(self, call: Call, request: ClassifyInput | Decode[ClassifyInput]) -> ClassifyOutput:
        """`request`, or a function that decodes it once auth and readiness passed (an HTTP body)."""
        return await self._answered(call, getattr(request, "adapter", None), request, self._classify)

    async def _classify(self, runtime: ServingRuntime, request: ClassifyInput,
                        resolved: tuple[str, Manifest] | None = None) -> ClassifyOutput:
        if not request.adapter:
            raise WrongTask("classification needs a classification adapter; set `adapter`")
        key, manifest = resolved or await self.adapter(runtime, request.adapter, "classification")
        bounds.check_texts(request.texts, request.field, self.limits.max_texts, self.max_chars(runtime),
                           runtime.max_positions)
        names = [f"{request.field}[{i}]" for i in range(len(request.texts))]
        ids = await text_token_ids(runtime.tokenizer, request.texts, runtime.max_positions, names)
        results = await runtime.classify(ids, key)
        return ClassifyOutput(key, manifest, results, sum(map(len, ids)))

    # -- embeddings ------------------------------------------------------------------------------

    async def embed(self, call: Call, request: embeddings.EmbedInput | Decode[embeddings.EmbedInput]
                    ) -> embeddings.EmbedOutput:
        """Embeddings of texts or token-id lists on the base or an adapter of any task (its LoRA applies; a
        head is unused); `request` may be a function that decodes it once auth and readiness passed."""
        return await self._answered(call, getattr(request, "adapter", "") or "", request, self._embed)

    async def _embed(self, runtime: ServingRuntime, request: embeddings.EmbedInput) -> embeddings.EmbedOutput:
        key = (await self.adapter(runtime, request.adapter, None))[0] if request.adapter else None
        return await embeddings.embed(request, self.limits, runtime, key)

    # -- generation ------------------------------------------------------------------------------

    async def generate(self, call: Call, request: GenerateInput | Decode[GenerateInput]) -> Generation:
        """Check, resolve, tokenize and queue a generation; its events follow through the result. A refusal
        raises here, before any event (so an HTTP stream can still answer with its status). `request` may
        be a function that decodes it once auth and readiness passed."""
        observation = self.observe(call, getattr(request, "adapter", "") or "")
        try:
            self.policy.check(call.token)
            runtime = self.ready()
            request = await _decoded(request, observation)
            return await self._start(runtime, request, observation)
        except BaseException as exc:
            observation.finish(exc)
            raise

    async def generate_whole(self, call: Call, request: GenerateInput | Decode[GenerateInput]) -> GenerationResult:
        """A generation collected whole (unary calls); the caller leaving cancels its row."""
        return await (await self.generate(call, request)).collect()

    async def _start(self, runtime: ServingRuntime, request: GenerateInput, observation: Observation) -> Generation:
        key = (await self.adapter(runtime, request.adapter, "generation"))[0] if request.adapter else None
        params = bounds.sampling(request.sampling, self.limits, request.longest_by_default)
        tools, structured = self._tools(request)
        if params.n > 1 and (tools is not None or structured is not None):  # one grammar and one parse per request
            raise InvalidRequest("n > 1 cannot be combined with tools or a constraint on the output; send n "
                                 "requests", request.sampling.n_field)
        if structured is not None:
            constraints.constraint(structured)  # bounds first: refused before tokenizing
        prompt_ids = await self._prompt_ids(runtime, request, tools)
        grammar = await constraints.compiled(runtime.engine, structured) if structured else None
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        generation = GenerationRequest(prompt_ids, key, params, grammar=grammar)
        events = await runtime.submit(generation)
        return Generation(self, runtime, generation, events, observation, tools.parser if tools else None)

    @staticmethod
    def _tools(request: GenerateInput) -> tuple[tool_calls.PreparedTools | None, constraints.StructuredInput | None]:
        """The checked tools, and the constraint on the output: the client's, or the call tool_choice enforces."""
        if request.tools is None:
            return None, request.structured
        tools = tool_calls.prepare(request.tools)
        if not request.messages:
            raise InvalidRequest("tools need a chat (messages), not a prompt", request.tools.field)
        if tools.structured is None:
            return tools, request.structured
        if request.structured is not None:
            raise InvalidRequest("a tool_choice that requires a call already constrains the output; drop the "
                                 "other constraint", "tool_choice")
        return tools, tools.structured

    async def _prompt_ids(self, runtime: ServingRuntime, request: GenerateInput,
                          tools: tool_calls.PreparedTools | None = None) -> list[int]:
        """Exactly one of a raw prompt and chat messages (with the tools, when given)."""
        if request.prompt and request.messages:
            raise InvalidRequest("set either prompt or messages, not both")
        context, max_chars = runtime.max_positions, self.max_chars(runtime)
        if request.messages:
            bounds.checked_messages(list(request.messages), max_chars)  # before the tool turns are rewritten
            messages, specs = self._chat(runtime.tokenizer, request, tools)
            return await chat_token_ids(runtime.tokenizer, messages, context, max_chars, specs)
        if not request.prompt:
            raise InvalidRequest("prompt is empty; set prompt (text to continue) or messages (a chat)",
                                 request.prompt_field)
        bounds.check_text(request.prompt, request.prompt_field, max_chars, context)
        return (await text_token_ids(runtime.tokenizer, [request.prompt], context, [request.prompt_field]))[0]

    @staticmethod
    def _chat(tokenizer, request: GenerateInput, tools: tool_calls.PreparedTools | None
              ) -> tuple[list[ChatMessage], list[dict] | None]:
        """The messages and tool specs to render: the template's own markup where it renders tools and tool
        turns (their client text checked for control text), plain text in the messages where it does not."""
        messages, specs = list(request.messages), None
        if tool_calls.renders_tool_turns(tokenizer):
            tool_calls.check_markup_safe(tokenizer, tool_calls.tool_turns_markup(messages), "messages")
        else:
            messages = tool_calls.plain_tool_turns(messages)
        if tools is not None and tool_calls.supports_tools(tokenizer):
            tool_calls.check_markup_safe(tokenizer, tools.specs, "tools")
            specs = tools.specs
        elif tools is not None:
            messages = tool_calls.with_tools_message(messages, tools.specs)
        return messages, specs

    # -- OIP: a model whose task picks the request's shape ----------------------------------------

    async def infer(self, call: Call, reference: str,
                    decode: Callable[[str, Manifest], ClassifyInput | GenerateInput]
                    ) -> tuple[Manifest, ClassifyOutput | GenerationResult]:
        """Resolve `reference`, let `decode(task, manifest)` build the request its task takes, and run it."""
        async def work(runtime: ServingRuntime):
            key, manifest = await self.adapter(runtime, reference, None)
            request = decode(manifest.extra.get("task"), manifest)
            if isinstance(request, ClassifyInput):
                return manifest, await self._classify(runtime, request, (key, manifest))
            observation = self.observe(Call(call.method), None)
            observation.done = True  # this call is counted once, by `observed`
            generation = await self._start(runtime, GenerateInput(key, request.prompt, request.messages,
                                                                  request.sampling, request.longest_by_default,
                                                                  request.prompt_field, request.structured),
                                           observation)
            return manifest, await generation.collect()
        return await self.observed(call, reference, work)

    async def model(self, call: Call, reference: str) -> Manifest:
        """A registered adapter's manifest (auth and readiness checked, not counted as a request)."""
        self.policy.check(call.token)
        return (await self.adapter(self.ready(), reference, None))[1]

    async def models(self, call: Call) -> tuple[str, list[Manifest]]:
        """The base's id and every registered adapter version, in (name, version) order."""
        async def work(runtime: ServingRuntime):
            return runtime.base_id, await runtime.in_store_thread(runtime.store.list)
        return await self.observed(call, None, work)

    # -- shutdown --------------------------------------------------------------------------------

    async def end_generations(self, grace: float) -> None:
        """Give running generations `grace` seconds; the ones still running then end with ShuttingDown
        (an error event on a stream, UNAVAILABLE / 503 on a call), not a cut connection."""
        deadline = time.monotonic() + grace
        while self._generations and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        for generation in list(self._generations):
            generation.stop(ShuttingDown("the server is shutting down; the generation was stopped"))
        while self._generations and time.monotonic() < deadline + 5:  # let their codecs write the ending
            await asyncio.sleep(0.01)


async def _decoded(request: R | Decode[R], observation: Observation) -> R:
    if callable(request):
        request = await request()
        observation.reference = request.adapter or ""
    return request


class Generation:
    """A queued generation: `events()` yields its token events; leaving early (cancel, disconnect,
    deadline) or `close()` frees its row. Counted in metrics when it ends."""

    def __init__(self, path: RequestPath, runtime: ServingRuntime, request: GenerationRequest,
                 events: asyncio.Queue[TokenEvent], observation: Observation,
                 tool_parser: tool_calls.CallParser | None = None) -> None:
        self._path, self._runtime, self.request, self._queue = path, runtime, request, events
        self._observation = observation
        self.tool_parser = tool_parser  # set when it may call functions: its output is parsed for calls
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._finished = False
        self._ended = False
        self._stopped: BaseException | None = None
        self._started = time.perf_counter()
        path._generations.add(self)

    def stop(self, error: BaseException) -> None:
        """End the generation with `error` at its next event (shutdown)."""
        self._stopped = error
        self._queue.put_nowait(TokenEvent(self.request.request_id, None, "", True, "cancelled", error))

    async def events(self) -> AsyncIterator[TokenEvent]:
        metrics = self._path.metrics
        tokens = metrics.tokens.labels(metrics.adapter_label(self.request.adapter))
        error: BaseException | None = None
        try:
            while not self._finished:
                event = await self._queue.get()
                self._finished = event.finished
                if event.error is not None:
                    raise event.error
                if event.token_id is not None:
                    tokens.inc()
                    if self.completion_tokens == 0:
                        metrics.first_token.observe(time.perf_counter() - self._started)
                    self.completion_tokens += 1
                if event.finished:
                    self.finish_reason = event.finish_reason
                yield event
        except (GeneratorExit, asyncio.CancelledError):  # the consumer left: counted as CANCELLED
            error = asyncio.CancelledError()
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end(error if error is not None or self._finished else asyncio.CancelledError())

    async def collect(self) -> GenerationResult:
        events = []
        try:
            async for event in self.events():
                events.append(event)
        finally:
            self.close()
        choices = collect_choices(events, self.request.params.n, self.token_texts)
        first = choices[0]
        calls = self.tool_parser.parse(first.text) if self.tool_parser else []  # n is 1 with tools
        if calls:
            return GenerationResult("", first.token_ids, "tool_calls", self.prompt_tokens, self.completion_tokens,
                                    first.logprobs, choices, calls)
        return GenerationResult(first.text, first.token_ids, first.finish_reason, self.prompt_tokens,
                                self.completion_tokens, first.logprobs, choices)

    @property
    def token_texts(self) -> TokenTexts | None:
        """Token texts and bytes for this generation's logprobs; None when it did not ask for them."""
        return token_texts(self._runtime.tokenizer) if self.request.params.logprobs is not None else None

    def logprobs(self, event: TokenEvent) -> TokenLogprob | None:
        """An event's logprobs with token texts (streaming codecs); None when not asked."""
        texts = self.token_texts
        return texts.describe(event.logprobs) if texts is not None and event.logprobs is not None else None

    def close(self) -> None:
        """Free the row if it still runs (idempotent; codecs call it when their response ends)."""
        self._end(asyncio.CancelledError())

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._path._generations.discard(self)
        if not self._finished or self._stopped is not None:
            self._runtime.cancel(self.request.request_id)
        self._observation.finish(error)


class Observation:
    """One request, from arrival to its last byte; `finish` is idempotent (the first call counts)."""

    def __init__(self, metrics: Metrics, method: str, reference: str | None, known: Callable[[str], bool]) -> None:
        self.metrics, self.method, self.reference, self._known = metrics, method, reference, known
        self.started = time.perf_counter()
        self.done = False

    def adapter_label(self) -> str:
        """The bounded label: none (a call about no single adapter), base, the name, other or unknown."""
        if self.reference is None:
            return "none"
        name = self.reference.split("@")[0]
        if not name:
            return "base"
        return self.metrics.adapter_label(name) if self._known(name) else "unknown"

    def finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        seconds = time.perf_counter() - self.started
        code = code_name(error)
        self.metrics.latency.labels(self.method).observe(seconds)
        self.metrics.requests.labels(self.method, self.adapter_label(), code).inc()
        # %r: the reference is the client's text, so a newline in it cannot forge a log line.
        access_log.info("%s adapter=%r status=%s %.1f ms", self.method, self.reference or "", code, 1000 * seconds)
