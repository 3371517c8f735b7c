"""Issue 14's production-size figures, for a lent GPU: `python -m bench.gpu_big [--shape 8b] [--quantize none nf4]`.

A Llama-3.1-8B-shaped base with random weights drawn on the device (random weights time the same as
trained ones), written once as a safetensors folder so the server's own loader reads it (nf4 too), and
32 distinct rank-16 adapters on q/k/v/o written straight as PEFT folders (no 8B PEFT model on the host).
For each quantization:
- decode_mixed_vs_base at batch 32 and 64 (rows cycle the 32 adapters): base step time over mixed;
- prefill_mixed_vs_base: 32 rows of 512 tokens;
- decode_vs_hbm_roofline at batch 64: the base's weight bytes over the HBM bandwidth measured here
  (a large device-to-device copy, bytes read plus written), over the mixed step time;
- absolute tok/s for base, one adapter and 32 mixed; torch, Triton and CUDA versions.
`--shape tiny` runs the same code on a small Llama (on the CPU too) to check the script itself.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.engine import TARGETS, Bench, interleaved, speedup, synchronize
from loraplex_adapters.embedded_base import embedded_default_path

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048),
}
KV_CACHE_BYTES = 4 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TARGETS_MET = {"decode_mixed_vs_base_32": 0.90, "decode_mixed_vs_base_64": 0.90, "prefill_mixed_vs_base": 0.90,
               "decode_vs_hbm_roofline_64": 0.6}


def make_base(folder: Path, shape: str, device: str) -> Path:
    """A random Llama of the shape, drawn on the device, saved in bf16 with the embedded base's tokenizer
    (ids past its vocabulary decode to nothing, which a benchmark that ignores EOS never reads)."""
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    for name in TOKENIZER_FILES:
        if (embedded_default_path() / name).exists():
            shutil.copy(embedded_default_path() / name, folder / name)
    return folder


def write_adapters(base_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    """`count` random rank-`rank` PEFT folders on q/k/v/o, written from the config's shapes alone."""
    config = LlamaConfig.from_pretrained(base_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    sizes = {"q_proj": (config.hidden_size, config.num_attention_heads * head_dim),
             "k_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
             "v_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
             "o_proj": (config.num_attention_heads * head_dim, config.hidden_size)}
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                      "target_modules": TARGETS, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                      "base_model_name_or_path": str(base_dir)}
    folders = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for module, (fan_in, fan_out) in sizes.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.02).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.02).bfloat16()
        folder = out / f"adapter{i:02d}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
        save_file(tensors, folder / "adapter_model.safetensors")
        folders.append(folder)
    return folders


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy, read plus written (the median of 10)."""
    if device != "cuda":
        return float("nan")
    source = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)  # 2 GiB
    target = torch.empty_like(source)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del source, target
    return 2 * (1 << 30) * 2 / statistics.median(times[3:])


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes a decode step must read: every weight but the input embedding (it reads one row a token)
    and the LoRA tables (the adapters' own cost)."""
    return sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
               if "embed_tokens" not in name and "lora" not in name)


def run(args, base_dir: Path, quantize: str, bandwidth: float) -> dict:
    results = {}
    for batch in (32, 64):
        bench_args = argparse.Namespace(base=str(base_dir), quantize=quantize, dtype="bfloat16", device=args.device,
                                        batch=batch, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                                        rank=16)
        # KV for 64 rows of short prompts and 32 x 512 prefill tokens; the server's default would take half
        # the GPU for the full 8k context and leave too little for the next load.
        bench = Bench(bench_args, adapters=32, make=write_adapters, kv_cache_memory=KV_CACHE_BYTES)
        decode = interleaved({mode: bench.decode(rows) for mode, rows in bench.modes.items()}, args.reps)
        results[f"decode_mixed_vs_base_{batch}"] = speedup(decode, "mixed", "base")
        for mode, seconds in decode.items():
            results[f"decode_tok_s_{mode}_{batch}"] = batch * args.decode_steps / statistics.median(seconds)
        if batch == 64:
            step = statistics.median(decode["mixed"]) / args.decode_steps
            floor = weight_bytes(bench.base.model) / bandwidth
            results["decode_vs_hbm_roofline_64"] = floor / step
            results["weight_bytes"] = weight_bytes(bench.base.model)
        if batch == 32:  # 32 rows of `prefill_len` tokens, a fresh Bench's prompts at that length
            bench.prompts = [p * (args.prefill_len // len(p) + 1) for p in bench.prompts]
            bench.prompts = [p[:args.prefill_len] for p in bench.prompts]
            prefill = interleaved({mode: bench.prefill(rows) for mode, rows in bench.modes.items()}, args.reps)
            results["prefill_mixed_vs_base"] = speedup(prefill, "mixed", "base")
            for mode, seconds in prefill.items():
                results[f"prefill_tok_s_{mode}"] = 32 * args.prefill_len / statistics.median(seconds)
        del bench
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def versions() -> dict:
    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4", "int8"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before the timed decode steps")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work", default=None, help="where the random base goes (default: a temporary folder)")
    args = parser.parse_args()

    print(json.dumps(versions()), flush=True)
    base_dir = Path(args.work or tempfile.mkdtemp(prefix="loraplex-big-")) / f"llama-{args.shape}"
    if not (base_dir / "model.safetensors.index.json").exists() and not (base_dir / "model.safetensors").exists():
        make_base(base_dir, args.shape, args.device)  # else a folder an earlier run of the same --work left
    bandwidth = copy_bandwidth(args.device)
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + written)", flush=True)
    figures = {}
    for quantize in args.quantize:
        for key, value in run(args, base_dir, quantize, bandwidth).items():
            figures[f"{quantize}_{key}"] = value
            print(f"{quantize:5s} {key:32s} {value:12.4g}", flush=True)
    print(f"\n{'ratio':40s} {'measured':>9s} {'target':>7s}")
    for quantize in args.quantize:
        for key, target in TARGETS_MET.items():
            if key == "decode_vs_hbm_roofline_64" and quantize != "none":
                continue  # the roofline target is bf16's
            value = figures[f"{quantize}_{key}"]
            print(f"{quantize + ' ' + key:40s} {value:9.3f} {target:7.2f}  {'met' if value >= target else 'NOT met'}")
    print(json.dumps({"shape": args.shape, "bandwidth_bytes_s": bandwidth, **versions(),
                      **{k: round(v, 4) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
