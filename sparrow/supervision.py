"""One way for every daemon task to fail: logged with its traceback, counted, and seen by /healthz.

Every long-running piece of a daemon (the master's control loop and node recorder, the node's
heartbeat client, convergence worker and fence timer) runs under one :class:`TaskSupervisor`:

- :meth:`TaskSupervisor.spawn` starts a task; if it ends with an exception (anything but a
  cancellation), the failure is logged with its traceback and recorded.
- A loop that catches an exception per iteration and carries on calls :meth:`TaskSupervisor.failed`
  where it catches it, and :meth:`TaskSupervisor.recovered` once an iteration succeeds again.
- :meth:`TaskSupervisor.guard` wraps a ``call_at`` callback (the fence timer) the same way: its
  exception is recorded instead of going to the event loop's default handler.
- :meth:`TaskSupervisor.install` routes what the event loop itself catches (an exception in any
  other callback, a task's exception nobody retrieved) here too.

A recorded failure stays until its task recovers: ``failures()`` is what ``/healthz`` reports as
``tasks`` (HTTP 503 while there is one); ``sparrow_task_failures_total{task}`` counts every failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter

log = structlog.get_logger("sparrow.tasks")

T = TypeVar("T")

#: The task name of failures the event loop caught outside any supervised task.
EVENT_LOOP = "event-loop"


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """The latest failure of one task: its name, ``Type: message``, and when (wall clock)."""

    task: str
    error: str
    at: float

    def json(self) -> dict[str, Any]:
        return {"task": self.task, "error": self.error, "at": round(self.at, 3)}


class TaskSupervisor:
    """See the module docstring. ``registry`` receives ``sparrow_task_failures_total{task}``."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._failures: dict[str, TaskFailure] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counter = Counter(
            "sparrow_task_failures",
            "Exceptions caught in daemon tasks, by task",
            ["task"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    # -- reporting --------------------------------------------------------------------------------

    def failed(self, task: str, error: BaseException) -> None:
        """Record (and log, with its traceback) an exception caught in ``task``."""
        log.error("task failed", task=task, error=f"{type(error).__name__}: {error}", exc_info=error)
        self.counter.labels(task=task).inc()
        self._failures[task] = TaskFailure(task, f"{type(error).__name__}: {error}", self._clock())

    def recovered(self, task: str) -> None:
        """``task`` completed an iteration after a failure: it no longer makes the daemon unhealthy."""
        if self._failures.pop(task, None) is not None:
            log.info("task recovered", task=task)

    def failures(self) -> tuple[TaskFailure, ...]:
        """The tasks whose latest failure has not been followed by a recovery, by name."""
        return tuple(self._failures[name] for name in sorted(self._failures))

    # -- running ----------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Start ``coro`` as a task named ``name``; an exception that ends it is :meth:`failed`."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here: the loop never calls it "never retrieved"
        if error is not None:
            self.failed(task.get_name(), error)

    def guard(self, name: str, callback: Callable[[], None]) -> Callable[[], None]:
        """``callback`` for ``loop.call_at``: an exception it raises is :meth:`failed`, not lost."""

        def guarded() -> None:
            try:
                callback()
            except Exception as e:
                self.failed(name, e)
            else:
                self.recovered(name)

        return guarded

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make the loop's exception handler record what it catches (callbacks, unretrieved task
        exceptions) as a failure of the task involved, or of :data:`EVENT_LOOP`."""

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            error = context.get("exception")
            if not isinstance(error, Exception) or isinstance(error, OSError):
                # No exception, or a socket error a transport reports (a peer's reset): not a bug.
                loop.default_exception_handler(context)
                return
            task = context.get("task") or context.get("future")
            name = task.get_name() if isinstance(task, asyncio.Task) else EVENT_LOOP
            self.failed(name, error)

        loop.set_exception_handler(handler)
