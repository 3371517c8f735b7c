"""The engine's step loop: token budget, chunked prefill, KV admission and preemption, mixed row kinds.

Every output is checked against the same request run alone (or PEFT), so scheduling never changes
what a request gets."""

from __future__ import annotations

import pytest
import torch
from test_engine_vs_peft import peft_reference, reference_model, tensor

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import ClassifyRequest, Engine, GenerationRequest
from loraplex_server.engine.kv_cache import bytes_per_token
from loraplex_server.engine.planner import MIN_CHUNK
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

# Prompts of 1 to 90 tokens (the tiny model's context is 128).
PROMPTS = [[5], [6, 7], list(range(10, 40)), [9] * 90, list(range(50, 62)), [30, 31, 32], list(range(100, 160))]


def engine(tiny, budget: int | None = None, kv_tokens: int | None = None, max_batch: int = 64) -> Engine:
    base_dir, adapters = tiny("llama")
    base = load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE)
    memory = kv_tokens * bytes_per_token(base.model.config, base.dtype) if kv_tokens else None
    out = Engine(base, max_adapters=8, max_batch=max_batch, max_batch_tokens=budget, kv_cache_memory=memory)
    for name, (folder, spec) in adapters.items():
        out.load_adapter(name, folder, labels=[f"{name}-{i}" for i in range(spec.num_labels)] or None)
    return out


def requests(params: list[SamplingParams]) -> list[GenerationRequest]:
    names = ["gen_qv_r4", "gen_all_r8", None, "gen_mlp_r2"]
    return [GenerationRequest(PROMPTS[i % len(PROMPTS)], names[i % len(names)], p) for i, p in enumerate(params)]


def collect(output, tokens: dict[str, list[int]]) -> None:
    """Add a step's new tokens to `tokens` (request id -> ids) for the requests it holds."""
    for e in output.events:
        if e.token_id is not None and e.request_id in tokens:
            tokens[e.request_id].append(e.token_id)


def run(eng: Engine, reqs: list[GenerationRequest], budget_check: int | None = None) -> dict[str, list[int]]:
    out = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.submit(r)
    while eng.has_work:
        collect(eng.step(), out)
        if budget_check is not None:
            assert eng.last_step[1] <= budget_check
    return out


def alone(eng: Engine, request: GenerationRequest) -> list[int]:
    copy = GenerationRequest(request.prompt_ids, request.adapter, request.params)
    return run(eng, [copy])[copy.request_id]


def test_chunked_prefill_beside_decoding_rows_matches_peft(tiny):
    """A budget of 5 tokens per step: long prompts are prefilled 5 tokens at a time while the other
    rows keep decoding; every row still gets exactly PEFT's greedy tokens."""
    base_dir, adapters = tiny("llama")
    eng = engine(tiny, budget=5)
    reqs = requests([SamplingParams(max_new_tokens=n) for n in (9, 14, 6, 11, 8, 12, 7)])
    got = run(eng, reqs, budget_check=5)
    with torch.no_grad():
        for r in reqs:
            model = reference_model(base_dir, "none") if r.adapter is None else \
                peft_reference(base_dir, adapters[r.adapter][0], "none")
            prompt = tensor([r.prompt_ids])
            want = model.generate(prompt, max_new_tokens=r.params.max_new_tokens, do_sample=False,
                                  min_new_tokens=r.params.max_new_tokens)[0, prompt.shape[1]:]
            assert got[r.request_id] == want.tolist(), f"{r.adapter} prompt of {len(r.prompt_ids)} tokens"


def test_running_rows_decode_every_step_while_a_long_prompt_is_prefilled(tiny):
    eng = engine(tiny, budget=8)
    short = requests([SamplingParams(max_new_tokens=60, ignore_eos=True) for _ in range(3)])
    short = [GenerationRequest([5, 6], r.adapter, r.params) for r in short]
    tokens = {r.request_id: [] for r in short}
    for r in short:
        eng.submit(r)
    for _ in range(3):
        collect(eng.step(), tokens)
    long = GenerationRequest(list(range(10, 100)), "gen_all_r8", SamplingParams(max_new_tokens=3))
    eng.submit(long)
    steps, first = 0, []
    while not first:
        before = {k: len(v) for k, v in tokens.items()}
        output = eng.step()
        collect(output, tokens)
        first = [e for e in output.events if e.request_id == long.request_id]
        steps += 1
        assert all(len(tokens[k]) == before[k] + 1 for k in tokens), "a running row stalled during the prefill"
    assert steps >= 90 // 5  # the 90-token prompt took many 8-token steps (3 went to the decode rows)


