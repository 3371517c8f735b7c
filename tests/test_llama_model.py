"""Our own Llama-family forward (engine/models/) against the Hugging Face modules and PEFT.

Tiny random Llama and Qwen2 shapes (GQA, tied or untied embeddings, q/k/v bias, attention and MLP
bias, llama3 rope scaling), fp32: packed logits equal HF's to float rounding, generation through the
paged cache (chunked prefill, decode) gives HF's greedy tokens, and mixed adapters per row give PEFT's
own outputs. Where our forward must not run (GPT-2, quantized bases, the switch), the HF path does.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loraplex_server.cpu_ops import cpu_ops
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.models.fused_linear import panel_columns
from loraplex_server.engine.models.llama import LlamaForward
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE, AdapterSpec, make_adapter, write_tokenizer

TOL = 1e-5
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [7], [30, 31]]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)
SHAPES = {
    "llama_gqa_tied": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_tied_bf16": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                            num_hidden_layers=1)),
    "llama_bias_mha": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=4, attention_bias=True,
                                                           mlp_bias=True, head_dim=32)),
    "llama3_rope": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_bias_gqa": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                           intermediate_size=144)),
}
# Weights that are exact bf16 values, as a bf16 checkpoint's: on CPU our forward keeps them in bf16 panels
# (csrc/bf16_linear.cpp; gate/up's 288 columns end in a padded panel). The others stay fp32 [in, out].
BF16_EXACT = {"qwen2_bias_gqa", "llama_tied_bf16"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """name -> a base folder of that shape (random weights, scaled so adapters and tokens matter)."""
    built = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            tok = write_tokenizer(folder)
            model_cls, config_cls, extra = SHAPES[name]
            torch.manual_seed(list(SHAPES).index(name))  # the same weights whatever runs first
            config = config_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                bos_token_id=tok.bos_token_id, **{**COMMON, **extra})
            model = model_cls(config)
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if param.dim() == 2:
                        param.mul_(3.0)
                    elif param_name.endswith("bias"):  # HF starts biases at zero: make them count
                        param.normal_(0, 0.1)
                if not config.tie_word_embeddings:  # logits well apart: greedy choices without near-ties
                    model.lm_head.weight.mul_(4.0)
                if name in BF16_EXACT:
                    for param in model.parameters():
                        param.copy_(param.bfloat16().float())
            model.save_pretrained(folder)
            built[name] = folder
        return built[name]

    return get


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": TEST_DEVICE}).eval()


def engine_for(folder, budget: int | None = None, **kwargs) -> Engine:
    return Engine(load_base_model(folder, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=4,
                  max_batch_tokens=budget, **kwargs)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_packed_logits_equal_hugging_face(shapes, shape):
    folder = shapes(shape)
    engine = engine_for(folder)
    assert isinstance(engine.runner.forward, LlamaForward)
    reference = hf_model(folder)
    got = engine.logits(PROMPTS, [None] * len(PROMPTS))
    with torch.no_grad():
        for prompt, logits in zip(PROMPTS, got, strict=True):
            expected = reference(torch.tensor([prompt], device=TEST_DEVICE)).logits[0]
            torch.testing.assert_close(logits.cpu(), expected.cpu(), atol=TOL, rtol=0)


@pytest.mark.parametrize("budget", [None, 4])
@pytest.mark.parametrize("shape", ["llama_gqa_tied", "qwen2_bias_gqa", "llama3_rope"])
def test_generation_through_the_paged_cache_equals_hugging_face_generate(shapes, shape, budget):
    """Prefill (in chunks of 4 tokens with a budget) and decode through the paged cache, rows joining
    at different steps, give exactly HF's greedy tokens for each prompt alone."""
    folder = shapes(shape)
    engine = engine_for(folder, budget)
    reference = hf_model(folder)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    requests = [GenerationRequest(p, None, params) for p in PROMPTS]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for step in range(200):
        if step < len(requests):
            engine.submit(requests[step])
        for event in engine.step().events:
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
        if step >= len(requests) and not engine.has_work:
            break
    with torch.no_grad():
        for request in requests:
            prompt = torch.tensor([request.prompt_ids], device=TEST_DEVICE)
            expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                          min_new_tokens=24, do_sample=False)[0, prompt.shape[1]:]
            assert_same_or_tie(reference, request.prompt_ids, tokens[request.request_id], expected.tolist())


def assert_same_or_tie(reference, prompt: list[int], got: list[int], expected: list[int]) -> None:
    """Equal greedy tokens, or equal up to a step where HF's own logits tie the two choices (a random
    tiny model can loop into one; float rounding then decides, and either choice is right)."""
    if got == expected:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    logits = reference(torch.tensor([prompt + got[:i]], device=TEST_DEVICE)).logits[0, -1]
    assert abs(float(logits[got[i]] - logits[expected[i]])) < 1e-5, f"token {i}: {got} != {expected}"


