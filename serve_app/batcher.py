"""Batches that form under load and cost nothing when idle: a model replica's forward passes, one at a time.

Requests queue while the forward pass runs; when it ends, the next forward takes everything queued (up to
``max_batch_size`` texts). An idle replica starts a request's forward at once, so a lone message never
waits for company; under load each batch holds what arrived during the previous one.

Why not ``@serve.batch``: its loop forms the next batch as soon as the previous one has *started*, and the
new batch then waits for the running one (its ``max_concurrent_batches`` semaphore) while holding only what
arrived in its ``batch_wait_timeout_s``. Measured on the Serve graph with a 1-thread MiniLM replica and 32
closed-loop clients sending one text each: batches averaged 1.4 texts while requests queued ~650 ms in the
replica; the batch wait would have to be the forward's length to help, and an idle replica would pay it.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class BatchResult:
    """One request's rows, and the forward pass that computed them."""

    rows: list[Any]
    started: float  # perf_counter when its forward began (the request queued from submit until then)
    forward_s: float  # seconds the forward took
    batch: int  # texts in that forward, this request's and others'


class Batcher:
    """Runs ``run(texts) -> rows`` (one row per text) over the texts of every request queued when a call
    could start: at most ``concurrency`` calls at once, each taking everything queued (up to
    ``max_batch_size`` texts). A lone request starts at once when a call slot is free.

    Args:
        run: the forward pass, called from a worker thread; or a coroutine function (``async def``), awaited on
            the event loop (the ingress's calls to a model deployment: one call carries many messages).
        max_batch_size: most texts per call; a request is never split (send at most this many texts).
        batch_wait_s: when a batch would start with fewer than ``max_batch_size`` texts, wait this long once
            for more (0: start at once; under load, batches form from the queue anyway).
        on_batch: called on the event loop with each call's number of texts (a metrics hook).
        concurrency: calls at once; 1 for a forward pass (a sync ``run`` is never called concurrently with
            itself then), more for calls to other processes that batch again on their side.
    """

    def __init__(self, run: Callable[[list[str]], Any], max_batch_size: int = 64, batch_wait_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None, concurrency: int = 1):
        self.run, self.on_batch = run, on_batch
        # (texts, future, the submitter's context: a call runs in its first request's, so the request id Serve
        # keeps in a context variable travels with the call to the model replica and into its logs)
        self._pending: deque[tuple[list[str], asyncio.Future, contextvars.Context]] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self.configure(max_batch_size, batch_wait_s, concurrency)

    def configure(self, max_batch_size: int, batch_wait_s: float, concurrency: int | None = None) -> None:
        """Changes the knobs; the next batch uses them."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        if concurrency is not None:
            self.concurrency = concurrency
            if self._wake is not None:
                self._wake.set()

    @property
    def queued_texts(self) -> int:
        return sum(len(item[0]) for item in self._pending)

    @property
    def in_flight(self) -> int:
        """Calls running now."""
        return len(self._running)

    async def submit(self, texts: list[str]) -> BatchResult:
        """``run``'s rows for ``texts``, computed in the next batch; ``run``'s exception if it raised."""
        if not 1 <= len(texts) <= self.max_batch_size:
            raise ValueError(f"a request holds 1 to max_batch_size={self.max_batch_size} texts, got {len(texts)}")
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        future = loop.create_future()
        self._pending.append((texts, future, contextvars.copy_context()))
        self._wake.set()
        return await future

    def _take(self) -> list[tuple[list[str], asyncio.Future, contextvars.Context]]:
        batch, size = [], 0
        while self._pending:
            texts, future, _ = self._pending[0]
            if future.done():  # its caller was cancelled while it queued
                self._pending.popleft()
                continue
            if batch and size + len(texts) > self.max_batch_size:
                break
            batch.append(self._pending.popleft())
            size += len(texts)
        return batch

    async def _drain(self) -> None:
        """Starts a call whenever requests are queued and a call slot is free; woken by each arrival and by
        each call's end."""
        assert self._wake is not None
        while True:
            if not self._pending or len(self._running) >= self.concurrency:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.batch_wait_s and self.queued_texts < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_s)
            batch = self._take()
            if not batch:
                continue
            task = batch[0][2].run(asyncio.get_running_loop().create_task, self._call(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if self._wake is not None:
            self._wake.set()

    async def _call(self, batch: list[tuple[list[str], asyncio.Future, contextvars.Context]]) -> None:
        flat = [text for texts, _, _ in batch for text in texts]
        if self.on_batch is not None:
            self.on_batch(len(flat))
        started = time.perf_counter()
        try:  # a sync run goes to a worker thread: requests keep queueing on the loop meanwhile
            if asyncio.iscoroutinefunction(self.run):
                rows = await self.run(flat)
            else:
                rows = await asyncio.to_thread(self.run, flat)
            if len(rows) != len(flat):
                raise RuntimeError(f"run returned {len(rows)} rows for {len(flat)} texts")
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(e)
            return
        forward_s, start = time.perf_counter() - started, 0
        for texts, future, _ in batch:
            if not future.done():
                future.set_result(BatchResult(rows[start:start + len(texts)], started, forward_s, len(flat)))
            start += len(texts)
