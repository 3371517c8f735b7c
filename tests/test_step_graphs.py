"""The bucketed decode step (step_graphs.py) on CPU: bucket choice, padding, static buffers, replay and
recapture, through the real engine on the tiny Llama with mixed adapters. "eager" mode runs exactly the
bookkeeping a CUDA graph replay needs (the same buffers, filled in place, then the same pure step), so
only the timing of the graphs is left to a GPU. The compiled mode is checked once (slow: inductor)."""

from __future__ import annotations

import pytest
import torch

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.models.step_graphs import compile_mode, context_bucket, pick, row_buckets
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [7, 7, 7, 7], [30, 31], [40, 41, 42]]


def test_buckets():
    assert row_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert row_buckets(1) == [1]
    assert [pick(n, row_buckets(64)) for n in (1, 3, 5, 9, 17, 64)] == [1, 4, 8, 16, 32, 64]
    assert pick(65, row_buckets(64)) is None
    assert [context_bucket(n, 8192) for n in (1, 64, 65, 300)] == [64, 64, 128, 512]
    assert context_bucket(300, 200) == 300  # never below the tokens themselves
    assert context_bucket(150, 200) == 200


def test_mode_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LORAPLEX_COMPILE", raising=False)
    assert compile_mode(cpu) == "off"
    assert compile_mode(torch.device("cuda")) == "off"  # until the graphs are timed on a GPU
    monkeypatch.setenv("LORAPLEX_COMPILE", "1")
    assert compile_mode(cpu) == "compile"
    monkeypatch.setenv("LORAPLEX_COMPILE", "0")
    assert compile_mode(cpu) == "off"
    for bad in ("cuda_graph", "fast"):
        monkeypatch.setenv("LORAPLEX_COMPILE", bad)
        with pytest.raises(ValueError, match="LORAPLEX_COMPILE"):
            compile_mode(cpu)


def engine_in(mode: str, monkeypatch, tiny, budget: int | None = None) -> Engine:
    monkeypatch.setenv("LORAPLEX_COMPILE", mode)
    base_dir, adapters = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=8,
                    max_batch_tokens=budget)
    for name, (folder, spec) in adapters.items():
        if not spec.num_labels:
            engine.load_adapter(name, folder)
    return engine


def staggered(engine: Engine, adapters: list[str | None], new_tokens: int = 14) -> list[list[int]]:
    """Requests joining at different steps (so decode steps of 1 to 6 rows, and mixed steps)."""
    requests = [GenerationRequest(p, a, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                for p, a in zip(PROMPTS[:len(adapters)], adapters, strict=True)]
    tokens = {r.request_id: [] for r in requests}
    step = 0
    while step < len(requests) * 3 or engine.has_work:
        if step % 3 == 0 and step // 3 < len(requests):
            engine.submit(requests[step // 3])
        for event in engine.step().events:
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
        step += 1
    return [tokens[r.request_id] for r in requests]


ROWS = ["gen_qv_r4", "gen_all_r8", None, "gen_mlp_r2", "gen_all_r8", None]  # the tiny Llama's adapters


# On a GPU (LORAPLEX_TEST_DEVICE=cuda, bench/gpu_check.sh) the same test captures real CUDA graphs.
REPLAY_MODES = ["eager"] + (["cuda_graph"] if TEST_DEVICE == "cuda" else [])


@pytest.mark.parametrize("mode", REPLAY_MODES)
@pytest.mark.parametrize("budget", [None, 3])
def test_replayed_decode_steps_give_the_eager_tokens(tiny, monkeypatch, budget, mode):
    expected = staggered(engine_in("off", monkeypatch, tiny, budget), ROWS)
    engine = engine_in(mode, monkeypatch, tiny, budget)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.mode == mode
    assert staggered(engine, ROWS) == expected
    used = graphs.replayed
    # 1..6 rows padded up to their buckets (a budget of 3 tokens runs at most 3 rows a step)
    assert {rows for rows, _ in used} == ({1, 2, 4, 8} if budget is None else {1, 2, 4}), used
    assert all(context == 64 for _, context in used)
    # Each bucket captured once, then replayed (a CUDA warm-up also captured the other row buckets).
    assert graphs.captures == (len(used) if mode == "eager" else len(graphs.steps))


def test_buffers_are_static_and_padding_rows_repeat_the_first(tiny, monkeypatch):
    engine = engine_in("eager", monkeypatch, tiny)
    for prompt, name in zip(PROMPTS[:3], ROWS[:3], strict=True):
        engine.submit(GenerationRequest(prompt, name, SamplingParams(max_new_tokens=20, ignore_eos=True)))
    engine.step()  # the three prompts' prefill: eager
    engine.step()  # the first decode step: captured at 4 rows
    step = engine.runner.graphs.steps[(4, 64)]
    buffers = step.buffers
    pointers = (buffers.ids.data_ptr(), buffers.kv_index.data_ptr())
    engine.step()
    assert engine.runner.graphs.steps[(4, 64)] is step
    assert (buffers.ids.data_ptr(), buffers.kv_index.data_ptr()) == pointers
    # The last step's rows (in the planner's order): token, adapter, context length, cache position.
    filled = list(zip(buffers.ids.tolist(), buffers.slots.tolist(), buffers.kv_mask.sum((1, 2, 3)).tolist(),
                      buffers.write_index.tolist(), strict=True))
    running = [(seq.all_token_ids(seq.num_cached - 1, seq.num_cached)[0], seq.slot, seq.num_cached,
                engine.kv.slot_index(seq.blocks, seq.num_cached - 1, seq.num_cached).item())
               for seq in engine.planner.running]
    assert sorted(filled[:3]) == sorted(running)
    assert filled[3] == filled[0]  # the padding row repeats the first


def test_a_replaced_table_drops_the_captured_steps(tiny, monkeypatch):
    """A higher-rank adapter replaces the tables: the old captures are dropped, and the new ones read
    the new tables (the tokens match the eager path's)."""
    base_dir, adapters = tiny("llama")
    eager = engine_in("off", monkeypatch, tiny)
    engine = engine_in("eager", monkeypatch, tiny)
    staggered(engine, ROWS)
    before = engine.runner.graphs.captures
    for e in (eager, engine):
        e.load_adapter("wide", adapters["gen_all_r8"][0])  # same rank: tables unchanged
    from tiny_models import AdapterSpec, make_adapter
    wide = make_adapter(base_dir, base_dir.parent / "wide_r24", AdapterSpec("wide_r24", 24, ["q_proj", "down_proj"]),
                        seed=11)
    for e in (eager, engine):
        e.load_adapter("r24", wide)
    rows = ["r24", None, "gen_qv_r4", "r24", "wide", "gen_mlp_r2"]
    assert staggered(engine, rows) == staggered(eager, rows)
    assert engine.runner.graphs.captures > before


@pytest.mark.long  # `make test-long`: inductor takes about a minute of 2 cores even for one tiny bucket, and
@pytest.mark.timeout(1800)  # the mode is opt-in (LORAPLEX_COMPILE=1); the replay tests above cover its bookkeeping
def test_compiled_decode_steps_give_the_eager_tokens(tiny, monkeypatch):
    """One row on an adapter, so one bucket (1 row x 64 context) is compiled."""
    expected = staggered(engine_in("off", monkeypatch, tiny), ROWS[1:2], new_tokens=4)
    monkeypatch.setenv("LORAPLEX_WARMUP_S", "0")
    engine = engine_in("compile", monkeypatch, tiny)
    assert staggered(engine, ROWS[1:2], new_tokens=4) == expected
    assert engine.runner.graphs.replayed == {(1, 64)}
