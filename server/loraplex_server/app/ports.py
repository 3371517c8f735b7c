"""The server's ports, checked before anything slow (imports of torch and transformers, the base model):
a busy or foreign address stops `loraplex serve` at once, with one message naming the option to change."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass


class PortUnavailable(SystemExit):
    pass


@dataclass
class Ports:
    grpc: int
    http: int  # 0: off
    metrics: int  # 0: off
    http_socket: socket.socket | None = None  # bound and listening, handed to uvicorn


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a busy port must fail
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _refusal(what: str, host: str, port: int, exc: OSError, option: str, off: bool) -> PortUnavailable:
    reason = exc.strerror or exc.__class__.__name__
    hint = f"choose another {option}" + (", or 0 to turn it off" if off else "")
    return PortUnavailable(f"cannot serve {what} on {host}:{port} ({reason}); {hint}")


def reserve_ports(args: argparse.Namespace) -> Ports:
    """Check that every port can be bound; the HTTP API's socket stays bound (the server serves on it)."""
    checks = [("the gRPC API", args.host, args.port, "--port (or --host)", False)]
    if args.metrics_port:
        checks.append(("metrics", args.metrics_host or args.host, args.metrics_port, "--metrics-port", True))
    for what, host, port, option, off in checks:
        try:
            _bind(host, port).close()
        except OSError as exc:
            raise _refusal(what, host, port, exc, option, off) from None
    http_socket = None
    if args.http_port:
        try:
            http_socket = _bind(args.host, args.http_port)
        except OSError as exc:
            raise _refusal("the HTTP API", args.host, args.http_port, exc, "--http-port", True) from None
        http_socket.setblocking(False)
    return Ports(args.port, args.http_port, args.metrics_port, http_socket)
