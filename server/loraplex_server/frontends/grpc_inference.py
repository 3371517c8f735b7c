"""gRPC InferenceService (loraplex.v1): protobuf <-> api.requests, and the request path in between."""

from __future__ import annotations

from collections.abc import AsyncIterator

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from loraplex_server.api.chat_template import MAX_CALLS_PER_MESSAGE
from loraplex_server.api.embeddings import EmbedInput
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.logprobs import ChoiceResult, TokenLogprob
from loraplex_server.api.request_path import RequestPath
from loraplex_server.api.requests import ChatMessage, ClassifyInput, GenerateInput, SamplingInput
from loraplex_server.api.structured import StructuredInput
from loraplex_server.api.tools import ToolCall, ToolsInput
from loraplex_server.frontends.grpc_calls import abort_for, call_of

FINISH_REASONS = {"eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "tool_calls": pb.FINISH_REASON_TOOL_CALLS}


def generate_input(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> GenerateInput:
    s = request.sampling
    sampling = SamplingInput(max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
                             temperature=s.temperature, top_p=s.top_p if s.HasField("top_p") else 1.0,
                             top_k=s.top_k, stop=tuple(s.stop), seed=s.seed if s.HasField("seed") else None,
                             logprobs=s.logprobs.top_logprobs if s.HasField("logprobs") else None,
                             n=s.n if s.HasField("n") else 1, logprobs_field="sampling.logprobs.top_logprobs",
                             n_field="sampling.n")
    return GenerateInput(request.adapter or None, request.prompt, tuple(map(_message, request.messages)), sampling,
                         structured=structured_input(s), tools=tools_input(request))


def _message(message: pb.ChatMessage) -> ChatMessage:
    if len(message.tool_calls) > MAX_CALLS_PER_MESSAGE:  # bounded before they are copied
        raise InvalidRequest(f"a message has {len(message.tool_calls)} tool calls; at most {MAX_CALLS_PER_MESSAGE}",
                             "messages")
    calls = tuple(ToolCall(c.id, c.name, c.arguments_json) for c in message.tool_calls)
    return ChatMessage(message.role, message.content, calls, message.tool_call_id)


def tools_input(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> ToolsInput | None:
    if not request.tools_json:
        if request.tool_choice not in ("", "auto", "none"):
            raise InvalidRequest("tool_choice needs tools_json", "tool_choice")
        return None
    parallel = not request.HasField("parallel_tool_calls") or request.parallel_tool_calls
    return ToolsInput(request.tools_json, request.tool_choice or None, "tools_json", parallel)


def _calls(calls: list[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments) for c in calls]


def structured_input(sampling: pb.SamplingParameters) -> StructuredInput | None:
    """SamplingParameters.structured as the request path's constraint (None when unset)."""
    if not sampling.HasField("structured"):
        return None
    kind = sampling.structured.WhichOneof("kind")
    where = f"sampling.structured.{kind}" if kind else "sampling.structured"
    if kind == "choice":
        return StructuredInput("choice", list(sampling.structured.choice.choices), where)
    if kind == "json_object" and not sampling.structured.json_object:
        kind = None  # false asks for nothing: refused as an empty constraint
    return StructuredInput(kind or "", getattr(sampling.structured, kind) if kind else None, where)


def token_logprobs(logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob, bytes=t.bytes,
                            top_logprobs=token_logprobs(t.top)) for t in logprobs or ()]


def choices(results: list[ChoiceResult]) -> list[pb.Choice]:
    """Every choice of an n > 1 generation; none for n = 1 (the response's own fields are the one choice)."""
    if len(results) < 2:
        return []
    return [pb.Choice(index=c.index, text=c.text, token_ids=c.token_ids, completion_tokens=len(c.token_ids),
                      finish_reason=FINISH_REASONS.get(c.finish_reason, 0), logprobs=token_logprobs(c.logprobs))
            for c in results]


class InferenceService(pb_grpc.InferenceServiceServicer):
    def __init__(self, path: RequestPath) -> None:
        self.path = path

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        try:
            output = await self.path.classify(call_of(context, "Classify"),
                                              ClassifyInput(request.adapter, list(request.texts)))
        except Exception as exc:
            await abort_for(context, exc)
        return pb.ClassifyResponse(results=[
            pb.Classification(label=r.label, score=r.score,
                              scores=[pb.LabelScore(label=k, score=v) for k, v in r.scores.items()])
            for r in output.results])

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        try:
            result = await self.path.generate_whole(call_of(context, "Generate"), generate_input(request))
        except Exception as exc:
            await abort_for(context, exc)
        return pb.GenerateResponse(text=result.text, token_ids=result.token_ids,
                                   finish_reason=FINISH_REASONS.get(result.finish_reason, 0),
                                   prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                                   logprobs=token_logprobs(result.logprobs), choices=choices(result.choices),
                                   tool_calls=_calls(result.tool_calls))

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            generation = await self.path.generate(call_of(context, "GenerateStream"), generate_input(request))
        except Exception as exc:
            await abort_for(context, exc)
        calls = generation.tool_parser.stream() if generation.tool_parser else None
        try:
            n = generation.request.params.n
            tokens = [0] * n  # per choice, for each choice's GenerationDone
            async for event in generation.events():
                if event.token_id is not None:
                    tokens[event.index] += 1
                    logprobs = generation.logprobs(event)
                    text = calls.feed(event.text) if calls is not None else event.text  # n is 1 with tools
                    yield pb.GenerateStreamResponse(delta=pb.TokenDelta(
                        text=text, token_ids=[event.token_id], index=event.index,
                        logprobs=token_logprobs([logprobs] if logprobs else None)))
                if event.finished or (n > 1 and event.finish_reason is not None):
                    rest, called = calls.end() if calls is not None else ("", [])
                    if rest:
                        yield pb.GenerateStreamResponse(delta=pb.TokenDelta(text=rest))
                    yield pb.GenerateStreamResponse(done=pb.GenerationDone(
                        finish_reason=FINISH_REASONS.get("tool_calls" if called else event.finish_reason, 0),
                        prompt_tokens=generation.prompt_tokens,
                        completion_tokens=generation.completion_tokens if n == 1 else tokens[event.index],
                        index=event.index, tool_calls=_calls(called)))
        except Exception as exc:
            await abort_for(context, exc)
        finally:
            generation.close()

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        try:
            output = await self.path.embed(call_of(context, "Embed"), EmbedInput(
                request.adapter or None, list(request.texts), request.truncate, field="texts"))
        except Exception as exc:
            await abort_for(context, exc)
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in output.vectors.tolist()],
                                prompt_tokens=output.prompt_tokens)
