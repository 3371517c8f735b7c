"""Runs the HTTP API (openai_api.py) with uvicorn inside `loraplex serve`'s own event loop, beside gRPC.

The port is bound before the base model loads (app/ports.py), so a busy --http-port stops the server at
once with a message naming the flag. uvicorn's own signal handling stays off: the server drains both
front ends on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket

import uvicorn

from loraplex_server.api.request_path import RequestPath
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

    async def stop(self, force: bool = False) -> None:
        """Stop taking connections; requests in flight get the configured grace period (none when forced)."""
        self._server.should_exit = True
        self._server.force_exit = force
        if self._task is not None:
            await self._task
        self._sock.close()


def open_http_api(args: argparse.Namespace, sock: socket.socket, path: RequestPath) -> HttpServer:
    """The HTTP API on an already bound socket; the caller starts it once the gRPC server runs."""
    api = OpenAIApi(path, args.max_message_bytes)
    config = uvicorn.Config(api.app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=args.grace + 1, ssl_certfile=args.tls_cert,
                            ssl_keyfile=args.tls_key, server_header=False, **HttpLimits().uvicorn_options())
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat serve's
    return HttpServer(api, sock, config)
