"""Adapter-affinity routing on Ray Serve (issue 13): `python -m bench.cluster`.

2 replicas of a small random Llama (tests/tiny_models.py: the embedded base is not needed to compare
routing, and this finishes in minutes on 2 cores), `--adapters` rank-8 classifiers in one shared folder
store, Zipf(s) requests through Ray Serve's gRPC proxy, each phase on a fresh deployment (empty tiers):
- multiplexed: the SDK sends multiplexed_model_id = the adapter, Ray routes to a replica holding it;
- unrouted: the same requests without it, so Ray's default power-of-two-choices router ignores the
  adapter (Ray 2.60 has no built-in round-robin router; this is the adapter-blind baseline);
device hit rate (slot hits / adapter lookups, summed over the replicas' own metrics) and adapter loads
into device slots per 1,000 requests for both, measured for --seconds after --warmup seconds of the
same traffic (the whole run's rate, cold start included, is printed too); requests/s of 2 replicas vs 1;
and `ray_vs_direct`: 1 replica through Ray vs the same flags served by `loraplex serve` directly, on the
embedded base with its shipped example classifiers (the product's real per-request work), and on the
small random Llama (`ray_vs_direct_tiny`: the proxy's cost against almost no engine work). Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from bench.serve import TEXTS, free_port, make_classifiers
from loraplex import AsyncClient, Client, LoraplexError
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.examples import publish_examples
from loraplex_adapters.fingerprint import model_fingerprint
from loraplex_adapters.store import AdapterStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import make_base  # noqa: E402


def zipf_picker(adapters: list[str], s: float, seed: int):
    cum = list(itertools.accumulate(1 / (rank ** s) for rank in range(1, len(adapters) + 1)))
    rng = random.Random(seed)
    return lambda: rng.choices(adapters, cum_weights=cum)[0]


def lookups(ports: list[int]) -> dict[str, float]:
    """Adapter lookups by tier, summed over the replicas: device = a slot hit, host/disk = a load into slots."""
    tiers = {"device": 0.0, "host": 0.0, "disk": 0.0}
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for tier, value in re.findall(r'loraplex_adapter_lookups_total\{tier="(\w+)"\} (\S+)', text):
            tiers[tier] += float(value)
    return tiers


def drive(target: str, adapters: list[str], args, routed: bool, seconds: float) -> tuple[int, float]:
    """args.clients closed loops for `seconds`; (requests answered, seconds)."""

    async def run() -> int:
        done = 0
        stop_at = time.perf_counter() + seconds
        async with AsyncClient(target, timeout=120, retries=3) as client, grpc.aio.insecure_channel(target) as ch:
            raw = pb_grpc.InferenceServiceStub(ch)

            async def loop(seed: int) -> None:
                nonlocal done
                pick, rng = zipf_picker(adapters, args.zipf, seed), random.Random(seed)
                while time.perf_counter() < stop_at:
                    adapter, text = pick(), rng.choice(TEXTS)
                    try:
                        if routed:
                            await client.classify([text], adapter=adapter)
                        else:
                            await raw.Classify(pb.ClassifyRequest(adapter=adapter, texts=[text]), timeout=120)
                        done += 1
                    except (LoraplexError, grpc.RpcError) as exc:
                        print(f"request failed: {exc}", file=sys.stderr)

            await asyncio.gather(*(loop(i) for i in range(args.clients)))
        return done

    started = time.perf_counter()
    count = asyncio.run(run())
    return count, time.perf_counter() - started


def replica_flags(base: Path | None, store: Path, args, metrics_port: int) -> list[str]:
    """The tiny random base in fp32, or (base None) the embedded base at the server's default dtype."""
    model = ["--base", str(base), "--dtype", "float32"] if base else []
    return [*model, "--adapter-dir", str(store), "--quantize", "none", "--device", "cpu",
            "--max-adapters", str(args.device_adapters), "--max-batch", "16",
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--max-pending", "1024"]


def hit_rate(before: dict, after: dict, requests: int) -> tuple[float, float]:
    """(device hit rate, adapter loads per 1,000 requests) between two lookups() readings."""
    delta = {tier: after[tier] - before[tier] for tier in after}
    return delta["device"] / (sum(delta.values()) or 1.0), 1000 * (delta["host"] + delta["disk"]) / max(requests, 1)


def ray_phase(base, store, adapters, args, grpc_port: int, replicas: int, routed: bool) -> dict:
    from ray import serve

    from loraplex_server.frontends.ray_app import APP_NAME, application

    metrics_port = free_port()
    serve.run(application(replica_flags(base, store, args, metrics_port), replicas=replicas, num_cpus=0),
              name=APP_NAME)
    ports = [metrics_port + rank for rank in range(replicas)]
    start = lookups(ports)
    warm_count, _ = drive(f"127.0.0.1:{grpc_port}", adapters, args, routed, args.warmup)
    before = lookups(ports)
    count, seconds = drive(f"127.0.0.1:{grpc_port}", adapters, args, routed, args.seconds)
    after = lookups(ports)
    serve.delete(APP_NAME)
    rate, loads = hit_rate(before, after, count)
    whole_rate, _ = hit_rate(start, after, warm_count + count)
    return {"requests": count, "rps": count / seconds, "hit_rate": rate, "loads_per_1000": loads,
            "hit_rate_with_cold_start": whole_rate}


def direct_rps(base, store, adapters, args) -> float:
    port = free_port()
    env = {**os.environ, "LORAPLEX_CPU_KERNEL": "0"}
    server = subprocess.Popen([sys.executable, "-m", "loraplex_server.app.serve", "--port", str(port),
                               "--http-port", "0",
                               *replica_flags(base, store, args, 0)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        Client(f"127.0.0.1:{port}", timeout=5, retries=0).wait_until_serving(timeout=300)
        drive(f"127.0.0.1:{port}", adapters, args, True, args.warmup)
        count, seconds = drive(f"127.0.0.1:{port}", adapters, args, True, args.seconds)
        return count / seconds
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--device-adapters", type=int, default=80,
                        help="--max-adapters per replica (device slots and Ray's multiplexing cap)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured, per phase")
    parser.add_argument("--warmup", type=float, default=10.0, help="unmeasured traffic before each phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1)
    args = parser.parse_args()

    import ray
    from ray import serve

    from loraplex_server.frontends.ray_app import grpc_options

    root = Path(tempfile.mkdtemp(prefix="loraplex-cluster-"))
    base = make_base(root / "base", "llama")
    store = root / "store"
    adapters = make_classifiers(base, AdapterStore(store), args.adapters, rank=8)
    embedded = embedded_default_path()
    example_store = root / "examples"
    examples = [m.name for m in publish_examples(AdapterStore(example_store), model_fingerprint(embedded))
                if m.labels]
    os.environ["LORAPLEX_CPU_KERNEL"] = "0"
    grpc_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options=grpc_options(grpc_port))
    try:
        routed = ray_phase(base, store, adapters, args, grpc_port, 2, routed=True)
        unrouted = ray_phase(base, store, adapters, args, grpc_port, 2, routed=False)
        one = ray_phase(base, store, adapters, args, grpc_port, 1, routed=True)
        one_embedded = ray_phase(None, example_store, examples, args, grpc_port, 1, routed=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    direct = direct_rps(base, store, adapters, args)
    direct_embedded = direct_rps(None, example_store, examples, args)
    print(f"device hit rate after {args.warmup:g} s of warm-up: multiplexed {routed['hit_rate']:.3f}, "
          f"unrouted (power-of-two) {unrouted['hit_rate']:.3f}; with the cold start: multiplexed "
          f"{routed['hit_rate_with_cold_start']:.3f}, unrouted {unrouted['hit_rate_with_cold_start']:.3f}")
    print(f"adapter loads per 1,000 requests: multiplexed {routed['loads_per_1000']:.1f}, "
          f"unrouted {unrouted['loads_per_1000']:.1f}")
    print(f"requests/s, small random base: 2 replicas {routed['rps']:.1f}, 1 replica {one['rps']:.1f}, direct "
          f"{direct:.1f}; embedded base ({', '.join(examples)}): 1 replica {one_embedded['rps']:.1f}, direct "
          f"{direct_embedded:.1f}")
    print(f"note: this machine has {os.cpu_count()} cores shared by both replicas, the proxy and the load; "
          "2 vs 1 replicas shows Ray's overhead here, not scaling")
    print(json.dumps({"affinity_hit_rate": round(routed["hit_rate"], 4),
                      "unrouted_hit_rate": round(unrouted["hit_rate"], 4),
                      "affinity_hit_rate_with_cold_start": round(routed["hit_rate_with_cold_start"], 4),
                      "unrouted_hit_rate_with_cold_start": round(unrouted["hit_rate_with_cold_start"], 4),
                      "affinity_loads_per_1000": round(routed["loads_per_1000"], 2),
                      "unrouted_loads_per_1000": round(unrouted["loads_per_1000"], 2),
                      "rps_2_replicas": round(routed["rps"], 2), "rps_1_replica": round(one["rps"], 2),
                      "two_vs_one": round(routed["rps"] / one["rps"], 3) if one["rps"] else None,
                      "ray_vs_direct": round(one_embedded["rps"] / direct_embedded, 3) if direct_embedded else None,
                      "ray_vs_direct_tiny": round(one["rps"] / direct, 3) if direct else None,
                      "adapters": args.adapters, "device_adapters": args.device_adapters, "zipf": args.zipf,
                      "seconds": args.seconds, "warmup": args.warmup, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
