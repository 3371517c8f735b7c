"""Serving benchmark: closed-loop gRPC load against `loraplex serve`, against the engine alone.

    python -m bench.serve [--clients 64] [--adapters 16] [--seconds 20] [--dtype auto]

The server runs on the embedded default base (SmolLM2-135M, CPU, at the `auto` dtype: bf16 where the CPU
has native bf16, else fp32; the engine baseline uses the same) with random rank-8
classification adapters. `--clients` closed loops (asyncio, in this process) each send one short
Classify at a time to a random adapter. Then, in the same run with the server stopped, the engine
classifies the same texts in batches of the size the server actually formed (from its metrics).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForSequenceClassification

from bench.engine import announce_dtype, random_copies
from loraplex import AsyncClient, Client, LoraplexError
from loraplex_adapters.compute_dtype import cpu_description
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.store import AdapterStore
from loraplex_server.base_model import DTYPE_CHOICES, load_base_model
from loraplex_server.engine import Engine

LABELS = ["neg", "neu", "pos"]
TEXTS = ["great movie", "awful plot", "fine acting, slow start", "I loved it", "never again", "ok I guess",
         "the music was lovely", "what a waste of time"]


def make_classifiers(base_dir: Path, store: AdapterStore, count: int, rank: int = 8) -> list[str]:
    """`count` random 3-label rank-`rank` classifiers on q/v published into the store the server will serve."""
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS),
                                                               dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank,
                                                  target_modules=["q_proj", "v_proj"]))
    with tempfile.TemporaryDirectory() as scratch:
        folders = random_copies(peft_model, Path(scratch), count, "cls", 0.05)
        for folder in folders:
            store.publish(folder, folder.name, labels=LABELS)
    return [folder.name for folder in folders]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store_root: Path, extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int, int]:
    """`loraplex serve` on the embedded base and this store; returns once it reports SERVING."""
    port, metrics_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "loraplex_server.serve", "--port", str(port), "--metrics-port",
                               str(metrics_port), "--adapter-dir", str(store_root), "--max-pending", "1024",
                               *extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}", timeout=5, retries=0) as probe:
        for _ in range(600):
            try:
                if probe.health() == "SERVING":
                    return server, port, metrics_port
            except LoraplexError:
                pass
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not become healthy")


def batch_rows_mean(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values["loraplex_batch_rows_sum"] / max(1.0, values["loraplex_batch_rows_count"])


def load(target: str, adapters: list[str], clients: int, seconds: float) -> list[float]:
    """`clients` concurrent closed loops on one asyncio thread (cheaper on the shared CPU than threads)."""

    async def run() -> list[float]:
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds
        async with AsyncClient(target, timeout=60, retries=0) as client:

            async def loop(seed: int) -> None:
                rng = random.Random(seed)
                while time.perf_counter() < stop_at:
                    start = time.perf_counter()
                    try:
                        await client.classify([rng.choice(TEXTS)], adapter=rng.choice(adapters))
                    except LoraplexError as exc:
                        print(f"request failed: {exc}", file=sys.stderr)
                        continue
                    latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(loop(i) for i in range(clients)))
        return latencies

    return asyncio.run(run())


def engine_rows_per_s(store: AdapterStore, adapters: list[str], batch: int, rows: int, dtype: str = "auto") -> float:
    engine = Engine(load_base_model(None, quantize="none", dtype=dtype, device="cpu"), max_adapters=len(adapters))
    for name in adapters:
        engine.load_adapter(name, store.resolve(name)[1], labels=LABELS)
    rng = random.Random(0)
    ids = [engine.tokenizer(t)["input_ids"] for t in TEXTS]
    work = [(rng.choice(ids), rng.choice(adapters)) for _ in range(rows)]
    engine.classify_ids([w[0] for w in work[:batch]], [w[1] for w in work[:batch]])  # warm-up
    start = time.perf_counter()
    for i in range(0, rows, batch):
        chunk = work[i:i + batch]
        engine.classify_ids([w[0] for w in chunk], [w[1] for w in chunk])
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: bf16 on CPUs with native bf16, else fp32")
    args = parser.parse_args()
    dtype = announce_dtype(args.dtype, "cpu")
    store = AdapterStore(tempfile.mkdtemp(prefix="loraplex-serve-bench-"))
    adapters = make_classifiers(embedded_default_path(), store, args.adapters)
    server, port, metrics_port = start_server(store.root, ("--dtype", args.dtype))
    try:
        load(f"127.0.0.1:{port}", adapters, args.clients, 2.0)  # warm-up
        start = time.perf_counter()
        latencies = load(f"127.0.0.1:{port}", adapters, args.clients, args.seconds)
        elapsed = time.perf_counter() - start
        mean_batch = batch_rows_mean(metrics_port)
    finally:
        server.terminate()
        server.wait(timeout=60)
    requests_per_s = len(latencies) / elapsed
    batch = max(1, round(mean_batch))
    engine_rps = engine_rows_per_s(store, adapters, batch, rows=max(batch * 20, 640), dtype=args.dtype)
    cuts = statistics.quantiles(latencies, n=100)
    result = {"grpc_vs_engine": requests_per_s / engine_rps, "requests_per_s": requests_per_s,
              "p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000}
    print(f"{args.clients} clients, {args.adapters} adapters, {len(latencies)} requests in {elapsed:.1f} s")
    print(f"gRPC: {requests_per_s:.1f} req/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
          f"mean batch {mean_batch:.1f} rows")
    print(f"engine alone, batches of {batch}: {engine_rps:.1f} rows/s")
    print(f"grpc_vs_engine {result['grpc_vs_engine']:.3f} (target >= 0.8: "
          f"{'met' if result['grpc_vs_engine'] >= 0.8 else 'NOT met'})")
    print(json.dumps({"dtype": dtype, "cpu": cpu_description(), **{k: round(v, 4) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
