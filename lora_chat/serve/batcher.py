"""One worker thread that gathers concurrent requests, whatever adapter each names, into one runtime batch.

HTTP handlers run on the event loop; the model runs here, on one thread, one batch at a time (the runtime
holds its lock for a batch; a second thread would only wait on it). Each request gets an asyncio queue that
receives its `Delta`s as they are decoded, then its `Completion` (or the exception that failed its batch).

Gathering: the worker takes the first waiting request, then whatever else is already queued (up to
`max_batch`), waiting `gather_s` at most for more to arrive, so requests sent together are answered
together. Rows leave the batch as they finish; requests that arrive while a batch runs wait for the next
one (the runtime's decode loop runs a batch to its end; it has no slot to join mid-way).

A request whose client went away is cancelled: still queued, it is dropped; running, the runtime ends its
row at the next token (`finish_reason` "cancelled"), so its slot and its compute are freed.

`Continuous` is what serve runs: the same `Job`s handed to `runtime.scheduler.Scheduler`, where a request joins
the running batch at the next decode step. `Batcher` (gather, then run the batch to its end) stays as the
baseline `bench/bench_serve.py` measures it against (`ServeOptions(scheduler="static")`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..runtime import Completion, Delta, Request, generate
from ..runtime.scheduler import Scheduler, Ticket

log = logging.getLogger("lora_chat.serve")


@dataclass
class Job:
    """One request on its way through the worker, and the queue its results go to."""

    request: Request
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue = field(default_factory=asyncio.Queue)
    timeout: float | None = None  # seconds the request may take (--request-timeout); None: no limit
    ticket: Ticket | None = None  # under `Continuous`: when its first token came (metrics)
    deadline: float | None = field(init=False)  # on the loop's clock, from the moment of submit

    def __post_init__(self) -> None:
        self.deadline = None if self.timeout is None else self.loop.time() + self.timeout

    def post(self, item: Delta | Completion | BaseException) -> None:
        """From the worker thread: hand `item` to the handler waiting on the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody is waiting
            pass

    def cancel(self) -> None:
        self.request.cancelled.set()


class Batcher:
    """Runs submitted requests in mixed-adapter batches on one worker thread."""

    def __init__(self, rt: Any, max_batch: int = 8, gather_s: float = 0.005, timeout: float | None = None):
        self.rt = rt
        self.timeout = timeout
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.finished: Counter[str] = Counter()  # finish reasons of the rows run so far
        self.batch_sizes: Counter[int] = Counter()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="lorachat-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, request: Request) -> Job:
        """Queue `request` (its `cancelled` event is created if missing); call from the event loop."""
        if request.cancelled is None:
            request.cancelled = threading.Event()
        job = Job(request, asyncio.get_running_loop(), timeout=self.timeout)
        self._queue.put(job)
        return job

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            gone = [job for job in batch if job.request.cancelled.is_set()]  # their clients left while queued
            self.finished["cancelled"] += len(gone)
            batch = [job for job in batch if job not in gone]
            if batch:
                self._run(batch)
            if stop:
                return

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        batch = [first]
        deadline = time.monotonic() + self.gather_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self, batch: list[Job]) -> None:
        self.batch_sizes[len(batch)] += 1
        try:
            completions = generate(self.rt, [job.request for job in batch],
                                   on_delta=lambda delta: batch[delta.row].post(delta))
        except Exception as err:  # noqa: BLE001 - every waiting request must hear of it; the worker goes on
            log.exception("a batch of %d failed", len(batch))
            for job in batch:
                job.post(err)
            return
        for job, completion in zip(batch, completions):
            self.finished[completion.finish_reason] += 1
            job.post(completion)


class Continuous:
    """`Job`s on the runtime's iteration-level scheduler (continuous batching); the interface of `Batcher`.

    `observe(job, completion)` runs on the worker thread when a request ends (metrics); `submit` raises
    `runtime.scheduler.QueueFull` beyond `max_queue` waiting requests.
    """

    def __init__(self, rt: Any, max_batch: int = 8, max_queue: int = 256, chunk_tokens: int = 128,
                 timeout: float | None = None, on_step: Any = None, observe: Any = None):
        self.scheduler = Scheduler(rt, max_running=max_batch, max_queue=max_queue, chunk_tokens=chunk_tokens,
                                   on_step=on_step)
        self.finished, self.batch_sizes = self.scheduler.finished, self.scheduler.batch_sizes
        self.timeout = timeout
        self.observe = observe

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_running

    def idle(self) -> bool:
        return self.scheduler.idle()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def submit(self, request: Request) -> Job:
        job = Job(request, asyncio.get_running_loop(), timeout=self.timeout)

        def done(item: Completion | BaseException) -> None:
            if self.observe is not None and isinstance(item, Completion):
                self.observe(job, item)
            job.post(item)

        job.ticket = self.scheduler.submit(request, job.post, done)
        return job
