"""Generation benchmark: cost flat in the work, long prompts beside running rows, a KV flood, the roofline.

    python -m bench.generation [--dtype auto] [--parts engine,serve,flood] [--flood-requests 200]

The embedded base (SmolLM2-135M) at the server's default dtype and step budget; every figure is a
ratio of timings taken in this one run (machines here are shared and noisy). Ends with one JSON line.
- per_token_long_vs_short: tok/s of 16 rows x 512 new tokens over 16 rows x 32 (same prompt, no EOS).
- long_join_penalty: median decode step of 16 short rows after a 2,048-token prompt joined (it decodes
  too, and counts) over the median before; max_stall_vs_step: the longest gap between two tokens of a
  running row while that prompt is prefilled, over the median step before; long_ttft_vs_alone: its time
  to first token over its prefill on an idle engine.
- kv_flood_ok: 200 requests of 1,500 prompt + 500 new tokens at once under --kv-cache-memory 1G; every
  greedy output equals the same prompt run alone (8 distinct prompts), peak RSS growth printed.
- generate_under_classify_load: a 48-token generation's latency while 3 clients hammer Classify on
  other adapters (real server, gRPC), over its latency alone.
- decode_vs_roofline: the floor max(weight bytes / read bandwidth, FLOPs / matmul rate), both measured
  here, over the measured batch-32 decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from bench.engine import announce_dtype, read_bandwidth, step_weight_bytes, timed
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.sampling import SamplingParams

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


class Timeline:
    """Token arrival times per request, from the events of the engine's steps."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[float]] = {}
        self.ids: dict[str, list[int]] = {}

    def request(self, prompt: list[int], new: int) -> GenerationRequest:
        """A greedy request for exactly `new` tokens (EOS ignored), its tokens timed as steps return them."""
        request = GenerationRequest(prompt, None, SamplingParams(max_new_tokens=new, ignore_eos=True))
        self.tokens[request.request_id], self.ids[request.request_id] = [], []
        _TIMED[request.request_id] = self
        return request


_TIMED: dict[str, Timeline] = {}  # request id -> the timeline that times it


def step(engine: Engine) -> None:
    """One engine step; its token events go to their requests' timelines."""
    output = engine.step()
    now = time.perf_counter()
    for event in output.events:
        timeline = _TIMED.get(event.request_id)
        if timeline is not None and event.token_id is not None:
            timeline.tokens[event.request_id].append(now)
            timeline.ids[event.request_id].append(event.token_id)


def run_until_idle(engine: Engine) -> list[float]:
    """Step until no work is left; returns each step's seconds."""
    steps = []
    while engine.has_work:
        start = time.perf_counter()
        step(engine)
        steps.append(time.perf_counter() - start)
    return steps


def tokens_per_s(engine: Engine, prompt: list[int], rows: int, new: int) -> float:
    timeline = Timeline()
    start = time.perf_counter()
    for _ in range(rows):
        engine.submit(timeline.request(prompt, new))
    run_until_idle(engine)
    return rows * new / (time.perf_counter() - start)


def long_join(engine: Engine, prompt: list[int], long_prompt: list[int], rows: int) -> dict[str, float]:
    timeline = Timeline()
    short = [timeline.request(prompt, 10_000) for _ in range(rows)]
    for request in short:
        engine.submit(request)
    before = [time_step(engine) for _ in range(30)][5:]
    long = timeline.request(long_prompt, 64)
    joined = time.perf_counter()
    engine.submit(long)
    while not timeline.tokens[long.request_id]:
        time_step(engine)
    first = timeline.tokens[long.request_id][0]
    after = [time_step(engine) for _ in range(30)][5:]
    for request in short + [long]:
        engine.cancel(request.request_id)
    run_until_idle(engine)
    gaps = [b - a for request in short for a, b in zip(timeline.tokens[request.request_id],
                                                        timeline.tokens[request.request_id][1:], strict=False)
            if b >= joined and a <= first]
    alone = Timeline()
    # Another first token: every block key differs, so the prefix cache holds none of this prompt.
    fresh = [long_prompt[1], *long_prompt[1:]]
    start = time.perf_counter()
    engine.submit(alone.request(fresh, 1))
    run_until_idle(engine)
    prefill_alone = time.perf_counter() - start
    step = statistics.median(before)
    return {"decode_step_ms": 1000 * step, "long_join_penalty": statistics.median(after) / step,
            "max_stall_vs_step": max(gaps) / step, "long_ttft_vs_alone": (first - joined) / prefill_alone,
            "long_ttft_s": first - joined, "long_prefill_alone_s": prefill_alone}


def time_step(engine: Engine) -> float:
    start = time.perf_counter()
    step(engine)
    return time.perf_counter() - start


class PeakRss:
    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.process.memory_info().rss) - self.start


def kv_flood(dtype: str, requests: int, prompt_len: int, new: int, memory: int) -> dict[str, object]:
    engine = Engine(load_base_model(None, quantize="none", dtype=dtype), max_batch=256, kv_cache_memory=memory)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40_000, (prompt_len,), generator=generator).tolist() for _ in range(8)]
    reference = {}
    for i, prompt in enumerate(prompts):
        timeline = Timeline()
        request = timeline.request(prompt, new)
        engine.submit(request)
        run_until_idle(engine)
        reference[i] = timeline.ids[request.request_id]
    rss = PeakRss()
    timeline, flood = Timeline(), []
    start = time.perf_counter()
    for i in range(requests):
        request = timeline.request(prompts[i % len(prompts)], new)
        engine.submit(request)
        flood.append((i % len(prompts), request.request_id))
    run_until_idle(engine)
    seconds = time.perf_counter() - start
    growth = rss.growth()
    # Where each differing output first leaves the prompt's output alone: at a near-tie in bf16 the
    # rounding of a batch of another size can flip a greedy choice (fp32 gives identical outputs).
    diverged = [next(k for k, (a, b) in enumerate(zip(timeline.ids[rid], reference[p], strict=False)) if a != b)
                for p, rid in flood if timeline.ids[rid] != reference[p]]
    mismatched = len(diverged)
    print(f"kv flood: {requests} requests in {seconds:.0f} s, {engine.planner.preemptions} preemptions, "
          f"{mismatched} outputs differ from the prompt alone (first differing token: {sorted(diverged)[:20]}), "
          f"peak RSS growth {growth / 2**30:.2f} GiB", flush=True)
    return {"kv_flood_ok": mismatched == 0 and growth <= 1.5 * 2**30, "kv_flood_rss_growth_gib": growth / 2**30,
            "kv_flood_seconds": seconds, "kv_flood_preemptions": engine.planner.preemptions}


