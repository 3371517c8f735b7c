"""Logprobs and n > 1 benchmark: what top_logprobs=20 costs a batch, and what n choices of one prompt save.

    python -m bench.api_logprobs [--quick] [--dtype auto]

The embedded base (SmolLM2-135M, 49,152-token vocabulary) in process, with two random rank-16 adapters.
- `logprobs_vs_none`: decode tok/s of 16 sampled rows (8 per adapter) that all ask top_logprobs=20, over
  the same 16 rows asking nothing; runs alternate, median of each; target >= 0.9 (logprobs are one
  log-softmax and a top-k over the rows that asked). Also the time of the logprobs pass alone for 16
  rows (`logprobs_ms_per_step`), against the sampler's own pass on the same logits.
- n = 4 against 4 requests of one prompt (`--prompt` tokens, 8 new tokens each): the tokens the engine
  computed (its own step counters) and the time to the last token; the separate requests with prefix
  caching on (a later request finds the blocks an earlier one computed) and off. `same_tokens` checks
  that choice i equals the separate request with seed + i.
Ratios are taken within this one run (the machine may be shared). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.engine import announce_dtype, engine_with_adapters
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.logprobs import token_logprobs
from loraplex_server.engine.sampling import SamplingParams, sample

ROWS = 16


def run(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, int, dict[str, list[list[int]]]]:
    """Submit together and step until all end: seconds, tokens the engine computed, each request's tokens
    per choice."""
    computed, tokens = 0, {r.request_id: [[] for _ in range(r.params.n)] for r in requests}
    start = time.perf_counter()
    for request in requests:
        engine.submit(request)
    while engine.has_work:
        for event in engine.step().events:
            if event.token_id is not None:
                tokens[event.request_id][event.index].append(event.token_id)
        computed += engine.last_step[1]
    return time.perf_counter() - start, computed, tokens


def decode_rows(engine: Engine, adapters: list[str], new: int, logprobs: int | None) -> float:
    """Decode tok/s of ROWS sampled rows (their short prompts prefilled before the clock starts)."""
    requests = [GenerationRequest([100 + i, 200 + i, 300 + i], adapters[i % len(adapters)],
                                  SamplingParams(max_new_tokens=new, temperature=0.8, seed=i, ignore_eos=True,
                                                 logprobs=logprobs)) for i in range(ROWS)]
    for request in requests:
        engine.submit(request)
    while any(len(s.output_ids) == 0 for s in engine.planner.running) or engine.planner.waiting:
        engine.step()  # prefill and first tokens
    start, produced = time.perf_counter(), 0
    while engine.has_work:
        produced += sum(e.token_id is not None for e in engine.step().events)
    return produced / (time.perf_counter() - start)


def pass_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt", type=int, default=512, help="tokens of the n = 4 prompt")
    args = parser.parse_args(argv)
    new, rounds = (12, 2) if args.quick else (32, 3)
    results: dict[str, object] = {"dtype": announce_dtype(args.dtype, "auto"), "threads": torch.get_num_threads()}
    base = load_base_model(None, quantize="none", dtype=args.dtype)
    engine = engine_with_adapters(base, 2, 16)
    adapters = sorted(engine.adapters)

    # -- logprobs cost -----------------------------------------------------------------------------
    speeds: dict[str, list[float]] = {"none": [], "top20": []}
    for round_ in range(rounds):
        for kind in (("none", "top20") if round_ % 2 == 0 else ("top20", "none")):
            speeds[kind].append(decode_rows(engine, adapters, new, 20 if kind == "top20" else None))
            print(f"round {round_} {kind}: {speeds[kind][-1]:.1f} tok/s", flush=True)
    tok_s = {kind: statistics.median(v) for kind, v in speeds.items()}
    results.update({"tok_s_none": tok_s["none"], "tok_s_top20": tok_s["top20"],
                    "logprobs_vs_none": tok_s["top20"] / tok_s["none"]})
    logits = torch.randn(ROWS, base.model.config.vocab_size) * 4
    params = [SamplingParams(temperature=0.8, logprobs=20) for _ in range(ROWS)]
    seeds, steps = list(range(ROWS)), [0] * ROWS
    tokens = sample(logits, params, seeds, steps)
    results["sample_ms_per_step"] = pass_ms(lambda: sample(logits, params, seeds, steps), 20)
    results["logprobs_ms_per_step"] = pass_ms(lambda: token_logprobs(logits, params, tokens), 20)

    # -- n = 4 against 4 requests ------------------------------------------------------------------
    generator = torch.Generator().manual_seed(0)
    figures: dict[str, list[tuple[float, int]]] = {"n4": [], "separate_cached": [], "separate_uncached": []}
    same = True
    for round_ in range(rounds):
        prompt = torch.randint(100, 40_000, (args.prompt,), generator=generator).tolist()  # new each round: no hits

        def params_for(seed: int, n: int = 1) -> SamplingParams:
            return SamplingParams(max_new_tokens=8, temperature=0.8, seed=seed, ignore_eos=True, n=n)
        for kind in ("n4", "separate_cached", "separate_uncached"):
            engine.planner.prefix_caching = kind != "separate_uncached"
            engine.kv.forget(engine.adapters[adapters[0]].identity)  # nothing cached from the kind before
            if kind == "n4":
                seconds, computed, out = run(engine, [GenerationRequest(prompt, adapters[0], params_for(7, 4))])
                choices = next(iter(out.values()))
            else:
                seconds, computed, out = run(engine, [GenerationRequest(prompt, adapters[0], params_for(7 + i))
                                                      for i in range(4)])
                same &= [t[0] for t in out.values()] == choices
            figures[kind].append((seconds, computed))
            print(f"round {round_} {kind}: {computed} tokens computed, {1000 * seconds:.0f} ms", flush=True)
    engine.planner.prefix_caching = True
    for kind, values in figures.items():
        results[f"{kind}_tokens_computed"] = statistics.median(c for _, c in values)
        results[f"{kind}_ms"] = 1000 * statistics.median(s for s, _ in values)
    for kind in ("separate_cached", "separate_uncached"):
        results[f"{kind}_vs_n4_time"] = results[f"{kind}_ms"] / results["n4_ms"]
        results[f"{kind}_vs_n4_tokens"] = results[f"{kind}_tokens_computed"] / results["n4_tokens_computed"]
    results["same_tokens"] = same
    print(f"{ROWS} rows: {tok_s['none']:.1f} tok/s without logprobs, {tok_s['top20']:.1f} with top_logprobs=20 "
          f"({results['logprobs_vs_none']:.3f}); the logprobs pass {results['logprobs_ms_per_step']:.2f} ms vs "
          f"sampling {results['sample_ms_per_step']:.2f} ms per step")
    print(f"n=4 of a {args.prompt}-token prompt: {results['n4_tokens_computed']:.0f} tokens computed, "
          f"{results['n4_ms']:.0f} ms; 4 requests: {results['separate_cached_tokens_computed']:.0f} tokens "
          f"(prefix cache on), {results['separate_uncached_tokens_computed']:.0f} (off); time x"
          f"{results['separate_cached_vs_n4_time']:.2f} / x{results['separate_uncached_vs_n4_time']:.2f}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))
    return results


if __name__ == "__main__":
    main()
