"""The single-node server: our gRPC services, KServe's OIP, health checking and reflection on --port, the
OpenAI-compatible HTTP API on --http-port, metrics on --metrics-port; every one a codec over the same
request path. Started by `loraplex serve` (serve.py) once its ports are known to be free."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
from loraplex_adapters.s3_store import StoreUnavailable  # boto3 is imported only for an s3:// store
from loraplex_server.api.admin_path import AdminPath
from loraplex_server.api.auth import TokenPolicy
from loraplex_server.api.metrics import Metrics
from loraplex_server.api.request_path import RequestPath
from loraplex_server.app.options import default_adapter_dir
from loraplex_server.app.ports import Ports
from loraplex_server.app.runtime import build_runtime, store_location
from loraplex_server.engine.kv_cache import KVCacheTooSmall
from loraplex_server.engine.pooling import PoolingConfigError
from loraplex_server.frontends.grpc_admin import AdapterAdminService
from loraplex_server.frontends.grpc_decoding import RequestDecoding
from loraplex_server.frontends.grpc_inference import InferenceService
from loraplex_server.frontends.http_server import open_http_api
from loraplex_server.frontends.oip_service import add_open_inference_service

log = logging.getLogger("loraplex.serve")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADMIN_SERVICE_NAME = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name


def _grpc_server(args: argparse.Namespace, path: RequestPath, admin: AdminPath,
                 health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    # No SO_REUSEPORT: a second server on a busy port must fail, not silently share its traffic.
    server = grpc.aio.server(interceptors=[RequestDecoding()], options=[
        ("grpc.max_receive_message_length", args.max_message_bytes), ("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceService(path), server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterAdminService(admin), server)
    oip_service_name = add_open_inference_service(server, path)  # KServe v2, same port
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, ADMIN_SERVICE_NAME, oip_service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server


def _listen(server: grpc.aio.Server, args: argparse.Namespace) -> None:
    address = f"{args.host}:{args.port}"
    try:
        if args.tls_cert:
            credentials = grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(),
                                                        Path(args.tls_cert).read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's way of saying the bind failed (taken since ports.py checked it)
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on {address}: the port is in use or the address is not this machine's; "
                         "choose another with --port/--host")


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def serve(args: argparse.Namespace, ports: Ports, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then drain: NOT_SERVING for --drain-delay, no new requests, and --grace
    seconds for the ones in flight; generations still running then end with a clear error. Cancelling
    this coroutine stops everything at once."""
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve_http(args.metrics_host or args.host, args.metrics_port, args.tls_cert, args.tls_key)
    path = RequestPath(metrics, TokenPolicy(args.token, args.admin_token))
    admin = AdminPath(path, args.max_upload_bytes)
    health_servicer = health.aio.HealthServicer()
    server = _grpc_server(args, path, admin, health_servicer)
    http = open_http_api(args, ports.http_socket, path) if ports.http_socket is not None else None
    runtime = None
    try:
        _listen(server, args)
        await _set_health(health_servicer, False)
        await server.start()
        if http:
            http.start()
        log.info("listening: gRPC (ours, KServe OIP, health) on %s:%d, HTTP (OpenAI API) %s, metrics %s; "
                 "loading the base model", args.host, args.port,
                 f"on {args.host}:{args.http_port}" if http else "off",
                 f"on {args.metrics_host or args.host}:{args.metrics_port}" if args.metrics_port else "off")
        runtime = await _load(args, metrics)
        path.attach(runtime)
        await _set_health(health_servicer, True)
        await stop.wait()
        log.info("draining: NOT_SERVING for %.1f s, then no new requests and %g s for the ones in flight",
                 args.drain_delay, args.grace)
        await _set_health(health_servicer, False)
        if http:
            http.drain()
        await asyncio.sleep(args.drain_delay)  # lets load balancers see NOT_SERVING and steer away first
        path.draining = True
        # Generations end with a clear error at the end of the grace; the servers get a moment more to send it.
        await asyncio.gather(path.end_generations(args.grace), server.stop(args.grace + 1),
                             http.stop() if http else asyncio.sleep(0))
        await _let_cancelled_rpcs_finish()
    finally:  # also when cancelled (an embedding host stopping it at once) or failing to start
        await asyncio.shield(_close(server, http, runtime, metrics))
    log.info("stopped")


async def _load(args: argparse.Namespace, metrics: Metrics):
    location = store_location(args)
    examples = location == default_adapter_dir() and not Path(location).exists() and not args.no_examples
    try:
        runtime = await asyncio.get_running_loop().run_in_executor(None, build_runtime, args, metrics, examples)
    except (KVCacheTooSmall, StoreUnavailable, PoolingConfigError) as exc:
        raise SystemExit(str(exc)) from None
    versions = len(await runtime.in_store_thread(runtime.store.list))
    log.info("serving %s (%s, quantize=%s) with %d adapter versions in %s", runtime.base_id,
             runtime.engine.base.device, runtime.engine.base.quantize, versions, location)
    return runtime


async def _close(server: grpc.aio.Server, http, runtime, metrics: Metrics) -> None:
    await server.stop(None)
    if http:
        await http.stop(force=True)
    if runtime is not None:
        runtime.stop()
    metrics.close()


async def _let_cancelled_rpcs_finish(timeout: float = 5.0) -> None:
    """Give the RPCs that server.stop cancelled a turn to unwind. grpc cancels them after the grace
    period but does not wait; any still pending when asyncio.run closes the loop is cancelled again
    there, and grpc logs each one as an "Exception not handled" CancelledError traceback."""
    rpcs = {task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__name__", "") == "_schedule_rpc_coro"}  # grpc's task per RPC
    if rpcs:
        await asyncio.wait(rpcs, timeout=timeout)
