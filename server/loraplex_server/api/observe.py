"""Metrics and the access log of every request, whatever its protocol: one count by method, adapter and
final status, one latency, one access-log line (off unless `loraplex serve --access-log`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from loraplex_server.api.metrics import Metrics
from loraplex_server.api.status import code_name

access_log = logging.getLogger("loraplex.access")


class Observation:
    """One request, from arrival to its last byte; `finish` is idempotent (the first call counts)."""

    def __init__(self, metrics: Metrics, method: str, reference: str | None, known: Callable[[str], bool]) -> None:
        self.metrics, self.method, self.reference, self._known = metrics, method, reference, known
        self.started = time.perf_counter()
        self.done = False

    def adapter_label(self) -> str:
        """The bounded label: none (a call about no single adapter), base, the name, other or unknown."""
        if self.reference is None:
            return "none"
        name = self.reference.split("@")[0]
        if not name:
            return "base"
        return self.metrics.adapter_label(name) if self._known(name) else "unknown"

    def finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        seconds = time.perf_counter() - self.started
        code = code_name(error)
        self.metrics.latency.labels(self.method).observe(seconds)
        self.metrics.requests.labels(self.method, self.adapter_label(), code).inc()
        # %r: the reference is the client's text, so a newline in it cannot forge a log line.
        access_log.info("%s adapter=%r status=%s %.1f ms", self.method, self.reference or "", code, 1000 * seconds)
