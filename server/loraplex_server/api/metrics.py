"""Prometheus metrics of one server, in its own registry, served over HTTP, or over HTTPS with the gRPC
server's certificate (metrics_http.py).

Adapter labels are bounded: the first `max_adapter_labels` adapters seen get their own label value,
every later one is counted as "other" (and names that are not registered as "unknown"), so thousands
of adapters or a client sending random names cannot blow up cardinality.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loraplex_server.api.metrics_http import serve_metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, max_adapter_labels: int = 50) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished RPCs", ["method", "adapter", "code"], registry=r)
        self.latency = Histogram("loraplex_request_seconds", "Time from arrival to the last byte", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("loraplex_queue_wait_seconds", "Time from arrival until the engine took it",
                                    ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("loraplex_time_to_first_token_seconds", "Time from arrival to the first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("loraplex_batch_rows", "Rows per engine forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_adapters = Histogram("loraplex_batch_adapters", "Distinct adapters per engine forward pass",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.finished = Counter("loraplex_generations_finished", "Generations ended, by reason (eos, stop, length, "
                                "cancelled: client gone or deadline passed, error: the engine failed the row)",
                                ["reason"], registry=r)
        self.tokens = Counter("loraplex_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests accepted and not yet taken by the engine",
                                 registry=r)
        self.in_flight = Gauge("loraplex_in_flight_requests", "Requests accepted and not finished", registry=r)
        self.running_rows = Gauge("loraplex_running_rows", "Generation rows admitted to the engine (holding KV)",
                                  registry=r)
        self.kv_blocks = Gauge("loraplex_kv_cache_blocks", "KV cache blocks by state (used, free)", ["state"],
                               registry=r)
        self.kv_touched = Gauge("loraplex_kv_cache_touched_bytes", "KV cache bytes below the highest block ever "
                                "used: on the host the cache is allocated lazily, so this part is resident",
                                registry=r)
        self.kv_waiting = Gauge("loraplex_kv_waiting_rows", "Generation rows queued in the engine until KV blocks "
                                "(and step tokens) are free for them", registry=r)
        self.preemptions = Counter("loraplex_kv_preemptions", "Rows preempted to free KV blocks (recomputed later)",
                                   registry=r)
        self._preempted = 0
        self.step_tokens = Histogram("loraplex_step_tokens", "Tokens per engine step (decode rows, prefill chunks, "
                                     "classification texts)", buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096),
                                     registry=r)
        self.adapter_lookups = Counter(
            "loraplex_adapter_lookups", "Adapter lookups by tier: device (slot hit), host (copied into a slot from "
            "host memory, also right after a disk read), disk (a read from the store started)", ["tier"], registry=r)
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds", "Adapter load time: from host memory into a slot, or from disk into "
            "host memory", ["source"], buckets=(0.001, 0.0025, *LATENCY_BUCKETS), registry=r)
        self.adapter_evictions = Counter("loraplex_adapter_evictions", "Adapters evicted from device slots",
                                         registry=r)
        self.device_adapters = Gauge("loraplex_device_adapters", "Adapters in device slots", registry=r)
        self.device_adapter_bytes = Gauge("loraplex_device_adapter_bytes", "Bytes of adapters in device slots",
                                          registry=r)
        self.host_adapter_bytes = Gauge("loraplex_host_adapter_bytes", "Bytes of adapters in host memory",
                                        registry=r)
        self._max_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self._http = None

    def adapter_label(self, adapter: str | None) -> str:
        """The bounded label of an adapter name (a `name@version` key counts under its name)."""
        if not adapter:
            return "base"
        adapter = adapter.split("@")[0]
        with self._lock:
            if adapter in self._labels:
                return adapter
            if len(self._labels) < self._max_labels:
                self._labels.add(adapter)
                return adapter
        return "other"

    def observe_step(self, engine) -> None:
        """Rows, adapters and tokens of the engine's last step; KV cache occupancy."""
        slots, tokens = engine.last_step
        if slots:
            self.batch_rows.observe(len(slots))
            self.batch_adapters.observe(len(set(slots) - {0}))
            self.step_tokens.observe(tokens)
        planner = engine.planner
        self.running_rows.set(len(planner.running))
        if engine.kv is not None:
            self.kv_blocks.labels("free").set(engine.kv.free_blocks)
            self.kv_blocks.labels("used").set(engine.kv.num_blocks - engine.kv.free_blocks)
            self.kv_waiting.set(planner.waiting_for_kv)
            self.kv_touched.set(engine.kv.touched_blocks * engine.kv.block_bytes)
            if planner.preemptions > self._preempted:
                self.preemptions.inc(planner.preemptions - self._preempted)
                self._preempted = planner.preemptions

    def serve_http(self, host: str, port: int, certfile: str | None = None, keyfile: str | None = None) -> None:
        """Serve /metrics on host:port, over HTTPS when certfile and keyfile are given."""
        self._http = serve_metrics(self.registry, host, port, certfile, keyfile)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
