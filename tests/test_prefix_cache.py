"""Prefix caching in the engine: rows that share leading tokens on the same adapter reuse each other's KV
blocks, and every output is exactly what it is without the cache (fp32, greedy and seeded, mixed adapters,
chunked prefill, preemption). Blocks are keyed by adapter: the same prompt on another adapter finds none,
and a deleted adapter's blocks are never found again."""

from __future__ import annotations

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.kv_cache import bytes_per_token
from loraplex_server.engine.sampling import SamplingParams
from tiny_models import TEST_DEVICE

SYSTEM = list(range(20, 60))  # a 40-token shared "system prompt": two full 16-token blocks and a part
SUFFIXES = [[5, 6, 7], [8], list(range(70, 90)), [5, 6, 7]]
ADAPTERS = ["gen_qv_r4", None, "gen_all_r8", "gen_qv_r4", "gen_mlp_r2", None]


def engine(tiny, prefix_caching: bool, kv_tokens: int | None = None, budget: int | None = None) -> Engine:
    base_dir, adapters = tiny("llama")
    base = load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE)
    memory = kv_tokens * bytes_per_token(base.model.config, base.dtype) if kv_tokens else None
    out = Engine(base, max_adapters=8, max_batch_tokens=budget, kv_cache_memory=memory,
                 prefix_caching=prefix_caching)
    for name, (folder, spec) in adapters.items():
        if not spec.num_labels:
            out.load_adapter(name, folder)
    return out


def requests() -> list[GenerationRequest]:
    """Mixed adapters, greedy and seeded sampling, prompts that share the system prompt (some exactly)."""
    out = []
    for i in range(12):
        params = SamplingParams(max_new_tokens=6 + i % 5, ignore_eos=True) if i % 2 else \
            SamplingParams(max_new_tokens=8, temperature=1.2, top_p=0.9, seed=i, ignore_eos=True)
        out.append(GenerationRequest(SYSTEM + SUFFIXES[i % len(SUFFIXES)], ADAPTERS[i % len(ADAPTERS)], params))
    return out


def run_in_waves(eng: Engine, reqs: list[GenerationRequest], wave: int = 3) -> dict[int, list[int]]:
    """Submit `wave` requests at a time, each wave after the previous one finished (so later waves can
    find the earlier ones' blocks); returns each request's tokens by index."""
    tokens: dict[int, list[int]] = {}
    for start in range(0, len(reqs), wave):
        batch = {r.request_id: i for i, r in enumerate(reqs[start:start + wave], start)}
        for r in reqs[start:start + wave]:
            tokens[batch[r.request_id]] = []
            eng.submit(GenerationRequest(r.prompt_ids, r.adapter, r.params, request_id=r.request_id))
        while eng.has_work:
            for e in eng.step().events:
                if e.token_id is not None:
                    tokens[batch[e.request_id]].append(e.token_id)
    return tokens


def test_outputs_are_identical_with_and_without_the_prefix_cache(tiny):
    reqs = requests()
    cached, plain = engine(tiny, True, budget=24), engine(tiny, False, budget=24)
    got, want = run_in_waves(cached, reqs), run_in_waves(plain, reqs)
    assert got == want
    assert cached.kv.hit_tokens >= 32 * 6, "later waves did not reuse the system prompt's blocks"
    assert plain.kv.hit_tokens == 0
    # Again, now that every prompt's blocks are cached: still the same tokens.
    again = [GenerationRequest(r.prompt_ids, r.adapter, r.params) for r in reqs]
    assert run_in_waves(cached, again, wave=12) == want
    assert cached.kv.free_blocks == cached.kv.num_blocks


def test_a_small_cache_reuses_freed_blocks_and_preempts_with_the_same_outputs(tiny):
    """KV room for 160 tokens: cached blocks are taken back when rows need room, rows are preempted and
    recomputed (finding their own blocks again), and nothing changes what any row gets."""
    reqs = requests()
    cached, plain = engine(tiny, True, kv_tokens=160, budget=16), engine(tiny, False, kv_tokens=160, budget=16)
    got, want = run_in_waves(cached, reqs, wave=6), run_in_waves(plain, reqs, wave=6)
    assert got == want
    assert cached.planner.preemptions > 0 and cached.kv.hit_tokens > 0


def test_blocks_are_found_only_with_their_adapter_and_never_after_it_is_forgotten(tiny):
    eng = engine(tiny, True)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    first = eng.generate([SYSTEM], ["gen_qv_r4"], params)[0].token_ids
    hits = eng.kv.hit_tokens
    eng.generate([SYSTEM], ["gen_all_r8"], params)  # same tokens, another adapter: nothing to reuse
    eng.generate([SYSTEM], [None], params)
    assert eng.kv.hit_tokens == hits
    assert eng.generate([SYSTEM], ["gen_qv_r4"], params)[0].token_ids == first
    assert eng.kv.hit_tokens == hits + 32  # two full blocks (the last token is always computed)
    eng.forget_prefixes(eng.adapters["gen_qv_r4"].identity)
    assert eng.generate([SYSTEM], ["gen_qv_r4"], params)[0].token_ids == first
    assert eng.kv.hit_tokens == hits + 32  # forgotten: computed again (and cached again from now on)
    eng.unload_adapter("gen_mlp_r2")
    _, adapters = tiny("llama")
    eng.load_adapter("gen_mlp_r2", adapters["gen_qv_r4"][0])  # a name reused for other weights
    eng.generate([SYSTEM], ["gen_mlp_r2"], params)
    assert eng.kv.hit_tokens == hits + 32  # a new write is a new identity: nothing of the old one
