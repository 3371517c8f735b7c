"""HTTP framing without bounds (issue 19, class 6), over raw sockets against real uvicorn servers on
127.0.0.1 with both of its parsers (httptools, h11) wrapped by frontends/http_limits: a huge header, a
head that never ends, slow-loris clients, idle keep-alive connections; and the same limits on the HTTP
port of a real `loraplex serve`.

Timeouts are short here (1 s) and every wait is bounded generously: a connection that is never closed
fails the test at the bound, a loaded machine only makes it pass later.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn
from server_process import free_port, start_server
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from loraplex_server.frontends.http_limits import HttpLimits

LIMITS = HttpLimits(max_header_bytes=64 * 1024, header_timeout=1.0, keep_alive_timeout=1.0, max_connections=1000)
BOUND_SECONDS = 30.0
REQUEST = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"


async def echo_length(scope, receive, send) -> None:
    """Answers 200 with the number of body bytes it read."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class Running:
    """A uvicorn server with the limits, in a thread with its own event loop."""

    def __init__(self, base) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(echo_length, log_config=None, lifespan="off", **LIMITS.uvicorn_options(base))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=asyncio.run, args=(self.server.serve(sockets=[self.sock]),),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + BOUND_SECONDS
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(BOUND_SECONDS)
        self.sock.close()


@pytest.fixture(scope="module", params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def server(request):
    running = Running(request.param)
    yield running
    running.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND_SECONDS)
    sock.settimeout(BOUND_SECONDS)
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes; it may close the connection midway (that is the point)."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the test fails at the bound)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def one_response(sock: socket.socket) -> bytes:
    """One response of echo_length (its length is small): the head and the body."""
    received = b""
    while b"\r\n\r\n" not in received or not received.split(b"\r\n\r\n", 1)[1]:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    return received


def head_of(size: int) -> bytes:
    """A GET whose head is `size` bytes, most of them in one header."""
    start = b"GET / HTTP/1.1\r\nhost: test\r\nx-padding: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_requests_within_the_limits_are_served_on_one_kept_alive_connection(server):
    with connect(server.port) as sock:
        sock.sendall(REQUEST)
        assert one_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(head_of(60 * 1024))
        assert one_response(sock).startswith(b"HTTP/1.1 200")
        body = b"x" * (300 * 1024)  # bodies are not the head: the head limit does not count them
        sock.sendall(b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        assert one_response(sock).endswith(b"\r\n\r\n%d" % len(body))
        sock.sendall(REQUEST + REQUEST)  # pipelined
        assert one_response(sock).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("size", [64 * 1024 + 1, 70 * 1024, 8 * 1024 * 1024])
def test_a_head_over_64_kib_is_answered_431_and_closed(server, size):
    with connect(server.port) as sock:
        sender = threading.Thread(target=send_quietly, args=(sock, head_of(size)))
        sender.start()
        answer = read_until_closed(sock)
        sender.join(BOUND_SECONDS)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:80]


def test_a_head_that_never_ends_is_refused_at_64_kib(server):
    """24 MB of one header, never finished: refused once 64 KiB are in, not buffered."""
    with connect(server.port) as sock:
        start = b"GET / HTTP/1.1\r\nhost: test\r\nx-padding: "
        sender = threading.Thread(target=send_quietly, args=(sock, start + b"a" * (24 << 20)))
        sender.start()
        answer = read_until_closed(sock)
        sender.join(BOUND_SECONDS)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def test_slow_loris_connections_are_closed(server):
    """Clients that send their head a byte at a time, and clients that send nothing: each is closed
    within the header timeout (plus a generous bound), with a 408 when it had begun a head."""
    trickling = [connect(server.port) for _ in range(25)]
    silent = [connect(server.port) for _ in range(25)]
    closed: dict[int, bytes] = {}
    for sock in trickling:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        sock.setblocking(False)
    deadline = time.monotonic() + BOUND_SECONDS
    while len(closed) < len(trickling) and time.monotonic() < deadline:
        for i, sock in enumerate(trickling):
            if i in closed:
                continue
            try:
                sock.send(b"x")  # one more header byte: keeps a plain keep-alive timer from ever firing
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                closed[i] = b""
                continue
            if not data or b"408" in data:
                closed[i] = data
        time.sleep(0.1)
    assert len(closed) == len(trickling), f"{len(trickling) - len(closed)} slow-loris connections still open"
    assert any(d.startswith(b"HTTP/1.1 408") for d in closed.values())
    for sock in silent:
        assert read_until_closed(sock) == b""
    for sock in trickling + silent:
        sock.close()


def test_an_idle_kept_alive_connection_is_closed(server):
    with connect(server.port) as sock:
        sock.sendall(REQUEST)
        assert one_response(sock).startswith(b"HTTP/1.1 200")
        assert read_until_closed(sock) == b""


def test_the_serve_commands_http_port_has_the_limits(tiny, adapter_dir):
    port, http_port = free_port(), free_port()
    process, client = start_server(tiny("llama")[0], adapter_dir, port, extra_args=["--http-port", str(http_port)])
    try:
        with connect(http_port) as sock:
            sender = threading.Thread(target=send_quietly, args=(sock, head_of(1 << 20)))
            sender.start()
            answer = read_until_closed(sock)
            sender.join(BOUND_SECONDS)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
        with connect(http_port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: test\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        client.close()
        process.kill()
        process.wait()
