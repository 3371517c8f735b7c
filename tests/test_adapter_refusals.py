"""Adapters the engine cannot serve faithfully are refused with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex_adapters.peft_folder import AdapterFormatError, load_peft_folder
from loraplex_server.base_model import load_base_model
from loraplex_server.engine import Engine
from loraplex_server.slot_table import SlotsFullError
from tiny_models import AdapterSpec, make_adapter


@pytest.fixture
def llama(tiny):
    return tiny("llama")


@pytest.fixture
def engine(llama):
    return Engine(load_base_model(llama[0], quantize="none", dtype="float32", device="cpu"), max_adapters=2)


@pytest.fixture
def adapter_copy(llama, tmp_path):
    source = llama[1]["gen_qv_r4"][0]
    target = tmp_path / "adapter"
    shutil.copytree(source, target)
    return target


def edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def edit_weights(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def first_key(tensors, part):
    return next(k for k in tensors if part in k)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda f: edit_config(f, use_dora=True), "DoRA"),
    (lambda f: edit_config(f, bias="all"), "bias"),
    (lambda f: edit_config(f, peft_type="IA3"), "IA3"),
    (lambda f: edit_config(f, lora_bias=True), "LoRA bias"),
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "adapter_model.bin").write_bytes(b"pickle"), "pickle"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage"), "unreadable"),
    (lambda f: edit_weights(f, lambda t: t.__setitem__(
        "base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 10))), "embedding"),
    (lambda f: edit_weights(f, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64))), "DoRA"),
    (lambda f: edit_weights(f, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.ones(64))), "bias"),
    (lambda f: edit_weights(f, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", torch.ones(64))), "unsupported weights"),
    (lambda f: edit_weights(f, lambda t: t.__setitem__(
        first_key(t, "lora_A"), torch.full_like(t[first_key(t, "lora_A")], float("nan")))), "NaN"),
    (lambda f: edit_weights(f, lambda t: t.__setitem__(
        first_key(t, "lora_A"), t[first_key(t, "lora_A")].to(torch.int32))), "non-float"),
    (lambda f: edit_weights(f, lambda t: t.pop(first_key(t, "lora_B"))), "lora_B must both"),
])
def test_bad_adapter_folder_is_refused(adapter_copy, engine, mutate, message):
    mutate(adapter_copy)
    with pytest.raises(AdapterFormatError, match=message):
        engine.load_adapter("bad", adapter_copy)
    assert engine.adapters == {} and engine.slots.free_slots == 2


def test_target_module_missing_from_base_is_refused(adapter_copy, engine):
    def rename(tensors):
        for key in [k for k in tensors if "q_proj" in k]:
            tensors[key.replace("q_proj", "nonexistent_proj")] = tensors.pop(key)
    edit_weights(adapter_copy, rename)
    with pytest.raises(AdapterFormatError, match="nonexistent_proj does not exist"):
        engine.load_adapter("bad", adapter_copy)


def test_shape_mismatch_is_refused(adapter_copy, engine):
    edit_weights(adapter_copy, lambda t: t.update({k: torch.zeros(4, 32) for k in t if "q_proj.lora_A" in k}))
    with pytest.raises(AdapterFormatError, match="shape mismatch.*q_proj"):
        engine.load_adapter("bad", adapter_copy)


def test_adapter_for_another_base_width_is_refused(tiny, engine, tmp_path):
    gpt2_base, _ = tiny("gpt2")
    folder = make_adapter(gpt2_base, tmp_path / "gpt2_adapter", AdapterSpec("x", 4, ["c_attn"]), seed=3)
    with pytest.raises(AdapterFormatError, match="does not exist in the base"):
        engine.load_adapter("other", folder)


def test_slots_full_and_reuse_after_unload(llama, engine):
    adapters = llama[1]
    engine.load_adapter("a", adapters["gen_qv_r4"][0])
    engine.load_adapter("b", adapters["gen_all_r8"][0])
    with pytest.raises(SlotsFullError):
        engine.load_adapter("c", adapters["gen_mlp_r2"][0])
    engine.unload_adapter("a")
    engine.load_adapter("c", adapters["gen_mlp_r2"][0])
    # the reused slot must hold only c's weights: a's q/v deltas must be gone
    fresh = Engine(load_base_model(llama[0], quantize="none", dtype="float32", device="cpu"), max_adapters=2)
    fresh.load_adapter("c", adapters["gen_mlp_r2"][0])
    prompt = [[5, 6, 7, 8]]
    torch.testing.assert_close(engine.logits(prompt, ["c"])[0], fresh.logits(prompt, ["c"])[0], atol=1e-5, rtol=0)


def test_parsed_adapter_reports_ranks_and_scaling(llama):
    adapter = load_peft_folder(llama[1]["gen_mlp_r2"][0])
    ranks = {name.rsplit(".", 1)[-1]: w.rank for name, w in adapter.modules.items()}
    assert ranks == {"down_proj": 2, "up_proj": 6}
    scaling = {name.rsplit(".", 1)[-1]: w.scaling for name, w in adapter.modules.items()}
    assert scaling == {"down_proj": 4 / 2, "up_proj": 16 / 6}
    assert adapter.task == "generation" and adapter.max_rank == 6
