"""Batch concurrent requests onto the device: one worker thread, a short collection window.

Requests arrive on the event loop (:meth:`Batcher.submit`, awaited by the request handler)
with their images already decoded; the worker thread takes the oldest waiting request, keeps
collecting requests with the same key (the decoding options) until the window counted from
that oldest request's arrival has passed or ``max_batch`` images are in hand, runs them as one
batch, and hands each request its own results back on its loop. So:

- decoding never runs on the event loop, which keeps accepting and reading uploads;
- the worker never waits on a client: what it batches is already in memory;
- under load the window costs nothing (the oldest request has waited longer than it while the
  previous batch ran), and when idle it adds at most ``window_s`` to a request's latency;
- requests with other options wait for a later batch, in arrival order;
- a request whose client has gone (its future cancelled) is dropped before it is run;
- when a batch of several requests fails, each of its requests is run again alone, so a
  request that fails (a bug its input triggers) fails only itself.

``max_queue`` bounds the images waiting; :meth:`submit` raises :class:`Overloaded` past it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

log = logging.getLogger("fastcap.serve")


class Overloaded(RuntimeError):
    """Too many images are waiting; the client should retry later (HTTP 503)."""


@dataclass
class BatchInfo:
    """The batch a request was decoded in."""

    requests: int
    images: int


@dataclass
class _Job:
    key: Hashable
    items: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


def _deliver(fut: asyncio.Future, result, exc: BaseException | None) -> None:
    if fut.done():  # cancelled: the client went away
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class Batcher:
    """``run(key, items) -> results`` (one result per item, in order) called from one thread
    on batches of jobs that share ``key``."""

    def __init__(
        self,
        run: Callable[[Hashable, list], list],
        *,
        max_batch: int = 32,
        window_s: float = 0.010,
        max_queue: int = 256,
    ):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, window_s >= 0; got {max_batch}, "
                f"{max_queue}, {window_s}"
            )
        self.run, self.max_batch, self.window_s, self.max_queue = (
            run,
            max_batch,
            window_s,
            max_queue,
        )
        self._cond = threading.Condition()
        self._pending: collections.deque[_Job] = collections.deque()
        self._queued = 0  # images in _pending
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = {
            "batches": 0,
            "requests": 0,
            "images": 0,
            "max_batch_requests": 0,
            "max_batch_images": 0,
            "requests_per_batch": collections.Counter(),
            "busy_seconds": 0.0,
        }

    # ------------------------------------------------------------------ the loop side
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="fastcap-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the waiting jobs, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    async def submit(self, key: Hashable, items: list) -> tuple[list, BatchInfo]:
        """Queue one request's items; -> (their results, the batch they ran in). Re-raises
        what ``run`` raised; :class:`Overloaded` when the queue is full."""
        if self._thread is None or not self._thread.is_alive():
            self.start()
        loop = asyncio.get_running_loop()
        job = _Job(key, list(items), loop.create_future(), loop)
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if self._queued and self._queued + len(job.items) > self.max_queue:
                raise Overloaded(
                    f"the queue holds {self._queued} images (the limit is {self.max_queue}); "
                    "retry later"
                )
            self._pending.append(job)
            self._queued += len(job.items)
            self._cond.notify()
        return await job.future

    def stats(self) -> dict:
        with self._cond:
            s = dict(self._stats)
            s["requests_per_batch"] = {
                str(k): v for k, v in sorted(s["requests_per_batch"].items())
            }
            s["waiting_images"] = self._queued
        s["mean_batch_images"] = round(s["images"] / s["batches"], 3) if s["batches"] else 0.0
        s["busy_seconds"] = round(s["busy_seconds"], 3)
        s.update(max_batch=self.max_batch, window_ms=self.window_s * 1000)
        return s

    # ------------------------------------------------------------------ the worker side
    def _select(self) -> list[_Job]:
        """The batch the oldest job would run in now (under the lock; nothing removed)."""
        jobs = [j for j in self._pending if not j.future.done()]
        if not jobs:
            return []
        key, batch, n = jobs[0].key, [], 0
        for j in jobs:
            if j.key != key:
                continue
            if batch and n + len(j.items) > self.max_batch:
                break
            batch.append(j)
            n += len(j.items)
        return batch

    def _take(self) -> list[_Job] | None:
        """Wait for a batch and remove it from the queue; None when stopping and empty."""
        with self._cond:
            while True:
                for j in [j for j in self._pending if j.future.done()]:  # abandoned
                    self._pending.remove(j)
                    self._queued -= len(j.items)
                if self._pending:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._pending[0].arrived + self.window_s
            while True:
                batch = self._select()
                full = sum(len(j.items) for j in batch) >= self.max_batch
                left = deadline - time.monotonic()
                if full or left <= 0 or self._stopping or not batch:
                    break
                self._cond.wait(left)
            for j in batch:
                self._pending.remove(j)
                self._queued -= len(j.items)
            return batch

    def _run(self, batch: list[_Job]) -> list[tuple[tuple | None, BaseException | None]]:
        """(results and BatchInfo, or None; the exception, or None) of each job of ``batch``,
        run as one call of ``run``; if that raises, each job alone."""
        items = [it for j in batch for it in j.items]
        info = BatchInfo(requests=len(batch), images=len(items))
        try:
            results = self.run(batch[0].key, items)
            if len(results) != len(items):
                raise RuntimeError(f"run returned {len(results)} results for {len(items)}")
        except Exception as e:  # handed to the request(s) that raise it; the worker goes on
            if len(batch) == 1:
                log.exception("batch of %d images failed", len(items))
                return [(None, e)]
            log.warning("a batch of %d requests failed (%s); running each alone", len(batch), e)
            return [self._run([j])[0] for j in batch]
        out, start = [], 0
        for j in batch:
            out.append(((results[start : start + len(j.items)], info), None))
            start += len(j.items)
        return out

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            info = BatchInfo(requests=len(batch), images=sum(len(j.items) for j in batch))
            t0 = time.perf_counter()
            answers = self._run(batch)
            busy = time.perf_counter() - t0
            with self._cond:
                s = self._stats
                s["batches"] += 1
                s["requests"] += info.requests
                s["images"] += info.images
                s["max_batch_requests"] = max(s["max_batch_requests"], info.requests)
                s["max_batch_images"] = max(s["max_batch_images"], info.images)
                s["requests_per_batch"][info.requests] += 1
                s["busy_seconds"] += busy
            for j, (res, exc) in zip(batch, answers):
                with contextlib.suppress(RuntimeError):  # RuntimeError: that loop has closed
                    j.loop.call_soon_threadsafe(_deliver, j.future, res, exc)
