"""Sampling, stop strings, streaming and cancellation in the continuous batch."""

from __future__ import annotations

import pytest

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest, WrongTask
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def engine(tiny):
    base_dir, adapters = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=8)
    for name, (folder, spec) in adapters.items():
        engine.load_adapter(name, folder, labels=[str(i) for i in range(spec.num_labels)] or None)
    return engine


def run(engine, requests) -> dict[str, list]:
    """Run requests to the end; returns each one's events."""
    events = {r.request_id: [] for r in requests}
    for r in requests:
        engine.submit(r)
    while engine.has_work:
        for e in engine.step().events:
            events[e.request_id].append(e)
    return events


def test_seeded_sampling_is_reproducible_and_differs_by_seed(engine):
    params = [SamplingParams(max_new_tokens=20, temperature=1.5, top_p=0.95, top_k=50, seed=s) for s in (1, 1, 2)]
    results = [engine.generate([PROMPT], ["gen_qv_r4"], p)[0] for p in params]
    assert results[0].token_ids == results[1].token_ids
    assert results[0].token_ids != results[2].token_ids


def test_rows_keep_their_own_sampling_parameters(engine):
    greedy = engine.generate([PROMPT], ["gen_qv_r4"], SamplingParams(max_new_tokens=15))[0]
    requests = [GenerationRequest(PROMPT, "gen_qv_r4", SamplingParams(max_new_tokens=15)),
                GenerationRequest(PROMPT, "gen_qv_r4", SamplingParams(max_new_tokens=15, temperature=2.0, seed=7))]
    events = run(engine, requests)
    assert [e.token_id for e in events[requests[0].request_id]] == greedy.token_ids
    assert [e.token_id for e in events[requests[1].request_id]] != greedy.token_ids


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([PROMPT], ["gen_all_r8"], SamplingParams(max_new_tokens=12))[0]
    sampled = engine.generate([PROMPT], ["gen_all_r8"], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1,
                                                                        seed=3))[0]
    assert sampled.token_ids == greedy.token_ids


def test_stop_string_ends_generation_and_is_not_streamed(engine):
    free = engine.generate([PROMPT], [None], SamplingParams(max_new_tokens=30))[0]
    assert len(free.text) > 6
    stop = free.text[4:6]
    first = free.text.find(stop)
    request = GenerationRequest(PROMPT, None, SamplingParams(max_new_tokens=30, stop=[stop]))
    texts = [e.text for e in run(engine, [request])[request.request_id]]
    assert "".join(texts) == free.text[:first]
    assert len(texts) < 30


def test_streamed_text_adds_up_to_the_final_text(engine):
    request = GenerationRequest(PROMPT, "gen_mlp_r2", SamplingParams(max_new_tokens=25))
    texts = [e.text for e in run(engine, [request])[request.request_id]]
    final = engine.generate([PROMPT], ["gen_mlp_r2"], SamplingParams(max_new_tokens=25))[0]
    assert "".join(texts) == final.text


def test_cancel_frees_the_row_at_the_next_step(engine):
    long = GenerationRequest(PROMPT, "gen_qv_r4", SamplingParams(max_new_tokens=50))
    other = GenerationRequest(PROMPT, "gen_all_r8", SamplingParams(max_new_tokens=50))
    engine.submit(long)
    engine.submit(other)
    engine.step()
    engine.step()
    assert len(engine.planner.running) == 2
    engine.cancel(long.request_id)
    events = [e for e in engine.step().events if e.request_id == long.request_id]
    assert [(e.finished, e.finish_reason) for e in events] == [(True, "cancelled")]
    assert [s.request_id for s in engine.planner.running] == [other.request_id]
    assert engine.running_request_ids() == [other.request_id]
    engine.cancel(other.request_id)
    engine.step()
    assert not engine.has_work


def test_wrong_task_and_bad_parameters_are_refused(engine):
    with pytest.raises(WrongTask):
        engine.classify_ids([PROMPT], ["gen_qv_r4"])
    with pytest.raises(WrongTask):
        engine.submit(GenerationRequest(PROMPT, "cls3_r2"))
    for bad in (SamplingParams(max_new_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0),
                SamplingParams(top_k=-1)):
        with pytest.raises(ValueError):
            engine.submit(GenerationRequest(PROMPT, None, bad))
    with pytest.raises(ValueError, match="context"):
        engine.submit(GenerationRequest([5] * 200, None))
    assert not engine.has_work
