"""`loraplex serve`: the gRPC server on one base model, with health checking and reflection.

Every option has an environment variable (LORAPLEX_<OPTION>), the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
from loraplex_adapters.examples import publish_examples
from loraplex_adapters.s3_store import StoreUnavailable  # boto3 is imported only for an s3:// store
from loraplex_adapters.store_protocol import open_store
from loraplex_server.api.auth import BearerAuth
from loraplex_server.api.metrics import Metrics
from loraplex_server.app.options import build_parser, default_adapter_dir
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.kv_cache import KVCacheTooSmall
from loraplex_server.frontends.grpc_admin import AdapterAdminService
from loraplex_server.frontends.grpc_decoding import RequestDecoding
from loraplex_server.frontends.grpc_inference import InferenceService, Limits
from loraplex_server.frontends.http_server import open_http_api
from loraplex_server.frontends.oip_service import add_open_inference_service
from loraplex_server.runtime.adapter_manager import AdapterManager
from loraplex_server.runtime.engine_loop import EngineLoop

log = logging.getLogger("loraplex.serve")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADMIN_SERVICE_NAME = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
async def serve(args: argparse.Namespace) -> None:
    metrics = Metrics()
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.metrics_port:
        metrics_host = args.metrics_host or args.host
        try:
            metrics.serve_http(metrics_host, args.metrics_port, args.tls_cert, args.tls_key)
        except OSError as exc:
            raise SystemExit(f"cannot serve metrics on {metrics_host}:{args.metrics_port} "
                             f"({exc.strerror or exc.__class__.__name__}); choose another --metrics-port or "
                             "--metrics-host, or 0 to turn metrics off") from None
    service = InferenceService(metrics, Limits())
    admin = AdapterAdminService(metrics, args.max_upload_bytes)
    health_servicer = health.aio.HealthServicer()
    interceptors = [RequestDecoding()]  # outermost: it also wraps the refusals that auth returns
    if args.token or args.admin_token:
        interceptors.append(BearerAuth(args.token, args.admin_token))
    # No SO_REUSEPORT: a second server on a busy port must fail, not silently share its traffic.
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", args.max_message_bytes), ("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(service, server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(admin, server)
    oip_service_name = add_open_inference_service(server, metrics, service.requests)  # KServe v2, same port
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, ADMIN_SERVICE_NAME, oip_service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{args.host}:{args.port}"
    try:
        if args.tls_cert:
            credentials = grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(),
                                                        Path(args.tls_cert).read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's way of saying the bind failed
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on {address}: the port is in use or the address is not this machine's; "
                         "choose another with --port/--host")
    http = open_http_api(args, service.requests, metrics)  # binds now: a busy --http-port stops the start
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    if http:
        http.start()
    log.info("listening on %s; loading the base model", address)

    location = args.adapter_store or args.adapter_dir
    first_default_store = (location == default_adapter_dir() and not Path(location).exists()
                           and not args.no_examples)

    def load() -> tuple[Engine, AdapterManager]:
        engine = Engine(load_base_model(args.base, quantize=args.quantize, dtype=args.dtype, device=args.device),
                        max_adapters=args.max_adapters, max_batch=args.max_batch,
                        max_batch_tokens=args.max_batch_tokens or None, kv_cache_memory=args.kv_cache_memory or None)
        store = open_store(location, base_fingerprint=engine.base.fingerprint,
                           max_rank=args.max_rank, max_bytes=args.max_upload_bytes,
                           allow_base_mismatch=args.allow_base_mismatch, check_fits=engine.slots.shapes.validate)
        if first_default_store:
            published = publish_examples(store, engine.base.fingerprint)
            log.info("new adapter store %s: published the example adapters %s (--no-examples skips this)",
                     location, ", ".join(m.name for m in published) or "(none: they were trained on another base)")
        return engine, AdapterManager(engine, store, args.adapter_memory, args.host_adapter_memory, metrics)

    try:
        engine, cache = await asyncio.get_running_loop().run_in_executor(None, load)
    except (KVCacheTooSmall, StoreUnavailable) as exc:
        await server.stop(None)  # the port is already open: close it before exiting
        raise SystemExit(str(exc)) from None
    scheduler = EngineLoop(engine, cache, metrics, max_pending=args.max_pending)
    scheduler.start()
    service.attach(engine, scheduler, cache)
    admin.attach(cache, scheduler)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s (%s, quantize=%s) with %d adapter versions in %s on %s", engine.base.path.name,
             engine.base.device, engine.base.quantize, len(cache.store.list()), location,
             address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: NOT_SERVING for %.1f s, then no new requests and %g s for the ones in flight",
             args.drain_delay, args.grace)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if http:
        http.drain()
    await asyncio.sleep(args.drain_delay)  # lets load balancers see NOT_SERVING and steer away first
    await asyncio.gather(server.stop(args.grace), http.stop() if http else asyncio.sleep(0))
    await _let_cancelled_rpcs_finish()
    scheduler.stop()
    metrics.close()
    log.info("stopped")


async def _let_cancelled_rpcs_finish(timeout: float = 5.0) -> None:
    """Give the RPCs that server.stop cancelled a turn to unwind. grpc cancels them after the grace
    period but does not wait; any still pending when asyncio.run closes the loop is cancelled again
    there, and grpc logs each one as an "Exception not handled" CancelledError traceback."""
    rpcs = {task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__name__", "") == "_schedule_rpc_coro"}  # grpc's task per RPC
    if rpcs:
        await asyncio.wait(rpcs, timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    logging.getLogger("loraplex.access").setLevel(logging.INFO if args.access_log else logging.WARNING)
    if args.ray:  # imported only here: the single-node server never imports ray
        from loraplex_server.app.ray_launch import run_on_ray

        run_on_ray(list(sys.argv[1:] if argv is None else argv), args)
        return
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