def test_a_small_kv_cache_preempts_and_every_output_equals_the_request_alone(tiny):
    """KV room for ~150 tokens, 10 requests needing up to ~100 each: rows wait, get preempted and are
    recomputed; greedy and seeded sampled rows give exactly what they give alone."""
    eng = engine(tiny, budget=16, kv_tokens=160)
    params = [SamplingParams(max_new_tokens=20 + 3 * i, ignore_eos=True) if i % 2 else
              SamplingParams(max_new_tokens=18 + i, temperature=1.3, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(10)]
    reqs = requests(params)
    got = run(eng, reqs, budget_check=16)
    assert eng.planner.preemptions > 0, "the cache was large enough: no preemption exercised"
    assert eng.kv.free_blocks == eng.kv.num_blocks
    for r in reqs:
        assert len(got[r.request_id]) == r.params.max_new_tokens
        assert got[r.request_id] == alone(eng, r)


def test_a_request_that_can_never_fit_is_refused_at_once(tiny):
    eng = engine(tiny, kv_tokens=64)
    with pytest.raises(ValueError, match="never fit the KV cache of 64 tokens"):
        eng.submit(GenerationRequest(list(range(10, 50)), None, SamplingParams(max_new_tokens=30)))
    eng.submit(GenerationRequest(list(range(10, 50)), None, SamplingParams(max_new_tokens=20)))
    while eng.has_work:
        eng.step()


def test_classification_rows_share_steps_with_generation(tiny):
    """Classify texts queued while generations run: same scores as classifying alone, same tokens."""
    eng = engine(tiny, budget=12)
    texts = [PROMPTS[i] for i in (0, 2, 3, 4)]
    names = ["cls3_r2", "cls5_r6", "cls3_r2", "cls5_r6"]
    want_scores = [eng.classify_ids([t], [n])[0].scores for t, n in zip(texts, names, strict=True)]
    reqs = requests([SamplingParams(max_new_tokens=10, ignore_eos=True) for _ in range(4)])
    want_tokens = [alone(eng, r) for r in reqs]
    got, results = {r.request_id: [] for r in reqs}, {}
    for r in reqs:
        eng.submit(r)
    collect(eng.step(), got)
    classify = [ClassifyRequest([t], n) for t, n in zip(texts, names, strict=True)]
    for request in classify:
        eng.submit_classify(request)
    mixed = 0
    while eng.has_work:
        output = eng.step()
        collect(output, got)
        results.update((c.request_id, c) for c in output.classified)
        mixed += len(eng.last_step[0]) > 0 and any(r.request_id in eng.running_request_ids() for r in reqs)
    assert mixed > 0
    for request, scores in zip(classify, want_scores, strict=True):
        done = results[request.request_id]
        assert done.error is None
        torch.testing.assert_close(torch.tensor(list(done.results[0].scores.values())),
                                   torch.tensor(list(scores.values())), atol=1e-5, rtol=0)
    assert [got[r.request_id] for r in reqs] == want_tokens


def assert_logits_match_peft(tiny, prompts: list[list[int]], rows: list[str | None], got) -> None:
    base_dir, adapters = tiny("llama")
    with torch.no_grad():
        for prompt, name, logits in zip(prompts, rows, got, strict=True):
            model = reference_model(base_dir, "none") if name is None else \
                peft_reference(base_dir, adapters[name][0], "none")
            torch.testing.assert_close(logits.cpu(), model(tensor([prompt])).logits[0].float().cpu(),
                                       atol=1e-4, rtol=0)


def test_single_token_and_long_rows_in_one_packed_forward_match_peft(tiny):
    rows = ["gen_qv_r4", "gen_all_r8", None, "gen_mlp_r2", "gen_all_r8", "gen_qv_r4", None]
    assert_logits_match_peft(tiny, PROMPTS, rows, engine(tiny).logits(PROMPTS, rows))


def test_equal_length_rows_on_mixed_adapters_match_peft(tiny):
    """Runs of equal-length rows on different adapters (and none) take one gathered bmm per run."""
    eng = engine(tiny)
    names = ["gen_qv_r4", None, "gen_all_r8", "gen_mlp_r2", "gen_all_r8"]
    prompts = [list(range(20 + i, 26 + i)) for i in range(5)] + [list(range(60 + i, 70 + i)) for i in range(5)]
    rows = names + names[::-1]
    got = eng.logits(prompts, rows)
    assert any(not g.slot for g in eng.slots.state.groups), "no gathered group was formed"
    assert_logits_match_peft(tiny, prompts, rows, got)


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="an out-of-range id is a fatal device assert on CUDA")
def test_a_row_that_fails_ends_alone_and_the_others_get_their_tokens(tiny):
    """A prompt id outside the vocabulary makes the shared forward raise: that request ends with an
    error, every other row of the same steps (generation and classification) finishes as alone."""
    eng = engine(tiny, budget=16)
    good = requests([SamplingParams(max_new_tokens=12, ignore_eos=True) for _ in range(4)])
    want = [alone(eng, r) for r in good]
    want_scores = eng.classify_ids([PROMPTS[4]], ["cls3_r2"])[0].scores
    bad = GenerationRequest([5, 6, 10_000], "gen_qv_r4", SamplingParams(max_new_tokens=5))
    got = {r.request_id: [] for r in good}
    for r in good[:2]:
        eng.submit(r)
    collect(eng.step(), got)
    eng.submit(bad)
    classify = ClassifyRequest([PROMPTS[4]], "cls3_r2")
    eng.submit_classify(classify)
    for r in good[2:]:
        eng.submit(r)
    ended, results = [], []
    while eng.has_work:
        output = eng.step()
        collect(output, got)
        ended += [e for e in output.events if e.request_id == bad.request_id]
        results += output.classified
    assert [e.finish_reason for e in ended] == ["error"] and "other requests are not affected" in str(ended[0].error)
    assert [got[r.request_id] for r in good] == want
    assert [(c.request_id, c.error) for c in results] == [(classify.request_id, None)]
    assert results[0].results[0].scores == pytest.approx(want_scores, abs=1e-5)
    assert eng.running_request_ids() == [] and eng.kv.free_blocks == eng.kv.num_blocks


