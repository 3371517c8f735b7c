"""Adapter cache benchmark: load latencies per tier, and serving many adapters against one.

    python -m bench.adapters [--adapters 1000] [--clients 64] [--seconds 15] [--dtype auto]

Everything runs at `--dtype` (auto: bf16 where the CPU has native bf16, else fp32), servers included.
1. Latency, in-process on the embedded base (SmolLM2-135M, CPU), random adapters on q/k/v/o of
   rank 8, 16 and 64 in a store: cold load = disk -> host -> device slot (the store's files are in the
   OS page cache, as right after an upload); warm swap = host -> device slot, evicting the least
   recently used adapter (4 slots, cycling through 16 adapters, so every swap evicts one).
2. Requests/s over gRPC, closed loop (`--clients`), short Classify requests with rank-8 classifiers:
   `many`: uniform over `--adapters` registered adapters (after one warm-up request each, so they
   are in the host tier); `single`: every request on one adapter, same server; `swapping`: the same
   uniform traffic on a server with one device slot, so each forward pass serves one adapter and
   every other request swaps it (set the adapter, run the request).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.engine import announce_dtype, make_adapters
from bench.serve import TEXTS, load, make_classifiers, start_server
from loraplex import AsyncClient
from loraplex_adapters.compute_dtype import cpu_description
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.store import AdapterStore
from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.base_model import DTYPE_CHOICES, load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.runtime.adapter_manager import AdapterManager, adapter_key

RANKS = (8, 16, 64)


def _quantiles(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def load_latencies(base, rank: int, count: int = 16, rounds: int = 4) -> dict[str, float]:
    scratch = Path(tempfile.mkdtemp(prefix=f"loraplex-bench-r{rank}-"))
    store = AdapterStore(scratch / "store")
    for folder in make_adapters(embedded_default_path(), scratch / "src", count, rank):
        store.publish(folder, folder.name)
    keys = [adapter_key(m.name, m.version) for m in store.list()]
    engine = Engine(base, max_adapters=4)
    manager = AdapterManager(engine, store, device_bytes=1 << 40, host_bytes=1 << 40, metrics=Metrics())
    cold, warm = [], []
    for key in keys:
        start = time.perf_counter()
        manager.read(key).result()
        manager.placed()  # takes the finished read into the host tier
        manager.place(key)
        cold.append(time.perf_counter() - start)
    for _ in range(rounds):
        for key in keys:
            start = time.perf_counter()
            manager.place(key)
            warm.append(time.perf_counter() - start)
    manager.close()
    for key, residency in manager.snapshot().items():
        if residency.tier == "device":
            manager.unload(key)
    (cold_p50, cold_p99), (warm_p50, warm_p99) = _quantiles(cold), _quantiles(warm)
    return {f"cold_load_ms_p50_r{rank}": cold_p50, f"cold_load_ms_p99_r{rank}": cold_p99,
            f"warm_swap_ms_p50_r{rank}": warm_p50, f"warm_swap_ms_p99_r{rank}": warm_p99}


def touch_all(target: str, adapters: list[str], clients: int) -> None:
    """One request per adapter, `clients` at a time: every adapter is read from disk once."""

    async def run() -> None:
        gate = asyncio.Semaphore(clients)
        async with AsyncClient(target, timeout=300, retries=0) as client:

            async def one(name: str) -> None:
                async with gate:
                    await client.classify([TEXTS[0]], adapter=name)

            await asyncio.gather(*(one(name) for name in adapters))

    asyncio.run(run())


def requests_per_s(store_root: Path, adapters: list[str], clients: int, seconds: float,
                   extra_args: tuple[str, ...] = (), single: bool = False) -> dict[str, float]:
    server, port, _ = start_server(store_root, extra_args)
    target = f"127.0.0.1:{port}"
    try:
        touch_all(target, adapters, clients)
        result = {}
        runs = {"uniform": adapters, "single": adapters[:1]} if single else {"uniform": adapters}
        for label, names in runs.items():
            load(target, names, clients, 2.0)  # warm-up
            start = time.perf_counter()
            done = len(load(target, names, clients, seconds))
            result[label] = done / (time.perf_counter() - start)
        return result
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: bf16 on CPUs with native bf16, else fp32")
    args = parser.parse_args()
    dtype = announce_dtype(args.dtype, "cpu")

    base = load_base_model(None, quantize="none", dtype=args.dtype, device="cpu")
    result: dict[str, float] = {}
    for rank in RANKS:
        result |= load_latencies(base, rank)
        print(f"rank {rank:>2}: cold load p50 {result[f'cold_load_ms_p50_r{rank}']:.2f} ms "
              f"p99 {result[f'cold_load_ms_p99_r{rank}']:.2f} ms; warm swap p50 "
              f"{result[f'warm_swap_ms_p50_r{rank}']:.2f} ms p99 {result[f'warm_swap_ms_p99_r{rank}']:.2f} ms")
    del base

    store = AdapterStore(tempfile.mkdtemp(prefix="loraplex-adapters-bench-"))
    started = time.perf_counter()
    adapters = make_classifiers(embedded_default_path(), store, args.adapters)
    print(f"published {len(adapters)} rank-8 classifiers in {time.perf_counter() - started:.0f} s")
    served = requests_per_s(store.root, adapters, args.clients, args.seconds, ("--dtype", args.dtype), single=True)
    swapping = requests_per_s(store.root, adapters, args.clients, args.seconds,
                              ("--dtype", args.dtype, "--max-adapters", "1"))
    result |= {"many_vs_single": served["uniform"] / served["single"],
               "many_vs_swapping": served["uniform"] / swapping["uniform"],
               "many_requests_per_s": served["uniform"], "single_requests_per_s": served["single"],
               "swapping_requests_per_s": swapping["uniform"]}
    print(f"{args.clients} clients: {args.adapters} adapters uniform {served['uniform']:.1f} req/s, one adapter "
          f"{served['single']:.1f} req/s, one slot (swapping) {swapping['uniform']:.1f} req/s")
    for key, target in (("warm_swap_ms_p50_r16", 5.0), ("cold_load_ms_p50_r16", 50.0)):
        print(f"{key} {result[key]:.2f} (target <= {target}: {'met' if result[key] <= target else 'NOT met'})")
    for key, target in (("many_vs_single", 0.7), ("many_vs_swapping", 10.0)):
        print(f"{key} {result[key]:.3f} (target >= {target}: {'met' if result[key] >= target else 'NOT met'})")
    print(json.dumps({"dtype": dtype, "cpu": cpu_description(), **{k: round(v, 4) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
