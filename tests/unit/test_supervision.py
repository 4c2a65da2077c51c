"""sparrow.supervision.TaskSupervisor: every way a daemon task can fail is logged with its
traceback, counted in sparrow_task_failures_total{task} and reported until the task recovers."""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CollectorRegistry

from sparrow.supervision import EVENT_LOOP, TaskSupervisor


def _count(registry: CollectorRegistry, task: str) -> float | None:
    return registry.get_sample_value("sparrow_task_failures_total", {"task": task})


async def test_a_task_that_dies_is_logged_counted_and_reported() -> None:
    registry = CollectorRegistry()
    supervisor = TaskSupervisor(registry, clock=lambda: 12.5)

    async def recorder() -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    with structlog.testing.capture_logs() as logs:
        task = supervisor.spawn(recorder(), name="node-recorder")
        await asyncio.wait({task})
        await asyncio.sleep(0)  # the done callback runs on the next loop iteration
    (failure,) = supervisor.failures()
    assert (failure.task, failure.at) == ("node-recorder", 12.5)
    assert failure.error == "OverflowError: Python int too large to convert to SQLite INTEGER"
    assert _count(registry, "node-recorder") == 1.0
    (entry,) = [e for e in logs if e["event"] == "task failed"]
    assert entry["task"] == "node-recorder" and isinstance(entry["exc_info"], OverflowError)
    assert entry["exc_info"].__traceback__ is not None  # the traceback goes to the log


async def test_a_cancelled_or_finished_task_is_no_failure() -> None:
    supervisor = TaskSupervisor()

    async def forever() -> None:
        await asyncio.Event().wait()

    async def done() -> None:
        return None

    cancelled = supervisor.spawn(forever(), name="control-loop")
    finished = supervisor.spawn(done(), name="node-recorder")
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.wait({cancelled, finished})
    await asyncio.sleep(0)
    assert supervisor.failures() == ()


async def test_a_loop_reports_and_recovers() -> None:
    registry = CollectorRegistry()
    supervisor = TaskSupervisor(registry)
    supervisor.failed("control-loop", OSError(5, "Input/output error"))
    supervisor.failed("control-loop", OSError(5, "Input/output error"))
    assert [f.task for f in supervisor.failures()] == ["control-loop"]
    assert _count(registry, "control-loop") == 2.0
    supervisor.recovered("control-loop")
    assert supervisor.failures() == ()
    assert _count(registry, "control-loop") == 2.0  # the count stays: it is history


def test_a_guarded_timer_callback_never_raises() -> None:
    supervisor = TaskSupervisor()
    calls: list[str] = []

    def fence() -> None:
        calls.append("fence")
        if len(calls) == 1:
            raise RuntimeError("LU gone")

    guarded = supervisor.guard("fence-timer", fence)
    guarded()
    assert [(f.task, f.error) for f in supervisor.failures()] == [("fence-timer", "RuntimeError: LU gone")]
    guarded()
    assert calls == ["fence", "fence"] and supervisor.failures() == ()


async def test_what_the_event_loop_catches_is_reported() -> None:
    supervisor = TaskSupervisor()
    loop = asyncio.get_running_loop()
    old = loop.get_exception_handler()
    supervisor.install(loop)
    try:

        def broken() -> None:
            raise KeyError("volume")

        loop.call_soon(broken)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(old)
    assert [(f.task, f.error) for f in supervisor.failures()] == [(EVENT_LOOP, "KeyError: 'volume'")]
