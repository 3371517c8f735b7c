"""Serving benchmark: every protocol the server speaks, against the same server in one run.

    python -m bench.serve [--protocol grpc openai oip] [--requests 32] [--concurrency 8] [--max-tokens 32]
    python -m bench.serve --vs-engine [--clients 64] [--adapters 16] [--seconds 20]

One `loraplex serve` on the embedded default base (SmolLM2-135M, CPU) at the server's default dtype
(`auto`: bf16 where the CPU has native bf16, else fp32), with one random rank-8 generation adapter and
one random 3-label classification adapter. First one greedy generation and one classification per
protocol, whose outputs must agree. Then, per protocol, `--concurrency` closed-loop clients (asyncio,
in this process) send `--requests` streamed greedy generations of `--max-tokens` tokens (OIP: unary
ModelInfer), then `--classify-requests` one-text classifications. Protocols run interleaved over
`--rounds` rounds (the order rotating) and each figure is the median over rounds, so the machine's
drift hits every protocol alike. openai_vs_grpc = OpenAI streaming requests/s over our gRPC
streaming requests/s, the median of the per-round ratios (target >= 0.8). Ends with one JSON line.

--vs-engine (issue 3): `--clients` closed loops each send one short Classify at a time to a random one
of `--adapters` classifiers; then, with the server stopped, the engine classifies the same texts in
batches of the size the server actually formed (from its metrics): grpc_vs_engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
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

from bench.engine import announce_dtype, make_adapters, random_copies
from bench.protocols import PROTOCOLS, Figures, closed_loop, open_driver
from loraplex import AsyncClient, Client, LoraplexError
from loraplex_adapters.compute_dtype import cpu_description
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.store import AdapterStore
from loraplex_server.engine.base_model import DTYPE_CHOICES, load_base_model
from loraplex_server.engine.engine import Engine

LABELS = ["neg", "neu", "pos"]
GENERATOR = "gen"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"
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
    """`loraplex serve` on the embedded base and this store; returns once it reports SERVING. The HTTP API
    is off unless extra_args names an --http-port."""
    port, metrics_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "loraplex_server.app.serve", "--port", str(port), "--metrics-port",
                               str(metrics_port), "--adapter-dir", str(store_root), "--max-pending", "1024",
                               "--http-port", "0", *extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def engine_comparison(args: argparse.Namespace) -> None:
    """Issue 3: classification over gRPC against the engine alone at the batch size the server formed."""
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


def protocol_comparison(args: argparse.Namespace) -> None:
    """Issue 12: the same workloads over each protocol, against one server."""
    dtype = announce_dtype(args.dtype, "cpu")
    with tempfile.TemporaryDirectory(prefix="loraplex-protocols-bench-") as scratch:
        store = AdapterStore(Path(scratch) / "store")
        classifier = make_classifiers(embedded_default_path(), store, 1)[0]
        store.publish(make_adapters(embedded_default_path(), Path(scratch) / "peft", 1, rank=8)[0], GENERATOR)
        http_port = free_port()
        server, port, _ = start_server(store.root, ("--dtype", args.dtype, "--http-port", str(http_port)))
        try:
            agree, results = asyncio.run(run_protocols(args, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}",
                                                       classifier))
        finally:
            server.terminate()
            server.wait(timeout=60)
    report(args, dtype, agree, results)


async def run_protocols(args: argparse.Namespace, grpc_target: str, http_url: str,
                        classifier: str) -> tuple[bool, dict[tuple[str, str], list[Figures]]]:
    """Whether the greedy outputs agree, and {(protocol, workload): [Figures per round]}."""
    drivers = {p: open_driver(p, grpc_target, http_url, GENERATOR, classifier) for p in args.protocol}
    try:
        agree = await outputs_agree(drivers, args.max_tokens)
        results: dict[tuple[str, str], list[Figures]] = {}
        workloads = {
            "generate": (args.requests, lambda d: d.generate(PROMPT, args.max_tokens)),
            "classify": (args.classify_requests, lambda d: d.classify(TEXTS[0])),
        }
        for driver in drivers.values():  # warm-up: every protocol's connections and code paths, briefly
            await closed_loop(lambda d=driver: d.generate(PROMPT, min(4, args.max_tokens)), args.concurrency,
                              args.concurrency)
            await closed_loop(lambda d=driver: d.classify(TEXTS[0]), args.concurrency, args.concurrency)
        order = list(drivers)
        for round_index in range(args.rounds):
            for protocol in order[round_index % len(order):] + order[:round_index % len(order)]:
                for workload, (requests, call) in workloads.items():
                    figures = await closed_loop(lambda call=call, d=drivers[protocol]: call(d), requests,
                                                args.concurrency)
                    results.setdefault((protocol, workload), []).append(figures)
                    print(f"round {round_index + 1} {protocol:6} {workload}: {describe(figures)}", flush=True)
        return agree, results
    finally:
        for driver in drivers.values():
            await driver.close()


async def outputs_agree(drivers: dict, max_tokens: int) -> bool:
    """One greedy generation and one classification per protocol, alone on the server; prints them."""
    texts, labels, tokens = {}, {}, {}
    for protocol, driver in drivers.items():
        reply = await driver.generate(PROMPT, max_tokens)
        texts[protocol], tokens[protocol] = reply.text, reply.tokens
        labels[protocol] = await driver.classify(TEXTS[0])
    agree = len(set(texts.values())) == 1 and len(set(labels.values())) == 1
    counts = ", ".join(f"{p} {n}" for p, n in tokens.items() if n is not None)
    print(f"greedy check, one request each ({max_tokens} max tokens; completion tokens: {counts}): "
          f"{'outputs agree' if agree else 'OUTPUTS DIFFER'}")
    for protocol in drivers if not agree else list(drivers)[:1]:
        print(f"  {protocol if not agree else 'all'}: label {labels[protocol]!r}, text {texts[protocol]!r}")
    return agree


def describe(figures: Figures) -> str:
    line = f"{figures.requests_per_s:.2f} req/s, p50 {figures.p50_ms:.0f} ms, p99 {figures.p99_ms:.0f} ms"
    if figures.tokens_per_s is not None:
        line += f", {figures.tokens_per_s:.1f} tok/s"
    if figures.first_text_p50_ms is not None:
        line += f", first text p50 {figures.first_text_p50_ms:.0f} ms"
    return line


def median_figures(rounds: list[Figures]) -> Figures:
    def median(name: str) -> float | None:
        values = [getattr(f, name) for f in rounds]
        return None if None in values else statistics.median(values)
    return Figures(*(median(name) for name in Figures.__dataclass_fields__))


def ratio(results: dict[tuple[str, str], list[Figures]], protocol: str, workload: str) -> float | None:
    """Median over rounds of protocol's requests/s over gRPC's in the same round."""
    if (protocol, workload) not in results or ("grpc", workload) not in results:
        return None
    return statistics.median(o.requests_per_s / g.requests_per_s
                             for o, g in zip(results[(protocol, workload)], results[("grpc", workload)], strict=True))


def report(args: argparse.Namespace, dtype: str, agree: bool, results: dict[tuple[str, str], list[Figures]]) -> None:
    summary: dict[str, object] = {"dtype": dtype, "cpu": cpu_description(), "protocols": args.protocol,
                                  "requests": args.requests,
                                  "classify_requests": args.classify_requests, "concurrency": args.concurrency,
                                  "max_tokens": args.max_tokens, "rounds": args.rounds,
                                  "outputs_agree": agree}
    print(f"medians over {args.rounds} rounds, {args.concurrency} concurrent clients:")
    for (protocol, workload), rounds in results.items():
        figures = median_figures(rounds)
        print(f"  {protocol:6} {workload}: {describe(figures)}")
        for name, value in vars(figures).items():
            if value is not None:
                summary[f"{protocol}_{workload}_{name}"] = round(value, 3)
    ratios = {"openai_vs_grpc": ratio(results, "openai", "generate"),
              "oip_vs_grpc": ratio(results, "oip", "generate"),
              "openai_classify_vs_grpc": ratio(results, "openai", "classify"),
              "oip_classify_vs_grpc": ratio(results, "oip", "classify")}
    ratios = {k: round(v, 4) for k, v in ratios.items() if v is not None}
    if "openai_vs_grpc" in ratios:
        met = "met" if ratios["openai_vs_grpc"] >= 0.8 else "NOT met"
        print(f"openai_vs_grpc {ratios['openai_vs_grpc']:.3f} (OpenAI streaming over HTTP / gRPC streaming, "
              f"requests/s; target >= 0.8: {met})")
    print(json.dumps({**summary, **ratios}))


def protocol_list(value: str) -> list[str]:
    names = [name for name in value.split(",") if name]
    unknown = sorted(set(names) - set(PROTOCOLS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown protocol {unknown[0]!r}; choose from {', '.join(PROTOCOLS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", type=protocol_list, nargs="+", action="extend",
                        help="grpc, openai and/or oip (space or comma separated; default: all three)")
    parser.add_argument("--requests", type=int, default=32, help="generations per protocol and round (%(default)s)")
    parser.add_argument("--classify-requests", type=int, help="classifications per protocol and round "
                        "(default: 4 x --requests)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients per protocol (%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per greedy generation (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; figures are their medians (%(default)s)")
    parser.add_argument("--vs-engine", action="store_true", help="issue 3's gRPC classification vs engine instead")
    parser.add_argument("--clients", type=int, default=64, help="--vs-engine: closed-loop clients (%(default)s)")
    parser.add_argument("--adapters", type=int, default=16, help="--vs-engine: classification adapters (%(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="--vs-engine: seconds of load (%(default)s)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: bf16 on CPUs with native bf16, else fp32")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its server (finally)
    if args.vs_engine:
        engine_comparison(args)
        return
    args.protocol = list(dict.fromkeys(sum(args.protocol or [list(PROTOCOLS)], [])))
    args.classify_requests = args.classify_requests or 4 * args.requests
    if min(args.requests, args.classify_requests, args.concurrency, args.max_tokens, args.rounds) < 1:
        parser.error("--requests, --classify-requests, --concurrency, --max-tokens and --rounds must be >= 1")
    protocol_comparison(args)


if __name__ == "__main__":
    main()
