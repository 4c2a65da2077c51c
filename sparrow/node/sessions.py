"""SessionControl: what the node's volume layer needs from the iSCSI listener.

``NodeVolumes`` (sparrow/node/convergence.py) counts and closes the sessions logged in to a target
when it unexports the volume (released by this node, or destroyed); :class:`ServerSessions` adapts
``frontend.server.IscsiServer`` to it, :class:`NoSessions` stands in where no listener runs.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from frontend.server import IscsiServer

#: Seconds in-flight SCSI commands get to finish on SIGTERM (the unit's TimeoutStopSec is larger).
SHUTDOWN_TIMEOUT = 10.0
#: Seconds in-flight commands of an unexported volume get before its connections are closed.
DISCONNECT_TIMEOUT = 5.0


class SessionControl(Protocol):
    def session_count(self, iqn: str) -> int: ...

    async def disconnect(self, iqn: str, reason: str) -> None: ...


class NoSessions:
    """SessionControl when no listener runs (unit tests of the volume layer)."""

    def session_count(self, iqn: str) -> int:
        return 0

    async def disconnect(self, iqn: str, reason: str) -> None:
        return None


class ServerSessions:
    """SessionControl over IscsiServer: count and disconnect the connections logged in to a target
    (reading stops at once; commands in flight get ``timeout`` seconds to finish)."""

    def __init__(self, server: IscsiServer, timeout: float = DISCONNECT_TIMEOUT) -> None:
        self.server = server
        self.timeout = timeout

    def session_count(self, iqn: str) -> int:
        return len(list(self.server.protocols_of_target(iqn)))

    async def disconnect(self, iqn: str, reason: str) -> None:
        protocols = list(self.server.protocols_of_target(iqn))
        for p in protocols:
            p.stop_reading()
        pending = [t for p in protocols for t in p.tasks]
        if pending:
            await asyncio.wait(pending, timeout=self.timeout)
        for p in protocols:
            p.close(reason)