def test_a_wide_head_costs_only_its_own_rows(tiny, tmp_path):
    """A 3,000-label classifier beside 3- and 5-label ones: their scores are what they are alone, and
    no head is padded to the widest label count."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir, _ = tiny("llama")
    wide = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3000),
                          LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["q_proj"]))
    wide.save_pretrained(tmp_path / "wide")
    eng = engine(tiny)
    want = [eng.classify_ids([PROMPTS[2]], [name])[0].scores for name in ("cls3_r2", "cls5_r6")]
    eng.load_adapter("wide", tmp_path / "wide")
    got = eng.classify_ids([PROMPTS[2], PROMPTS[2], PROMPTS[2]], ["cls3_r2", "wide", "cls5_r6"])
    assert len(got[1].scores) == 3000
    assert [g.scores for g in (got[0], got[2])] == [pytest.approx(w, abs=1e-6) for w in want]
    assert [w.shape[0] for w, _ in filter(None, eng.slots.heads.weights)] == [3, 5, 3000]


def test_a_prompt_chunk_beside_decoding_rows_is_held_to_its_attention_pairs(tiny):
    """Beside a decoding row, a long prompt's chunks shrink as its context grows (chunk_pairs), never below
    MIN_CHUNK; alone it takes the whole budget. The tokens are the same either way."""
    eng = engine(tiny, budget=48)
    assert eng.planner.chunk_pairs == 48 * 128  # the CPU default
    eng.planner.chunk_pairs = 48 * 20
    eng.planner.prefix_caching = False  # each run computes the whole prompt
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    long = GenerationRequest(list(range(5, 105)), "gen_all_r8", params)
    expected = alone(eng, long)

    def chunks(reqs: list[GenerationRequest]) -> tuple[list[int], dict[str, list[int]]]:
        out, sizes, cached = {r.request_id: [] for r in reqs}, [], 0
        for r in reqs:
            eng.submit(r)
            if r is not reqs[-1]:
                collect(eng.step(), out)  # the short rows are decoding before the long one arrives
        while eng.has_work:
            collect(eng.step(), out)
            seq = next((s for s in eng.planner.running if s.request_id == reqs[-1].request_id), None)
            now = seq.num_cached if seq is not None else len(reqs[-1].prompt_ids)
            if cached < len(reqs[-1].prompt_ids):
                sizes.append(now - cached)
            cached = now
        return sizes, out

    sizes, _ = chunks([long])
    assert sizes == [48, 48, 4]  # alone: the budget
    decoding = GenerationRequest([7, 8], None, SamplingParams(max_new_tokens=40, ignore_eos=True))
    long = GenerationRequest(long.prompt_ids, long.adapter, params)
    sizes, out = chunks([decoding, long])
    # 960 pairs: 20 tokens from an empty context (20 * 48 <= 960), then 16 (the least) as it grows
    assert sizes[0] == 20 and all(s == MIN_CHUNK for s in sizes[1:-1]) and sum(sizes) == 100, sizes
    assert out[long.request_id] == expected
