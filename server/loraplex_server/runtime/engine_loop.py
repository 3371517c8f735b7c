"""One thread owns the engine and the adapter manager; asyncio handlers hand it work and await results.

The thread loops: take what arrived (jobs and cancels), hand each job that needs an adapter to the
adapter manager, start the jobs whose adapters the manager has put into slots, run one engine step, and
dispatch what the step returned (token events, classifications, embeddings) to the futures and queues the
callers await. Classification, embedding and generation all become rows of the engine's steps. A request
whose adapter is only on disk waits in the manager, without holding anyone up, until the loader thread has
read it.
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
from loraplex_server.engine.embedding import EmbedRequest
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.requests import Classification, ClassifyRequest, SlotAdapter, StepOutput
from loraplex_server.engine.sequence import GenerationRequest, TokenEvent
from loraplex_server.runtime.adapter_manager import AdapterManager

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """As many requests as the server accepts are already in flight; retry later."""


@dataclass(kw_only=True)
class _Job:
    key: str | None  # the adapter as `name@version`; None for the base model
    loop: asyncio.AbstractEventLoop  # the caller's event loop, where `future` resolves
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass(kw_only=True)
class _ClassifyJob(_Job):
    token_ids: list[list[int]]


@dataclass(kw_only=True)
class _EmbedJob(_Job):
    """Texts to embed, on an adapter (key) or the base (key None)."""

    request: EmbedRequest


@dataclass(kw_only=True)
class _SubmitJob(_Job):
    """A generation: `future` resolves once the engine took it, then its events go to `events`."""

    request: GenerationRequest
    events: asyncio.Queue


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


_WAKE = object()  # a disk read ended: the manager has requests to place


class EngineLoop:
    def __init__(self, engine: Engine, manager: AdapterManager, metrics: Metrics, max_pending: int = 256) -> None:
        self.engine, self.manager, self.metrics = engine, manager, metrics
        self.max_pending = max_pending  # requests accepted and not finished, queued or running
        self._inbox: queue.Queue = queue.Queue()
        self._running: dict[str, _ClassifyJob | _EmbedJob | _SubmitJob] = {}  # engine request id -> its caller's job
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        manager.wake = lambda: self._inbox.put(_WAKE)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
        self.manager.close()

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

    async def _job(self, kind: type[_Job], key: str | None, **fields):
        """Queue a job and await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(kind(key=key, loop=loop, future=future, **fields))
        return await future

    async def classify(self, token_ids: list[list[int]], key: str) -> list[Classification]:
        return await self._job(_ClassifyJob, key, token_ids=token_ids)

    async def embed(self, token_ids: list[list[int]], key: str | None):
        """The texts' embeddings [texts, hidden] (a float32 CPU tensor); the caller leaving (a client gone, a
        deadline) takes its texts out of the engine at the next step."""
        request = EmbedRequest(token_ids, key)
        try:
            return await self._job(_EmbedJob, key, request=request)
        except asyncio.CancelledError:
            self.cancel(request.request_id)
            raise

    async def warm(self, key: str, pin: bool) -> None:
        await self._job(_WarmJob, key, pin=pin)

    async def call(self, fn: Callable[[], object]):
        """Run fn on the engine thread, between steps."""
        return await self._job(_CallJob, None, fn=fn)

    async def submit(self, request: GenerationRequest) -> asyncio.Queue[TokenEvent]:
        """Queue a generation (request.adapter is a `name@version` key); returns the queue its token
        events arrive on, once the engine took it."""
        loop = asyncio.get_running_loop()
        accepted, events = loop.create_future(), asyncio.Queue()
        self._put(_SubmitJob(key=request.adapter, loop=loop, future=accepted, request=request, events=events))
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
                elif isinstance(message, _Job):
                    self._take(message)
            for job, placed in self.manager.placed():
                self._start(job, placed)
            if self.engine.has_work:
                try:
                    output = self.engine.step()
                except Exception:  # a bug outside the engine's per-row isolation: never lose this thread
                    log.exception("engine step failed; cancelling every request in the engine")
                    for request_id in self.engine.running_request_ids():
                        self.engine.cancel(request_id)
                else:
                    self._dispatch(output)
                self.metrics.observe_step(self.engine)

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
                method = {_ClassifyJob: "Classify", _SubmitJob: "Generate", _EmbedJob: "Embed"}.get(
                    type(job), "AdapterService")
                self.metrics.queue_wait.labels(method).observe(now - job.arrived)
        return messages

    def _take(self, job: _Job) -> None:
        """A new job: one on an adapter waits in the manager until it sits in a slot."""
        if job.key is None:
            self._start(job, None)
        else:
            self.manager.request(job.key, job)

    def _cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)  # its end comes out of the next step
        for job in self.manager.withdraw(lambda j: isinstance(j, _SubmitJob | _EmbedJob)
                                         and j.request.request_id == request_id):
            self._reply(job, None, asyncio.CancelledError())

    def _start(self, job: _Job, placed: SlotAdapter | BaseException | None) -> None:
        """Hand a job to the engine on its adapter's slot (None: the base). A job the manager placed counts
        in its adapter's in-flight requests until it ends, so the slot stays while it runs."""
        if isinstance(placed, BaseException):  # its adapter could not be read or placed
            self._reply(job, None, placed)
            return
        try:
            if isinstance(job, _ClassifyJob):
                request = ClassifyRequest(job.token_ids, job.key)
                self.engine.submit_classify(request, placed)
                self._running[request.request_id] = job
                return
            if isinstance(job, _EmbedJob):
                self.engine.submit_embed(job.request, placed)
                self._running[job.request.request_id] = job
                return
            if isinstance(job, _SubmitJob):
                self.engine.submit(job.request, placed)
                self._running[job.request.request_id] = job
                result = None
            elif isinstance(job, _WarmJob):
                try:
                    if job.pin:
                        self.manager.pin(job.key)
                finally:
                    self.manager.release(job.key)
                result = None
            else:
                result = job.fn()
        except Exception as exc:  # bad request: reported to its caller only
            if job.key is not None and not isinstance(job, _WarmJob):
                self.manager.release(job.key)
            self._reply(job, None, exc)
            return
        self._reply(job, result, None)

    def _reply(self, job: _Job, result, error: BaseException | None) -> None:
        """Resolve the caller's future. A generation stays in flight after its acceptance, until its
        finished event."""
        if error is not None or not isinstance(job, _SubmitJob):
            self._finished()
        job.loop.call_soon_threadsafe(_resolve, job.future, result, error)

    def _dispatch(self, output: StepOutput) -> None:
        """Send a step's events to their streams (one wake-up per event loop per step) and its
        classifications to their callers; requests that ended release their adapters."""
        streams: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent]]] = {}
        for event in output.events:
            job = self._running.get(event.request_id)
            if job is None:
                continue
            if event.finished:
                del self._running[event.request_id]
                self._ended(job)
                self.metrics.finished.labels(event.finish_reason).inc()
                self._finished()
            streams.setdefault(job.loop, []).append((job.events, event))
        for loop, items in streams.items():
            loop.call_soon_threadsafe(_deliver, items)
        for done in [*output.classified, *output.embedded]:
            job = self._running.pop(done.request_id, None)
            if job is not None:
                self._ended(job)
                self._reply(job, done.results, done.error)

    def _ended(self, job: _Job) -> None:
        if job.key is not None:
            self.manager.release(job.key)


def _deliver(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for events, event in items:
        events.put_nowait(event)


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
