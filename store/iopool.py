"""The store's I/O threads, with a cheap hand-off back to the event loop.

``asyncio``'s ``run_in_executor`` costs one concurrent future, one asyncio future chained to it, and
one ``call_soon_threadsafe`` (a wake-up of the loop) per call. For cold 4 KiB reads from a disk at
QD32 that hand-off, not the disk, was the limit (docs/performance.md, "Both cores": 110-210 us of
CPU per pooled read against 33-44 us inline; the disk itself did 4x more with depth). Here a call is
an asyncio future and a tuple on a ``queue.SimpleQueue``; a worker that finishes puts the result on
the loop's list of completions and wakes the loop only if that list was empty, so the completions
of one batch cost one wake-up, and the loop settles them all in one callback.

``SPARROW_IO_BATCHED=0`` makes ``store.blockstore`` use the plain executor instead (A/B, debugging).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

#: SPARROW_IO_BATCHED=0: the I/O pool hands results back through ``run_in_executor`` instead.
BATCHED = os.environ.get("SPARROW_IO_BATCHED", "1") != "0"

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
_Done = tuple["asyncio.Future[Any]", Any, BaseException | None]


class IoPool:
    """``threads`` daemon threads running blocking calls for any number of event loops; started on
    first use, stopped (after the calls already queued) at interpreter exit."""

    def __init__(self, threads: int, name: str = "sparrow-io") -> None:
        self._size = threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
        self._threads: list[threading.Thread] = []
        #: Times a worker woke a loop (one per batch of completions): for tests and curiosity.
        self.wakeups = 0

    def submit(self, fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
        """Run ``fn(*args)`` on a pool thread; the returned future (of the running loop) gets its
        result or exception. Cancelling the future does not stop a call already running."""
        loop = asyncio.get_running_loop()
        if not self._threads:
            self._start()
        future: asyncio.Future[R] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            for i in range(self._size):
                t = threading.Thread(target=self._work, name=f"{self._name}_{i}", daemon=True)
                t.start()
                self._threads.append(t)
            atexit.register(self._stop)  # runs before the interpreter stops daemon threads

    def _stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                done: _Done = (future, fn(*args), None)
            except BaseException as e:  # handed to the awaiting coroutine
                done = (future, None, e)
            with self._lock:
                pending = self._done.setdefault(loop, [])
                pending.append(done)
                if len(pending) > 1:
                    continue  # the loop has been woken for this batch and has not drained it yet
                self.wakeups += 1
            try:
                loop.call_soon_threadsafe(self._drain, loop)
            except RuntimeError:  # the loop is closed: nobody awaits these any more
                with self._lock:
                    self._done.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._done.pop(loop, [])
        for future, result, exc in batch:
            if future.cancelled():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
