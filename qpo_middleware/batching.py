"""Micro-batching: concurrent callers' queries decode together.

A :class:`MicroBatcher` owns one worker thread and a bounded queue. The worker takes the
first waiting query, then keeps collecting for up to ``window_ms`` (or until
``max_batch_size`` queries are in hand) and runs them as one batched decode; each caller
waits on its own :class:`concurrent.futures.Future`. A caller that gives up (its latency
budget ran out) cancels its future: if the worker has not started it yet, the query is
dropped from the batch; otherwise the result is simply not read.

With ``window_ms=0`` the worker takes whatever is queued at that moment and never waits:
under load, queries that arrived while a batch was decoding form the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The micro-batching queue is full: the runtime is overloaded."""


class BatcherClosedError(RuntimeError):
    """The micro-batcher was closed; no new query is accepted."""


_STOP = object()


class MicroBatcher(Generic[T]):
    """Collects single queries from many threads into batches for ``run_batch``. Thread-safe."""

    def __init__(
        self,
        run_batch: Callable[[list[str]], Sequence[T]],
        *,
        window_ms: float,
        max_batch_size: int,
        max_queue: int,
        name: str = "qpo-batcher",
    ) -> None:
        if window_ms < 0 or max_batch_size < 1 or max_queue < 1:
            raise ValueError("window_ms must be >= 0, max_batch_size and max_queue >= 1.")
        self._run_batch = run_batch
        self.window_s = window_ms / 1000.0
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._name = name
        self.batches = 0  # decodes run (for tests and stats)
        self.queries = 0  # queries decoded

    def submit(self, query: str) -> Future[T]:
        """Queue one query; the future holds its result (or the decode's exception)."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosedError("This PromptOptimizer was closed; load the bundle again to decode.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((query, future))
        except queue.Full:
            raise QueueFullError(
                f"The micro-batching queue is full ({self._queue.maxsize} queries waiting): the policy cannot keep "
                "up. Raise RuntimeConfig.max_queue, add replicas, or set a latency budget so callers fail open."
            ) from None
        return future

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting queries, finish what is queued, stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    # -- worker -------------------------------------------------------------------------------

    def _collect(self, first: object) -> tuple[list[tuple[str, Future[T]]], bool]:
        batch = [first]
        stop = False
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch_size:
            try:
                remaining = deadline - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop  # type: ignore[return-value]

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            live = [(q, f) for q, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._run_batch([q for q, _ in live])
            except BaseException as error:  # noqa: BLE001 - every waiter gets the decode's error
                for _, future in live:
                    future.set_exception(error)
                continue
            self.batches += 1
            self.queries += len(live)
            for (_, future), result in zip(live, results, strict=True):
                future.set_result(result)
        # Drain: anything still queued after the stop is cancelled, never left hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].cancel()  # type: ignore[index]
