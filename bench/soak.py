"""Soak benchmark (issue 10): a long mixed load against one server on the embedded default base.

    python -m bench.soak [--minutes 10] [--clients 6] [--dtype auto]

One `loraplex serve` (SmolLM2-135M, CPU) with two random classifiers and two random generation
adapters. `--clients` threads loop until the end, each drawing per request: a one-text Classify, a
unary Generate, a GenerateStream read to its end, or a GenerateStream the client cancels after a few
tokens. One more thread cycles an upload, a Classify on it and a delete of a fresh adapter name. A
sampler reads the server's RSS every 5 s.

Prints errors by status (a cancel the client made itself is not an error), the RSS growth from the end
of the warm-up (the first 20% of the run, at most 60 s) to the end (target < 5%), each request kind's
p99 latency in the first and the last minute after the warm-up (target: the last within 1.2x of the
first), the CPU capability and dtype, and one JSON line. Every loop is bounded by the run's length;
all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

from bench.engine import announce_dtype, make_adapters, random_copies
from bench.serve import LABELS, PROMPT, TEXTS, make_classifiers, start_server
from loraplex import Client, LoraplexError
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from loraplex_adapters.compute_dtype import cpu_description
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.store import AdapterStore
from loraplex_server.engine.base_model import DTYPE_CHOICES

KINDS = ("classify", "generate", "stream", "cancel")
MAX_TOKENS = 16
RSS_EVERY_S = 5.0
RPC_TIMEOUT_S = 120.0


@dataclass
class Record:
    """What every thread saw; appended from many threads (list.append is atomic in CPython)."""

    latencies: list[tuple[float, str, float]] = field(default_factory=list)  # (finished at, kind, seconds)
    statuses: Counter = field(default_factory=Counter)  # (kind, status name) -> count
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (at, RSS, RSS less touched KV cache)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, kind: str, status: str) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1


def one_request(stub, kind: str, rng: random.Random, classifiers: list[str], generators: list[str]) -> str:
    """Run one request of `kind`; returns its status name."""
    sampling = pb.SamplingParameters(max_tokens=MAX_TOKENS)
    try:
        if kind == "classify":
            stub.Classify(pb.ClassifyRequest(adapter=rng.choice(classifiers), texts=[rng.choice(TEXTS)]),
                          timeout=RPC_TIMEOUT_S)
        elif kind == "generate":
            stub.Generate(pb.GenerateRequest(adapter=rng.choice(generators), prompt=PROMPT, sampling=sampling),
                          timeout=RPC_TIMEOUT_S)
        else:
            call = stub.GenerateStream(pb.GenerateStreamRequest(adapter=rng.choice(generators), prompt=PROMPT,
                                                                sampling=sampling), timeout=RPC_TIMEOUT_S)
            for index, _ in enumerate(call):
                if kind == "cancel" and index == 2:
                    call.cancel()  # the client walks away mid-stream
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def client_loop(target: str, seed: int, stop_at: float, record: Record, classifiers, generators) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        while time.perf_counter() < stop_at:
            kind = rng.choices(KINDS, weights=(4, 2, 3, 1))[0]
            start = time.perf_counter()
            status = one_request(stub, kind, rng, classifiers, generators)
            finished = time.perf_counter()
            record.count(kind, status)
            if status == "OK":
                record.latencies.append((finished, kind, finished - start))


def adapter_cycles(target: str, folder: Path, stop_at: float, record: Record) -> None:
    """Upload a fresh name, classify with it, delete it; again until the end."""
    with Client(target, timeout=RPC_TIMEOUT_S, retries=0) as client:
        cycle = 0
        while time.perf_counter() < stop_at:
            name = f"soak-{cycle}"
            steps = {"upload": lambda n=name: client.adapters.upload(folder, name=n, labels=LABELS),
                     "classify-new": lambda n=name: client.classify([TEXTS[0]], adapter=n),
                     "delete": lambda n=name: client.adapters.delete(n)}
            for step, action in steps.items():
                try:
                    action()
                    record.count(step, "OK")
                except LoraplexError as exc:
                    record.count(step, exc.code.name)
            cycle += 1
            time.sleep(1.0)


def kv_touched_bytes(metrics_port: int) -> int:
    """The server's KV cache bytes ever written: resident on the host, though allocated at start."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    match = re.search(r"^loraplex_kv_cache_touched_bytes (\S+)$", text, re.MULTILINE)
    return int(float(match[1])) if match else 0


def sample_rss(pid: int, metrics_port: int, stop_at: float, record: Record) -> None:
    """(at, RSS, RSS less the KV cache pages written so far): the third is what a leak would grow."""
    process = psutil.Process(pid)
    while True:
        rss = process.memory_info().rss
        record.rss.append((time.perf_counter(), rss, rss - kv_touched_bytes(metrics_port)))
        if time.perf_counter() >= stop_at:
            return
        time.sleep(RSS_EVERY_S)


