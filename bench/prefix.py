"""Prefix-cache benchmark: time to first token of a request whose long system prompt is cached, vs not.

    python -m bench.prefix [--system 1024] [--rounds 3] [--dtype auto]

The embedded base (SmolLM2-135M) in process, at the server's default dtype and step budget, with two
random rank-16 LoRA adapters on q/k/v/o. Requests of a `--system`-token system prompt plus a 24-token
user turn are sent one at a time on an idle engine; each is timed to its first token:
- `cached`: the first adapter's shared system prompt, computed by an earlier request (new user turn);
- `uncached`: a system prompt never seen before (a cache miss: the whole prompt is prefilled);
- `other_adapter` (once): the shared system prompt on the second adapter, which never saw it (blocks are
  keyed by adapter, so this is a miss too).
`cached` and `uncached` alternate for `--rounds` rounds; figures are medians, and
`ttft_uncached_vs_cached` (target >= 5) is the ratio of two medians taken in this one run (the machine
may be shared and noisy). `same_tokens` checks that a cached request's 8 greedy tokens equal those of
the same request with prefix caching off. Ends with one JSON line.
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
from loraplex_server.engine.sampling import SamplingParams

USER = 24


def first_token_seconds(engine: Engine, prompt: list[int], adapter: str | None, new: int = 1
                        ) -> tuple[float, list[int]]:
    """Submit on an idle engine, step until it ends; returns the time to its first token and its `new`
    greedy tokens."""
    request = GenerationRequest(prompt, adapter, SamplingParams(max_new_tokens=new, ignore_eos=True))
    start = time.perf_counter()
    engine.submit(request)
    first, tokens = None, []
    while engine.has_work:
        for event in engine.step().events:
            if event.token_id is not None:
                first = first or time.perf_counter()
                tokens.append(event.token_id)
    return first - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", type=int, default=1024, help="tokens of the system prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    results: dict[str, object] = {"dtype": announce_dtype(args.dtype, "auto"), "threads": torch.get_num_threads()}
    base = load_base_model(None, quantize="none", dtype=args.dtype)
    engine = engine_with_adapters(base, 2, 16)
    cached_adapter, other_adapter = sorted(engine.adapters)
    results["max_batch_tokens"] = engine.planner.max_batch_tokens
    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> list[int]:
        return torch.randint(100, 40_000, (count,), generator=generator).tolist()

    system = tokens(args.system)
    first_token_seconds(engine, system + tokens(USER), cached_adapter)  # computes (and caches) the system prompt
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    other = first_token_seconds(engine, system + tokens(USER), other_adapter)[0]
    for round_ in range(args.rounds):
        for kind in (("cached", "uncached") if round_ % 2 == 0 else ("uncached", "cached")):
            prompt = (system if kind == "cached" else tokens(args.system)) + tokens(USER)
            times[kind].append(first_token_seconds(engine, prompt, cached_adapter)[0])
            print(f"round {round_} {kind}: {1000 * times[kind][-1]:.0f} ms", flush=True)
    medians = {kind: statistics.median(values) for kind, values in times.items()} | {"other_adapter": other}
    prompt = system + tokens(USER)
    _, with_cache = first_token_seconds(engine, prompt, cached_adapter, new=8)
    engine.planner.prefix_caching = False
    _, without = first_token_seconds(engine, prompt, cached_adapter, new=8)
    results.update({f"ttft_{kind}_ms": 1000 * value for kind, value in medians.items()})
    results["ttft_uncached_vs_cached"] = medians["uncached"] / medians["cached"]
    results["ttft_other_adapter_vs_cached"] = medians["other_adapter"] / medians["cached"]
    results["same_tokens"] = with_cache == without
    print(f"{args.system}-token system prompt + {USER}-token user turn, {args.rounds} rounds: time to first "
          f"token cached {1000 * medians['cached']:.0f} ms, uncached {1000 * medians['uncached']:.0f} ms "
          f"({results['ttft_uncached_vs_cached']:.1f}x), on another adapter {1000 * medians['other_adapter']:.0f} ms")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
