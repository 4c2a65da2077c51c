"""What every Sparrow daemon (serve, master, node) does the same way at start and stop."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from store.blockstore import StoreError
from store.lock import DataDirLock


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