def p99(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    return statistics.quantiles(values, n=100)[98]


def summarize(record: Record, started: float, warmup_end: float, stop_at: float, ended: float) -> dict:
    """Windows are placed on the load's schedule; requests still in flight at stop_at count in the last."""
    window = min(60.0, (stop_at - warmup_end) / 2)
    first, last = (warmup_end, warmup_end + window), (stop_at - window, float("inf"))
    latency = {}
    for kind in ("classify", "generate", "stream"):
        def within(span, kind=kind):
            return [s for at, k, s in record.latencies if k == kind and span[0] <= at < span[1]]
        a, b = p99(within(first)), p99(within(last))
        latency[kind] = {"p99_first_ms": a and round(a * 1000, 1), "p99_last_ms": b and round(b * 1000, 1),
                         "last_vs_first": a and b and round(b / a, 3)}
    after_warmup = [rss for at, rss, _ in record.rss if at >= warmup_end] or [record.rss[-1][1]]
    less_kv = [rest for at, _, rest in record.rss if at >= warmup_end] or [record.rss[-1][2]]
    errors = {f"{kind} {status}": n for (kind, status), n in sorted(record.statuses.items())
              if status != "OK" and not (kind == "cancel" and status == "CANCELLED")}
    growth = round(100 * (after_warmup[-1] - after_warmup[0]) / after_warmup[0], 2)
    growth_less_kv = round(100 * (less_kv[-1] - less_kv[0]) / less_kv[0], 2)
    steady = all(f["last_vs_first"] is not None and f["last_vs_first"] <= 1.2 for f in latency.values())
    return {
        "targets_met": not errors and growth < 5 and steady,
        "seconds": round(ended - started, 1), "window_s": round(window, 1),
        "requests": {f"{kind} {status}": n for (kind, status), n in sorted(record.statuses.items())},
        "errors": errors,
        "rss_after_warmup_mb": round(after_warmup[0] / 2**20, 1), "rss_end_mb": round(after_warmup[-1] / 2**20, 1),
        "rss_growth_pct": growth, "rss_growth_less_kv_pct": growth_less_kv,
        "latency": latency,
    }


def report(summary: dict, dtype: str) -> None:
    print(f"{summary['seconds']} s; p99 windows of {summary['window_s']} s after the warm-up")
    print("requests by kind and status: " + ", ".join(f"{k} {n}" for k, n in summary["requests"].items()))
    print("errors by status: " + (", ".join(f"{k} {n}" for k, n in summary["errors"].items()) or "none"))
    growth = summary["rss_growth_pct"]
    print(f"RSS {summary['rss_after_warmup_mb']} MB after the warm-up, {summary['rss_end_mb']} MB at the end: "
          f"{growth:+.2f}% (target < 5%: {'met' if growth < 5 else 'NOT met'}); without the KV cache pages "
          f"first written meanwhile: {summary['rss_growth_less_kv_pct']:+.2f}%")
    for kind, figures in summary["latency"].items():
        ratio = figures["last_vs_first"]
        if ratio is None:
            print(f"{kind:8} too few requests in a window for a p99 (run longer)")
            continue
        print(f"{kind:8} p99 first {figures['p99_first_ms']} ms, last {figures['p99_last_ms']} ms: last/first "
              f"{ratio} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
    print(json.dumps({"dtype": dtype, "cpu": cpu_description(), **summary}))


def cycled_classifier(base_dir: Path, out: Path) -> Path:
    """A random rank-4 classifier folder that the upload/delete cycles send under fresh names."""
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS),
                                                               dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"]))
    return random_copies(peft_model, out, 1, "cycled", 0.05)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6, help="client threads sending inference requests")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    args = parser.parse_args()
    dtype = announce_dtype(args.dtype, "cpu")
    store = AdapterStore(tempfile.mkdtemp(prefix="loraplex-soak-"))
    classifiers = make_classifiers(embedded_default_path(), store, 2)
    scratch = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    cycled = cycled_classifier(embedded_default_path(), scratch)
    generators = []
    for i, folder in enumerate(make_adapters(embedded_default_path(), scratch, 2, rank=8)):
        store.publish(folder, f"gen{i}")
        generators.append(f"gen{i}")
    server, port, metrics_port = start_server(store.root, ("--dtype", args.dtype))
    target = f"127.0.0.1:{port}"
    duration = args.minutes * 60
    started = time.perf_counter()
    stop_at, warmup_end = started + duration, started + min(60.0, 0.2 * duration)
    record = Record()
    threads = [threading.Thread(target=client_loop, args=(target, i, stop_at, record, classifiers, generators))
               for i in range(args.clients)]
    threads += [threading.Thread(target=adapter_cycles, args=(target, cycled, stop_at, record)),
                threading.Thread(target=sample_rss, args=(server.pid, metrics_port, stop_at, record))]
    print(f"{args.clients} client threads and one upload/delete cycle for {args.minutes:g} min "
          f"(warm-up {warmup_end - started:.0f} s)", flush=True)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ended = time.perf_counter()
    finally:
        server.terminate()
        server.wait(timeout=60)
    report(summarize(record, started, warmup_end, stop_at, ended), dtype)


if __name__ == "__main__":
    main()