def roofline(engine: Engine, prompt: list[int], rows: int = 32) -> dict[str, float]:
    """Measured batch-32 decode step against max(weight bytes / bandwidth, FLOPs / matmul rate)."""
    timeline = Timeline()
    for _ in range(rows):
        engine.submit(timeline.request(prompt, 10_000))
    steps = [time_step(engine) for _ in range(40)][8:]
    for rid in list(timeline.tokens):
        engine.cancel(rid)
    run_until_idle(engine)
    step = statistics.median(steps)
    dtype = engine.base.dtype
    weight_bytes = step_weight_bytes(engine)
    model = engine.base.model
    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name]
    head = model.get_output_embeddings().weight
    if all(p is not head for p in weights):
        weights.append(head)  # tied to the embedding: read whole once per step by the LM head
    flops = 2 * rows * sum(p.numel() for p in weights)
    bandwidth = read_bandwidth()
    a, b = torch.randn(rows, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    rate = 2 * rows * 4096 * 4096 / min(timed(lambda: a @ b)() for _ in range(20))
    floor = max(weight_bytes / bandwidth, flops / rate)
    print(f"roofline: {weight_bytes / 2**20:.0f} MiB weights, read {bandwidth / 1e9:.1f} GB/s, batch-{rows} matmul "
          f"{rate / 1e9:.0f} GFLOP/s -> floor {1000 * floor:.1f} ms; measured step {1000 * step:.1f} ms", flush=True)
    return {"decode_vs_roofline": floor / step, "decode32_step_ms": 1000 * step, "roofline_floor_ms": 1000 * floor}


def under_classify_load(dtype: str) -> dict[str, float]:
    from bench.serve import TEXTS, make_classifiers, start_server
    from loraplex import Client
    from loraplex_adapters.embedded_base import embedded_default_path
    from loraplex_adapters.store import AdapterStore

    with tempfile.TemporaryDirectory() as root:
        store = AdapterStore(Path(root) / "store")
        adapters = make_classifiers(embedded_default_path(), store, 6)
        server, port, _ = start_server(store.root, ("--dtype", dtype))
        try:
            target = f"127.0.0.1:{port}"
            with Client(target, timeout=120, retries=0) as client:
                def generate() -> float:
                    start = time.perf_counter()
                    client.generate(PROMPT, max_tokens=48, temperature=0)
                    return time.perf_counter() - start
                generate()
                alone = statistics.median(generate() for _ in range(3))
                stop = threading.Event()

                def hammer(seed: int) -> None:
                    with Client(target, timeout=120, retries=0) as other:
                        i = seed
                        while not stop.is_set():
                            other.classify(TEXTS, adapter=adapters[i % len(adapters)])
                            i += 1
                threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
                for thread in threads:
                    thread.start()
                time.sleep(1.0)
                loaded = statistics.median(generate() for _ in range(3))
                stop.set()
                for thread in threads:
                    thread.join()
        finally:
            server.terminate()
            server.wait(30)
    return {"generate_under_classify_load": loaded / alone, "generate_alone_s": alone, "generate_loaded_s": loaded}


def engine_figures(dtype: str) -> dict[str, float]:
    engine = Engine(load_base_model(None, quantize="none", dtype=dtype), max_batch=64)
    results = {"max_batch_tokens": engine.planner.max_batch_tokens}
    prompt = engine.tokenizer(PROMPT)["input_ids"]
    long_prompt = (prompt * (2048 // len(prompt) + 1))[:2048]
    tokens_per_s(engine, prompt, 4, 8)  # warm-up
    short = tokens_per_s(engine, prompt, 16, 32)
    long = tokens_per_s(engine, prompt, 16, 512)
    results.update(per_token_long_vs_short=long / short, short_tok_s=short, long_tok_s=long)
    print(f"16 rows: {short:.0f} tok/s at 32 new tokens, {long:.0f} tok/s at 512", flush=True)
    results.update(long_join(engine, prompt, long_prompt, 16))
    print({k: round(v, 3) for k, v in results.items() if isinstance(v, float)}, flush=True)
    results.update(roofline(engine, prompt))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--flood-requests", type=int, default=200)
    parser.add_argument("--flood-prompt", type=int, default=1500)
    parser.add_argument("--flood-new", type=int, default=500)
    parser.add_argument("--parts", default="engine,serve,flood",
                        help="which parts to run (the flood takes tens of minutes on a 2-core CPU)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict[str, object] = {"dtype": announce_dtype(args.dtype, "auto"), "threads": torch.get_num_threads()}
    if "engine" in parts:
        results.update(engine_figures(args.dtype))
    if "serve" in parts:
        results.update(under_classify_load(args.dtype))
    if "flood" in parts:
        results.update(kv_flood(args.dtype, args.flood_requests, args.flood_prompt, args.flood_new, 2**30))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
