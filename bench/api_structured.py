"""Structured output benchmark: what grammar constraints cost the engine, on the embedded base (SmolLM2-135M,
49,152 tokens) in process.

    python -m bench.api_structured [--quick] [--tokens 16] [--rounds 6] [--dtype auto]

- `structured_vs_free` (target >= 0.8): tok/s of 16 rows, each under its own JSON schema and on one of 4
  adapters, over the same 16 rows free; rows run to `--tokens` (ignore_eos: a constrained row that
  completes its document starts another); the two kinds run back to back in each of `--rounds` rounds
  (order alternating), and the figure is the median of the rounds' ratios.
- `mask_us`: the per-token cost of a row's mask (fill the bitmask for one row, median over every token of
  a JSON document under a 4-property schema), for xgrammar (the engine's) and, when it is installed,
  llguidance (the alternative that was measured against it); `apply_16_rows_us`: applying 16 rows' masks
  to the logits [16, 49152], and `mask_share_of_a_16_row_step`, that against a free step of the 16 rows.
- `compile_50_properties_ms`: compiling a 50-property schema cold (never seen) and cached (the request
  path's LRU).
Ratios are taken within one run (the machine may be shared and noisy). Ends with one JSON line.
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
from loraplex_server.engine.grammar import Constraint, GrammarCompiler, RowGrammar, mask_logits
from loraplex_server.engine.sampling import SamplingParams

ROWS = 16
MASK_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                "tags": {"type": "array", "items": {"type": "string"}},
                                                "ok": {"type": "boolean"}},
               "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
MASK_DOCUMENT = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"], "ok": True}
TYPES = [{"type": "string", "maxLength": 12}, {"type": "integer"}, {"type": "boolean"},
         {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}, {"enum": ["red", "green"]}]


def row_schema(i: int) -> dict:
    """A different small schema per row: 3 to 6 properties of varied types."""
    properties = {f"field_{i}_{k}": TYPES[(i + k) % len(TYPES)] for k in range(3 + i % 4)}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def fifty_properties(tag: str) -> str:
    properties = {f"{tag}_{k}": TYPES[k % len(TYPES)] for k in range(50)}
    return json.dumps({"type": "object", "properties": properties, "required": list(properties)})


def run_rows(engine: Engine, prompts: list[list[int]], adapters: list[str], tokens: int, grammars: list | None,
             steps: list[int] | None = None) -> float:
    """Seconds to run the rows to `tokens` each (their step count appended to `steps`)."""
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    requests = [GenerationRequest(p, a, params, grammar=grammars[i] if grammars else None)
                for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
    start = time.perf_counter()
    for request in requests:
        engine.submit(request)
    count = 0
    while engine.has_work:
        engine.step()
        count += 1
    if steps is not None:
        steps.append(count)
    return time.perf_counter() - start


def throughput(engine: Engine, compiler: GrammarCompiler, args) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40_000, (32,), generator=generator).tolist() for _ in range(ROWS)]
    names = sorted(engine.adapters)
    adapters = [names[i % len(names)] for i in range(ROWS)]
    grammars = [compiler.compile(Constraint("json_schema", json.dumps(row_schema(i)))) for i in range(ROWS)]
    run_rows(engine, prompts, adapters, 4, None)  # warm: first steps, prefix cache of the prompts
    run_rows(engine, prompts, adapters, 4, grammars)
    seconds: dict[str, list[float]] = {"free": [], "structured": []}
    steps: list[int] = []
    for round_ in range(args.rounds):
        for kind in (("free", "structured") if round_ % 2 == 0 else ("structured", "free")):
            seconds[kind].append(run_rows(engine, prompts, adapters, args.tokens,
                                          grammars if kind == "structured" else None,
                                          steps if kind == "free" else None))
            print(f"round {round_} {kind}: {ROWS * args.tokens / seconds[kind][-1]:.1f} tok/s", flush=True)
    free, structured = (ROWS * args.tokens / statistics.median(seconds[k]) for k in ("free", "structured"))
    # The machine's load moves between rounds far more than within one: the ratio is the median of each
    # round's pair (taken back to back), not a ratio of medians over rounds.
    pairs = [f / s for f, s in zip(seconds["free"], seconds["structured"], strict=True)]
    step = statistics.median(s / n for s, n in zip(seconds["free"], steps, strict=True))
    return {"free_tok_s": round(free, 1), "structured_tok_s": round(structured, 1),
            "free_step_ms": round(1e3 * step, 1),
            "structured_vs_free": round(statistics.median(pairs), 3),
            "structured_vs_free_rounds": [round(p, 3) for p in pairs]}


def _median_us(samples: list[float]) -> float:
    return round(1e6 * statistics.median(samples), 1)


def mask_costs(engine: Engine, compiler: GrammarCompiler) -> dict:
    ids = engine.tokenizer(json.dumps(MASK_DOCUMENT), add_special_tokens=False)["input_ids"]
    grammar = compiler.compile(Constraint("json_schema", json.dumps(MASK_SCHEMA)))
    vocab = compiler.info.vocab_size
    bitmask = torch.empty((1, (vocab + 31) // 32), dtype=torch.int32)
    fills = []
    for _ in range(5):
        row = RowGrammar(grammar)
        for token in ids:
            start = time.perf_counter()
            row.fill(bitmask, 0)
            fills.append(time.perf_counter() - start)
            assert row.accept(token)
    out = {"mask_tokens_per_document": len(ids), "mask_us_xgrammar": _median_us(fills)}
    logits = torch.randn(ROWS, vocab)
    rows = [RowGrammar(grammar) for _ in range(ROWS)]
    applies = []
    for _ in range(20):
        start = time.perf_counter()
        mask_logits(logits, rows)
        applies.append(time.perf_counter() - start)
    out["fill_and_apply_16_rows_us"] = _median_us(applies)
    try:  # the alternative the engine was chosen against (not a dependency)
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        return out
    tokenizer = llguidance.hf.from_tokenizer(engine.tokenizer, n_vocab=vocab)
    compiled = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(MASK_SCHEMA))
    guidance_mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    fills = []
    for _ in range(5):
        matcher = llguidance.LLMatcher(tokenizer, compiled)
        for token in ids:
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, guidance_mask, 0)
            fills.append(time.perf_counter() - start)
            assert matcher.consume_token(token)
    out["mask_us_llguidance"] = _median_us(fills)
    return out


def compile_times(compiler: GrammarCompiler, rounds: int) -> dict:
    cold, cached = [], []
    for i in range(rounds):
        constraint = Constraint("json_schema", fifty_properties(f"p{i}_{time.monotonic_ns()}"))
        start = time.perf_counter()
        compiler.compile(constraint)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiler.compile(constraint)
        cached.append(time.perf_counter() - start)
    return {"compile_50_properties_cold_ms": round(1e3 * statistics.median(cold), 2),
            "compile_50_properties_cached_us": _median_us(cached)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per row")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="8 tokens, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = 8, 1
    results: dict[str, object] = {"dtype": announce_dtype(args.dtype, "auto"), "threads": torch.get_num_threads()}
    base = load_base_model(None, quantize="none", dtype=args.dtype)
    engine = engine_with_adapters(base, 4, 8, max_batch=2 * ROWS)
    start = time.perf_counter()
    compiler = GrammarCompiler(engine.tokenizer, base.model.config.vocab_size, engine.eos_ids)
    results["vocabulary_read_ms"] = round(1e3 * (time.perf_counter() - start))
    results.update(compile_times(compiler, 3))
    results.update(mask_costs(engine, compiler))
    results.update(throughput(engine, compiler, args))
    # Less noisy than the timed ratio: the 16 rows' mask work against a free step, both measured here.
    share = results["fill_and_apply_16_rows_us"] / 1e3 / results["free_step_ms"]
    results["mask_share_of_a_16_row_step"] = round(share, 4)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
