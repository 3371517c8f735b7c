"""KServe's Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`), on the same port and
request path (api/request_path.py) as our InferenceService: this module only decodes and encodes tensors.

A model is an adapter: `name` (its latest version), `name@version`, or `name` plus `model_version`.
- classification adapters: input `text` BYTES [N] -> `label` BYTES [N], `probabilities` FP32 [N, L]
  (columns in the order of the labels ModelMetadata lists on `probabilities`), or with Triton's
  classification parameter on `probabilities` (tritonclient's class_count=k) its top k classes as
  BYTES [N, k] "probability:index:label";
- generation adapters: input `text_input` BYTES [1] and request parameters max_tokens, temperature,
  top_p, top_k, seed, stop -> `text_output` BYTES [1] (Triton's generate extension naming).
The base model alone is not a model here (an adapter may be named anything, "base" too); it is
served by our own API and the OpenAI-compatible one. Outputs go back as raw_output_contents.

The stubs share the package `inference` with tritonclient's: never import both in one process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata

import grpc

from loraplex.oip import grpc_predict_v2_pb2 as pb
from loraplex.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from loraplex_adapters.manifest import Manifest
from loraplex_server.api.errors import InvalidRequest, WrongTask
from loraplex_server.api.request_path import RequestPath
from loraplex_server.api.requests import ClassifyInput, ClassifyOutput, GenerateInput, GenerationResult
from loraplex_server.frontends.grpc_calls import abort_for, call_of
from loraplex_server.frontends.oip_parameters import sampling_input
from loraplex_server.frontends.oip_tensors import (
    decode_texts,
    pack_bytes,
    pack_fp32,
    split_bytes,
    texts_of_shape,
    top_classes,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
BYTES, FP32 = "BYTES", "FP32"
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class ModelTask:
    platform: str
    input_name: str
    outputs: tuple[str, ...]


CLASSIFICATION = ModelTask("loraplex_classification", "text", ("label", "probabilities"))
GENERATION = ModelTask("loraplex_generation", "text_input", ("text_output",))
TASKS = {"classification": CLASSIFICATION, "generation": GENERATION}


def _server_version() -> str:
    try:
        return metadata.version("loraplex")
    except metadata.PackageNotFoundError:
        return "unknown"


def _reference(name: str, version: str) -> str:
    """The adapter reference a model name and version stand for."""
    if not name:
        raise InvalidRequest("the model name is empty; name an adapter (`name` or `name@version`)")
    if len(name) > MAX_NAME_CHARS or len(version) > MAX_NAME_CHARS:
        raise InvalidRequest(f"model names and versions have at most {MAX_NAME_CHARS} characters")
    if not version:
        return name
    if "@" in name:
        raise InvalidRequest("give the version either in the model name (name@version) or as model_version")
    if not version.isdigit():
        raise InvalidRequest(f"model version {version!r} is not a version number")
    return f"{name}@{version}"


def _task(manifest: Manifest) -> ModelTask:
    kind = manifest.extra.get("task")
    task = TASKS.get(kind)
    if task is None:
        raise WrongTask(f"adapter {manifest.name}@{manifest.version} has task {kind!r}, which this protocol does "
                        "not serve")
    return task


def _class_count(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    """The `classification` parameter of a requested output (tritonclient's class_count), on probabilities."""
    unknown = sorted(set(output.parameters) - {"classification"})
    if unknown:
        raise InvalidRequest(f"output {output.name}: unknown output parameter {unknown[0][:MAX_NAME_CHARS]!r}")
    if not output.parameters:
        return 0
    count = _parameter_value(output.parameters["classification"])
    if output.name != "probabilities":
        raise InvalidRequest(f"output {output.name}: the classification parameter applies to probabilities only")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidRequest(f"output probabilities: classification must be an integer >= 1, got {count!r}")
    return count


def _parameter_value(parameter: pb.InferParameter) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


class OpenInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, path: RequestPath) -> None:
        self.path = path

    # -- health and metadata --------------------------------------------------------------------

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.path.runtime is not None)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        try:
            self.path.policy.check(call_of(context, "ServerMetadata").token)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.ServerMetadataResponse(name="loraplex", version=_server_version(),
                                         extensions=["classification", "parameters"])

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """Ready = registered, fits this base and has a task we serve; it loads on demand. An unknown
        model is not ready (as Triton answers), not an error."""
        try:
            reference = _reference(request.name, request.version)
            _task(await self.path.model(call_of(context, "ModelReady"), reference))
        except (InvalidRequest, PermissionError) as exc:
            await abort_for(context, exc)
        except Exception:  # loading, not registered, another base, a malformed name, a task we do not serve
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        try:
            manifest = await self.path.model(call_of(context, "ModelMetadata"),
                                             _reference(request.name, request.version))
            task = _task(manifest)
            _, manifests = await self.path.models(call_of(context, "ModelMetadata"))
        except Exception as exc:
            await abort_for(context, exc)
        versions = [str(m.version) for m in manifests if m.name == manifest.name]
        return pb.ModelMetadataResponse(name=manifest.name, versions=versions, platform=task.platform,
                                        inputs=[self._input_metadata(task)],
                                        outputs=self._output_metadata(task, manifest.labels))

    # -- inference --------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        wanted: dict[str, int] = {}

        def decode(kind: str, manifest: Manifest) -> ClassifyInput | GenerateInput:
            task = _task(manifest)
            wanted.update(self._requested_outputs(request, task))
            texts = self._input_texts(request, task)
            if task is CLASSIFICATION:
                if request.parameters:
                    raise InvalidRequest("a classification model takes no request parameters")
                return ClassifyInput(manifest.name, texts, "text")
            parameters = {name: _parameter_value(value) for name, value in request.parameters.items()}
            return GenerateInput(manifest.name, texts[0], sampling=sampling_input(parameters),
                                 prompt_field="text_input")

        try:
            reference = _reference(request.model_name, request.model_version)
            manifest, output = await self.path.infer(call_of(context, "ModelInfer"), reference, decode)
        except Exception as exc:
            await abort_for(context, exc)
        outputs = self._classified(output, manifest.labels, wanted) if isinstance(output, ClassifyOutput) \
            else self._generated(output)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(manifest.version),
                                         id=request.id)
        for name in wanted:
            datatype, shape, raw = outputs[name]
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        return response

    @staticmethod
    def _classified(output: ClassifyOutput, labels: list[str], wanted: dict[str, int]) -> dict:
        results = output.results
        rows = [[r.scores[label] for label in labels] for r in results]
        outputs = {"label": (BYTES, [len(results)], pack_bytes([r.label.encode() for r in results])),
                   "probabilities": (FP32, [len(results), len(labels)], pack_fp32([p for row in rows for p in row]))}
        count = wanted.get("probabilities", 0)
        if count:  # Triton's classification extension: the top classes instead of the whole row
            count = min(count, len(labels))
            outputs["probabilities"] = (BYTES, [len(results), count], pack_bytes(top_classes(rows, labels, count)))
        return outputs

    @staticmethod
    def _generated(result: GenerationResult) -> dict:
        return {"text_output": (BYTES, [1], pack_bytes([result.text.encode()]))}

    # -- decoding ---------------------------------------------------------------------------------

    def _input_texts(self, request: pb.ModelInferRequest, task: ModelTask) -> list[str]:
        if len(request.inputs) != 1:
            raise InvalidRequest(f"{len(request.inputs)} inputs; this model takes one, {task.input_name!r}")
        tensor = request.inputs[0]
        if tensor.name != task.input_name:
            other = next((t for t in TASKS.values() if t.input_name == tensor.name), None)
            if other is not None:
                kind = "classification" if task is CLASSIFICATION else "generation"
                raise WrongTask(f"model {request.model_name} is a {kind} adapter: send input "
                                f"{task.input_name!r} (BYTES), not {tensor.name!r}")
            raise InvalidRequest(f"unknown input {tensor.name[:MAX_NAME_CHARS]!r}; this model takes "
                                 f"{task.input_name!r} (BYTES)")
        if tensor.datatype != BYTES:
            raise InvalidRequest(f"input {tensor.name} must have datatype BYTES, got {tensor.datatype[:32]!r}")
        if tensor.parameters:
            raise InvalidRequest(f"input {tensor.name} takes no parameters")
        max_count = self.path.limits.max_texts if task is CLASSIFICATION else 1
        count = texts_of_shape(tensor.shape, tensor.name, max_count)
        return decode_texts(self._elements(request, count), tensor.name)

    @staticmethod
    def _elements(request: pb.ModelInferRequest, count: int) -> list[bytes]:
        tensor = request.inputs[0]
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidRequest(f"{len(request.raw_input_contents)} raw_input_contents for one input")
            if tensor.HasField("contents"):
                raise InvalidRequest("send an input's data in raw_input_contents or in contents, not both")
            return split_bytes(request.raw_input_contents[0], count, tensor.name)
        contents = tensor.contents
        others = [f.name for f, _ in contents.ListFields() if f.name != "bytes_contents"]
        if others:
            raise InvalidRequest(f"input {tensor.name} is BYTES: its data goes in bytes_contents, not {others[0]}")
        if len(contents.bytes_contents) != count:
            raise InvalidRequest(f"input {tensor.name} has shape [{count}] but {len(contents.bytes_contents)} "
                                 "elements in bytes_contents")
        return list(contents.bytes_contents)

    @staticmethod
    def _requested_outputs(request: pb.ModelInferRequest, task: ModelTask) -> dict[str, int]:
        """Output name -> the classes asked for with Triton's `classification` parameter (0: none)."""
        if not request.outputs:
            return dict.fromkeys(task.outputs, 0)
        names: dict[str, int] = {}
        for output in request.outputs:
            if output.name not in task.outputs:
                raise InvalidRequest(f"unknown output {output.name[:MAX_NAME_CHARS]!r}; this model has "
                                     f"{', '.join(task.outputs)}")
            if output.name in names:
                raise InvalidRequest(f"output {output.name} is requested twice")
            names[output.name] = _class_count(output)
        return names

    @staticmethod
    def _input_metadata(task: ModelTask) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=task.input_name, datatype=BYTES,
                                                       shape=[-1] if task is CLASSIFICATION else [1])

    @staticmethod
    def _output_metadata(task: ModelTask, labels: list[str]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        if task is GENERATION:
            return [tensor(name="text_output", datatype=BYTES, shape=[1])]
        probabilities = tensor(name="probabilities", datatype=FP32, shape=[-1, len(labels)])
        probabilities.parameters["labels"].string_param = json.dumps(labels)
        return [tensor(name="label", datatype=BYTES, shape=[-1]), probabilities]


def add_open_inference_service(server: grpc.aio.Server, path: RequestPath) -> str:
    """Serve the protocol on `server`; returns its full service name (for reflection)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInferenceService(path), server)
    return SERVICE_NAME
