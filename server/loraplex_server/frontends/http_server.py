"""Runs the HTTP API (openai_api.py) with uvicorn inside `loraplex serve`'s own event loop, beside gRPC.

The port is bound at start, so a busy --http-port stops the server with a message naming the flag,
like --port. uvicorn's own signal handling stays off: serve.py drains both front ends on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket

import uvicorn

from loraplex_server.api.metrics import Metrics
from loraplex_server.api.request_builder import RequestBuilder
from loraplex_server.frontends.http_limits import HttpLimits
from loraplex_server.frontends.openai_api import OpenAIApi


class _EmbeddedServer(uvicorn.Server):
    def capture_signals(self):  # the host process owns SIGTERM/SIGINT
        return contextlib.nullcontext()


class HttpServer:
    def __init__(self, api: OpenAIApi, sock: socket.socket, config: uvicorn.Config) -> None:
        self.api, self._sock = api, sock
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))

    def drain(self) -> None:
        """/health answers 503 from now on, so load balancers steer away before the port closes."""
        self.api.draining = True

    async def stop(self) -> None:
        """Stop taking connections; requests in flight get the configured grace period."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()


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
    sock.setblocking(False)
    return sock


def open_http_api(args: argparse.Namespace, requests: RequestBuilder, metrics: Metrics) -> HttpServer | None:
    """Bind --http-port now (None when it is 0); the caller starts it once the gRPC server runs."""
    if not args.http_port:
        return None
    try:
        sock = _bind(args.host, args.http_port)
    except OSError as exc:
        raise SystemExit(f"cannot serve the HTTP API on {args.host}:{args.http_port} "
                         f"({exc.strerror or exc.__class__.__name__}); choose another --http-port, or 0 to turn "
                         "the HTTP API off") from None
    api = OpenAIApi(requests, metrics, args.token + args.admin_token, args.max_message_bytes)
    config = uvicorn.Config(api.app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(args.grace, 0.1), ssl_certfile=args.tls_cert,
                            ssl_keyfile=args.tls_key, server_header=False, **HttpLimits().uvicorn_options())
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat serve's
    return HttpServer(api, sock, config)
