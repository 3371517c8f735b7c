"""`loraplex serve`: parse the options, check the ports, then (and only then) import the server and load the
base model, so a wrong option or a busy port fails in a second with a message naming the option.

Every option has an environment variable (LORAPLEX_<OPTION>); the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from loraplex_server.app.log_limits import install_log_limits
from loraplex_server.app.options import build_parser
from loraplex_server.app.ports import reserve_ports


def check_options(args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")


async def _serve_until_signalled(args: argparse.Namespace, ports) -> None:
    from loraplex_server.app.server import serve  # torch, transformers: seconds of imports

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(args, ports, stop)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_limits()  # a client repeating a refusal cannot flood the log
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_options(args)
    logging.getLogger("loraplex.access").setLevel(logging.INFO if args.access_log else logging.WARNING)
    if args.ray:  # imported only here: the single-node server never imports ray
        from loraplex_server.app.ray_launch import run_on_ray

        run_on_ray(argv, args)
        return
    ports = reserve_ports(args)
    asyncio.run(_serve_until_signalled(args, ports))


if __name__ == "__main__":
    main()
