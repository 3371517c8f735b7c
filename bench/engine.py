"""Engine benchmark: batched multi-adapter LoRA against single-adapter, base and PEFT, in one run.

    python -m bench.engine [--batch 32] [--prompt-len 32] [--decode-steps 32] [--device cpu] [--dtype auto]

SmolLM2-135M (embedded default) at the `auto` dtype (bf16 on CUDA and on CPUs with native bf16, else
fp32; PEFT runs at the same one), rank 16 on q/k/v/o. Every figure is a ratio of two timings
taken in this same process (the machines are shared and noisy): variants run round-robin after a
warm-up, and each ratio is the median of back-to-back pairs. Ends with one JSON line.
One row's decode step (Hugging Face modules vs our forward vs the bandwidth floor) and one adapter vs
many at 16 rows: `python -m bench.decode_step`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraplex_adapters.compute_dtype import cpu_description
from loraplex_server.engine.base_model import (
    DTYPE_CHOICES,
    fix_bnb_cpu_fast_path,
    load_base_model,
    quantization_config,
    resolve_device,
    resolve_dtype,
)
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.sampling import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def announce_dtype(dtype: str, device: str) -> str:
    """Resolve `--dtype` as the server does and print it with the CPU's bf16 support (ratios taken
    at bf16 and at fp32 are not comparable); returns the dtype's name for the JSON line."""
    name = str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")
    print(f"{cpu_description()}; dtype {name}", flush=True)
    return name


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - start
    return run


def interleaved(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Seconds per repetition of each run, taken round-robin (rotating the order) after one warm-up
    each, so that the machine's drift hits every variant alike."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    for rep in range(reps):
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            seconds[key].append(runs[key]())
    return seconds


def speedup(seconds: dict[str, list[float]], ours: str, baseline: str) -> float:
    """Median over repetitions of baseline time / our time, each pair taken back to back."""
    return statistics.median(b / o for o, b in zip(seconds[ours], seconds[baseline], strict=True))


def step_weight_bytes(engine: Engine) -> int:
    """The weight bytes one decode step streams: the layers' projections and the LM head as the engine stores
    them (our forward's bf16 panels or fp32; the HF modules' weights otherwise), not the input embedding
    (a step reads one row of it per token)."""
    forward = engine.runner.forward
    if forward is not None:
        linears = [p for layer in forward.layers for p in layer.projections] + [forward.head]
        return sum((f.packed if f.packed is not None else f.weight).nbytes for f in linears)
    model = engine.base.model
    weights = {p.untyped_storage().data_ptr(): p for name, p in model.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in name}
    head = model.get_output_embeddings().weight
    weights[head.untyped_storage().data_ptr()] = head  # tied to the embedding: read whole by the LM head
    return sum(p.untyped_storage().nbytes() for p in weights.values())  # fused weights counted once


def read_bandwidth() -> float:
    """Bytes a second this machine reads now: torch summing 256 MiB of written memory (a read-only stream, as a
    decode step's GEMVs), best of 5. Written: untouched pages of torch.empty all map the kernel's one zero page
    and are read from cache (1.6x too fast here; the floors before stop 30 timed a copy out of such pages)."""
    big = torch.ones(256 << 20 >> 2, dtype=torch.float32)
    return big.numel() * 4 / min(timed(big.sum)() for _ in range(5))


def random_copies(peft_model, out: Path, count: int, prefix: str, scale: float) -> list[Path]:
    """Save the PEFT model once as a template, then `count` adapters of its shape with their own
    random weights (N(0, scale), bf16) - many distinct adapters without training or PEFT per copy."""
    template = out / f".{prefix}-template"
    peft_model.save_pretrained(template)
    tensors = load_file(template / "adapter_model.safetensors")
    folders = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        folder = out / f"{prefix}{i:02d}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
        save_file({k: (torch.randn(v.shape, generator=gen) * scale).to(torch.bfloat16) for k, v in tensors.items()},
                  folder / "adapter_model.safetensors")
        folders.append(folder)
    return folders


def make_adapters(base_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                  init_lora_weights=False))
    return random_copies(peft_model, out, count, "adapter", 0.02)


