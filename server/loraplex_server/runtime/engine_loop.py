"""One thread owns the engine and its adapter cache; asyncio handlers hand it work and await results.

The thread loops: take what arrived (typed jobs and control messages), start the jobs whose adapters
can be put on the device now, run one engine step. Classification and generation both become rows of
the engine's steps. A request whose adapter is only on disk waits, without holding anyone up, until the
loader thread has read it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.engine import Classification, ClassifyRequest, Engine
from loraplex_server.engine.sequence import GenerationRequest, TokenEvent
from loraplex_server.runtime.adapter_cache import AdapterCache

log = logging.getLogger(__name__)

Done = Callable[[object, BaseException | None], None]


class QueueFull(RuntimeError):
    """As many requests as the server accepts are already in flight; retry later."""


@dataclass(kw_only=True)
class _Job:
    key: str | None  # the adapter as `name@version`; None for the base model
    done: Done
    arrived: float = field(default_factory=time.perf_counter)


@dataclass(kw_only=True)
class _ClassifyJob(_Job):
    token_ids: list[list[int]]


@dataclass(kw_only=True)
class _SubmitJob(_Job):
    request: GenerationRequest


@dataclass(kw_only=True)
class _WarmJob(_Job):
    """Load an adapter into a device slot (and maybe pin it) once it is in memory."""

    pin: bool


@dataclass(kw_only=True)
class _CallJob(_Job):
    """Run a function on the engine thread (adapter management)."""

    fn: Callable[[], object]


@dataclass
class _Cancel:
    request_id: str


@dataclass
class _Arrived:
    """A disk read finished: its waiting jobs go on, or fail with its error."""

    key: str


class EngineLoop:
    def __init__(self, engine: Engine, cache: AdapterCache, metrics: Metrics, max_pending: int = 256) -> None:
        self.engine, self.cache, self.metrics = engine, cache, metrics
        self.max_pending = max_pending  # requests accepted and not finished, queued or running
        self._inbox: queue.Queue = queue.Queue()
        self._pending: list[_Job] = []  # taken from the inbox, waiting for device room
        self._waiting: dict[str, list[_Job]] = {}  # adapter key -> jobs waiting for its disk read
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
        self.cache.close()

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._in_flight >= self.max_pending:
                raise QueueFull(f"{self._in_flight} requests are in flight, the server's limit; retry later")
            self._in_flight += 1
        self.metrics.in_flight.inc()
        self.metrics.queue_depth.inc()
        self._inbox.put(job)

    def _finished(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self.metrics.in_flight.dec()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- asyncio side ---------------------------------------------------------------------------

    async def _job(self, make: Callable[[Done], _Job]):
        """Queue a job and await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result, error):
            self._finished()
            loop.call_soon_threadsafe(_resolve, future, result, error)

        self._put(make(done))
        return await future

    async def classify(self, token_ids: list[list[int]], key: str) -> list[Classification]:
        return await self._job(lambda done: _ClassifyJob(key=key, done=done, token_ids=token_ids))

    async def warm(self, key: str, pin: bool) -> None:
        await self._job(lambda done: _WarmJob(key=key, done=done, pin=pin))

    async def call(self, fn: Callable[[], object]):
        """Run fn on the engine thread, between steps."""
        return await self._job(lambda done: _CallJob(key=None, done=done, fn=fn))

    async def submit(self, request: GenerationRequest) -> asyncio.Queue[TokenEvent]:
        """Queue a generation (request.adapter is a `name@version` key); returns the queue its token
        events arrive on."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def on_event(event: TokenEvent) -> None:
            if event.finished:
                self.metrics.finished.labels(event.finish_reason).inc()
                self._finished()
            loop.call_soon_threadsafe(events.put_nowait, event)

        def accepted_or_not(_, error: BaseException | None) -> None:
            if error is not None:
                self._finished()
            loop.call_soon_threadsafe(_resolve, accepted, None, error)

        request.on_event = on_event
        accepted = loop.create_future()
        self._put(_SubmitJob(key=request.adapter, done=accepted_or_not, request=request))
        try:
            await accepted
        except asyncio.CancelledError:  # the caller left before the engine took the request
            self.cancel(request.request_id)
            raise
        return events

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            for message in self._drain(block=not self.engine.has_work):
                if isinstance(message, _Cancel):
                    self._cancel(message.request_id)
                elif isinstance(message, _Arrived):
                    self._arrived(message.key)
                else:
                    self._pending.append(message)
            self._dispatch()
            if self.engine.has_work:
                try:
                    self.engine.step()
                except Exception:  # a bug outside the engine's per-row isolation: never lose this thread
                    log.exception("engine step failed; cancelling every request in the engine")
                    for request_id in self.engine.running_request_ids():
                        self.engine.cancel(request_id)
                self.metrics.observe_step(self.engine)

    def _cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        for jobs in (self._pending, *self._waiting.values()):
            for job in [j for j in jobs if isinstance(j, _SubmitJob) and j.request.request_id == request_id]:
                jobs.remove(job)
                job.done(None, asyncio.CancelledError())

    def _arrived(self, key: str) -> None:
        error = self.cache.arrived(key)
        for job in self._waiting.pop(key, []):
            if error is None:
                self._pending.append(job)
            else:
                job.done(None, error)

    def _drain(self, block: bool) -> list:
        messages = []
        try:
            messages.append(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait())
            while True:
                messages.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        now = time.perf_counter()
        for job in messages:
            if isinstance(job, _Job):
                self.metrics.queue_depth.dec()
                method = {_ClassifyJob: "Classify", _SubmitJob: "Generate"}.get(type(job), "AdapterService")
                self.metrics.queue_wait.labels(method).observe(now - job.arrived)
        return messages

    def _dispatch(self) -> None:
        """Start every pending job whose adapter can be put on the device now; the others keep waiting
        (for their disk read, or for device room that running requests hold)."""
        jobs, self._pending = self._pending, []
        for job in jobs:
            if job.key is not None and not self.cache.in_memory(job.key):
                self._await_disk(job)
            else:
                self._start(job)

    def _await_disk(self, job: _Job) -> None:
        self._waiting.setdefault(job.key, []).append(job)
        future = self.cache.fetch(job.key)
        if future is not None:
            key = job.key
            future.add_done_callback(lambda _: self._inbox.put(_Arrived(key)))

    def _start(self, job: _Job) -> None:
        """Hand a job to the engine once its adapter sits in a slot; the slot stays while it runs."""
        try:
            if job.key is not None and not self.cache.ensure(job.key):
                self._pending.append(job)
                return
            if isinstance(job, _ClassifyJob):
                self.engine.submit_classify(ClassifyRequest(job.token_ids, job.key, job.done))
                return
            if isinstance(job, _SubmitJob):
                self.engine.submit(job.request)
                result = None
            elif isinstance(job, _WarmJob):
                if job.pin:
                    self.cache.pin(job.key)
                result = None
            else:
                result = job.fn()
        except Exception as exc:  # bad request: reported to its caller only
            job.done(None, exc)
            return
        job.done(result, None)


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
