"""`loraplex serve --ray --replicas N`: a local Ray cluster with N replicas behind Ray Serve's gRPC proxy on
--port, until SIGINT/SIGTERM. For a real multi-node cluster, deploy `loraplex_server.frontends.ray_app:build` with
`serve run`/`serve deploy` instead (README)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from loraplex_server.app.ports import reserve_ports

log = logging.getLogger("loraplex.ray")


def check_ports(args: argparse.Namespace) -> None:
    """The proxies' ports are free (Ray Serve's own failure comes late and names no option)."""
    ports = reserve_ports(argparse.Namespace(**{**vars(args), "metrics_port": 0, "http_port": args.http_port or 8000}))
    ports.http_socket.close()


def replica_argv(argv: list[str]) -> list[str]:
    """The `loraplex serve` flags each replica parses: all but --ray and --replicas."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--ray" or item.startswith("--replicas="):
            continue
        elif item == "--replicas":
            skip = True
        else:
            kept.append(item)
    return kept


def run_on_ray(argv: list[str], args: argparse.Namespace) -> None:
    import ray  # the cluster extra; the single-node server never imports it
    from ray import serve

    from loraplex_server.frontends.ray_app import APP_NAME, application, grpc_options

    if args.replicas < 1:
        raise SystemExit("--replicas must be >= 1")
    check_ports(args)
    ray.init(include_dashboard=False)
    # After ray.init (which installs handlers of its own), before the proxy answers anyone: a SIGTERM
    # that arrives while the replicas start still ends in an orderly shutdown.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    http_port = args.http_port or 8000  # Ray Serve always runs its HTTP proxy
    serve.start(http_options={"host": args.host, "port": http_port}, grpc_options=grpc_options(args.port))
    serve.run(application(replica_argv(argv), replicas=args.replicas), name=APP_NAME)
    log.info("serving %d replicas through Ray Serve's gRPC proxy on port %d (our API, KServe OIP is not served "
             "here) and its HTTP proxy on port %d (the OpenAI-compatible API); metrics from port %s, one per replica",
             args.replicas, args.port, http_port, args.metrics_port or "(off)")
    stop.wait()
    serve.shutdown()
    ray.shutdown()
