"""Log floods (issue 19, class 11): a client repeating what the server refuses must not write a log line
per attempt. Against a real `loraplex serve`: 300 TLS hellos and 300 lines of garbage at the plain HTTP
port and at the gRPC port; and RepeatLimit itself, on a real logger, with its window driven by a clock."""

from __future__ import annotations

import io
import logging
import socket
import ssl
import time

import pytest
from server_process import free_port, start_server

from loraplex_server.app.log_limits import MAX_KINDS, RepeatLimit

ATTEMPTS = 300
BURST = 10


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged():
    """(logger, clock, lines()) with a RepeatLimit(burst=10, window=60) on its handler."""
    stream, clock = io.StringIO(), Clock()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RepeatLimit(BURST, 60.0, clock))
    logger = logging.getLogger(f"flood-{time.monotonic_ns()}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, clock, lambda: stream.getvalue().splitlines()
    logger.removeHandler(handler)


def test_a_repeated_warning_is_cut_to_the_burst_then_counted(logged):
    logger, clock, lines = logged
    for i in range(ATTEMPTS):
        logger.warning("Invalid HTTP request received from %s.", f"client-{i}")  # one kind: the template
    assert len(lines()) == BURST + 1
    assert "similar messages are suppressed" in lines()[-1]
    clock.now += 61
    logger.warning("Invalid HTTP request received from %s.", "late")
    assert len(lines()) == BURST + 2
    assert lines()[-1] == f"Invalid HTTP request received from late. [{ATTEMPTS - BURST - 1} similar message(s) " \
                          "were suppressed]"


def test_kinds_are_limited_apart_and_info_is_not_limited(logged):
    logger, _, lines = logged
    for _ in range(ATTEMPTS):
        logger.warning("one kind")
        logger.error("another kind")
        logger.info("the access log")
    assert sum(line == "one kind" for line in lines()) == BURST
    assert sum(line == "another kind" for line in lines()) == BURST
    assert sum(line == "the access log" for line in lines()) == ATTEMPTS


def test_distinct_messages_cannot_grow_the_filter_without_bound(logged):
    logger, _, lines = logged
    limit = logger.handlers[0].filters[0]
    for i in range(3 * MAX_KINDS):
        logger.warning(f"message {i}")  # pre-formatted: every one is its own kind
    assert len(limit._windows) == MAX_KINDS and len(lines()) == 3 * MAX_KINDS


def tls_hello(port: int, context: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            context.wrap_socket(sock, server_hostname="localhost")
        except (ssl.SSLError, OSError):
            pass


def garbage(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(b"\x16\x03\x01\x02\x00garbage \x00\xff\r\n\r\n")
            sock.recv(1024)
        except OSError:
            pass


def test_300_tls_hellos_and_garbage_on_either_port_write_a_bounded_log(tiny, adapter_dir):
    port, http_port = free_port(), free_port()
    process, client = start_server(tiny("llama")[0], adapter_dir, port, extra_args=["--http-port", str(http_port)],
                                   in_process=False)  # the filter is installed by the serve command
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        before = len(process.output)
        for target in (http_port, port):
            for _ in range(ATTEMPTS):
                tls_hello(target, context)
                garbage(target)
        assert client.health() == "SERVING"
        time.sleep(1)  # the last lines reach the output reader
        lines = list(process.output)[before:]
    finally:
        client.close()
        process.kill()
        process.wait()
    warnings = [line for line in lines if " WARNING " in line or " ERROR " in line]
    # one kind (uvicorn's "Invalid HTTP request received.") limited to BURST + the suppression notice,
    # with room for a few other kinds; 2 x 2 x 300 attempts were made
    assert len(warnings) <= 4 * (BURST + 1), "".join(warnings[-20:])
    assert len(lines) <= 4 * (BURST + 1) + 10, "".join(lines[-20:])
