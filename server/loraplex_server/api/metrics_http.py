"""The /metrics endpoint: Prometheus text over HTTP, or HTTPS when the server has a TLS certificate.

prometheus-client's own TLS server wraps the listening socket, so the TLS handshake runs inside
accept() on its one serving thread: a client that connects and sends nothing stalls every scrape.
Here each connection gets a socket timeout and its handshake runs on the connection's own thread.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

# A scrape is one short request: a connection idle (or mid-handshake) this long is dropped.
CONNECTION_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape would drown the server log


class _MetricsServer(ThreadingWSGIServer):
    ssl_context: ssl.SSLContext | None = None

    def get_request(self):
        connection, address = self.socket.accept()
        connection.settimeout(CONNECTION_TIMEOUT_S)
        if self.ssl_context is not None:
            connection = self.ssl_context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def finish_request(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except OSError:  # plain HTTP on the TLS port, a bad client, or a stalled one: drop it
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


def serve_metrics(registry: CollectorRegistry, host: str, port: int, certfile: str | None = None,
                  keyfile: str | None = None) -> WSGIServer:
    """Serve `registry` on host:port from a daemon thread (HTTPS when certfile and keyfile are given)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
    server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    if certfile and keyfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server.ssl_context = context
    threading.Thread(target=server.serve_forever, name="loraplex-metrics", daemon=True).start()
    return server