@pytest.fixture(scope="module")
def qwen_adapters(shapes, tmp_path_factory):
    folder = shapes("qwen2_bias_gqa")
    root = tmp_path_factory.mktemp("qwen_adapters")
    specs = [AdapterSpec("all_r8", 8, ALL_MODULES, alpha=16), AdapterSpec("kv_r4", 4, ["k_proj", "v_proj"]),
             AdapterSpec("mlp_r2", 2, ["gate_proj", "down_proj"], rslora=True)]
    return folder, {s.name: make_adapter(folder, root / s.name, s, seed) for seed, s in enumerate(specs, start=1)}


@pytest.mark.parametrize("rows", [["all_r8", "kv_r4", None, "mlp_r2", "all_r8"], ["kv_r4"] * 5])
def test_mixed_adapters_per_row_equal_peft(qwen_adapters, rows):
    """Every projection (the fused q/k/v with bias, gate/up) takes each row's own adapter's delta in its
    columns; one adapter for all rows (the single-slot path) too."""
    folder, adapters = qwen_adapters
    engine = engine_for(folder)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    got = engine.logits(PROMPTS, rows)
    base = hf_model(folder)
    with torch.no_grad():
        for prompt, name, logits in zip(PROMPTS, rows, got, strict=True):
            model = base if name is None else PeftModel.from_pretrained(hf_model(folder), adapters[name]).eval()
            expected = model(torch.tensor([prompt], device=TEST_DEVICE)).logits[0]
            torch.testing.assert_close(logits.cpu(), expected.cpu(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("ops", ["compiled", "torch"])
def test_decode_rows_on_mixed_adapters_equal_peft_generate(qwen_adapters, ops):
    """Both step paths: our compiled CPU ops (cpu_ops.py; decode attention reads the paged cache in place)
    and the plain torch ops they replace."""
    folder, adapters = qwen_adapters
    engine = engine_for(folder)
    forward = engine.runner.forward
    assert (forward.ops is not None) == (TEST_DEVICE == "cpu" and cpu_ops() is not None)
    if ops == "torch":
        forward.ops = None
    elif forward.ops is None:
        pytest.skip("the compiled ops run on CPU with a C++ toolchain")
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    rows = ["all_r8", "kv_r4", None, "mlp_r2", "all_r8"]
    out = engine.generate(PROMPTS, rows, SamplingParams(max_new_tokens=12, ignore_eos=True))
    with torch.no_grad():
        for prompt, name, generation in zip(PROMPTS, rows, out, strict=True):
            model = hf_model(folder) if name is None else \
                PeftModel.from_pretrained(hf_model(folder), adapters[name]).eval()
            ids = torch.tensor([prompt], device=TEST_DEVICE)
            expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                      min_new_tokens=12, do_sample=False)[0, len(prompt):]
            assert generation.token_ids == expected.tolist(), name


def test_fused_weights_are_shared_with_the_hugging_face_modules(shapes):
    folder = shapes("llama_bias_mha")
    engine = engine_for(folder)
    layer = engine.runner.forward.layers[0]
    attn = engine.base.model.model.layers[0].self_attn
    fused = layer.qkv.weight
    assert layer.qkv.packed is None, "weights that are not bf16 values stay fp32"
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert attn.v_proj.bias.untyped_storage().data_ptr() == layer.qkv.bias.untyped_storage().data_ptr()
    mlp = engine.base.model.model.layers[1].mlp
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == \
        engine.runner.forward.layers[1].gate_up.weight.untyped_storage().data_ptr()
    # fp32 on CPU: stored [in, out] for x @ W (the members hold transposed views), the head likewise
    transposed = TEST_DEVICE == "cpu"
    assert layer.qkv.transposed == transposed and (fused.shape[0] == attn.q_proj.in_features) == transposed
    assert torch.equal(attn.q_proj.weight, (fused[:, :attn.q_proj.out_features].t() if transposed
                                            else fused[:attn.q_proj.out_features]))


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The fp32 [in, out] weight of bf16 panels."""
    return panel_columns(packed, torch.arange(out_features)).t().float()


def test_bf16_valued_weights_are_kept_once_in_bf16_panels(shapes):
    folder = shapes("qwen2_bias_gqa")
    engine = engine_for(folder)
    reference = hf_model(folder)
    ops = engine.runner.forward.layers[0].qkv.ops
    if ops is None or not ops.bf16_linear_tiled():
        pytest.skip("the bf16 panels need our CPU ops built with AVX-512 (CPU, a C++ toolchain)")
    for ours, theirs in zip(engine.runner.forward.layers, reference.model.layers, strict=True):
        for fused, members in ((ours.qkv, [theirs.self_attn.q_proj, theirs.self_attn.k_proj, theirs.self_attn.v_proj]),
                               (ours.gate_up, [theirs.mlp.gate_proj, theirs.mlp.up_proj]),
                               (ours.down, [theirs.mlp.down_proj])):
            assert fused.weight is None and fused.packed.dtype == torch.bfloat16
            expected = torch.cat([m.weight for m in members]).t()
            assert torch.equal(unpack(fused.packed, fused.out_features), expected)
            bias = 0 if fused.bias is None else fused.bias
            for rows in (1, 3, 4, 7, 40):  # register tiles of 1-4 rows, and many
                x = torch.randn(rows, expected.shape[0])
                torch.testing.assert_close(fused.base(x), x @ expected + bias, atol=TOL, rtol=0)
    engine_attn = engine.base.model.model.layers[0].self_attn
    assert engine_attn.q_proj.weight.is_meta, "the Hugging Face modules keep shapes only"
    with pytest.raises(RuntimeError, match="bf16 panels"):  # and say so rather than multiply garbage
        engine_attn.q_proj(torch.randn(2, engine_attn.q_proj.in_features))


@pytest.mark.parametrize("shape", ["llama_gqa_tied", "qwen2_bias_gqa", "llama_tied_bf16"])
def test_the_head_is_stored_once_for_its_layout(shapes, shape):
    engine = engine_for(shapes(shape))
    model, forward = engine.base.model, engine.runner.forward
    head, tied = forward.head, model.config.tie_word_embeddings
    assert head.transposed == (TEST_DEVICE == "cpu")
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight or not tied
    if head.packed is not None:  # bf16 panels; a tied model looks its embeddings up there
        assert model.get_output_embeddings().weight.is_meta and (forward.embed is None) == tied
        ids = torch.tensor([0, 1, 63, 64, 200, model.config.vocab_size - 1])
        assert torch.equal(forward.embed_rows(ids), hf_model(shapes(shape)).get_input_embeddings()(ids))
    elif head.transposed:  # [hidden, vocab]; the model's head, and the embeddings tied to it, view it
        assert head.weight.shape == model.get_output_embeddings().weight.t().shape
        assert model.get_output_embeddings().weight.data_ptr() == head.weight.data_ptr()
    assert (shape in BF16_EXACT and head.ops is not None and head.ops.bf16_linear_tiled()) == (head.packed is not None)


def test_other_bases_and_the_switch_keep_the_hugging_face_path(tiny, shapes, monkeypatch):
    assert engine_for(tiny("gpt2")[0]).runner.forward is None
    monkeypatch.setenv("LORAPLEX_OWN_FORWARD", "0")
    folder = shapes("llama_gqa_tied")
    hf_path = engine_for(folder)
    assert hf_path.runner.forward is None
    monkeypatch.delenv("LORAPLEX_OWN_FORWARD")
    ours = engine_for(folder)
    for a, b in zip(ours.logits(PROMPTS, [None] * 5), hf_path.logits(PROMPTS, [None] * 5), strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_quantized_base_keeps_the_hugging_face_path(tiny):
    pytest.importorskip("bitsandbytes")
    engine = Engine(load_base_model(tiny("llama")[0], quantize="nf4", dtype="float32", device=TEST_DEVICE))
    assert engine.runner.forward is None


@pytest.mark.slow
def test_embedded_base_greedy_outputs_equal_the_hugging_face_path(monkeypatch):
    """SmolLM2-135M: the same greedy tokens on our forward as on the HF modules (one adapter-free batch)."""
    prompts = [[1, 504, 3458, 282, 260, 1345, 314], [1, 19556, 28, 638, 253, 1345, 30, 2375], [1, 42]]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ours = Engine(load_base_model(None, quantize="none", dtype="float32", device=TEST_DEVICE), max_batch=4,
                  kv_cache_memory=64 << 20)
    assert isinstance(ours.runner.forward, LlamaForward)
    got = [g.token_ids for g in ours.generate(prompts, [None] * 3, params)]
    del ours
    monkeypatch.setenv("LORAPLEX_OWN_FORWARD", "0")
    hf = Engine(load_base_model(None, quantize="none", dtype="float32", device=TEST_DEVICE), max_batch=4,
                kv_cache_memory=64 << 20)
    assert got == [g.token_ids for g in hf.generate(prompts, [None] * 3, params)]
