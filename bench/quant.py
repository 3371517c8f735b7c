"""A quantized base on CPU (issue 20, item 7): speed and accuracy of each quantization against the default dtype.

    python -m bench.quant [--variants none,nf4,int8,int8-wo,int4-wo] [--reps 5] [--decode-steps 16]

The embedded base (SmolLM2-135M) at the `auto` dtype (fp32 on CPUs without native bf16), served through the
engine (`Engine.step`), with one random rank-16 generation adapter on q/k/v/o, in each variant:
- none: the default (what `--quantize auto` serves on CPU today);
- nf4, int8: bitsandbytes, today's `--quantize` options;
- int8-wo, int4-wo: torchao's weight-only CPU path (`quantize_weight_only_` below; `pip install
  --constraint constraints.txt torchao`, 0.18.0 was measured: not a dependency of the server).

Speed: decode tok/s of 1 row and of 16 rows (64-token prompts), variants timed round-robin in rotating order;
each ratio is the median over repetitions of (default's step time / the variant's), so > 1 is faster.
Accuracy, on a few English prompts under the adapter:
- vs PEFT fp32: the largest logit difference from PEFT on the unquantized fp32 base (teacher-forced over
  the prompts), the share of positions whose top token agrees, and how much of a greedy generation (up to
  32 tokens or the end-of-sequence token) matches PEFT's before the first different token (the quantization's
  cost);
- vs PEFT same base: the largest logit difference from PEFT on a base loaded and quantized the same way
  (our engine's parity on that base; tests/test_engine_vs_peft.py's tolerances: none 1e-4, nf4 1e-3, int8 3e-2).
Ends with one JSON line. The machine's load moves absolute figures; only the ratios are comparable.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from bench.engine import make_adapters
from loraplex_adapters.compute_dtype import cpu_description
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_server.engine.base_model import BaseModel, load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.sampling import SamplingParams

WEIGHT_ONLY_MODES = ("int8-wo", "int4-wo")
INT4_GROUP_SIZES = (128, 64, 32)  # the CPU int4 kernel's group sizes, coarsest first
# Kept as the bitsandbytes configs keep them: the head (tied to the embeddings here) and task heads.
SKIP_MODULES = ("lm_head", "score", "classifier", "pooler")
VARIANTS = ("none", "nf4", "int8", *WEIGHT_ONLY_MODES)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Then the fox",
    "Write a short note to a friend about the weather today:",
    "Question: What is the capital of France?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
GREEDY_TOKENS = 32
# bitsandbytes' int8 logs, once per layer and call on CPU, that fp32 inputs go through fp16.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
KV_MEMORY = 64 << 20  # plenty for 16 rows of 64 + a few hundred tokens


def _quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if type(module) is nn.Linear and not any(part in SKIP_MODULES for part in name.split("."))}


def int4_group_size(in_features: int) -> int | None:
    """The coarsest int4 group that divides the layer's input features, or None (the layer stays as it is)."""
    return next((size for size in INT4_GROUP_SIZES if in_features % size == 0), None)


def quantize_weight_only_(model: nn.Module, mode: str) -> list[str]:
    """Quantize the model's linear weights in place with torchao's weight-only CPU path; returns the names
    of the layers quantized. "int8-wo": per-output-channel int8. "int4-wo": grouped int4 (asymmetric, the
    tinygemm CPU kernel), the group the coarsest of INT4_GROUP_SIZES that divides each layer's input."""
    if mode not in WEIGHT_ONLY_MODES:
        raise ValueError(f"unknown weight-only mode {mode!r}; choose one of {', '.join(WEIGHT_ONLY_MODES)}")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    done = []
    for name, module in _quantized_linears(model).items():
        if mode == "int8-wo":
            config = Int8WeightOnlyConfig(set_inductor_config=False)
        else:
            # torchao 0.18 keeps its CPU int4 layout (the `_weight_int4pack_mm_for_cpu` kernel) in prototype.
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            group = int4_group_size(module.in_features)
            if group is None:
                continue
            config = PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
        quantize_(module, config)  # the layer itself: quantize_ applies to the root module it is given
        done.append(name)
    return done


def load_variant(name: str, dtype: str) -> BaseModel:
    base = load_base_model(None, quantize=name if name in ("nf4", "int8") else "none", dtype=dtype, device="cpu")
    if name in WEIGHT_ONLY_MODES:
        quantize_weight_only_(base.model, name)
    return base


class Variant:
    """One base variant with the adapter loaded in an engine."""

    def __init__(self, name: str, adapter: Path, dtype: str) -> None:
        self.name = name
        self.base = load_variant(name, dtype)
        self.engine = Engine(self.base, max_adapters=2, kv_cache_memory=KV_MEMORY)
        self.engine.load_adapter("a", adapter)

    def decode_seconds(self, prompts: list[list[int]], steps: int) -> float:
        """Seconds per decode step of a running batch of these prompts (their prefill not timed)."""
        engine = self.engine
        for prompt in prompts:
            engine.submit(GenerationRequest(prompt, "a", SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)))
        while engine.planner.waiting or any(not s.output_ids for s in engine.planner.running):
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
        while engine.has_work:
            engine.step()
        return elapsed / steps


