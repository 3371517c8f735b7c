"""Decode step benchmark: one row's step on the Hugging Face modules vs our forward vs the bandwidth floor,
the share of the step spent around the forward, and 16 rows on one adapter vs 16 over 4 adapters.

    python -m bench.decode_step [--dtype auto] [--reps 30] [--compile] [--threads N] [--parts one_row,adapters]

`--parts layout`: our forward's weight layouts at 1 and 16 rows: bf16 panels (the CPU default for bf16-valued
weights), fp32 [in, out] (x @ W) and nn.Linear's [out, in] (F.linear); and our CPU step ops against torch's.
`--parts gemm`: the bf16-panel GEMM alone against torch's at the dtype (MKL's fp32 GEMM, or torch's bf16
linear), 1 to 512 rows.

The embedded base (SmolLM2-135M) at the server's default dtype (or --dtype). Engines run side by side in
this one process and their steps are interleaved, so the machine's drift (it is shared) hits each alike;
every ratio is the median of back-to-back pairs. --compile adds our forward with LORAPLEX_COMPILE=1
(torch.compile per decode bucket; minutes of compiling on a small CPU). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.engine import announce_dtype, interleaved, make_adapters, read_bandwidth, step_weight_bytes, timed
from loraplex_server.cpu_ops import cpu_ops
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.models import fused_linear
from loraplex_server.engine.sampling import SamplingParams

PROMPT = list(range(1000, 1064))  # 64 tokens


def engine(dtype: str, own: bool, compile_mode: str = "0") -> Engine:
    """An engine on a fresh copy of the base: the slot table wraps its layers, so engines never share one."""
    os.environ["LORAPLEX_OWN_FORWARD"] = "1" if own else "0"
    os.environ["LORAPLEX_COMPILE"] = compile_mode
    try:
        return Engine(load_base_model(None, quantize="none", dtype=dtype), max_batch=32, kv_cache_memory=512 << 20)
    finally:
        os.environ.pop("LORAPLEX_OWN_FORWARD")
        os.environ.pop("LORAPLEX_COMPILE")


class ForwardTimer:
    """Seconds spent in the engine's forward (runner.run), to tell the step's own overhead apart."""

    def __init__(self, target: Engine) -> None:
        self.seconds = 0.0
        run = target.runner.run

        def timed(planned):
            start = time.perf_counter()
            out = run(planned)
            self.seconds += time.perf_counter() - start
            return out
        target.runner.run = timed


def start_rows(target: Engine, adapters: list[str | None]) -> None:
    """Submit one long request per entry and step until every row decodes."""
    for adapter in adapters:
        target.submit(GenerationRequest(PROMPT, adapter, SamplingParams(max_new_tokens=4000, ignore_eos=True)))
    while target.planner.waiting or any(not s.output_ids for s in target.planner.running):
        target.step()
    for _ in range(3):
        target.step()
    if len(target.planner.running) != len(adapters):
        raise RuntimeError("a benchmark request failed in the engine (see the log)")


def stop_rows(target: Engine) -> None:
    for request_id in target.running_request_ids():
        target.cancel(request_id)
    while target.has_work:
        target.step()


def interleaved_steps(engines: dict[str, Engine], reps: int, steps: int = 1) -> dict[str, list[float]]:
    """Seconds of `steps` steps of each engine, round-robin with rotating order."""
    seconds: dict[str, list[float]] = {key: [] for key in engines}
    keys = list(engines)
    for rep in range(reps):
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            start = time.perf_counter()
            for _ in range(steps):
                engines[key].step()
            seconds[key].append((time.perf_counter() - start) / steps)
    return seconds


def ratio(seconds: dict[str, list[float]], slower: str, faster: str) -> float:
    """Median over back-to-back pairs of time(slower) / time(faster)."""
    return statistics.median(a / b for a, b in zip(seconds[slower], seconds[faster], strict=True))


def bandwidth_floor_ms(target: Engine) -> tuple[float, float]:
    """(floor ms, read GB/s): every weight byte a batch-1 step reads (the layers' projections and the LM
    head, as our forward stores them: bf16 panels or fp32) over the read bandwidth measured now."""
    bandwidth = read_bandwidth()
    return 1000 * step_weight_bytes(target) / bandwidth, bandwidth / 1e9


def one_row(args, dtype: str) -> dict[str, float]:
    engines = {"hf": engine(dtype, own=False), "ours": engine(dtype, own=True)}
    if args.compile:
        start = time.perf_counter()
        engines["compiled"] = engine(dtype, own=True, compile_mode="1")
        print(f"compiled engine ready in {time.perf_counter() - start:.0f} s (warm-up included)", flush=True)
    timer = ForwardTimer(engines["ours"])
    for target in engines.values():
        start_rows(target, [None])
    timer.seconds = 0.0
    seconds = interleaved_steps(engines, args.reps)
    around = 1 - timer.seconds / sum(seconds["ours"])
    floor, bandwidth = bandwidth_floor_ms(engines["ours"])
    for target in engines.values():
        stop_rows(target)
    out = {f"one_row_step_ms_{k}": 1000 * statistics.median(v) for k, v in seconds.items()}
    out.update({f"one_row_tok_s_{k}": 1 / statistics.median(v) for k, v in seconds.items()})
    out.update(one_row_hf_vs_ours=ratio(seconds, "hf", "ours"), one_row_floor_ms=floor,
               one_row_floor_vs_ours=floor / out["one_row_step_ms_ours"], around_forward_share=around)
    if args.compile:
        out["one_row_ours_vs_compiled"] = ratio(seconds, "ours", "compiled")
    print(f"one row decode step: HF modules {out['one_row_step_ms_hf']:.1f} ms, "
          f"ours {out['one_row_step_ms_ours']:.1f} ms"
          + (f", compiled {out['one_row_step_ms_compiled']:.1f} ms" if args.compile else "")
          + f"; floor {floor:.1f} ms (read {bandwidth:.1f} GB/s); around the forward {100 * around:.1f} % of ours",
          flush=True)
    return out


def one_vs_four_adapters(args, dtype: str) -> dict[str, float]:
    """16 rows all on one adapter vs the same 16 rows over 4 adapters (rank 16 on q/k/v/o), same engine
    kind, interleaved; also 16 rows on the base."""
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for mode in ("base", "single", "four"):
            target = engines[mode] = engine(dtype, own=True)
            folders = make_adapters(target.base.path, Path(tmp) / mode, 4, 16)
            for i, folder in enumerate(folders):
                target.load_adapter(f"a{i}", folder)
        rows = {"base": [None] * 16, "single": ["a0"] * 16, "four": [f"a{i % 4}" for i in range(16)]}
        for mode, target in engines.items():
            start_rows(target, rows[mode])
        seconds = interleaved_steps(engines, args.reps, steps=2)
        for target in engines.values():
            stop_rows(target)
    out = {f"rows16_step_ms_{k}": 1000 * statistics.median(v) for k, v in seconds.items()}
    out.update(rows16_four_vs_single=ratio(seconds, "four", "single"), rows16_base_vs_single=ratio(seconds, "base",
                                                                                                   "single"))
    print(f"16 rows: base {out['rows16_step_ms_base']:.1f} ms, one adapter {out['rows16_step_ms_single']:.1f} ms, "
          f"4 adapters {out['rows16_step_ms_four']:.1f} ms a step", flush=True)
    return out


LAYOUTS = {  # name -> (how FusedLinear decides, whether our CPU step ops run)
    "panels": ({}, True),  # the CPU default: bf16 panels (bf16-valued weights) and our step ops
    "in_out": ({"packs": lambda weights, ops: False}, True),  # fp32 [in, out], x @ W (bf16: as out_in)
    "out_in": ({"packs": lambda weights, ops: False, "stores_transposed": lambda weight: False}, True),
    "torch_ops": ({}, False),  # bf16 panels, but norms, rotary and attention as plain torch ops
}


def layout_engine(dtype: str, name: str) -> Engine:
    rules, ops = LAYOUTS[name]
    saved = {key: getattr(fused_linear, key) for key in rules}
    for key, rule in rules.items():  # read while an engine is built
        setattr(fused_linear, key, rule)
    try:
        built = engine(dtype, own=True)
    finally:
        for key, rule in saved.items():
            setattr(fused_linear, key, rule)
    if not ops:
        built.runner.forward.ops = None
    return built


def weight_layouts(args, dtype: str) -> dict[str, float]:
    """Our forward's weight layouts and step ops, engines interleaved, at 1 and 16 rows on the base: bf16
    panels (csrc/bf16_linear.cpp) against fp32 [in, out] (x @ W) and nn.Linear's [out, in] (F.linear), and our
    step ops (csrc/decode_ops.cpp) against plain torch ops."""
    out = {}
    for rows in (1, 16):
        engines = {name: layout_engine(dtype, name) for name in LAYOUTS}
        for target in engines.values():
            start_rows(target, [None] * rows)
        seconds = interleaved_steps(engines, args.reps, steps=2)
        for target in engines.values():
            stop_rows(target)
        out.update({f"rows{rows}_step_ms_{k}": 1000 * statistics.median(v) for k, v in seconds.items()})
        for other in ("in_out", "out_in", "torch_ops"):
            out[f"rows{rows}_{other}_vs_panels"] = ratio(seconds, other, "panels")
        print(f"{rows} rows, ms a step: " + ", ".join(f"{k} {out[f'rows{rows}_step_ms_{k}']:.1f}" for k in LAYOUTS),
              flush=True)
    return out


def bf16_gemm(args, dtype: str) -> dict[str, float]:
    """Our bf16-panel GEMM (csrc/bf16_linear.cpp) against torch's GEMM at the server's dtype, on the same
    bf16-valued weights: MKL's fp32 GEMM over [in, out] (fp32), or torch's bf16 linear over [out, in] (bf16).
    30 layers of SmolLM2's projection shapes (weights from DRAM), all 120 multiplied per timing."""
    ops = cpu_ops()
    if ops is None or not ops.bf16_linear_tiled():
        print("bf16 GEMM: our CPU ops with AVX-512 tiles are not available here", flush=True)
        return {}
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    weights = [torch.randn(i, o).bfloat16().float() for _ in range(30) for i, o in shapes]
    packed = [(fused_linear.pack_bf16(w), w.shape[0], w.shape[1]) for w in weights]
    if dtype == "bfloat16":
        name, theirs = "torch_bf16", [w.t().bfloat16().contiguous() for w in weights]
        def torch_gemm(x):
            return [F.linear(x[w.shape[1]], w) for w in theirs]
    else:
        name, theirs = "mkl_fp32", weights
        def torch_gemm(x):
            return [torch.mm(x[w.shape[0]], w) for w in theirs]
    out = {}
    for rows in (1, 8, 16, 64, 512):
        x = {i: torch.randn(rows, i).to(getattr(torch, dtype)) for i, _ in shapes}
        seconds = interleaved({
            "panels": timed(lambda x=x: [ops.bf16_linear(x[i], p, None, n) for p, i, n in packed]),
            name: timed(lambda x=x: torch_gemm(x))}, max(3, args.reps // 10))
        out[f"gemm_rows{rows}_{name}_vs_panels"] = ratio(seconds, name, "panels")
        print(f"{rows} rows: bf16 panels {1000 * statistics.median(seconds['panels']):.1f} ms, {name} "
              f"{1000 * statistics.median(seconds[name]):.1f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also our forward under LORAPLEX_COMPILE=1")
    parser.add_argument("--parts", default="one_row,adapters", help="any of one_row, adapters, layout, gemm")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 keeps timings sane on an oversubscribed CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = announce_dtype(args.dtype, "cpu")
    results: dict[str, object] = {"dtype": dtype, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                  "threads": torch.get_num_threads()}
    parts = set(args.parts.split(","))
    if "one_row" in parts:
        results.update(one_row(args, args.dtype))
    if "adapters" in parts:
        results.update(one_vs_four_adapters(args, args.dtype))
    if "layout" in parts:
        results.update(weight_layouts(args, args.dtype))
    if "gemm" in parts:
        results.update(bf16_gemm(args, dtype))
    targets = {"one_row_hf_vs_ours": (">=", 1.5), "one_row_floor_vs_ours": (">=", 0.5),
               "around_forward_share": ("<=", 0.10), "rows16_four_vs_single": (">=", 1.0)}
    print(f"\n{'figure':24s} {'measured':>9s} {'target':>9s}")
    for key, (sense, target) in targets.items():
        if key not in results:
            continue
        value = results[key]
        met = value >= target if sense == ">=" else value <= target
        print(f"{key:24s} {value:9.3f} {sense} {target:6.2f}  {'met' if met else 'NOT met'}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
