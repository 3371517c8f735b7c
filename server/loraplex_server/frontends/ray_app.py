"""loraplex as a Ray Serve application: N replicas of the base, requests through Ray Serve's gRPC proxy (our
API) and its HTTP proxy (the OpenAI-compatible API), routed by adapter (`multiplexed_model_id`) to a replica
that holds it while it is not overloaded.

    serve run loraplex_server.frontends.ray_app:build
        argv="--base /models/base --adapter-dir /shared/adapters" replicas=2   (one command line)

(with the proxy's gRPC servicers configured, see `grpc_options()` and the README), or
`loraplex serve --ray --replicas N` for a local cluster. `@serve.batch` is not used: it would split
batches by model id, and each replica's engine batches rows of all its adapters together.
"""

from __future__ import annotations

import contextlib
import shlex

from ray import serve
from ray.serve.config import gRPCOptions

from loraplex_server.app.options import build_parser
from loraplex_server.frontends.ray_replica import ReplicaServer

APP_NAME = "loraplex"
DEPLOYMENT_NAME = "LoraplexReplica"
GRPC_SERVICERS = [
    "loraplex.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server",
    "loraplex.v1.adapters_pb2_grpc.add_AdapterServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# Requests in flight per replica before Ray's router looks elsewhere, even for a replica that holds the
# adapter: the engine batches up to --max-batch rows, and more only queue behind them.
DEFAULT_MAX_ONGOING = 32


def grpc_options(port: int) -> gRPCOptions:
    """The proxy's gRPC server: our two services and grpc.health.v1, on `port`."""
    return gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICERS)


def replica_class(max_adapters: int) -> type:
    """The deployment class; built per cap because `@serve.multiplexed` takes its cap when decorating, and
    the cap follows --max-adapters (each replica's device tier holds at most that many)."""

    class LoraplexReplica:
        def __init__(self, argv: list[str]) -> None:
            self.server = ReplicaServer(argv)

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def routed_adapter(self, model_id: str):
            return await self.server.load_routed(model_id)

        # The OpenAI-compatible HTTP API, through Ray Serve's HTTP proxy.
        async def __call__(self, request):
            return await self.server.respond(request)

        # InferenceService -- Ray's proxy calls the method named like the RPC.
        async def Classify(self, request, grpc_context=None):  # noqa: N802 - gRPC method names
            await self.server.route(self.routed_adapter)
            return await self.server.inference.Classify(request, self.server.context(grpc_context))

        async def Generate(self, request, grpc_context=None):  # noqa: N802
            await self.server.route(self.routed_adapter)
            return await self.server.inference.Generate(request, self.server.context(grpc_context))

        async def GenerateStream(self, request, grpc_context=None):  # noqa: N802
            await self.server.route(self.routed_adapter)
            stream = self.server.inference.GenerateStream(request, self.server.context(grpc_context))
            async with contextlib.aclosing(stream):  # Ray cancelling this call (client gone) frees the row now
                async for message in stream:
                    yield message

        async def Embed(self, request, grpc_context=None):  # noqa: N802
            await self.server.route(self.routed_adapter)
            return await self.server.inference.Embed(request, self.server.context(grpc_context))

        # AdapterService -- any replica: the store is shared, the others see changes on their next lookup.
        async def Upload(self, requests, grpc_context=None):  # noqa: N802
            return await self.server.admin.Upload(requests, self.server.context(grpc_context))

        async def List(self, request, grpc_context=None):  # noqa: N802
            return await self.server.admin.List(request, self.server.context(grpc_context))

        async def Get(self, request, grpc_context=None):  # noqa: N802
            return await self.server.admin.Get(request, self.server.context(grpc_context))

        async def Delete(self, request, grpc_context=None):  # noqa: N802
            return await self.server.admin.Delete(request, self.server.context(grpc_context))

        async def Load(self, request, grpc_context=None):  # noqa: N802
            return await self.server.admin.Load(request, self.server.context(grpc_context))

        async def Unload(self, request, grpc_context=None):  # noqa: N802
            return await self.server.admin.Unload(request, self.server.context(grpc_context))

        def Check(self, request, grpc_context=None):  # noqa: N802 - grpc.health.v1
            return self.server.health()

        def replica_pid(self) -> int:
            """For tests and operators: this replica's process id (through a DeploymentHandle)."""
            import os

            return os.getpid()

        def __del__(self) -> None:
            server = getattr(self, "server", None)
            if server is not None:
                server.close()

    return LoraplexReplica


def application(argv: list[str], replicas: int = 2, num_cpus: float = 1.0,
                max_ongoing_requests: int = DEFAULT_MAX_ONGOING) -> serve.Application:
    """The Ray Serve application for `loraplex serve` flags `argv` (parsed here first, so a bad flag
    fails before any replica starts)."""
    args = build_parser().parse_args(argv)
    deployment = serve.deployment(
        replica_class(args.max_adapters), name=DEPLOYMENT_NAME, num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests, ray_actor_options={"num_cpus": num_cpus})
    return deployment.bind(list(argv))


def build(args: dict) -> serve.Application:
    """Application builder for `serve run` / a `serve deploy` config: args argv (a string of
    `loraplex serve` flags), replicas, num_cpus, max_ongoing_requests."""
    return application(shlex.split(str(args.get("argv", ""))), int(args.get("replicas", 2)),
                       float(args.get("num_cpus", 1.0)),
                       int(args.get("max_ongoing_requests", DEFAULT_MAX_ONGOING)))