def peft_reference(variant: str | None, adapter: Path, dtype: str) -> PeftModel:
    """PEFT on a base loaded and quantized as `variant` is (None: the unquantized fp32 base). PEFT's LoRA layers
    call the quantized base layer and add their delta, as they do on a bitsandbytes base."""
    if variant is None:
        base = load_base_model(None, quantize="none", dtype="float32", device="cpu")
    else:
        base = load_variant(variant, dtype)
    return PeftModel.from_pretrained(base.model, adapter, adapter_name="a", autocast_adapter_dtype=False).eval()


@torch.inference_mode()
def peft_outputs(model: PeftModel, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    logits, greedy = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        logits.append(model(input_ids=ids).logits[0].float())
        # Stops at the end-of-sequence token as the engine does (min_new_tokens would forbid it instead).
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                             do_sample=False)
        greedy.append(out[0, len(prompt):].tolist())
    return logits, greedy


def strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    ids = list(ids)
    while ids and ids[-1] in eos:
        ids.pop()
    return ids


def agreement(engine: Engine, prompts: list[list[int]], logits: list[torch.Tensor], greedy: list[list[int]]
              ) -> dict[str, float]:
    ours = engine.logits(prompts, ["a"] * len(prompts))
    diff = max(float((o - r).abs().max()) for o, r in zip(ours, logits, strict=True))
    top1 = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(ours, logits, strict=True))
    generated = engine.generate(prompts, ["a"] * len(prompts),
                                SamplingParams(max_new_tokens=GREEDY_TOKENS))
    prefix = []
    for gen, want in zip(generated, greedy, strict=True):
        ours_ids, want = strip_eos(gen.token_ids, engine.eos_ids), strip_eos(want, engine.eos_ids)
        pairs = enumerate(zip(ours_ids, want, strict=False))  # one may stop earlier
        same = next((i for i, (a, b) in pairs if a != b), min(len(ours_ids), len(want)))
        prefix.append(same / max(len(ours_ids), len(want), 1))
    return {"max_abs_logit_diff": diff, "top1_agree": top1 / sum(len(p) for p in prompts),
            "greedy_prefix": statistics.mean(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--dtype", default="auto", help="the compute dtype (auto: bf16 where native, else fp32)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="0: accuracy only")
    args = parser.parse_args()
    names = ["none", *[v for v in args.variants.split(",") if v != "none"]]
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-quant-"))

    adapter = make_adapters(embedded_default_path(), tmp, 1, 16)[0]
    variants: dict[str, Variant] = {}
    for name in names:
        start = time.perf_counter()
        variants[name] = Variant(name, adapter, args.dtype)
        print(f"loaded {name} in {time.perf_counter() - start:.1f} s", flush=True)
    base = variants["none"].base
    print(f"{cpu_description()}; dtype {str(base.dtype).removeprefix('torch.')}; "
          f"{base.path.name}, rank-16 adapter on q/k/v/o; {args.reps} reps x {args.decode_steps} decode steps",
          flush=True)

    vocab = base.model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.rows)]
    shapes = {"1 row": prompts[:1], f"{args.rows} rows": prompts}
    seconds = {(name, shape): [] for name in names for shape in shapes}
    for name in names if args.reps else []:  # warm-up (--reps 0: accuracy only)
        for shape_prompts in shapes.values():
            variants[name].decode_seconds(shape_prompts, 2)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for shape, shape_prompts in shapes.items():
                seconds[name, shape].append(variants[name].decode_seconds(shape_prompts, args.decode_steps))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {seconds[n, s][-1] * 1000:.0f}"
                                                      for n in names for s in shapes) + " ms per step", flush=True)

    text_prompts = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
    fp32_logits, fp32_greedy = peft_outputs(peft_reference(None, adapter, args.dtype), text_prompts)
    results: dict[str, dict[str, float]] = {}
    header = (f"{'variant':8s} " + " ".join(f"{s + ' tok/s':>12s} {'vs none':>7s}" for s in shapes if args.reps)
              + f" {'vs PEFT fp32: max|dlogit|':>26s} {'top1':>6s} {'greedy':>6s} {'vs PEFT same base':>18s}")
    print("\n" + header)
    for name in names:
        row: dict[str, float] = {}
        cells = []
        for shape, shape_prompts in shapes.items() if args.reps else []:
            ratio = statistics.median(b / v for b, v in zip(seconds["none", shape], seconds[name, shape], strict=True))
            tok_s = len(shape_prompts) / statistics.median(seconds[name, shape])
            key = shape.replace(" ", "_")
            row[f"{key}_tok_s"], row[f"{key}_vs_none"] = tok_s, ratio
            cells.append(f"{tok_s:12.1f} {ratio:7.3f}")
        row.update(agreement(variants[name].engine, text_prompts, fp32_logits, fp32_greedy))
        logits, _ = peft_outputs(peft_reference(name, adapter, args.dtype), text_prompts[:1])
        ours = variants[name].engine.logits(text_prompts[:1], ["a"])[0]
        row["vs_peft_same_base"] = float((ours - logits[0]).abs().max())
        results[name] = row
        print(f"{name:8s} " + " ".join(cells) + f" {row['max_abs_logit_diff']:26.4f} {row['top1_agree']:6.3f} "
              f"{row['greedy_prefix']:6.3f} {row['vs_peft_same_base']:18.2e}", flush=True)
    print(json.dumps({"cpu": cpu_description(), "dtype": str(base.dtype).removeprefix("torch."),
                      **{name: {k: round(v, 5) for k, v in row.items()} for name, row in results.items()}}))


if __name__ == "__main__":
    main()
