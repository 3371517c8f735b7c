"""`loraplex serve --ray --replicas N`: a local Ray cluster with N replicas behind Ray Serve's gRPC proxy on
--port, until SIGINT/SIGTERM. For a real multi-node cluster, deploy `loraplex_server.frontends.ray_app:build` with
`serve run`/`serve deploy` instead (README)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

log = logging.getLogger("loraplex.ray")


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
    ray.init(include_dashboard=False)
    # After ray.init (which installs handlers of its own), before the proxy answers anyone: a SIGTERM
    # that arrives while the replicas start still ends in an orderly shutdown.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.http_port or 8000}, grpc_options=grpc_options(args.port))
    serve.run(application(replica_argv(argv), replicas=args.replicas), name=APP_NAME)
    log.info("serving %d replicas through Ray Serve's gRPC proxy on port %d", args.replicas, args.port)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
