"""The one thread that runs a kind of model call for every request, batching what is waiting.

The web server answers many requests at once; the model must not be: two threads inside one PyTorch
module can race on its lazily built parts, and on two cores parallel forward passes only fight over
them. So each kind of query (text, uploaded item) has one `BatchWorker` thread that owns its side of
the model. Requests queue up; the thread takes every request waiting (up to `max_batch`) and runs
them as one batch, so concurrent text queries share one forward pass and one index search. Clients
that wait for their answers come back together, a little apart: when the last batch held several
requests, the next one waits up to `linger` seconds (2 ms) for as many, so that they share one pass
instead of taking turns in two; a lone client never waits. The queue is bounded: when it is full a
request is refused at once (`Busy`) rather than left to wait without end. If a batch fails, its
requests are run one by one, so a bad request fails alone and the thread goes on.

Written here rather than taken from a library: the batching servers that exist (Triton, Ray
Serve, TorchServe) are whole deployments of their own, for a loop of a few dozen lines.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

_logger = logging.getLogger(__name__)

_STOP = object()


class Busy(Exception):
    """Too many requests are waiting for the model."""


class BatchWorker:
    def __init__(self, name: str, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = 32,
                 max_waiting: int = 256, linger: float = 0.002):
        self.name, self.run_batch, self.max_batch, self.linger = name, run_batch, max_batch, linger
        self._last = 1  # the size of the last batch: how many requests to wait `linger` for
        self._queue: queue.Queue = queue.Queue(max_waiting)
        self._thread = threading.Thread(target=self._loop, name=f"mmret-{name}", daemon=True)
        self._thread.start()
        self.batches = 0  # batches run, for the tests and the benchmark
        self.largest = 0  # the largest batch run

    def submit(self, job: Any) -> Future:
        """Queue a job; its future gets the job's result or its exception."""
        future: Future = Future()
        try:
            self._queue.put_nowait((job, future))
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} queries are waiting already") from None
        return future

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _take(self) -> list | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.linger
        while len(batch) < self.max_batch:
            wait = deadline - time.monotonic() if len(batch) < self._last else 0.0
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # stop after this batch
                break
            batch.append(item)
        self._last = len(batch)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [(job, f) for job, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches += 1
            self.largest = max(self.largest, len(live))
            try:
                results = self.run_batch([job for job, _ in live])
            except Exception as e:
                if len(live) == 1:
                    live[0][1].set_exception(e)
                    continue
                self._one_by_one(live)
                continue
            for (_, future), result in zip(live, results):
                future.set_result(result)

    def _one_by_one(self, live: list) -> None:
        for job, future in live:
            try:
                future.set_result(self.run_batch([job])[0])
            except Exception as e:
                future.set_exception(e)
