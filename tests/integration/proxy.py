"""A fault-injecting TCP proxy for integration tests, in the style of asyncpg's test proxy.

It runs its own asyncio loop in a daemon thread, accepts connections on loopback and forwards bytes
between each one and ``upstream`` (for us: a node's heartbeat connection to the master). On demand:

- :meth:`FaultProxy.cut`: a partition. Bytes are still read from both sockets (so neither side sees
  back-pressure, an error or EOF) but dropped, in both directions; the sockets stay open.
- :meth:`FaultProxy.stall`: nothing is read any more; bytes pile up in the kernel buffers and the
  writers eventually block, as on a link that stopped delivering.
- :meth:`FaultProxy.restore`: forwarding resumes (stalled bytes are delivered; cut ones are gone).
- :meth:`FaultProxy.reset`: every open connection is aborted (RST on both sides).

It records the ``time.monotonic()`` at which it forwarded each downstream-to-upstream chunk (node to
master), taken *after* the write was handed to the kernel: a chunk's recorded time is at or after
the moment the node sent it, which makes the bounds the tests derive from it conservative.
Mode changes run on the proxy's loop and return only once they are in force, so no chunk is
forwarded after :meth:`cut` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

READ_SIZE = 65536


class Mode(enum.Enum):
    PASS = "pass"
    CUT = "cut"
    STALL = "stall"


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``upstream``; see the module docstring."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self._mode = Mode.PASS
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None  # set unless stalled
        self._writers: set[asyncio.StreamWriter] = set()
        self._lock = threading.Lock()
        self._up_times: list[float] = []
        #: Connections accepted over the proxy's life.
        self.accepted = 0
        #: Every byte forwarded, both directions (what a tap on the wire would see).
        self.captured = bytearray()
        #: Bytes dropped while cut, per direction.
        self.dropped_up = 0
        self.dropped_down = 0

    # -- life -------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Sockets of forwarded connections still open (two per connection)."""
        return len(self._writers)

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"fault-proxy->{self.upstream[1]}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise AssertionError("the proxy did not start")
        if failure:
            raise failure[0]
        return self

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None

    # -- faults -----------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def cut(self) -> float:
        """Drop everything both ways from now on, keeping the sockets open; returns when (monotonic)."""
        return self._set(Mode.CUT)

    def stall(self) -> float:
        """Stop reading from both sides from now on; returns when (monotonic)."""
        return self._set(Mode.STALL)

    def restore(self) -> float:
        """Forward again; returns when (monotonic)."""
        return self._set(Mode.PASS)

    def reset(self) -> None:
        """Abort every open connection (both sides see a reset)."""

        async def abort() -> None:
            for w in list(self._writers):
                sock = w.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST, not FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()

        self._call(abort())

    def _set(self, mode: Mode) -> float:
        async def change() -> float:
            assert self._flowing is not None
            self._mode = mode
            if mode is Mode.STALL:
                self._flowing.clear()
            else:
                self._flowing.set()
            return time.monotonic()

        return self._call(change())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the proxy's loop and wait for its result."""
        assert self._loop is not None, "the proxy is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- what was forwarded -----------------------------------------------------------------------

    def up_times(self) -> list[float]:
        """The monotonic times at which downstream-to-upstream chunks were forwarded, oldest first."""
        with self._lock:
            return list(self._up_times)

    def last_up(self) -> float | None:
        """When the last downstream-to-upstream chunk was forwarded (None: never)."""
        with self._lock:
            return self._up_times[-1] if self._up_times else None

    # -- forwarding (on the proxy's loop) ---------------------------------------------------------

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(down_w)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._writers.discard(down_w)
            down_w.transport.abort()  # as if the upstream refused: the client sees a reset
            return
        self._writers.add(up_w)
        pumps = [
            asyncio.create_task(self._pump(down_r, up_w, upstream=True)),
            asyncio.create_task(self._pump(up_r, down_w, upstream=False)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for w in (down_w, up_w):
                self._writers.discard(w)
                w.close()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            try:
                data = await reader.read(READ_SIZE)
            except OSError:
                return
            if not data:
                return
            await self._flowing.wait()  # stalled while the read was pending: hold the chunk
            if self._mode is Mode.CUT:
                if upstream:
                    self.dropped_up += len(data)
                else:
                    self.dropped_down += len(data)
                continue
            writer.write(data)
            with self._lock:
                self.captured += data  # every byte forwarded, both ways (what a tap would see)
            if upstream:
                forwarded = time.monotonic()
                with self._lock:
                    self._up_times.append(forwarded)
            try:
                await writer.drain()
            except OSError:
                return
