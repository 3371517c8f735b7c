"""One thread owns the engine; asyncio handlers hand it work and await results.

Between engine steps the thread drains everything that arrived: all pending classify requests,
whatever their adapters, go through one forward pass (split only by `max_batch` rows); new
generation requests join the running batch; cancelled ones leave it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine import Classification, Engine
from .metrics import Metrics
from .sequence import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """As many requests as the server accepts are already in flight; retry later."""


@dataclass
class _ClassifyJob:
    token_ids: list[list[int]]
    adapter: str
    done: Callable[[list[Classification] | None, BaseException | None], None]
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _SubmitJob:
    request: GenerationRequest
    done: Callable[[BaseException | None], None]
    arrived: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, max_pending: int = 256, max_batch: int = 64) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_pending = max_pending  # requests accepted and not finished, queued or running
        self.max_batch = max_batch
        self._inbox: queue.Queue = queue.Queue()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def _put(self, job) -> None:
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

    async def classify(self, token_ids: list[list[int]], adapter: str) -> list[Classification]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(results, error):
            self._finished()
            loop.call_soon_threadsafe(_resolve, future, results, error)

        self._put(_ClassifyJob(token_ids, adapter, done))
        return await future

    async def submit(self, request: GenerationRequest) -> asyncio.Queue[TokenEvent]:
        """Queue a generation; returns the queue its token events arrive on."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def on_event(event: TokenEvent) -> None:
            if event.finished:
                self.metrics.finished.labels(event.finish_reason).inc()
                self._finished()
            loop.call_soon_threadsafe(events.put_nowait, event)

        def accepted_or_not(error: BaseException | None) -> None:
            if error is not None:
                self._finished()
            loop.call_soon_threadsafe(_resolve, accepted, None, error)

        request.on_event = on_event
        accepted = loop.create_future()
        self._put(_SubmitJob(request, accepted_or_not))
        try:
            await accepted
        except asyncio.CancelledError:  # the caller left before the engine took the request
            self.cancel(request.request_id)
            raise
        return events

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            jobs = self._drain(block=not self.engine.has_work)
            classify = [job for job in jobs if isinstance(job, _ClassifyJob)]
            for job in jobs:
                if isinstance(job, _SubmitJob):
                    try:
                        self.engine.submit(job.request)
                        job.done(None)
                    except Exception as exc:  # bad request: reported to its caller only
                        job.done(exc)
                elif isinstance(job, tuple):
                    self.engine.cancel(job[1])
            if classify:
                self._classify(classify)
            if self.engine.has_work:
                try:
                    self.engine.step()
                    self.metrics.observe_batch(self.engine.slots.state.slots)
                except Exception:
                    log.exception("engine step failed; cancelling the running batch")
                    for request_id in self.engine.running_request_ids():
                        self.engine.cancel(request_id)
                self.metrics.running_rows.set(len(self.engine.batch.running))

    def _drain(self, block: bool) -> list:
        jobs = []
        try:
            jobs.append(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait())
            while True:
                jobs.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        now = time.perf_counter()
        for job in jobs:
            if not isinstance(job, tuple):
                self.metrics.queue_depth.dec()
                method = "Classify" if isinstance(job, _ClassifyJob) else "Generate"
                self.metrics.queue_wait.labels(method).observe(now - job.arrived)
        return jobs

    def _classify(self, jobs: list[_ClassifyJob]) -> None:
        """All jobs' rows in shared forward passes of at most max_batch rows."""
        rows = [(job, ids) for job in jobs for ids in job.token_ids]
        results: dict[int, list[Classification]] = {id(job): [] for job in jobs}
        failed: dict[int, BaseException] = {}
        for start in range(0, len(rows), self.max_batch):
            chunk = [(job, ids) for job, ids in rows[start:start + self.max_batch] if id(job) not in failed]
            if not chunk:
                continue
            try:
                out = self.engine.classify_ids([ids for _, ids in chunk], [job.adapter for job, _ in chunk])
                self.metrics.observe_batch(self.engine.slots.state.slots)
            except Exception:
                # One job's bad input must not fail the others: retry them one by one.
                out = None
            if out is not None:
                for (job, _), result in zip(chunk, out, strict=True):
                    results[id(job)].append(result)
                continue
            for job, ids in chunk:
                if id(job) in failed:
                    continue
                try:
                    results[id(job)].extend(self.engine.classify_ids([ids], [job.adapter]))
                except Exception as exc:
                    failed[id(job)] = exc
        for job in jobs:
            error = failed.get(id(job))
            job.done(None if error else results[id(job)], error)


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
