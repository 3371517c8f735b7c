"""Rate limits on repeated log warnings, so a client cannot flood the server's log.

300 TLS hellos sent to the plain HTTP port wrote 300 "Invalid HTTP request received." warnings
(uvicorn.error); any refusal a client can trigger at will does the same. `RepeatLimit` lets through
at most `burst` records of one kind (logger, level and message template) per `window` seconds; the
first one held back says that similar messages are being suppressed, and the first one let through
after the window says how many were. Records below WARNING are not limited (the access log is
opt-in and counts requests on purpose).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_KINDS = 1024  # distinct kinds tracked at once; the oldest is forgotten past it


@dataclass
class _Window:
    start: float
    passed: int = 0
    held: int = 0  # past the burst; the first of them is shown, with the notice


class RepeatLimit(logging.Filter):
    def __init__(self, burst: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._windows: dict[tuple, _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            window = self._windows.pop(kind, None)  # re-inserted last: the dict stays in use order
            held_before = 0
            if window is None or now - window.start >= self.window:
                held_before = max(window.held - 1, 0) if window else 0  # dropped, not the notice
                window = _Window(now)
            self._windows[kind] = window
            if len(self._windows) > MAX_KINDS:
                del self._windows[next(iter(self._windows))]
            if window.passed < self.burst:
                window.passed += 1
                if held_before:
                    _append(record, f" [{held_before} similar message(s) were suppressed]")
                return True
            window.held += 1
            if window.held == 1:
                _append(record, f" [repeated {self.burst} times in {self.window:g} s: similar messages are "
                                "suppressed for the rest of that time]")
                return True
            return False


def _append(record: logging.LogRecord, note: str) -> None:
    record.msg, record.args = record.getMessage() + note, None


def install_log_limits(burst: int = 10, window: float = 60.0) -> RepeatLimit:
    """Put one RepeatLimit on every handler of the root logger (so on every logger that propagates:
    the server's, uvicorn's, grpc's)."""
    limit = RepeatLimit(burst, window)
    for handler in logging.getLogger().handlers:
        handler.addFilter(limit)
    return limit
