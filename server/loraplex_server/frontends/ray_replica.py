"""One Ray Serve replica of loraplex: the base, the engine, the scheduler and both adapter tiers, behind
our InferenceService and AdapterService methods as Ray Serve's gRPC proxy calls them (by method name).

The methods delegate to the single-node servicers (service.py, admin_service.py), so validation,
limits and status mapping are the same code. Routing: `route(model_id)` is wrapped in
`@serve.multiplexed` by ray_app.py (the cap follows --max-adapters); it warms the adapter into this
replica's device tier, and Ray then prefers this replica for that id while it is not overloaded. The
id is a hint only: the request itself resolves its adapter as a single server does.
"""

from __future__ import annotations

import argparse
import logging
import os

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import Counter

from loraplex_adapters.manifest import parse_reference
from loraplex_adapters.store_protocol import open_store
from loraplex_server.api.auth import TokenPolicy
from loraplex_server.api.metrics import Metrics
from loraplex_server.app.options import build_parser
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.frontends.grpc_admin import AdapterAdminService
from loraplex_server.frontends.grpc_inference import InferenceService, Limits
from loraplex_server.frontends.ray_grpc_context import RayServicerContext
from loraplex_server.runtime.adapter_manager import AdapterManager
from loraplex_server.runtime.engine_loop import EngineLoop

log = logging.getLogger("loraplex.ray")


class RoutedAdapter:
    """What Ray's multiplexer keeps per id: the key it warmed. Our own tiers decide residency (by bytes),
    so Ray evicting an id from its list frees nothing here."""

    def __init__(self, key: str) -> None:
        self.key = key


def replica_rank() -> int:
    from ray import serve  # a replica always runs inside Ray

    rank = serve.get_replica_context().rank
    return getattr(rank, "rank", rank) or 0


class ReplicaMetrics:
    """The affinity counters Ray routing adds to our per-process Metrics, in the same registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.routed = Counter("loraplex_routed_requests", "Requests that carried a multiplexed_model_id, by where "
                              "their adapter was on this replica when they arrived (device = an affinity hit)",
                              ["residency"], registry=metrics.registry)
        self.route_loads = Counter("loraplex_routed_adapter_loads", "Adapters Ray's multiplexer asked this replica "
                                   "to load (an id new to this replica)", registry=metrics.registry)


class ReplicaServer:
    """The state and methods of one replica; ray_app.py turns it into a deployment."""

    def __init__(self, argv: list[str]) -> None:
        args = build_parser().parse_args(argv)
        self.args = args
        self.metrics = Metrics()
        self.affinity = ReplicaMetrics(self.metrics)
        self.rank = replica_rank()
        self.auth = TokenPolicy(args.token, args.admin_token)  # Ray's proxy checks no tokens: each replica does
        if args.metrics_port:  # one port per replica on a node: --metrics-port + the replica's rank
            self.metrics.serve_http(args.metrics_host or args.host, args.metrics_port + self.rank,
                                    args.tls_cert, args.tls_key)
        self.inference = InferenceService(self.metrics, Limits())
        self.admin = AdapterAdminService(self.metrics, args.max_upload_bytes)
        engine, cache = build_tiers(args, self.metrics)
        self.scheduler = EngineLoop(engine, cache, self.metrics, max_pending=args.max_pending)
        self.scheduler.start()
        self.inference.attach(engine, self.scheduler, cache)
        self.admin.attach(cache, self.scheduler)
        self.cache = cache
        log.info("replica %d (pid %d) serving %s with adapters in %s", self.rank, os.getpid(), engine.base.path.name,
                 args.adapter_dir)

    async def context(self, grpc_context, admin: bool = False) -> RayServicerContext:
        """Our servicer context for this call, once its bearer token passes (else UNAUTHENTICATED)."""
        context = RayServicerContext(grpc_context)
        message = self.auth.refusal(context.invocation_metadata(), admin)
        if message is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return context

    # -- routing ----------------------------------------------------------------------------------

    async def load_routed(self, model_id: str) -> RoutedAdapter:
        """Ray's multiplexer calls this (through ray_app's decorated method) for an id new to this replica."""
        self.affinity.route_loads.inc()
        key, _ = self.cache.resolve(model_id)
        await self.scheduler.warm(key, False)
        return RoutedAdapter(key)

    async def _route(self, routed) -> None:
        """Count where the request's adapter is, then let Ray's multiplexer record the id here. A bad or
        unknown id fails nothing: the request's own `adapter` field is validated by the servicer."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return
        try:
            parse_reference(model_id)  # bounded before any lookup
            key, _ = self.cache.resolve(model_id)
        except Exception:  # noqa: BLE001 - a hint, not a request: the servicer reports the real error
            return
        self.affinity.routed.labels(self.cache.residency(key)).inc()
        try:
            await routed(model_id)
        except Exception:  # noqa: BLE001 - deleted meanwhile, queue full...: the servicer answers precisely
            log.debug("routing hint %r not loaded", model_id, exc_info=True)

    # -- InferenceService ------------------------------------------------------------------------

    async def classify(self, routed, request, grpc_context):
        context = await self.context(grpc_context)
        await self._route(routed)
        return await self.inference.Classify(request, context)

    async def generate(self, routed, request, grpc_context):
        context = await self.context(grpc_context)
        await self._route(routed)
        return await self.inference.Generate(request, context)

    async def generate_stream(self, routed, request, grpc_context):
        context = await self.context(grpc_context)
        await self._route(routed)
        async for message in self.inference.GenerateStream(request, context):
            yield message

    # -- health (grpc.health.v1, so the SDK's health() works through the proxy) --------------------

    def health(self) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self.scheduler.stop()
        self.metrics.close()


def build_tiers(args: argparse.Namespace, metrics: Metrics) -> tuple[Engine, AdapterManager]:
    """The engine and adapter tiers exactly as `loraplex serve` builds them (serve.py's load()); the store is
    the folder or S3 store every replica shares (--adapter-store / --adapter-dir)."""
    engine = Engine(load_base_model(args.base, quantize=args.quantize, dtype=args.dtype, device=args.device),
                    max_adapters=args.max_adapters, max_batch=args.max_batch,
                    max_batch_tokens=args.max_batch_tokens or None, kv_cache_memory=args.kv_cache_memory or None)
    store = open_store(args.adapter_store or args.adapter_dir, base_fingerprint=engine.base.fingerprint,
                       max_rank=args.max_rank,
                       max_bytes=args.max_upload_bytes, allow_base_mismatch=args.allow_base_mismatch,
                       check_fits=engine.slots.shapes.validate)
    return engine, AdapterManager(engine, store, args.adapter_memory, args.host_adapter_memory, metrics)