def engine_with_adapters(base, count: int, rank: int, **engine_options) -> Engine:
    """An engine on `base` with `count` random rank-`rank` generation adapters loaded (named by their folders)."""
    engine = Engine(base, max_adapters=count, **engine_options)
    with tempfile.TemporaryDirectory() as root:
        for folder in make_adapters(base.path, Path(root), count, rank):
            engine.load_adapter(folder.name, folder)
    return engine


class Bench:
    """`args.batch` rows over `adapters` distinct adapters (default one per row), made by `make`
    (base folder, output folder, count, rank) -> adapter folders; `kv_cache_memory` bytes (default: the
    server's)."""

    def __init__(self, args, adapters: int | None = None, make=make_adapters, kv_cache_memory: int | None = None
                 ) -> None:
        torch.manual_seed(0)
        self.args = args
        self.base = load_base_model(args.base, quantize=args.quantize, dtype=args.dtype, device=args.device)
        self.tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
        count = adapters or args.batch
        self.folders = make(self.base.path, self.tmp, count, args.rank)
        self.engine = Engine(self.base, max_adapters=count, kv_cache_memory=kv_cache_memory)
        self.names = [f"a{i}" for i in range(count)]
        for name, folder in zip(self.names, self.folders, strict=True):
            self.engine.load_adapter(name, folder)
        vocab = self.base.model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        self.prompts = [torch.randint(100, vocab, (args.prompt_len,), generator=gen).tolist()
                        for _ in range(args.batch)]
        self.modes = {"base": [None] * args.batch, "single": [self.names[0]] * args.batch,
                      "mixed": [self.names[i % count] for i in range(args.batch)]}
        self.results: dict[str, float] = {}

    # -- ours -----------------------------------------------------------------------------------

    def prefill(self, rows: list[str | None]) -> Callable[[], float]:
        return timed(lambda: self.engine.logits(self.prompts, rows, last_only=True))

    def decode(self, rows: list[str | None]) -> Callable[[], float]:
        """Seconds for `decode_steps` steps of a full running batch (its prefill is not timed)."""
        steps = self.args.decode_steps

        def run() -> float:
            params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
            for prompt, name in zip(self.prompts, rows, strict=True):
                self.engine.submit(GenerationRequest(prompt, name, params))
            planner = self.engine.planner
            while planner.waiting or any(not s.output_ids for s in planner.running):
                self.engine.step()  # prefill (in chunks of --max-batch-tokens): every row gets its first token
            synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                self.engine.step()
            synchronize()
            elapsed = time.perf_counter() - start
            while self.engine.has_work:
                self.engine.step()
            return elapsed

        return run

    def continuous(self, adapters: list[str], tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        out = self.engine.generate(self.prompts, adapters, params)
        elapsed = time.perf_counter() - start
        return sum(g.completion_tokens for g in out) / elapsed, [g.token_ids for g in out]

    # -- PEFT -----------------------------------------------------------------------------------

    def peft_model(self) -> PeftModel:
        """PEFT on the same base, dtype and quantization as ours."""
        kwargs = {"dtype": self.base.dtype, "device_map": {"": self.base.device}}
        if self.base.quantize != "none":
            kwargs["quantization_config"] = quantization_config(self.base.quantize, self.base.dtype)
        base = AutoModelForCausalLM.from_pretrained(self.base.path, **kwargs).eval()
        fix_bnb_cpu_fast_path(base)
        model = PeftModel.from_pretrained(base, self.folders[0], adapter_name=self.names[0],
                                          autocast_adapter_dtype=False)
        for name, folder in zip(self.names[1:], self.folders[1:], strict=True):
            model.load_adapter(folder, adapter_name=name, autocast_adapter_dtype=False)
        return model.eval()

    def peft_prefill(self, model: PeftModel) -> Callable[[], float]:
        ids = torch.tensor(self.prompts, device=self.base.device)
        mask = torch.ones_like(ids)
        return timed(torch.inference_mode()(
            lambda: model(input_ids=ids, attention_mask=mask, adapter_names=self.names, logits_to_keep=1)))

    def peft_decode(self, model: PeftModel) -> Callable[[], float]:
        """Seconds for `decode_steps` decode steps of PEFT generate on the mixed batch, from the
        difference of two generate calls (so its prefill is not counted)."""
        ids = torch.tensor(self.prompts, device=self.base.device)
        mask = torch.ones_like(ids)
        extra = self.args.peft_decode_steps

        @torch.inference_mode()
        def generate(n: int) -> float:
            synchronize()
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, adapter_names=self.names, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False)
            synchronize()
            return time.perf_counter() - start

        return lambda: (generate(extra + 1) - generate(1)) / extra * self.args.decode_steps

    @torch.inference_mode()
    def peft_sequential(self, model: PeftModel, adapters: list[str], tokens: int) -> tuple[float, list[list[int]]]:
        produced, outputs = 0, []
        start = time.perf_counter()
        for prompt, name in zip(self.prompts, adapters, strict=True):
            ids = torch.tensor([prompt], device=self.base.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[name],
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            outputs.append(out[0, len(prompt):].tolist())
            produced += out.shape[1] - len(prompt)
        return produced / (time.perf_counter() - start), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--peft-decode-steps", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=24, help="tokens per request, continuous vs sequential")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base", default=None, help="a local HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32")
    args = parser.parse_args()
    dtype = announce_dtype(args.dtype, args.device)
    bench = Bench(args)
    device = torch.cuda.get_device_name() if bench.base.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"{bench.base.path.name} {dtype} quantize={args.quantize} on {device}, batch={args.batch}, "
          f"prompt={args.prompt_len}, rank={args.rank} on {'/'.join(TARGETS)}", flush=True)

    peft_model = bench.peft_model()
    prefill = interleaved({**{mode: bench.prefill(rows) for mode, rows in bench.modes.items()},
                           "peft": bench.peft_prefill(peft_model)}, args.reps)
    decode = interleaved({**{mode: bench.decode(rows) for mode, rows in bench.modes.items()},
                          "peft": bench.peft_decode(peft_model)}, args.reps)
    prefill_tokens = args.batch * args.prompt_len
    decode_tokens = args.batch * args.decode_steps
    for mode in [*bench.modes, "peft"]:
        label = "PEFT mixed" if mode == "peft" else f"ours {mode}"
        print(f"{label:12s}: prefill {prefill_tokens / statistics.median(prefill[mode]):8.1f} tok/s   "
              f"decode {decode_tokens / statistics.median(decode[mode]):8.1f} tok/s", flush=True)

    eight = [bench.names[i % 8] for i in range(args.batch)]
    cont_tps, cont_out = bench.continuous(eight, args.gen_tokens)
    seq_tps, seq_out = bench.peft_sequential(peft_model, eight, args.gen_tokens)
    same = sum(a == b for a, b in zip(cont_out, seq_out, strict=True))
    print(f"{args.batch} requests on 8 adapters: continuous {cont_tps:.1f} tok/s, PEFT one at a time "
          f"{seq_tps:.1f} tok/s ({same}/{len(cont_out)} greedy outputs identical in {dtype})", flush=True)

    ratios = {
        "prefill_mixed_vs_single": speedup(prefill, "mixed", "single"),
        "prefill_mixed_vs_base": speedup(prefill, "mixed", "base"),
        "prefill_vs_peft_mixed": speedup(prefill, "mixed", "peft"),
        "decode_mixed_vs_single": speedup(decode, "mixed", "single"),
        "decode_mixed_vs_base": speedup(decode, "mixed", "base"),
        "decode_vs_peft_mixed": speedup(decode, "mixed", "peft"),
        "continuous_vs_sequential": cont_tps / seq_tps,
    }
    targets = {"prefill_mixed_vs_single": 0.95, "prefill_mixed_vs_base": 0.90, "prefill_vs_peft_mixed": 2.0,
               "decode_mixed_vs_single": 0.90, "decode_mixed_vs_base": 0.85, "decode_vs_peft_mixed": 5.0,
               "continuous_vs_sequential": 10.0}
    print(f"\n{'ratio':28s} {'measured':>9s} {'target':>7s}")
    for key, value in ratios.items():
        print(f"{key:28s} {value:9.3f} {targets[key]:7.2f}  {'met' if value >= targets[key] else 'NOT met'}")
    print(json.dumps({"dtype": dtype, "cpu": cpu_description(), **{k: round(v, 4) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
