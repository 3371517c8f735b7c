"""Logprobs and n > 1 in the engine: values against PEFT's logits for each row's own adapter, in a mixed
batch of rows that asked and rows that did not; choices of one prompt share its prefill and KV blocks."""

from __future__ import annotations

import pytest
import torch
from test_engine_vs_peft import engine_for, peft_reference, reference_model, tensor

from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.logprobs import MIN_LOGPROB
from loraplex_server.engine.sampling import SamplingParams

PROMPT_21 = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]  # a block + 5


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list]:
    """Every token event of each request, stepping until all ended."""
    for request in requests:
        engine.submit(request)
    events: dict[str, list] = {r.request_id: [] for r in requests}
    ended: set[str] = set()
    while len(ended) < len(requests):
        for event in engine.step().events:
            events[event.request_id].append(event)
            if event.finished:
                ended.add(event.request_id)
    return events


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What the sampled distribution is, written plainly for one row: greedy = raw log-softmax; else
    logits / T, the top_k largest kept, log-softmax."""
    if params.greedy:
        return logits.log_softmax(-1)
    scores = logits / params.temperature
    if params.top_k:
        kth = scores.topk(params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return scores.log_softmax(-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_match_peft_in_a_mixed_batch(tiny, arch):
    base_dir, adapters = tiny(arch)
    engine = engine_for(base_dir, adapters)
    names = [n for n, (_, spec) in adapters.items() if not spec.num_labels]
    rows = [  # (adapter, params): greedy and sampled rows that ask, beside rows that do not
        (names[0], SamplingParams(max_new_tokens=4, logprobs=5)),
        (names[1], SamplingParams(max_new_tokens=4, temperature=0.7, seed=3, logprobs=20)),
        (None, SamplingParams(max_new_tokens=4)),
        (names[2], SamplingParams(max_new_tokens=4, temperature=1.6, top_k=7, seed=9, logprobs=0)),
        (names[0], SamplingParams(max_new_tokens=4, temperature=0.9, seed=1)),
        (None, SamplingParams(max_new_tokens=4, temperature=2.0, seed=5, logprobs=3)),
    ]
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23], [7, 7, 7, 7], [30, 31], [40, 41, 42, 43]]
    for _, params in rows:
        params.ignore_eos = True
    requests = [GenerationRequest(p, a, params) for p, (a, params) in zip(prompts, rows, strict=True)]
    events = run(engine, requests)
    base_ref = reference_model(base_dir, "none")
    checked = 0
    with torch.no_grad():
        for request, (name, params) in zip(requests, rows, strict=True):
            got = events[request.request_id]
            if params.logprobs is None:
                assert all(e.logprobs is None for e in got)
                continue
            model = base_ref if name is None else peft_reference(base_dir, adapters[name][0], "none")
            tokens = [e.token_id for e in got]
            for step, event in enumerate(got):
                logits = model(tensor([request.prompt_ids + tokens[:step]])).logits[0, -1].float().cpu()
                expected = processed_logprobs(logits, params)
                lp = event.logprobs
                assert lp.token_id == event.token_id
                assert lp.logprob == pytest.approx(max(expected[lp.token_id].item(), MIN_LOGPROB), abs=1e-4)
                assert lp.logprob > MIN_LOGPROB  # the sampled token was allowed by its filters
                assert len(lp.top) == params.logprobs
                values = [v for _, v in lp.top]
                assert values == sorted(values, reverse=True)
                for token_id, value in lp.top:
                    assert value == pytest.approx(max(expected[token_id].item(), MIN_LOGPROB), abs=1e-4)
                if lp.top:
                    assert lp.top[0][1] == pytest.approx(expected.max().item(), abs=1e-4)
                if params.greedy:  # greedy picks the most probable token
                    assert lp.top[0][0] == event.token_id
                checked += 1
    assert checked == 16


def test_logprobs_do_not_change_the_tokens(tiny):
    base_dir, adapters = tiny("llama")
    engine = engine_for(base_dir, adapters)
    name = next(iter(adapters))
    plain = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    asked = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True, logprobs=4)
    a, b = GenerationRequest([5, 6, 7], name, plain), GenerationRequest([5, 6, 7], name, asked)
    events = run(engine, [a, b])
    assert [e.token_id for e in events[a.request_id]] == [e.token_id for e in events[b.request_id]]


def _by_choice(events: list) -> dict[int, list[int]]:
    choices: dict[int, list[int]] = {}
    for event in events:
        if event.token_id is not None:
            choices.setdefault(event.index, []).append(event.token_id)
    return choices


def test_choices_share_the_prompt_prefill_and_its_blocks(tiny):
    base_dir, adapters = tiny("llama")
    engine = engine_for(base_dir, adapters)
    name = next(iter(adapters))
    n, new = 4, 5
    params = SamplingParams(max_new_tokens=new, temperature=0.9, seed=40, ignore_eos=True, n=n)
    request = GenerationRequest(PROMPT_21, name, params)
    engine.submit(request)
    computed, shared_checked, events = 0, False, []
    while not (events and events[-1].finished):
        out = engine.step()
        computed += engine.last_step[1]
        events += out.events
        running = [s for s in engine.planner.running if s.request_id == request.request_id]
        if len(running) == n and not shared_checked:  # just forked: the prompt's full block is one block
            first = {s.blocks[0] for s in running}
            assert len(first) == 1 and engine.kv._refs[first.pop()] == n
            tails = {s.blocks[1] for s in running}
            assert len(tails) == n  # the partly filled block: one copy each
            shared_checked = True
    assert shared_checked
    # The prompt was computed once; then each choice computed its own tokens.
    assert computed == len(PROMPT_21) + n * (new - 1)
    choices = _by_choice(events)
    assert sorted(choices) == list(range(n)) and all(len(t) == new for t in choices.values())
    assert sum(e.finish_reason is not None for e in events) == n and sum(e.finished for e in events) == 1
    # Choice i is what a lone request with seed + i gives.
    alone = [GenerationRequest(PROMPT_21, name, SamplingParams(max_new_tokens=new, temperature=0.9, seed=40 + i,
                                                                ignore_eos=True)) for i in range(n)]
    lone = run(engine, alone)
    for i, r in enumerate(alone):
        assert choices[i] == [e.token_id for e in lone[r.request_id]], f"choice {i}"
    assert len(set(map(tuple, choices.values()))) > 1  # different seeds, different texts


def test_greedy_choices_are_copies_and_carry_logprobs(tiny):
    base_dir, adapters = tiny("llama")
    engine = engine_for(base_dir, adapters)
    params = SamplingParams(max_new_tokens=4, n=3, logprobs=2, ignore_eos=True)
    request = GenerationRequest([5, 6, 7, 8], None, params)
    events = run(engine, [request])[request.request_id]
    choices = _by_choice(events)
    assert len(choices) == 3 and len(set(map(tuple, choices.values()))) == 1
    assert all(e.logprobs is not None and len(e.logprobs.top) == 2 for e in events)
    assert engine.kv.free_blocks == engine.kv.num_blocks  # every block came back


def test_choices_that_can_never_fit_the_cache_are_refused(tiny):
    base_dir, adapters = tiny("llama")
    engine = engine_for(base_dir, adapters)
    capacity = engine.kv.capacity_tokens
    too_many = SamplingParams(max_new_tokens=100, n=16)
    if 16 * 112 <= capacity:  # the tiny model's cache is sized from its context; make it small
        engine = Engine(engine.base, max_adapters=2, kv_cache_memory=engine.kv.block_bytes * 40)
    with pytest.raises(ValueError, match="n .16. choices"):
        engine.submit(GenerationRequest([5, 6, 7], None, too_many))


def test_a_choice_forked_without_a_free_block_waits_and_recomputes(tiny):
    base_dir, adapters = tiny("llama")
    block_bytes = engine_for(base_dir, {}).kv.block_bytes
    # 4 blocks: another request takes 1, the 21-token prompt 2, the first choice's copy the last one;
    # the second choice waits for a block and recomputes its prompt's tail.
    engine = Engine(engine_for(base_dir, {}).base, max_adapters=2, kv_cache_memory=block_bytes * 4)
    params = SamplingParams(max_new_tokens=3, temperature=0.9, seed=7, ignore_eos=True, n=3)
    other = GenerationRequest([1, 2, 3], None, SamplingParams(max_new_tokens=3, ignore_eos=True))
    request = GenerationRequest(PROMPT_21, None, params)
    events = run(engine, [other, request])
    choices = _by_choice(events[request.request_id])
    alone = [GenerationRequest(PROMPT_21, None, SamplingParams(max_new_tokens=3, temperature=0.9, seed=7 + i,
                                                                ignore_eos=True)) for i in range(3)]
    lone = run(engine, alone)
    for i, r in enumerate(alone):
        assert choices[i] == [e.token_id for e in lone[r.request_id]], f"choice {i}"
    assert engine.kv.free_blocks == engine.kv.num_blocks


def test_cancelling_a_request_ends_all_its_choices_and_frees_their_blocks(tiny):
    base_dir, adapters = tiny("llama")
    engine = engine_for(base_dir, adapters)
    request = GenerationRequest(PROMPT_21, None, SamplingParams(max_new_tokens=50, temperature=0.9, n=3,
                                                                ignore_eos=True))
    engine.submit(request)
    while len([s for s in engine.planner.running if s.request_id == request.request_id]) < 3:
        engine.step()
    engine.step()
    engine.cancel(request.request_id)
    ended = [e for e in engine.step().events if e.finished]
    assert [(e.request_id, e.finish_reason) for e in ended] == [(request.request_id, "cancelled")]
    assert not engine.has_work and engine.kv.free_blocks == engine.kv.num_blocks
