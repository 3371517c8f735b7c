"""Upload validation reads a frozen snapshot of the base's shapes, never the live (engine-owned) model."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from torch import nn

from loraplex_adapters.peft_folder import (
    AdapterFormatError,
    ClassificationHead,
    LoraAdapter,
    LoraModuleWeights,
    load_peft_folder,
)
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.lora.base_shapes import BaseShapes

Q = "model.layers.0.self_attn.q_proj"


def engine_for(base_dir) -> Engine:
    return Engine(load_base_model(base_dir, quantize="none", dtype="float32", device="cpu"), max_adapters=2)


def lora(name: str, rank: int, inp: int, out: int, head: ClassificationHead | None = None) -> LoraAdapter:
    return LoraAdapter({name: LoraModuleWeights(torch.zeros(rank, inp), torch.zeros(out, rank), 1.0)}, head)


def refusal(validate, adapter: LoraAdapter) -> str:
    with pytest.raises(AdapterFormatError) as info:
        validate(adapter)
    return str(info.value)


def test_snapshot_ignores_layers_wrapped_after_it(tiny):
    base_dir, adapters = tiny("llama")
    engine = engine_for(base_dir)
    shapes = engine.slots.shapes
    before = pickle.dumps(shapes)
    bad = lora(Q, 4, 32, 64)  # q_proj is 64 -> 64
    other = load_peft_folder(adapters["gen_all_r8"][0])
    message = refusal(shapes.validate, bad)

    engine.load_adapter("a", adapters["gen_qv_r4"][0])  # wraps q_proj and v_proj in the live model
    assert type(engine.base.model.get_submodule(Q)).__name__ == "BatchedLoraLinear"
    assert pickle.dumps(shapes) == before
    assert f"{Q}.base_layer" not in shapes.linear and f"{Q}.base_layer" not in shapes.other
    shapes.validate(other)  # still fits
    assert refusal(shapes.validate, bad) == message
    assert refusal(engine.slots.validate, bad) == message  # the slot table delegates to the same snapshot
    engine.load_adapter("b", adapters["gen_all_r8"][0])


def test_snapshot_is_plain_data(tiny):
    shapes = engine_for(tiny("llama")[0]).slots.shapes
    for field in dataclasses.fields(shapes):
        value = getattr(shapes, field.name)
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else [value]
        assert not any(isinstance(item, (nn.Module, torch.Tensor)) for item in items)
    copy = pickle.loads(pickle.dumps(shapes))
    assert copy == shapes and copy.linear[Q] == (64, 64)


def test_refusals_name_the_problem(tiny):
    shapes = engine_for(tiny("llama")[0]).slots.shapes
    assert "does not exist in the base model" in refusal(shapes.validate, lora("model.layers.0.nope", 2, 64, 64))
    assert "is a LlamaRMSNorm, not a linear layer" in refusal(shapes.validate, lora("model.norm", 2, 64, 64))
    head = ClassificationHead("classifier", torch.zeros(3, 64), None)
    assert "does not fit this base, which uses `score`" in refusal(shapes.validate, lora(Q, 2, 64, 64, head))
    head = ClassificationHead("score", torch.zeros(3, 32), None)
    assert "head input 32, base hidden size 64" in refusal(shapes.validate, lora(Q, 2, 64, 64, head))
    shapes.validate(lora(Q, 2, 64, 64, ClassificationHead("score", torch.zeros(3, 64), None)))


def test_bert_prefix_and_gpt2_conv1d(tiny):
    bert = BaseShapes.capture(load_base_model(tiny("bert")[0], quantize="none", dtype="float32",
                                              device="cpu").model, "classifier", 64)
    query = "encoder.layer.0.attention.self.query"
    assert bert.path(f"bert.{query}") == query and bert.path(query) == query
    gpt2 = engine_for(tiny("gpt2")[0]).slots.shapes
    assert gpt2.linear["transformer.h.0.attn.c_attn"] == (64, 192)  # Conv1D: weight is [in, out]
