"""Hostile class 12, fairness between kinds: a flood of classification texts must not starve a generation,
and a full batch of generation rows must not starve classification.

Counted in steps and tokens of the engine's own steps (no wall clock): a step's cost grows with its
tokens, so "a decode row shares its step with at most the classification share of tokens" bounds how
much slower a stream gets beside any flood of texts. Outputs stay what each request gives alone.
"""

from __future__ import annotations

import pytest

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import ClassifyRequest, Engine, GenerationRequest
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

BUDGET = 32  # tokens per step; classification's share is half of it
TEXT = list(range(40, 50))  # a 10-token text
PROMPT = list(range(10, 30))  # a 20-token prompt


def engine(tiny, max_batch: int = 16) -> Engine:
    base_dir, adapters = tiny("llama")
    out = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=4,
                 max_batch=max_batch, max_batch_tokens=BUDGET)
    for name in ("cls3_r2", "gen_qv_r4"):
        folder, spec = adapters[name]
        out.load_adapter(name, folder, labels=[str(i) for i in range(spec.num_labels)] or None)
    return out


def flood(eng: Engine, texts: int) -> None:
    """Keep `texts` classification texts waiting."""
    while len(eng.planner.texts) < texts:
        eng.submit_classify(ClassifyRequest([TEXT], "cls3_r2"))


def test_a_stream_beside_a_flood_of_texts_decodes_every_step_in_steps_of_at_most_their_share(tiny):
    eng = engine(tiny)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    want = eng.generate([PROMPT], ["gen_qv_r4"], params)[0].token_ids
    want_scores = eng.classify_ids([TEXT], ["cls3_r2"])[0].scores
    stream = GenerationRequest(PROMPT, "gen_qv_r4", params)
    flood(eng, 40)
    eng.submit(stream)
    tokens, steps, decode_step_tokens, classified = [], 0, [], []
    while len(tokens) < len(want):
        flood(eng, 40)
        output = eng.step()
        steps += 1
        new = [e.token_id for e in output.events if e.request_id == stream.request_id]
        if tokens:  # decoding: one token every step, and a step no bigger than 1 + the texts' share
            assert len(new) == 1, "the stream skipped a step"
            decode_step_tokens.append(eng.last_step[1])
        tokens += new
        classified += output.classified
    assert tokens == want
    assert steps <= 2 + len(want)  # its 20-token prompt took at most 2 steps of generation's 16-token share
    assert max(decode_step_tokens) <= 1 + BUDGET // 2
    assert len(classified) >= steps, "the texts were starved"  # 10-token texts: at least one per step
    assert {c.error for c in classified} == {None}
    assert classified[-1].results[0].scores == pytest.approx(want_scores, abs=1e-6)
    for request_id in eng.running_request_ids():
        eng.cancel(request_id)
    eng.step()


def test_a_generation_queued_behind_a_backlog_of_texts_starts_at_once(tiny):
    eng = engine(tiny)
    flood(eng, 200)  # 2,000 tokens of texts queued first: about 60 full steps
    late = GenerationRequest(PROMPT, "gen_qv_r4", SamplingParams(max_new_tokens=3, ignore_eos=True))
    eng.submit(late)
    steps = 0
    while not any(e.request_id == late.request_id for e in eng.step().events):
        steps += 1
    assert steps + 1 <= 2  # its prompt in generation's share of two steps, not after the backlog
    assert len(eng.planner.texts) > 150
    for request_id in eng.running_request_ids():
        eng.cancel(request_id)
    eng.step()


def test_a_full_batch_of_decoding_rows_and_a_long_prefill_leave_room_for_a_text(tiny):
    """Four rows of four decoding (the whole batch) and a 90-token prompt waiting: a text still runs in
    the next step, and the decoding rows take turns for the rows left, so none of them stalls."""
    eng = engine(tiny, max_batch=4)
    rows = [GenerationRequest([5 + i, 6], "gen_qv_r4", SamplingParams(max_new_tokens=60, ignore_eos=True))
            for i in range(4)]
    for r in rows:
        eng.submit(r)
    eng.step()
    eng.submit(GenerationRequest(list(range(10, 100)), None, SamplingParams(max_new_tokens=5)))
    text = ClassifyRequest([TEXT], "cls3_r2")
    eng.submit_classify(text)
    assert [c.request_id for c in eng.step().classified] == [text.request_id]
    counts = {r.request_id: 0 for r in rows}
    for _ in range(8):
        flood(eng, 4)
        for e in eng.step().events:
            counts[e.request_id] = counts.get(e.request_id, 0) + 1
    assert min(counts[r.request_id] for r in rows) >= 4, counts  # 3 of 4 rows a step, in turns
    for request_id in eng.running_request_ids():
        eng.cancel(request_id)
    eng.step()
