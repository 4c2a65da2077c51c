"""The master's end of the heartbeat transport (docs/cluster.md, "Messages", "Lease arithmetic").

One :class:`NodeConnection` (an asyncio Protocol) per TCP connection from a node. It only moves
bytes: they go to ``heartbeat.FrameDecoder``; each decoded message is handled here:

- ``Hello``: recorded in the ObservationStore at ``now`` (master clock) and remembered as the
  connection's node; the node is upserted in the AuthorityStore (in a worker thread: an fsync), so
  the Publisher may name it in an assignment. A Hello naming another node on the same connection
  is a protocol error.
- ``Heartbeat``: recorded at ``now``; answered at once with ``Ack(seq, lease_seconds, assignments
  naming the node, directory, deleted)``: the directory lists every live volume with the portal of
  the primary its latest published assignment names (None when it has none, or no assignment
  yet; :func:`volume_directory`), and ``deleted`` holds the tombstones of the volumes the
  heartbeat reported that the authority marks deleted (``ControlLoop.tombstones_for``). When the
  Ack has been written, ``MasterLeases.granted(node, now, lease_seconds)`` records the lease (a
  lease counts on the master from *after* the Ack left, so the node's copy, counted from its send
  time, always ends first).
- anything else (an Ack from a node, a Heartbeat before Hello, a bad frame): the connection is
  closed and the reason logged. Nothing else happens on a protocol error: a half-understood node
  gets no Ack, so no lease.

A peer that does not read its Acks (the write buffer passes :data:`MAX_WRITE_BUFFER`) is
disconnected rather than buffered without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import structlog

from sparrow.cluster.heartbeat import FrameDecoder, HeartbeatProtocolError, encode
from sparrow.cluster.lease import MasterLeases
from sparrow.cluster.messages import Ack, DirectoryEntry, Heartbeat, Hello, Message
from sparrow.cluster.observations import ObservationError, ObservationStore
from sparrow.master.control import ControlLoop

log = structlog.get_logger("sparrow.master.heartbeat")

#: Bytes of unsent Acks a connection may hold before the node is deemed not to be reading.
MAX_WRITE_BUFFER = 4 << 20


def volume_directory(control: ControlLoop) -> tuple[DirectoryEntry, ...]:
    """Every live volume the master knows, by volume id, with its primary's iSCSI portal as the
    latest published assignment records it (None while the volume has no primary or has not been
    placed yet). Every node gets it in every Ack (docs/cluster.md, "Messages")."""
    entries = []
    for volume in control.desired():
        current = control.current(volume.volume_id)
        portal = None if current is None else current.primary_portal
        entries.append(DirectoryEntry(volume.volume_id, volume.name, portal))
    return tuple(sorted(entries, key=lambda e: e.volume_id))


class ConnectionRefused(Exception):
    """A message that ends the connection (not a codec error); ``reason`` is logged."""


class HeartbeatServer:
    """The shared state of all node connections, and the listening socket.

    ``clock`` is the master's monotonic clock (``loop.time``); ``on_hello(hello)`` is called for
    every Hello (the daemon upserts the node in the authority store); ``on_heartbeat()`` counts.
    """

    def __init__(
        self,
        control: ControlLoop,
        *,
        lease_seconds: float,
        clock: Callable[[], float],
        on_hello: Callable[[Hello], None] | None = None,
        on_heartbeat: Callable[[], None] | None = None,
        on_protocol_error: Callable[[str], None] | None = None,
    ) -> None:
        self.control = control
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.on_hello = on_hello
        self.on_heartbeat = on_heartbeat
        self.on_protocol_error = on_protocol_error
        self.connections: set[NodeConnection] = set()
        self._server: asyncio.Server | None = None

    @property
    def observations(self) -> ObservationStore:
        return self.control.observations

    @property
    def leases(self) -> MasterLeases:
        return self.control.leases

    def protocol(self) -> NodeConnection:
        """A protocol factory for ``loop.create_server``."""
        return NodeConnection(self)

    async def start(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.protocol, host, port, reuse_address=True)
        return self._server

    @property
    def sockets(self) -> tuple[Any, ...]:
        return () if self._server is None else tuple(self._server.sockets)

    async def close(self) -> None:
        """Stop listening and close every node connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close("master shutting down")
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class NodeConnection(asyncio.Protocol):
    """One node's connection; see the module docstring."""

    def __init__(self, server: HeartbeatServer) -> None:
        self.server = server
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self.node_id: str | None = None
        self.acks_sent = 0
        self.closed_reason: str | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)
        log.debug("node connected", peer=self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closed_reason is not None:
            return
        self.decoder.feed(data)
        try:
            while (message := self.decoder.next_message()) is not None:
                self.handle(message)
                if self.closed_reason is not None:
                    return
        except HeartbeatProtocolError as e:
            self.protocol_error(e.code.value, str(e))
        except ConnectionRefused as e:
            self.protocol_error("refused", str(e))

    def eof_received(self) -> bool | None:
        if self.decoder.buffered:
            log.warning(
                "node connection ended inside a frame",
                peer=self.peer,
                node=self.node_id,
                buffered=self.decoder.buffered,
            )
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        log.info(
            "node disconnected",
            peer=self.peer,
            node=self.node_id,
            reason=self.closed_reason or (str(exc) if exc else "closed by peer"),
        )
        self.transport = None

    # -- messages ---------------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Act on one decoded message (raises ConnectionRefused for one that ends the connection)."""
        if isinstance(message, Hello):
            self._hello(message)
        elif isinstance(message, Heartbeat):
            self._heartbeat(message)
        else:
            raise ConnectionRefused(f"a node may not send {type(message).__name__}")

    def _hello(self, hello: Hello) -> None:
        if self.node_id is not None and hello.node_id != self.node_id:
            raise ConnectionRefused(f"Hello from {hello.node_id!r} on the connection of {self.node_id!r}")
        known = self.server.observations.hello(hello.node_id)
        self.server.observations.record(hello, hello.node_id, self.server.clock())
        if self.node_id is None:
            log.info(
                "node hello",
                peer=self.peer,
                node=hello.node_id,
                incarnation=hello.incarnation,
                restarted=known is not None and known.incarnation != hello.incarnation,
                iscsi_portal=hello.iscsi_portal,
            )
        self.node_id = hello.node_id
        if self.server.on_hello is not None:
            self.server.on_hello(hello)

    def _heartbeat(self, heartbeat: Heartbeat) -> None:
        node_id = self.node_id
        if node_id is None:
            raise ConnectionRefused("Heartbeat before Hello")
        try:
            self.server.observations.record(heartbeat, node_id, self.server.clock())
        except ObservationError as e:
            raise ConnectionRefused(str(e)) from None
        if self.server.on_heartbeat is not None:
            self.server.on_heartbeat()
        ack = Ack(
            seq=heartbeat.seq,
            lease_seconds=self.server.lease_seconds,
            assignments=self.server.control.assignments_for(node_id),
            directory=volume_directory(self.server.control),
            deleted=self.server.control.tombstones_for(o.volume_id for o in heartbeat.observations),
        )
        self._send(ack)
        if self.closed_reason is None:
            self.acks_sent += 1
            # After the write: the master's view of the lease starts no earlier than the node's.
            self.server.leases.granted(node_id, self.server.clock(), self.server.lease_seconds)

    def _send(self, ack: Ack) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.closed_reason = self.closed_reason or "connection closing"
            return
        transport.write(encode(ack))
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.protocol_error("not_reading", f"more than {MAX_WRITE_BUFFER} bytes of Acks unread")

    # -- closing ----------------------------------------------------------------------------------

    def protocol_error(self, code: str, reason: str) -> None:
        log.warning("closing node connection", peer=self.peer, node=self.node_id, code=code, reason=reason)
        if self.server.on_protocol_error is not None:
            self.server.on_protocol_error(code)
        self.close(reason, abort=True)

    def close(self, reason: str, *, abort: bool = False) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()
