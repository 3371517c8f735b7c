"""`loraplex serve`: the gRPC server on one base model, with health checking and reflection.

Every option has an environment variable (LORAPLEX_<OPTION>), the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
from loraplex_adapters.s3_store import StoreUnavailable  # boto3 is imported only for an s3:// store
from loraplex_adapters.store_protocol import open_store

from .adapter_cache import AdapterCache
from .admin_service import AdapterAdminService
from .auth import BearerAuth
from .base_model import DTYPE_CHOICES, QUANTIZE_CHOICES, load_base_model
from .engine import Engine
from .http_server import open_http_api
from .kv_cache import KVCacheTooSmall
from .metrics import Metrics
from .oip_service import add_open_inference_service
from .request_decoding import RequestDecoding
from .scheduler import Scheduler
from .service import InferenceService, Limits

log = logging.getLogger("loraplex.serve")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADMIN_SERVICE_NAME = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'512M', '1G', '2GiB', '1048576' -> bytes (binary units)."""
    value = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 1048576)") from None
    return int(number * _UNITS[unit])


def non_negative(text: str) -> int:
    """An integer flag where 0 means the default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = the default), got {value}")
    return value


def default_adapter_dir() -> str:
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return str(Path(data) / "loraplex" / "adapters")


def _env(name: str, default):
    return os.environ.get(f"LORAPLEX_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex serve", description=__doc__)
    parser.add_argument("--base", default=_env("base", None),
                        help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--quantize", default=_env("quantize", "auto"), choices=QUANTIZE_CHOICES)
    parser.add_argument("--dtype", default=_env("dtype", "auto"), choices=DTYPE_CHOICES)
    parser.add_argument("--device", default=_env("device", "auto"), help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--host", default=_env("host", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(_env("port", 50051)))
    parser.add_argument("--metrics-port", type=int, default=int(_env("metrics_port", 9400)),
                        help="Prometheus metrics on --metrics-host, over HTTPS when --tls-cert is set; 0 turns "
                             "it off")
    parser.add_argument("--metrics-host", default=_env("metrics_host", None),
                        help="address the metrics endpoint binds (default: --host)")
    parser.add_argument("--http-port", type=int, default=int(_env("http_port", 8000)),
                        help="the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                             "/classify, /health, /metrics) on --host; 0 turns it off")
    parser.add_argument("--adapter-dir", default=_env("adapter_dir", default_adapter_dir()),
                        help="the adapter store: uploads go here, requests load from here (default: %(default)s)")
    parser.add_argument("--adapter-store", default=_env("adapter_store", None),
                        help="the adapter store as a folder or s3://bucket/prefix, shared by every replica (boto3 "
                             "reads endpoint, region and credentials the usual AWS way: AWS_ENDPOINT_URL, "
                             "AWS_REGION, AWS_ACCESS_KEY_ID...); overrides --adapter-dir")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        default=bool(_env("allow_base_mismatch", "")),
                        help="serve adapters whose manifest names another base model fingerprint")
    parser.add_argument("--max-adapters", type=int, default=int(_env("max_adapters", 1024)),
                        help="most adapters on the device at once (slot tables grow to it as adapters arrive; "
                             "--adapter-memory bounds the bytes)")
    parser.add_argument("--adapter-memory", type=parse_bytes, default=_env("adapter_memory", "1G"),
                        help="device bytes for adapter weights; least recently used idle adapters are evicted")
    parser.add_argument("--host-adapter-memory", type=parse_bytes, default=_env("host_adapter_memory", "4G"),
                        help="host bytes for adapters kept in memory, ready to swap into a slot")
    parser.add_argument("--max-rank", type=int, default=int(_env("max_rank", 256)),
                        help="uploads with a higher LoRA rank are refused")
    parser.add_argument("--max-upload-bytes", type=parse_bytes, default=_env("max_upload_bytes", "512M"),
                        help="uploads (and the adapters they unpack to) past this size are refused")
    parser.add_argument("--max-batch", type=int, default=int(_env("max_batch", 64)),
                        help="most rows (generations, classification texts) in one engine step")
    parser.add_argument("--max-batch-tokens", type=non_negative, default=_env("max_batch_tokens", "0"),
                        help="tokens per engine step: decode rows, prefill chunks and classification texts share "
                             "it, so a long prompt is prefilled in chunks while running rows keep decoding "
                             "(default: 128 on CPU, 2048 on CUDA)")
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=_env("kv_cache_memory", "0") or None,
                        help="bytes of KV cache, allocated once; generations wait for room and are preempted "
                             "(then recomputed) when it runs out (default: enough for --max-batch rows at full "
                             "context, at most a quarter of free memory, or half of free GPU memory)")
    parser.add_argument("--max-pending", type=int, default=int(_env("max_pending", 256)),
                        help="requests waiting for the engine before new ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--grace", type=float, default=float(_env("grace", 10.0)),
                        help="seconds in-flight requests get to finish on SIGTERM")
    parser.add_argument("--drain-delay", type=float, default=float(_env("drain_delay", 1.0)),
                        help="seconds health reports NOT_SERVING before the server stops taking requests on SIGTERM")
    parser.add_argument("--max-message-bytes", type=int, default=int(_env("max_message_bytes", 4 * 1024 * 1024)),
                        help="larger requests are refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--token", action="append", default=_split(_env("tokens", "")),
                        help="accepted bearer token (repeatable; env LORAPLEX_TOKENS, comma separated); "
                             "none means no authentication")
    parser.add_argument("--admin-token", action="append", default=_split(_env("admin_tokens", "")),
                        help="bearer token for adapter management (repeatable; env LORAPLEX_ADMIN_TOKENS)")
    parser.add_argument("--tls-cert", default=_env("tls_cert", None), help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", default=_env("tls_key", None), help="PEM private key for --tls-cert")
    parser.add_argument("--access-log", action="store_true", default=bool(_env("access_log", "")),
                        help="log one line per request: method, adapter, status, milliseconds")
    parser.add_argument("--ray", action="store_true", default=bool(_env("ray", "")),
                        help="serve --replicas replicas on a local Ray cluster, through Ray Serve's gRPC proxy on "
                             "--port, routed by adapter (needs loraplex[cluster])")
    parser.add_argument("--replicas", type=int, default=int(_env("replicas", 2)), help="replicas with --ray")
    return parser


def _split(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


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

    def load() -> tuple[Engine, AdapterCache]:
        engine = Engine(load_base_model(args.base, quantize=args.quantize, dtype=args.dtype, device=args.device),
                        max_adapters=args.max_adapters, max_batch=args.max_batch,
                        max_batch_tokens=args.max_batch_tokens or None, kv_cache_memory=args.kv_cache_memory or None)
        store = open_store(args.adapter_store or args.adapter_dir, base_fingerprint=engine.base.fingerprint,
                           max_rank=args.max_rank, max_bytes=args.max_upload_bytes,
                           allow_base_mismatch=args.allow_base_mismatch, check_fits=engine.slots.shapes.validate)
        return engine, AdapterCache(engine, store, args.adapter_memory, args.host_adapter_memory, metrics)

    try:
        engine, cache = await asyncio.get_running_loop().run_in_executor(None, load)
    except (KVCacheTooSmall, StoreUnavailable) as exc:
        await server.stop(None)  # the port is already open: close it before exiting
        raise SystemExit(str(exc)) from None
    scheduler = Scheduler(engine, cache, metrics, max_pending=args.max_pending)
    scheduler.start()
    service.attach(engine, scheduler, cache)
    admin.attach(cache, scheduler)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s (%s, quantize=%s) with %d adapter versions in %s on %s", engine.base.path.name,
             engine.base.device, engine.base.quantize, len(cache.store.list()), args.adapter_store or args.adapter_dir,
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
        from .ray_launch import run_on_ray

        run_on_ray(list(sys.argv[1:] if argv is None else argv), args)
        return
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
