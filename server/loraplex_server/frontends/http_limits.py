"""Bounds on HTTP/1.1 framing for uvicorn, whichever parser it runs (httptools or h11).

uvicorn alone accepts a request head of any size with httptools (h11 stops at 16 KiB and answers 400),
and never times out a client that is slow to send its head: its keep-alive timer is cancelled by the
first byte that arrives, and a fresh connection has none at all. So a slow-loris client holds a
connection (and its buffered head) forever.

`HttpLimits.uvicorn_options()` gives uvicorn.Config a protocol class that wraps the parser uvicorn
would pick, as proxies do (nginx: large_client_header_buffers, client_header_timeout):
- a request head larger than `max_header_bytes` (64 KiB: the request line and every header) is
  answered 431 and the connection closed, before the parser buffers more;
- a head must arrive whole within `header_timeout` seconds of when the server starts waiting for it
  (the connection opened, or the previous response ended): otherwise 408 and close (a connection that
  sent nothing is just closed);
- idle keep-alive connections close after `keep_alive_timeout`, and past `max_connections` open
  connections new requests get 503 (uvicorn's timeout_keep_alive and limit_concurrency).
Bodies are not this module's: the HTTP API bounds them itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000

    def uvicorn_options(self, base: type[asyncio.Protocol] | None = None) -> dict[str, Any]:
        """Keyword arguments for uvicorn.Config; `base` is the protocol to wrap (uvicorn's own choice,
        httptools when installed, else h11, by default)."""
        if base is None:
            from uvicorn.protocols.http.auto import AutoHTTPProtocol

            base = AutoHTTPProtocol
        return {"http": bounded_protocol(base, self), "timeout_keep_alive": self.keep_alive_timeout,
                "limit_concurrency": self.max_connections,
                # h11 refuses a head past this itself (with a 400); ours, a little lower, answers first
                "h11_max_incomplete_event_size": self.max_header_bytes + 4096}


def bounded_protocol(base: type[asyncio.Protocol], limits: HttpLimits) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol `base` (H11Protocol or HttpToolsProtocol) with the limits."""
    return type(f"Bounded{base.__name__}", (_HeadLimits, base), {"limits": limits})


def _head_end(data: bytes) -> int:
    """Where the blank line ending a request head ends in `data`, or -1 (parsers accept a bare LF too)."""
    ends = [i + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (i := data.find(mark)) >= 0]
    return min(ends, default=-1)


class _HeadLimits:
    """Mixin over a uvicorn HTTP protocol. Both of uvicorn's protocols make a new `self.cycle` when a
    request head has been parsed, set its `more_body` false when the body has, and call
    `on_response_complete` when the response is sent: the state is read from those alone."""

    limits: HttpLimits

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._head_bytes, self._head_timer = 0, None
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete:  # these bytes start a next head
            end = _head_end(data)
            size = len(data) if end < 0 else end
            if self._head_bytes + size > self.limits.max_header_bytes:
                self._refuse(431, f"the request head is over {self.limits.max_header_bytes} bytes")
                return
            self._head_bytes += size
        super().data_received(data)
        if self.cycle is not cycle:  # a head was parsed: a request began
            self._head_bytes = 0
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._idle():
            self._await_head()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._idle():
            return
        if self._head_bytes:
            self._refuse(408, f"the request head did not arrive within {self.limits.header_timeout:g} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` and close; while a response is being sent, only close (a second response
        cannot be put inside it)."""
        self._stop_head_timer()
        if self._idle():
            body = message.encode("ascii")
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, _REASONS[status].encode("ascii"), len(body), body))
        self.transport.close()
