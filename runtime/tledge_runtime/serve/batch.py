"""One thread that runs the model for the server, several requests per run, and drops work nobody waits for.

Requests put jobs in a queue; the thread takes what is waiting (up to ``max_batch`` rows, jobs of
one kind together: prepared images go through ``Classifier.infer``, graph tensors through
``Classifier.run_graph``) and runs the model once for all of them. A job whose waiter gave up
(deadline passed, client disconnected: its future was cancelled) or whose deadline has passed is
dropped before the model sees it, so an overloaded server spends its time on requests someone
will read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from tledge_runtime.classifier import Classifier
from tledge_runtime.errors import TledgeError
from tledge_runtime.serve.metrics import Metrics

log = logging.getLogger("tledge_runtime")

IMAGES = "images"  # N x H x W x 3 uint8 from Classifier.prepare -> (probabilities, ood scores or None)
TENSOR = "tensor"  # the graph's own input -> (the graph's raw output, its ood_score output or None)


class Dropped(TledgeError):
    """The job was not run: its deadline passed or its client went away, or the server is stopping."""


@dataclass
class Job:
    kind: str
    array: np.ndarray
    deadline: float  # time.monotonic() after which nobody waits for the answer
    future: Future = field(default_factory=Future)
    gone: str = "deadline"  # why the waiter gave up, when it cancels the future: deadline | disconnected


class Batcher:
    def __init__(self, classifier: Classifier, max_batch: int, metrics: Metrics):
        self._classifier = classifier
        self._max_batch = max(1, max_batch)
        self._metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tledge-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether jobs submitted now will run (readiness)."""
        return not self._stopping and self._thread.is_alive()

    def submit(self, kind: str, array: np.ndarray, deadline: float) -> Job:
        job = Job(kind, array, deadline)
        if self._stopping:
            job.future.set_exception(Dropped("the server is stopping", hint="retry on another instance"))
            return job
        self._queue.put(job)
        self._metrics.queue.inc()
        return job

    def close(self) -> None:
        """Stop after the run in progress; jobs still queued are answered with Dropped."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._metrics.queue.dec()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(Dropped("the server stopped", hint="retry on another instance"))

    def _loop(self) -> None:
        carry: Job | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                return
            jobs, rows = [first], len(first.array)
            while rows < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop once this batch is done
                    break
                if nxt.kind != first.kind:
                    carry = nxt  # the next batch starts with it
                    break
                jobs.append(nxt)
                rows += len(nxt.array)
            self._metrics.queue.dec(len(jobs))
            if carry is not None:
                self._metrics.queue.inc()
            live = [job for job in jobs if self._wanted(job)]
            if live:
                self._run(first.kind, live)

    def _wanted(self, job: Job) -> bool:
        if not job.future.set_running_or_notify_cancel():  # the waiter cancelled it
            self._metrics.dropped.labels(job.gone).inc()
            return False
        if time.monotonic() > job.deadline:
            self._metrics.dropped.labels("deadline").inc()
            job.future.set_exception(Dropped("the request's deadline passed before the model could run it",
                                             hint="retry shortly; the server is overloaded"))
            return False
        return True

    def _run(self, kind: str, jobs: list[Job]) -> None:
        batch = np.concatenate([job.array for job in jobs]) if len(jobs) > 1 else jobs[0].array
        self._metrics.batch.observe(len(batch))
        try:
            clf = self._classifier
            out, scores = clf.infer_scored(batch) if kind == IMAGES else clf.run_graph_scored(batch)
        except BaseException as e:
            if not isinstance(e, TledgeError):
                log.exception("the model failed on a batch of %d", len(batch))
            for job in jobs:
                job.future.set_exception(e)
            return
        start = 0
        for job in jobs:
            end = start + len(job.array)
            job.future.set_result((out[start:end], None if scores is None else scores[start:end]))
            start = end
