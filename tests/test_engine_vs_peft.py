"""The mixed-adapter batch must give what PEFT gives for each row's own adapter."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from loraplex_server.engine.base_model import fix_bnb_cpu_fast_path, load_base_model, quantization_config
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [7, 7, 7, 7], [30, 31], [40, 41, 42, 43]]
# bitsandbytes int8 returns float16, so values round at ~1e-3 relative (logits here reach ~10) and a
# batched row rounds differently from the same row alone; on an H200 the largest gap seen was 0.0204.
# On a CPU with native bf16, bitsandbytes' 4-bit CPU kernel multiplies in bf16 (its fast path, on in both the
# engine and the reference), so a batched row differs from the same row alone by ~1e-3 (0.0013 seen).
NF4_CPU_BF16 = TEST_DEVICE == "cpu" and has_avx512bf16()
QUANT_TOL = {"none": 1e-4, "nf4": 4e-3 if NF4_CPU_BF16 else 1e-3, "int8": 3e-2}


def reference_model(base_dir, quantize: str, cls_labels: int = 0, encoder: bool = False):
    kwargs = {"dtype": torch.float32, "device_map": {"": TEST_DEVICE}}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, torch.float32)
    if cls_labels:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=cls_labels, **kwargs)
    elif encoder:
        model = AutoModel.from_pretrained(base_dir, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    fix_bnb_cpu_fast_path(model)
    return model.eval()


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, device=TEST_DEVICE)


def peft_reference(base_dir, adapter_dir, quantize: str, cls_labels: int = 0):
    return PeftModel.from_pretrained(reference_model(base_dir, quantize, cls_labels), adapter_dir).eval()


def engine_for(base_dir, adapters, quantize="none", budget: int | None = None) -> Engine:
    engine = Engine(load_base_model(base_dir, quantize=quantize, dtype="float32", device=TEST_DEVICE), max_adapters=8,
                    max_batch_tokens=budget)
    for name, (folder, spec) in adapters.items():
        engine.load_adapter(name, folder, labels=[f"{name}-{i}" for i in range(spec.num_labels)] or None)
    return engine


def generation_adapters(adapters):
    return [name for name, (_, spec) in adapters.items() if not spec.num_labels]


def classification_adapters(adapters):
    return [name for name, (_, spec) in adapters.items() if spec.num_labels]


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_logits_match_peft(tiny, arch, quantize):
    base_dir, adapters = tiny(arch)
    engine = engine_for(base_dir, adapters, quantize)
    names = generation_adapters(adapters)
    rows = [names[0], names[1], None, names[2], names[0], None]
    assert len({r for r in rows if r}) >= 3 and None in rows
    got = engine.logits(PROMPTS, rows)
    base_ref = reference_model(base_dir, quantize)
    tol = QUANT_TOL[quantize]
    with torch.no_grad():
        for prompt, name, logits in zip(PROMPTS, rows, got, strict=True):
            model = base_ref if name is None else peft_reference(base_dir, adapters[name][0], quantize)
            expected = model(tensor([prompt])).logits[0].float()
            torch.testing.assert_close(logits.cpu(), expected.cpu(), atol=tol, rtol=0,
                                       msg=lambda m, n=name: f"row adapter {n}: {m}")
            if name is not None:  # the adapter must actually change something
                assert (base_ref(tensor([prompt])).logits[0].cpu() - logits.cpu()).abs().max() > 10 * tol


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_classification_matches_peft(tiny, arch, quantize):
    base_dir, adapters = tiny(arch)
    engine = engine_for(base_dir, adapters, quantize)
    names = classification_adapters(adapters)
    rows = [names[i % len(names)] for i in range(len(PROMPTS))]
    got = engine.classify_ids(PROMPTS, rows)
    with torch.no_grad():
        for prompt, name, result in zip(PROMPTS, rows, got, strict=True):
            spec = adapters[name][1]
            model = peft_reference(base_dir, adapters[name][0], quantize, cls_labels=spec.num_labels)
            expected = model(tensor([prompt])).logits[0].float().softmax(-1)
            assert list(result.scores) == [f"{name}-{i}" for i in range(spec.num_labels)]
            torch.testing.assert_close(torch.tensor(list(result.scores.values())), expected.cpu(),
                                       atol=QUANT_TOL[quantize], rtol=0)
            assert result.label == f"{name}-{int(expected.argmax())}"


def test_bert_classification_matches_peft(tiny):
    base_dir, adapters = tiny("bert")
    engine = engine_for(base_dir, adapters)
    names = list(adapters)
    rows = [names[i % len(names)] for i in range(len(PROMPTS))]
    got = engine.classify_ids(PROMPTS, rows)
    with torch.no_grad():
        for prompt, name, result in zip(PROMPTS, rows, got, strict=True):
            model = peft_reference(base_dir, adapters[name][0], "none", cls_labels=adapters[name][1].num_labels)
            expected = model(tensor([prompt])).logits[0].softmax(-1)
            torch.testing.assert_close(torch.tensor(list(result.scores.values())), expected.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("quantize", "budget"), [("none", None), ("none", 3), ("nf4", None), ("nf4", 3),
                                                  ("int8", None)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continuous_batching_greedy_matches_peft_generate(tiny, arch, quantize, budget):
    """Requests arrive at different steps, with different adapters and lengths; each must produce
    exactly the tokens PEFT's own generate gives for it alone (with a budget of 3 tokens a step,
    prompts are prefilled in chunks beside the decoding rows)."""
    base_dir, adapters = tiny(arch)
    engine = engine_for(base_dir, adapters, quantize, budget)
    names = generation_adapters(adapters) + [None]
    max_new = [12, 20, 7, 16, 25, 9]
    arrivals = {0: [0, 1], 3: [2], 5: [3, 4], 9: [5]}  # step -> request indices
    streamed: dict[str, list[int]] = {}
    requests = [GenerationRequest(PROMPTS[i], names[i % len(names)], SamplingParams(max_new_tokens=max_new[i]))
                for i in range(len(PROMPTS))]
    finished, step, batch_sizes = {}, 0, []
    while len(finished) < len(requests):
        for index in arrivals.get(step, []):
            engine.submit(requests[index])
        for event in engine.step().events:
            streamed.setdefault(event.request_id, []).append(event.token_id)
            if event.finished:
                finished[event.request_id] = event
        batch_sizes.append(len(engine.planner.running))
        step += 1
        assert step < 200
    assert max(batch_sizes) >= 3, "requests should have overlapped in the running batch"
    with torch.no_grad():
        for i, request in enumerate(requests):
            model = reference_model(base_dir, quantize) if request.adapter is None else \
                peft_reference(base_dir, adapters[request.adapter][0], quantize)
            prompt = tensor([request.prompt_ids])
            expected = model.generate(prompt, max_new_tokens=max_new[i], do_sample=False)[0, prompt.shape[1]:]
            assert finished[request.request_id].finish_reason in ("eos", "length")
            assert streamed[request.request_id] == expected.tolist(), f"request {i} adapter {request.adapter}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_reused_slot_keeps_nothing_of_its_previous_adapter(tiny, dtype):
    """Freeing a slot leaves its weights in place; the next write must overwrite or clear all of them,
    and a prepared (host tier) adapter must write exactly what its folder does."""
    from loraplex_adapters.peft_folder import load_peft_folder

    base_dir, adapters = tiny("llama")
    small, big = adapters["gen_qv_r4"][0], adapters["gen_all_r8"][0]
    fresh = Engine(load_base_model(base_dir, quantize="none", dtype=dtype, device=TEST_DEVICE), max_adapters=1)
    fresh.load_adapter("small", small)
    want = fresh.logits(PROMPTS, ["small"] * len(PROMPTS))
    reused = Engine(load_base_model(base_dir, quantize="none", dtype=dtype, device=TEST_DEVICE), max_adapters=1)
    reused.load_adapter("big", big)
    reused.unload_adapter("big")
    reused.load_adapter("small", reused.slots.prepare(load_peft_folder(small)))
    for got, expected in zip(reused.logits(PROMPTS, ["small"] * len(PROMPTS)), want, strict=True):
        assert torch.equal(got, expected)


def test_slot_tables_grow_as_adapters_arrive(tiny):
    """Tables start small and double; adapters written before a growth keep their outputs."""
    from loraplex_server.lora import slot_table

    base_dir, adapters = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=40)
    folder = adapters["gen_qv_r4"][0]
    engine.load_adapter("first", folder)
    before = engine.logits(PROMPTS[:2], ["first", None])
    for i in range(slot_table.INITIAL_SLOTS + 5):
        engine.load_adapter(f"copy{i}", folder)
    assert engine.slots.capacity == 2 * slot_table.INITIAL_SLOTS
    after = engine.logits(PROMPTS[:2], ["first", None])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.allclose(engine.logits(PROMPTS[:1], [f"copy{i}"])[0], before[0], atol=1e-5)  # batch of 1
