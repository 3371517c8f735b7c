"""Random mixed batches against PEFT (hypothesis): random ranks 1-64, random target modules, alpha and
rsLoRA, generation and classification adapters side by side, random prompt lengths, arrival steps and
step budgets. Every generation row gets exactly PEFT's greedy tokens for its adapter alone, every
classification row PEFT's probabilities, and one packed forward PEFT's logits (fp32, today's
tolerances: 1e-4 absolute)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_engine_vs_peft import peft_reference, reference_model, tensor

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import ClassifyRequest, Engine, GenerationRequest
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE, AdapterSpec, make_adapter

TOL = 1e-4
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB_IDS = st.integers(5, 300)  # the tiny tokenizer's ids past its special tokens

adapter_spec = st.builds(
    lambda rank, targets, labels, alpha, rslora: (rank, tuple(sorted(targets)), labels, alpha, rslora),
    st.integers(1, 64), st.sets(st.sampled_from(LLAMA_MODULES), min_size=1, max_size=7),
    st.sampled_from([0, 0, 2, 3, 6]), st.sampled_from([1, 8, 16, 32]), st.booleans())
row = st.fixed_dictionaries({
    "adapter": st.integers(0, 3),  # an index into the example's adapters; past the end = the base model
    "prompt": st.lists(VOCAB_IDS, min_size=1, max_size=40),
    "arrival": st.integers(0, 6),
    "new_tokens": st.integers(1, 10),
})
batch = st.fixed_dictionaries({
    "adapters": st.lists(adapter_spec, min_size=1, max_size=3, unique_by=lambda s: s[:3]),
    "rows": st.lists(row, min_size=2, max_size=6),
    "budget": st.sampled_from([None, 3, 7, 16]),
})


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """The tiny Llama base, its engine-side loader, and adapters and PEFT references built once per spec."""
    base_dir, _ = tiny("llama")
    root = tmp_path_factory.mktemp("random_adapters")
    folders, references = {}, {}

    def folder(spec):
        if spec not in folders:
            rank, targets, labels, alpha, rslora = spec
            name = f"a{len(folders)}"
            folders[spec] = make_adapter(base_dir, root / name, AdapterSpec(name, rank, list(targets), labels,
                                                                             alpha, rslora), seed=len(folders))
        return folders[spec]

    def reference(spec):
        if spec not in references:
            references[spec] = reference_model(base_dir, "none") if spec is None else \
                peft_reference(base_dir, folder(spec), "none", cls_labels=spec[2])
        return references[spec]

    return base_dir, folder, reference


def engine_with(world, specs, budget) -> Engine:
    base_dir, folder, _ = world
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=4,
                    max_batch_tokens=budget)
    for i, spec in enumerate(specs):
        engine.load_adapter(f"r{i}", folder(spec), labels=[f"l{j}" for j in range(spec[2])] or None)
    return engine


def run_steps(engine: Engine, rows, specs) -> tuple[dict[int, list[int]], dict[int, list[float]]]:
    """Submit each row at its arrival step; return generated tokens and classification scores by row."""
    tokens: dict[int, list[int]] = {}
    scores: dict[int, list[float]] = {}
    errors = []
    arrivals: dict[int, list[int]] = {}
    for index, r in enumerate(rows):
        arrivals.setdefault(r["arrival"], []).append(index)
    row_of: dict[str, int] = {}  # engine request id -> row index
    step = 0
    while step <= max(arrivals) or engine.has_work:
        for index in arrivals.get(step, []):
            r, name = rows[index], _name(rows[index], specs)
            if name is not None and specs[r["adapter"]][2]:
                request = ClassifyRequest([r["prompt"]], name)
                engine.submit_classify(request)
            else:
                tokens[index] = []
                request = GenerationRequest(r["prompt"], name, SamplingParams(max_new_tokens=r["new_tokens"]))
                engine.submit(request)
            row_of[request.request_id] = index
        output = engine.step()
        for e in output.events:
            if e.token_id is not None:
                tokens[row_of[e.request_id]].append(e.token_id)
        for done in output.classified:
            errors.append(done.error) if done.error else scores.__setitem__(
                row_of[done.request_id], list(done.results[0].scores.values()))
        step += 1
        assert step < 500
    assert not errors, errors
    return tokens, scores


def _name(r, specs) -> str | None:
    return f"r{r['adapter']}" if r["adapter"] < len(specs) else None


def _spec(r, specs):
    return specs[r["adapter"]] if r["adapter"] < len(specs) else None


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(example=batch)
def test_random_mixed_batches_match_peft(world, example):
    specs, rows = example["adapters"], example["rows"]
    _, _, reference = world
    engine = engine_with(world, specs, example["budget"])
    tokens, scores = run_steps(engine, rows, specs)
    event(f"{len(tokens)} generation and {len(scores)} classification rows")
    event(f"highest rank {max(spec[0] for spec in specs) // 16 * 16}+")
    generation = list(tokens)
    with torch.no_grad():
        for index, r in enumerate(rows):
            spec, prompt = _spec(r, specs), tensor([r["prompt"]])
            if index in scores:
                want = reference(spec)(prompt).logits[0].float().softmax(-1).cpu()
                torch.testing.assert_close(torch.tensor(scores[index]), want, atol=TOL, rtol=0)
                continue
            want = reference(spec).generate(prompt, max_new_tokens=r["new_tokens"], do_sample=False,
                                            pad_token_id=0)[0, prompt.shape[1]:]
            assert tokens[index] == want.tolist(), f"row {index} ({spec})"  # both end at EOS or the length
        # And one packed forward of every generation row's whole prompt: logits as PEFT's.
        prompts = [rows[i]["prompt"] for i in generation]
        got = engine.logits(prompts, [_name(rows[i], specs) for i in generation]) if generation else []
        for i, logits in zip(generation, got, strict=True):
            want = reference(_spec(rows[i], specs))(tensor([rows[i]["prompt"]])).logits[0].float()
            torch.testing.assert_close(logits.cpu(), want.cpu(), atol=TOL, rtol=0, msg=lambda m, i=i: f"row {i}: {m}")
