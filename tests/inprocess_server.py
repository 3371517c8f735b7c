"""A real `loraplex serve` (gRPC, HTTP, metrics: the same code as the command) inside the test process, on its
own thread and event loop: no interpreter start and no imports per server, so request-path tests are fast.
It answers the few process calls the tests make (terminate/SIGTERM = drain, kill = stop at once, wait, poll).
Tests that watch a process itself (its exit code, its log, signals) start a real one (server_process.py)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import threading

from loraplex_server.app.options import build_parser
from loraplex_server.app.ports import reserve_ports
from loraplex_server.app.server import serve


class _Lines(logging.Handler):
    def __init__(self, lines: collections.deque) -> None:
        super().__init__()
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + "\n")


class InProcessServer:
    def __init__(self, argv: list[str]) -> None:
        args = build_parser().parse_args(argv)
        self.ports = reserve_ports(args)
        self.pid = os.getpid()
        self.output: collections.deque = collections.deque(maxlen=10_000)  # every log line while it runs
        self.returncode: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._started = threading.Event()
        self._handler = _Lines(self.output)
        logging.getLogger().addHandler(self._handler)
        self._thread = threading.Thread(target=self._run, args=(args,), name="loraplex-test-server", daemon=True)
        self.output_reader = self._thread  # what server_process joins before reading `output`
        self._thread.start()
        self._started.wait()

    def _run(self, args) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._task = asyncio.current_task()
            self._started.set()
            await serve(args, self.ports, self._stop)

        try:
            asyncio.run(main())
            self.returncode = 0
        except (asyncio.CancelledError, KeyboardInterrupt):
            self.returncode = -signal.SIGKILL
        except BaseException as exc:  # noqa: BLE001 - SystemExit and failures: the exit code a process would have
            self.output.append(f"server failed: {exc!r}\n")
            self.returncode = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
        finally:
            self._started.set()
            logging.getLogger().removeHandler(self._handler)

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self.returncode

    def send_signal(self, sig: int) -> None:
        if self._loop is None or not self._thread.is_alive():
            return
        if sig == signal.SIGKILL:
            self._loop.call_soon_threadsafe(self._task.cancel)
        else:
            self._loop.call_soon_threadsafe(self._stop.set)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the in-process server did not stop within {timeout} s")
        return self.returncode
