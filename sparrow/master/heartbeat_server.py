"""The master's end of the heartbeat transport (docs/cluster.md, "Messages", "Lease arithmetic",
"The cluster channel").

One :class:`NodeConnection` (an asyncio Protocol) per TCP connection from a node. It only moves
bytes: they go to a server-side :class:`~sparrow.cluster.channel.Channel` (purpose HEARTBEAT),
which authenticates the node by the cluster secret before anything else; the plaintext of its
records goes to ``heartbeat.FrameDecoder``; each decoded message is handled here. The master's
first message on every connection, as soon as the channel is open, is its
:class:`~sparrow.cluster.messages.MasterHello`: its identity key and a proof over this connection's
channel binding (``MasterIdentity.hello``), which the node checks against the key it pinned before
it says Hello (docs/cluster.md, "Master identity").

- ``Hello``: admitted only with a proof, made by the key bound to its node id (or by any key when
  none is bound yet, which binds it: ``NodeKeys.admit``, docs/cluster.md "Node identity"), over
  this connection's channel binding; then recorded in the ObservationStore at ``now`` (master
  clock) and remembered as the
  connection's node; the node is upserted in the AuthorityStore (in a worker thread: an fsync), so
  the Publisher may name it in an assignment. A Hello naming another node on the same connection
  is a protocol error. A node whose key no one approved is *pending* (docs/cluster.md, "Node
  admission"): logged once at warning level ("node awaiting approval", node and key), and until
  it is approved each of its heartbeats is recorded without its volume reports (the master
  believes nothing a pending node says about volumes) and answered with an Ack that carries no
  assignment, directory, stream key or discovery CHAP; no Ack is pushed to it.
- ``Heartbeat``: recorded at ``now``; answered at once with ``Ack(seq, lease_seconds, assignments
  naming the node, directory, deleted)``: the directory lists every live volume with the portal of
  the primary its latest published assignment names (None when it has none, or no assignment
  yet; :func:`volume_directory`), and ``deleted`` holds the tombstones of the volumes the
  heartbeat reported that the authority marks deleted (``ControlLoop.tombstones_for``). When the
  Ack has been written, ``MasterLeases.granted(node, now, lease_seconds)`` records the lease (a
  lease counts on the master from *after* the Ack left, so the node's copy, counted from its send
  time, always ends first).
- A newly published assignment is not left waiting for each node's next heartbeat:
  :meth:`HeartbeatServer.push_assignments` (the daemon calls it on every publish; pushes of one
  loop turn are coalesced) sends every connected node that has heartbeated an Ack *repeating the
  seq of its last Heartbeat* with the current assignments, directory and no tombstones. The node
  applies a repeat of its latest Ack's seq for its assignments only; its lease is not extended
  (``LeaseClock.acked`` ignores a seq already applied), and the master records no grant for it.
  This saves up to one heartbeat interval on the promoted node, and on each replica that must
  persist the new epoch before it accepts the new primary's stream.
- anything else (an Ack from a node, a Heartbeat before Hello, a bad frame): the connection is
  closed and the reason logged. Nothing else happens on a protocol error: a half-understood node
  gets no Ack, so no lease.

Limits: at most ``max_handshaking`` connections may be in the handshake at once (past that a new
one is closed at once); a handshake must complete within ``handshake_timeout``, a record or a
heartbeat frame once begun within ``frame_timeout``; an authenticated connection silent for
``idle_timeout`` (the master's dead_after) is closed. A peer that fails the handshake is refused:
logged (warning, peer and reason) and counted (``on_refused(reason)``). A Hello refused after the
handshake (``no_identity``, ``bad_proof``, ``key_mismatch``, ``live_incarnation``) is logged at
error level, counted, and answered with a ``Refusal`` (reason and detail, so the node can log why)
before the connection is closed.

An authenticated connection must say Hello within ``handshake_timeout`` of its handshake (empty
records would otherwise keep a Hello-less connection open for ever), or it is closed
(``hello_timeout``).

One connection per node id: an admitted Hello closes every other connection of its node id
(``superseded``): a node needs one, and a member that opened many as itself could otherwise send
:data:`MAX_HEARTBEATS_PER_SECOND` on each.

One live incarnation per node id: a Hello for a node id that has another open connection, under
another incarnation, whose last heartbeat is younger than dead_after is refused (logged at error
level, counted with reason ``live_incarnation``); once that connection closes or goes silent the
Hello is admitted, so a restarted node comes back at once.

A peer that does not read its Acks (the write buffer passes :data:`MAX_WRITE_BUFFER`) is
disconnected rather than buffered without bound, and so is one that sends more than
:data:`MAX_HEARTBEATS_PER_SECOND` heartbeats in a second (each costs an Ack with the whole volume
directory: a member flooding them would starve the loop that grants every node's lease).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, cast

import structlog

from sparrow.cluster.channel import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    Channel,
    ChannelError,
    ClusterSecret,
    Established,
    HandshakeBytes,
    Purpose,
    Side,
)
from sparrow.cluster.heartbeat import FrameDecoder, HeartbeatProtocolError, encode
from sparrow.cluster.lease import MasterLeases
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.cluster.messages import (
    MAX_REFUSAL_DETAIL,
    Ack,
    Assignment,
    DirectoryEntry,
    Heartbeat,
    Hello,
    Message,
    Refusal,
    StreamKey,
)
from sparrow.cluster.nodeidentity import Admission, IdentityCode, IdentityRefused, NodeKeys, key_text
from sparrow.cluster.observations import ObservationError, ObservationStore
from sparrow.master.control import ControlLoop
from sparrow.replication.streamauth import stream_keys_for

log = structlog.get_logger("sparrow.master.heartbeat")

#: Bytes of unsent Acks a connection may hold before the node is deemed not to be reading.
MAX_WRITE_BUFFER = 4 << 20
#: Connections that may be in the handshake at once; more are closed as they arrive.
DEFAULT_MAX_HANDSHAKING = 64
#: The reason label of a Hello refused because its node id is alive under another incarnation.
LIVE_INCARNATION = "live_incarnation"
#: The reason label of a connection closed because too many are in the handshake.
HANDSHAKE_CAP = "handshake_cap"
#: Seconds a refused node gets to read its Refusal before the connection is aborted.
REFUSAL_LINGER = 1.0
#: Heartbeats a connection may send in one second (a node sends one per interval, 4/s at the
#: shortest the tests use, and a few early ones when a replica lags); more close the connection.
MAX_HEARTBEATS_PER_SECOND = 20
#: The protocol-error code of a connection closed because its node id said Hello on another one.
SUPERSEDED = "superseded"
#: The protocol-error code of an authenticated connection that said no Hello in time.
HELLO_TIMEOUT = "hello_timeout"


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
    """A message that ends the connection (not a codec error); ``reason`` is logged.

    ``refusal`` is set for a refusal counted in ``on_refused`` (and logged at error level)."""

    def __init__(self, message: str, *, refusal: str | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


class HeartbeatServer:
    """The shared state of all node connections, and the listening socket.

    ``clock`` is the master's monotonic clock (``loop.time``); ``on_hello(hello)`` is called for
    every Hello (the daemon upserts the node in the authority store); ``on_heartbeat()`` counts;
    ``on_refused(reason)`` counts a refused connection. ``idle_timeout`` defaults to the
    ObservationStore's dead_after. Deadlines are armed on the running loop once :meth:`start` has
    run; without it (unit tests) call :meth:`NodeConnection.check_deadline`. ``node_keys`` are the
    node identity bindings and approvals (default: the control loop's, ``ControlLoop.node_keys``).
    ``on_hello(hello, approved)``: ``approved`` says the Hello's key was approved just now
    (``Admitted.newly_approved``), for the authority to record.
    """

    def __init__(
        self,
        control: ControlLoop,
        *,
        secret: ClusterSecret,
        lease_seconds: float,
        clock: Callable[[], float],
        on_hello: Callable[[Hello, bool], None] | None = None,
        on_heartbeat: Callable[[], None] | None = None,
        on_protocol_error: Callable[[str], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        max_handshaking: int = DEFAULT_MAX_HANDSHAKING,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        idle_timeout: float | None = None,
        master_key: bytes | None = None,
        node_keys: NodeKeys | None = None,
        identity: MasterIdentity | None = None,
    ) -> None:
        self.control = control
        self.node_keys = node_keys if node_keys is not None else control.node_keys
        self.secret = secret
        #: Derives the replication stream keys each Ack carries (None: no keys, streams refused).
        self.master_key = master_key
        #: Proves the master's key to every node first (None: no MasterHello; unit harnesses only).
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.on_hello = on_hello
        self.on_heartbeat = on_heartbeat
        self.on_protocol_error = on_protocol_error
        self.on_refused = on_refused
        self.max_handshaking = max_handshaking
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout if idle_timeout is not None else control.observations.dead_after
        self.connections: set[NodeConnection] = set()
        #: Connections whose handshake has not completed.
        self.handshaking = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._push_pending = False
        #: (node id, key) of every pending node logged as awaiting approval: logged once each.
        self._announced_pending: set[tuple[str, bytes]] = set()

    def approved(self, node_id: str) -> bool:
        """Whether ``node_id`` is a member (its bound key approved: ``NodeKeys.admission``)."""
        return self.node_keys.admission(node_id) is Admission.APPROVED

    def announce_pending(self, node_id: str, key: bytes, peer: str) -> None:
        """Log a pending node once per (node id, key) while this master runs."""
        if (node_id, key) in self._announced_pending:
            return
        self._announced_pending.add((node_id, key))
        log.warning(
            "node awaiting approval",
            peer=peer,
            node=node_id,
            node_key=key_text(key),
            approve=f"sparrow node approve {node_id}",
        )

    def stream_keys(self, node_id: str, assignments: tuple[Assignment, ...]) -> tuple[StreamKey, ...]:
        """The replication stream keys an Ack to ``node_id`` carries (``streamauth.stream_keys_for``)."""
        if self.master_key is None:
            return ()
        return stream_keys_for(self.master_key, node_id, assignments)

    def push_assignments(self) -> None:
        """Send every connected node its current assignments now (see the module docstring);
        pushes asked in one loop turn go out once, at the end of it."""
        if self._loop is None:  # unit tests without start(): at once
            self._push()
        elif not self._push_pending:
            self._push_pending = True
            self._loop.call_soon(self._push)

    def _push(self) -> None:
        self._push_pending = False
        for conn in list(self.connections):
            conn.push()

    def refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

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
        self._loop = loop
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
        self.channel = Channel(
            server.secret,
            Side.SERVER,
            Purpose.HEARTBEAT,
            server.clock(),
            handshake_timeout=server.handshake_timeout,
            frame_timeout=server.frame_timeout,
            idle_timeout=server.idle_timeout,
        )
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self.node_id: str | None = None
        self.incarnation: int | None = None
        #: Arrival (master clock) of the last Heartbeat on this connection.
        self.last_heartbeat_at: float | None = None
        #: The key this connection's Hello proved (NodeKeys.admit).
        self.node_key: bytes | None = None
        #: The second of heartbeats being counted: when it began and how many so far.
        self._rate_since = -1.0
        self._rate_count = 0
        #: Seq of the last Heartbeat on this connection (what a pushed Ack repeats).
        self.last_seq: int | None = None
        self.acks_sent = 0
        #: Acks pushed on a publish (:meth:`push`), not answering a heartbeat.
        self.pushes_sent = 0
        self.closed_reason: str | None = None
        self._handshaking = False
        #: True once the peer proved it holds the cluster secret.
        self.authenticated = False
        #: The instant a Hello is due by, from the handshake's end until the first Hello.
        self._hello_by: float | None = None
        #: When the heartbeat frame now partly decoded began (None: none pending).
        self._frame_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)
        log.debug("node connected", peer=self.peer)
        if self.server.handshaking >= self.server.max_handshaking:
            self.refuse(HANDSHAKE_CAP, f"{self.server.handshaking} connections already in the handshake")
            return
        self.server.handshaking += 1
        self._handshaking = True
        self._arm()

    def _left_handshake(self) -> None:
        if self._handshaking:
            self._handshaking = False
            self.server.handshaking -= 1

    def data_received(self, data: bytes) -> None:
        if self.closed_reason is not None:
            return
        now = self.server.clock()
        try:
            events = self.channel.feed(data, now)
        except ChannelError as e:
            self._channel_error(e)
            return
        for event in events:
            if isinstance(event, HandshakeBytes):
                if self.transport is not None:
                    self.transport.write(event.data)
            elif isinstance(event, Established):
                self.authenticated = True
                self._hello_by = now + self.server.handshake_timeout
                self._left_handshake()
                log.debug("node authenticated", peer=self.peer)
                identity = self.server.identity
                if identity is not None and self.transport is not None:
                    self.transport.write(self.channel.send(encode(identity.hello(self.channel.binding))))
            else:
                self.decoder.feed(event.data)
        try:
            while (message := self.decoder.next_message()) is not None:
                self.handle(message)
                if self.closed_reason is not None:
                    return
        except HeartbeatProtocolError as e:
            self.protocol_error(e.code.value, str(e))
            return
        except ConnectionRefused as e:
            if e.refusal is not None:
                log.error("refused node", peer=self.peer, node=self.node_id, reason=e.refusal, detail=str(e))
                self.server.refused(e.refusal)
                self._refuse_with(Refusal(e.refusal, str(e)[:MAX_REFUSAL_DETAIL]))
            else:
                self.protocol_error("refused", str(e))
            return
        if not self.decoder.buffered:
            self._frame_since = None
        elif self._frame_since is None:
            self._frame_since = now
        self._arm()

    # -- deadlines --------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """The next instant :meth:`check_deadline` closes the connection at (handshake, a record
        or a heartbeat frame begun and not completed, or an idle authenticated connection)."""
        deadlines = [d for d in (self.channel.deadline(),) if d is not None]
        if self._frame_since is not None:
            deadlines.append(self._frame_since + self.server.frame_timeout)
        if self._hello_by is not None and self.node_id is None:
            deadlines.append(self._hello_by)
        return min(deadlines) if deadlines else None

    def check_deadline(self) -> None:
        """Close the connection if a deadline has passed; otherwise arm the next one."""
        self._timer = None
        if self.closed_reason is not None:
            return
        now = self.server.clock()
        try:
            self.channel.check(now)
        except ChannelError as e:
            self._channel_error(e)
            return
        if self._frame_since is not None and now >= self._frame_since + self.server.frame_timeout:
            self.protocol_error(
                "frame_timeout",
                f"a heartbeat frame begun {now - self._frame_since:.1f}s ago is incomplete "
                f"({self.decoder.buffered} bytes)",
            )
            return
        if self._hello_by is not None and self.node_id is None and now >= self._hello_by:
            self.protocol_error(
                HELLO_TIMEOUT, f"no Hello within {self.server.handshake_timeout:g}s of the handshake"
            )
            return
        self._arm()

    def _arm(self) -> None:
        loop = self.server._loop
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.deadline()
        if loop is not None and deadline is not None and self.closed_reason is None:
            self._timer = loop.call_at(deadline, self.check_deadline)

    def _channel_error(self, error: ChannelError) -> None:
        if self.authenticated:
            self.protocol_error(error.code.value, str(error))
        else:
            self.refuse(error.code.value, error.message)

    def refuse(self, reason: str, detail: str) -> None:
        """Close a connection that never authenticated: logged (warning) and counted."""
        log.warning("refused node connection", peer=self.peer, reason=reason, detail=detail)
        self.server.refused(reason)
        self.close(f"refused: {reason}", abort=True)

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
        if self._handshaking and self.closed_reason is None:
            # The peer gave up in the handshake (e.g. it found the master does not hold its secret).
            self.closed_reason = "refused: handshake_abandoned"
            log.warning(
                "refused node connection", peer=self.peer, reason="handshake_abandoned", detail=str(exc)
            )
            self.server.refused("handshake_abandoned")
        self._left_handshake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
        self._refuse_a_second_live_incarnation(hello)
        try:
            admitted = self.server.node_keys.admit(hello, self.channel.binding)
        except IdentityRefused as e:
            raise ConnectionRefused(str(e), refusal=e.code.value) from None
        if admitted.first_use:
            log.warning(
                "node key bound on first use",
                peer=self.peer,
                node=hello.node_id,
                node_key=key_text(admitted.key),
            )
        if admitted.admission is Admission.PENDING:
            self.server.announce_pending(hello.node_id, admitted.key, self.peer)
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
        self._close_other_connections_of(hello.node_id)
        self.node_id = hello.node_id
        self.node_key = admitted.key
        self.incarnation = hello.incarnation
        if self.server.on_hello is not None:
            self.server.on_hello(hello, admitted.newly_approved)

    def _close_other_connections_of(self, node_id: str) -> None:
        """One connection per node id (module docstring): the older ones are closed."""
        for other in list(self.server.connections):
            if other is not self and other.node_id == node_id and other.closed_reason is None:
                other.protocol_error(SUPERSEDED, f"node {node_id!r} said Hello again, on {self.peer}")

    def _refuse_a_second_live_incarnation(self, hello: Hello) -> None:
        now = self.server.clock()
        dead_after = self.server.observations.dead_after
        for other in self.server.connections:
            if (
                other is not self
                and other.closed_reason is None
                and other.node_id == hello.node_id
                and other.incarnation != hello.incarnation
                and other.last_heartbeat_at is not None
                and now - other.last_heartbeat_at < dead_after
            ):
                raise ConnectionRefused(
                    f"node {hello.node_id!r} is alive under incarnation {other.incarnation} on {other.peer}; "
                    f"Hello with incarnation {hello.incarnation} refused",
                    refusal=LIVE_INCARNATION,
                )

    def _heartbeat(self, heartbeat: Heartbeat) -> None:
        node_id = self.node_id
        if node_id is None:
            raise ConnectionRefused("Heartbeat before Hello")
        bound = self.server.node_keys.key(node_id)
        if bound != self.node_key:  # the operator rebound the node id (rekey, forget) since
            raise ConnectionRefused(
                f"node {node_id!r} was rebound to key {'none' if bound is None else key_text(bound)} "
                "since this connection's Hello",
                refusal=IdentityCode.KEY_MISMATCH.value,
            )
        now = self.server.clock()
        if now - self._rate_since >= 1.0:
            self._rate_since, self._rate_count = now, 0
        self._rate_count += 1
        if self._rate_count > MAX_HEARTBEATS_PER_SECOND:
            raise ConnectionRefused(f"more than {MAX_HEARTBEATS_PER_SECOND} heartbeats in a second")
        approved = self.server.approved(node_id)
        if not approved:  # pending: seen alive, its word on volumes not believed (module docstring)
            heartbeat = dataclasses.replace(heartbeat, observations=(), skipped=())
        try:
            self.server.observations.record(heartbeat, node_id, self.server.clock())
        except ObservationError as e:
            raise ConnectionRefused(str(e)) from None
        self.last_heartbeat_at = self.server.clock()
        self.last_seq = heartbeat.seq
        if self.server.on_heartbeat is not None:
            self.server.on_heartbeat()
        if self.server.control.holding:  # a restored authority: no lease, no assignment yet
            return
        if not approved:
            self._send(Ack(seq=heartbeat.seq, lease_seconds=self.server.lease_seconds, assignments=()))
            return
        assignments = self.server.control.assignments_for(node_id)
        ack = Ack(
            seq=heartbeat.seq,
            lease_seconds=self.server.lease_seconds,
            assignments=assignments,
            directory=volume_directory(self.server.control),
            deleted=self.server.control.tombstones_for(o.volume_id for o in heartbeat.observations),
            stream_keys=self.server.stream_keys(node_id, assignments),
            discovery_chap=self.server.control.discovery_chap,
        )
        self._send(ack)
        if self.closed_reason is None:
            self.acks_sent += 1
            # After the write: the master's view of the lease starts no earlier than the node's.
            self.server.leases.granted(node_id, self.server.clock(), self.server.lease_seconds)

    def push(self) -> None:
        """Send the node its current assignments in an Ack repeating its last heartbeat's seq
        (module docstring). No lease is granted: the node extends nothing on a repeat."""
        node_id, seq = self.node_id, self.last_seq
        if node_id is None or seq is None or self.closed_reason is not None:
            return
        if self.server.node_keys.key(node_id) != self.node_key:
            return  # rebound since its Hello: its next heartbeat is refused (_heartbeat)
        if not self.server.approved(node_id):
            return  # pending: nothing to send it
        assignments = self.server.control.assignments_for(node_id)
        ack = Ack(
            seq=seq,
            lease_seconds=self.server.lease_seconds,
            assignments=assignments,
            directory=volume_directory(self.server.control),
            stream_keys=self.server.stream_keys(node_id, assignments),
            discovery_chap=self.server.control.discovery_chap,
        )
        self._send(ack)
        if self.closed_reason is None:
            self.pushes_sent += 1

    def _send(self, ack: Ack) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.closed_reason = self.closed_reason or "connection closing"
            return
        transport.write(self.channel.send(encode(ack)))
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.protocol_error("not_reading", f"more than {MAX_WRITE_BUFFER} bytes of Acks unread")

    # -- closing ----------------------------------------------------------------------------------

    def protocol_error(self, code: str, reason: str) -> None:
        log.warning("closing node connection", peer=self.peer, node=self.node_id, code=code, reason=reason)
        if self.server.on_protocol_error is not None:
            self.server.on_protocol_error(code)
        self.close(reason, abort=True)

    def _refuse_with(self, refusal: Refusal) -> None:
        """Send ``refusal`` and end the connection: the write side is shut once it is sent, and
        the connection aborted REFUSAL_LINGER later (bytes from the node meanwhile are dropped)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self.close(refusal.detail, abort=True)
            return
        transport.write(self.channel.send(encode(refusal)))
        loop = self.server._loop
        if loop is None or not transport.can_write_eof():
            self.close(refusal.detail)
            return
        # Not close(): bytes the node wrote after its Hello would come back as a reset, which
        # may cost the node the Refusal still unread in its socket.
        self.close(refusal.detail, shut=True)
        transport.write_eof()
        loop.call_later(REFUSAL_LINGER, transport.abort)

    def close(self, reason: str, *, abort: bool = False, shut: bool = False) -> None:
        """End the connection (``shut``: only mark it ended; the caller ends the transport)."""
        if self.closed_reason is None:
            self.closed_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if shut:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()
