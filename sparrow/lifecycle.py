"""What every Sparrow daemon (serve, master, node) does the same way at start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import structlog
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from sparrow import httplimits, systemd
from sparrow.config import HostPort
from sparrow.httplimits import GuardedSite, HttpLimits
from store.blockstore import StoreError
from store.lock import DataDirLock

log = structlog.get_logger("sparrow.daemon")

#: How long the HTTP listener lets requests in progress finish at shutdown.
HTTP_SHUTDOWN_TIMEOUT = 5.0


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


def os_reason(e: OSError) -> str:
    """The errno text ("address already in use"), not aiohttp's longer "error while attempting..."."""
    text = os.strerror(e.errno) if e.errno else str(e)
    return text[:1].lower() + text[1:]


class StopSignals:
    """SIGTERM and SIGINT set ``event``; ``received`` names the signals that came (for the log)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.event = asyncio.Event()
        self.received: list[str] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.received.append(sig.name)
        self.event.set()

    @property
    def first(self) -> str | None:
        return self.received[0] if self.received else None


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Take the data directory's lock (one daemon per directory) or fail with a one-line reason."""
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except StoreError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"cannot use data directory {data_dir}: {os_reason(e)}") from None
    return lock


def run_daemon(main: Coroutine[Any, Any, int], what: str) -> int:
    """Run a daemon's ``main`` on uvloop until it returns (SIGTERM/SIGINT); the process exit code.

    A StartupError is one line on stderr and exit 1; a bug is logged with its traceback and one
    line for the operator, never a bare traceback."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    except StartupError as e:
        fail(str(e))
        return 1
    except KeyboardInterrupt:  # SIGINT before the daemon's handler was installed
        return 1
    except Exception as e:
        log.exception(f"{what} crashed")
        fail(f"unexpected error: {type(e).__name__}: {e}")
        return 1


def fail(message: str) -> None:
    print(f"sparrow: error: {message}", file=sys.stderr, flush=True)


async def start_http(
    app: web.Application,
    host: str,
    port: int,
    cleanup: contextlib.AsyncExitStack,
    *,
    limits: HttpLimits | None = None,
    registry: CollectorRegistry | None = None,
) -> web.AppRunner:
    """Serve ``app`` on host:port (cleaned up by ``cleanup``); a bind failure is a StartupError.
    Every connection is bounded by ``limits`` (sparrow.httplimits; its metrics go to ``registry``)."""
    limits = limits if limits is not None else HttpLimits()
    guard = httplimits.install(app, limits, registry)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=limits.idle_timeout)
    await runner.setup()
    cleanup.push_async_callback(runner.cleanup)
    site = GuardedSite(runner, host, port, guard, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT)
    try:
        await site.start()
    except OSError as e:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise StartupError(f"cannot listen for HTTP on {address}: {os_reason(e)}") from None
    return runner


def notify(send: Callable[[str], bool], status: str) -> None:
    """Tell systemd (``sparrow.systemd.ready`` / ``stopping``); a failure is logged, not raised."""
    try:
        send(status)
    except OSError as e:
        log.warning("sd_notify failed", error=str(e))


def bound_port(sockets_or_addresses: Iterable[Any]) -> int | None:
    """The port of the first bound socket, or ``(host, port, ...)`` address as aiohttp's runner
    gives them; None if there is none."""
    for item in sockets_or_addresses:
        name = item.getsockname() if hasattr(item, "getsockname") else item
        if isinstance(name, tuple):
            return int(name[1])
    return None


def bound_address(sockets_or_addresses: Iterable[Any], configured: HostPort) -> HostPort:
    """``configured`` with the port a listener actually got: a port of 0 becomes the bound one."""
    port = bound_port(sockets_or_addresses)
    return configured if port is None else HostPort(configured.host, port)


async def begin_shutdown(
    cleanup: contextlib.AsyncExitStack, signals: StopSignals, runner: web.AppRunner
) -> None:
    """The first steps of every daemon's shutdown: take the exit stack over (the rest is done by
    hand, in order, so each step is logged), log the signal, tell systemd STOPPING=1, and stop the
    HTTP listener (requests in progress get HTTP_SHUTDOWN_TIMEOUT)."""
    cleanup.pop_all()
    log.info("stopping", signal=signals.first)
    notify(systemd.stopping, "draining")
    await runner.cleanup()
