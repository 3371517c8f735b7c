"""Adapters the engine cannot serve faithfully are refused with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex_adapters.peft_folder import AdapterFormatError, load_peft_folder
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.lora.slot_table import SlotsFullError
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


BAD_MANIFESTS = [  # (id, manifest fields) each refused by publish and by read_manifest alike
    ("empty label", {"labels": ["", "x", "y"]}),
    ("duplicate labels", {"labels": ["a", "a", "a"]}),
    ("control char label", {"labels": ["a", "b\n", "c"]}),
    ("257-char label", {"labels": ["x" * 257, "y", "z"]}),
    ("4097 labels", {"labels": [f"l{i}" for i in range(4097)]}),
    ("label not a string", {"labels": [1, 2, 3]}),
    ("name trailing newline", {"name": "sentiment\n"}),
    ("name with slash", {"name": "a/b"}),
    ("name dot-dot", {"name": "a..b"}),
    ("name not a string", {"name": 7}),
    ("metrics not an object", {"metrics": [1]}),
]


@pytest.mark.parametrize("fields", [case[1] for case in BAD_MANIFESTS], ids=[case[0] for case in BAD_MANIFESTS])
def test_publish_and_read_manifest_refuse_the_same_manifests(llama, tmp_path, fields):
    from loraplex_adapters.manifest import MANIFEST_FILE, read_manifest
    from loraplex_adapters.store import AdapterStore

    source = llama[1]["cls3_r2"][0]
    store = AdapterStore(tmp_path / "store")
    name, labels = fields.get("name", "ok"), fields.get("labels", ["a", "b", "c"])
    with pytest.raises(AdapterFormatError):
        store.publish(source, name, labels=labels, metrics=fields.get("metrics"))
    assert store.list() == []
    folder = tmp_path / "written"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(json.dumps({"name": "ok", "version": 1, "labels": ["a", "b", "c"], **fields}))
    with pytest.raises(AdapterFormatError):
        read_manifest(folder)


def test_a_published_manifest_reads_back_equal(llama, tmp_path):
    from loraplex_adapters.manifest import read_manifest
    from loraplex_adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    published = store.publish(llama[1]["cls3_r2"][0], "x" * 128, labels=["n\u00e9g", "neu", "p" * 256],
                              metrics={"acc": 0.5, "nested": {"a": [1, 2]}})
    _, folder = store.resolve(published.name)
    assert read_manifest(folder).to_dict() == published.to_dict()


@pytest.mark.parametrize("module", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                    "model.layers.10.self_attn.q_proj", "q_proj", "xq_proj"])
def test_pattern_keys_match_as_peft_does(module):
    """Plain keys matched as literal dotted suffixes pick the same key as PEFT's regex match."""
    from peft.utils.other import get_pattern_key

    from loraplex_adapters.lora_config import pattern_value

    patterns = {"down_proj": 1, "layers.1.self_attn.q_proj": 2, "q_proj": 3, "model.layers.10.self_attn.q_proj": 4}
    expected = get_pattern_key(list(patterns), module)
    assert pattern_value(patterns, module, default=-1) == patterns.get(expected, -1)


def test_a_regex_pattern_key_is_refused_without_running_it(adapter_copy):
    edit_config(adapter_copy, alpha_pattern={"(a|aa)+$x" + "a" * 50: 4})
    with pytest.raises(AdapterFormatError, match="not a plain module name"):
        load_peft_folder(adapter_copy)


def test_shapes_and_rank_are_checked_before_any_tensor_data_is_read(adapter_copy):
    """check_shapes sees meta tensors (no data), and a rank over max_rank is refused from the header."""
    seen = []
    load_peft_folder(adapter_copy, check_shapes=lambda adapter: seen.extend(
        m.A.device.type for m in adapter.modules.values()))
    assert seen and set(seen) == {"meta"}
    with pytest.raises(AdapterFormatError, match="rank 4 is above the server's max rank 2"):
        load_peft_folder(adapter_copy, max_rank=2, check_shapes=lambda adapter: pytest.fail("checked after rank"))


def test_refusal_messages_name_files_not_server_paths(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterFormatError) as refused:
        load_peft_folder(adapter_copy)
    assert str(adapter_copy.parent) not in str(refused.value) and "adapter_config.json" in str(refused.value)
