"""One Ray Serve replica of loraplex: the runtime `loraplex serve` builds (app/runtime.py) and the same request
path, behind the methods Ray Serve's proxies call: our gRPC RPCs by name (the gRPC codecs themselves,
with Ray's servicer context), and HTTP requests (`respond`, the OpenAI API's codec).

Routing: `load_routed(model_id)` is wrapped in `@serve.multiplexed` by ray_app.py (the cap follows
--max-adapters); it warms the adapter into this replica's device tier, and Ray then prefers this
replica for that id while it is not overloaded. The id is a hint only: the request itself resolves
its adapter as on a single server.
"""

from __future__ import annotations

import logging
import os

from grpc_health.v1 import health_pb2
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response

from loraplex_adapters.manifest import parse_reference
from loraplex_server.api.admin_path import AdminPath
from loraplex_server.api.auth import TokenPolicy
from loraplex_server.api.metrics import Metrics
from loraplex_server.api.request_path import RequestPath
from loraplex_server.app.options import build_parser
from loraplex_server.app.runtime import build_runtime
from loraplex_server.frontends.grpc_admin import AdapterAdminService
from loraplex_server.frontends.grpc_inference import InferenceService
from loraplex_server.frontends.openai_api import OpenAIApi
from loraplex_server.frontends.ray_grpc_context import RayServicerContext

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
        self.metrics = Metrics()
        self.affinity = ReplicaMetrics(self.metrics)
        self.rank = replica_rank()
        if args.metrics_port:  # one port per replica on a node: --metrics-port + the replica's rank
            self.metrics.serve_http(args.metrics_host or args.host, args.metrics_port + self.rank,
                                    args.tls_cert, args.tls_key)
        self.runtime = build_runtime(args, self.metrics)
        self.path = RequestPath(self.metrics, TokenPolicy(args.token, args.admin_token))  # Ray's proxies check none
        self.path.attach(self.runtime)
        self.inference = InferenceService(self.path)
        self.admin = AdapterAdminService(AdminPath(self.path, args.max_upload_bytes))
        self.http = OpenAIApi(self.path, args.max_message_bytes)
        log.info("replica %d (pid %d) serving %s with adapters in %s", self.rank, os.getpid(), self.runtime.base_id,
                 args.adapter_store or args.adapter_dir)

    @staticmethod
    def context(grpc_context) -> RayServicerContext:
        return RayServicerContext(grpc_context)

    # -- routing ----------------------------------------------------------------------------------

    async def load_routed(self, model_id: str) -> RoutedAdapter:
        """Ray's multiplexer calls this (through ray_app's decorated method) for an id new to this replica."""
        self.affinity.route_loads.inc()
        key, _ = await self.runtime.resolve(model_id)
        await self.runtime.warm(key, False)
        return RoutedAdapter(key)

    async def route(self, routed) -> None:
        """Count where the request's adapter is, then let Ray's multiplexer record the id here. A bad or
        unknown id fails nothing: the request's own `adapter` field is what the request path checks."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return
        try:
            parse_reference(model_id)  # bounded before any lookup
            key, _ = await self.runtime.resolve(model_id)
        except Exception:  # noqa: BLE001 - a hint, not a request: the request path reports the real error
            return
        self.affinity.routed.labels(self.runtime.residency(key)).inc()
        try:
            await routed(model_id)
        except Exception:  # noqa: BLE001 - deleted meanwhile, queue full...: the request path answers precisely
            log.debug("routing hint %r not loaded", model_id, exc_info=True)

    # -- HTTP (Ray Serve's HTTP proxy) and health ---------------------------------------------------

    async def respond(self, request: Request) -> Response:
        return await self.http.respond(request)

    def health(self) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self.runtime.stop()
        self.metrics.close()
