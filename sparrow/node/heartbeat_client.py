"""The node's side of the heartbeat connection (docs/cluster.md, "Messages", "Lease arithmetic").

:class:`HeartbeatSession` is the sans-IO core: it checks the master's proof that opens every
connection (a :class:`~sparrow.cluster.messages.MasterHello` proving the pinned master key over this
connection's channel binding, :class:`~sparrow.cluster.masteridentity.MasterPin`; docs/cluster.md
"Master identity"), then frames the Hello and the Heartbeats that follow, numbers them with one
``seq`` that increases for the whole process (never reset on reconnect: the master and
:class:`~sparrow.cluster.lease.LeaseClock` rely on it),
records each send in the lease clock (``LeaseClock.sent(seq, now)`` as the frame is written, so the
lease is counted from the send), and turns the master's bytes into the Acks that extended the lease
(``LeaseClock.acked(seq, lease_seconds)``). A :class:`~sparrow.cluster.messages.Refusal` (the
master does not admit this node: its key is not the one bound to the node id, docs/cluster.md
"Node identity") is :class:`MasterRefused`; anything else but an Ack is a
:class:`~sparrow.cluster.heartbeat.HeartbeatProtocolError`.

:class:`HeartbeatClient` is the thin asyncio layer: connect with :class:`Backoff`, run the cluster
channel's handshake (:class:`~sparrow.cluster.channel.Channel`, purpose HEARTBEAT: the master must
prove it holds the cluster secret before the node says anything), wait for the master's proof
of its key (a first-use pin is persisted, ``on_pinned``, before anything else; a master that does
not prove the pinned key is refused: logged at error level with both keys, counted in
``sparrow_node_master_refused_total{reason}``, and the node dials again after its backoff, saying
nothing and applying nothing meanwhile, so its lease lapses and it fences), then write the Hello, signed
with the node's key for this connection (``NodeKey.sign_hello`` over the channel binding), and a
Heartbeat every ``interval`` on a fixed schedule, each sealed in a channel record, and hand each
applied Ack to ``on_ack``; a protocol or channel error, a refusal (logged at error level with the
master's reason), EOF or any socket error closes the connection and it reconnects after a backoff;
so does any other exception (a bug), which is reported to the TaskSupervisor (task
``node-heartbeat``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter

from sparrow.cluster.channel import (
    Channel,
    ChannelError,
    ClusterSecret,
    HandshakeBytes,
    Plaintext,
    Purpose,
    Side,
)
from sparrow.cluster.heartbeat import ErrorCode, FrameDecoder, HeartbeatProtocolError, encode
from sparrow.cluster.lease import LeaseClock
from sparrow.cluster.masteridentity import MasterAdmitted, MasterCode, MasterNotProven, MasterPin
from sparrow.cluster.messages import Ack, Heartbeat, Hello, Refusal, SkippedVolume, VolumeObservation
from sparrow.cluster.nodeidentity import NodeKey, key_text
from sparrow.supervision import TaskSupervisor

log = structlog.get_logger("sparrow.node.heartbeat")

#: Bytes asked of the socket per read.
READ_SIZE = 65536
#: The heartbeat client's task name (TaskSupervisor, /healthz, sparrow_task_failures_total).
TASK = "node-heartbeat"
#: Bounds of the time one connect and handshake may take (:func:`default_connect_timeout`).
MIN_CONNECT_TIMEOUT = 1.0
MAX_CONNECT_TIMEOUT = 5.0
#: The lease assumed before the first Ack says otherwise (lease.LeaseConfig default).
DEFAULT_LEASE_SECONDS = 5.0


class MasterRefused(Exception):
    """The master refused this node's Hello (``Refusal``): ``reason`` is the master's metric label,
    ``detail`` its one line."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"refused by the master: {refusal.reason}: {refusal.detail}")
        self.reason = refusal.reason
        self.detail = refusal.detail


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial * factor**attempt`` capped at ``maximum``, each shortened by up
    to ``jitter`` (a fraction) so that many nodes do not reconnect in step after a master restart."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs factor >= 1 and 0 <= jitter < 1")

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait before reconnect ``attempt`` (0 = the first retry); ``rand`` in [0, 1)."""
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base * (1.0 - self.jitter * rand)


def default_connect_timeout(interval: float) -> float:
    """How long one connect and handshake may take: two heartbeats, at least 1 s and at most 5 s. A
    connection attempt lost in a partition is given up this soon, so a node is back at most about
    this long after the network heals (a fixed 5 s made every healed partition cost ~5 s)."""
    return min(MAX_CONNECT_TIMEOUT, max(MIN_CONNECT_TIMEOUT, 2 * interval))


class HeartbeatSession:
    """Sans-IO: the frames of one node process's heartbeat connections, and the lease they earn.

    One instance lives as long as the process; :meth:`connection_made` starts each connection,
    :meth:`master_proof` admits its master (``pin``: the pinned key, none pinned yet by default),
    and only then :meth:`hello` and :meth:`receive` may be used.
    """

    def __init__(self, lease: LeaseClock, pin: MasterPin | None = None) -> None:
        self.lease = lease
        self.pin = pin if pin is not None else MasterPin()
        self._seq = 0
        self._decoder = FrameDecoder()
        self._binding: bytes | None = None
        #: The master admitted on this connection (None: not yet).
        self.master: MasterAdmitted | None = None

    @property
    def seq(self) -> int:
        """The seq of the last heartbeat framed (0 before the first)."""
        return self._seq

    def connection_made(self, binding: bytes) -> None:
        """A new connection (``binding``: its ``Channel.binding``): fresh framing state, no master
        admitted yet."""
        self._decoder = FrameDecoder()
        self._binding = binding
        self.master = None

    def master_proof(self, data: bytes) -> MasterAdmitted | None:
        """Feed the master's first bytes; None until its first message is whole, then the admitted
        master (a first use pinned its key: persist it before :meth:`hello`). Raises
        MasterNotProven (not a MasterHello, a bad proof, another key than the pinned one) and
        HeartbeatProtocolError."""
        if self._binding is None or self.master is not None:
            raise RuntimeError("master_proof: no connection, or its master is admitted already")
        self._decoder.feed(data)
        message = self._decoder.next_message()
        if message is None:
            return None
        self.master = self.pin.admit(message, self._binding)
        return self.master

    def hello(self, hello: Hello) -> bytes:
        """The Hello that opens the node's side, once the master is admitted."""
        if self.master is None:
            raise RuntimeError("no Hello before the master proved its key")
        return encode(hello)

    def heartbeat(
        self,
        observations: tuple[VolumeObservation, ...],
        now: float,
        skipped: tuple[SkippedVolume, ...] = (),
    ) -> bytes:
        """The next Heartbeat's frame; records it as sent at ``now`` (write it right away)."""
        seq = self._seq + 1
        frame = encode(Heartbeat(seq, observations, skipped))
        self._seq = seq
        self.lease.sent(seq, now)
        return frame

    def receive(self, data: bytes) -> list[Ack]:
        """Feed bytes from the master; returns the Acks to act on, in order: those applied to the
        lease clock, and repeats of the latest applied seq (the master pushes a newly published
        assignment that way, docs/cluster.md "Messages"; a repeat extends no lease). Any other
        Ack the clock ignores (stale, or for a seq it no longer remembers) is dropped: its
        assignments are older than ones already acted on. Raises HeartbeatProtocolError, and
        MasterNotProven before the connection's master was admitted."""
        if self.master is None:
            raise MasterNotProven(MasterCode.NO_PROOF, "bytes from a master that has not proven its key")
        self._decoder.feed(data)
        applied: list[Ack] = []
        while (message := self._decoder.next_message()) is not None:
            if isinstance(message, Refusal):
                raise MasterRefused(message)
            if not isinstance(message, Ack):
                raise HeartbeatProtocolError(
                    ErrorCode.UNKNOWN_TYPE,
                    f"the master sent a {type(message).__name__}; only acks are expected",
                )
            if message.seq == self.lease.last_acked:
                applied.append(message)  # a push: newer assignments, the same lease
            elif self.lease.acked(message.seq, message.lease_seconds) is not None:
                applied.append(message)
        return applied

    def connection_lost(self) -> None:
        """The connection ended; a truncated frame in the buffer is dropped with it."""
        self._decoder = FrameDecoder()
        self._binding = None
        self.master = None


class HeartbeatClient:
    """Keeps one heartbeat connection to the master open, forever (until :meth:`stop`).

    ``hello()`` builds the Hello for each new connection (free space changes), ``observations(now)``
    the observations of each Heartbeat (``skipped()`` the volumes not loaded at start),
    ``on_ack(ack)`` is called for every Ack that extended the
    lease (after ``LeaseClock.acked``). ``clock`` is the event loop's clock, the lease clock's too.
    ``identity`` signs each Hello (None: an unsigned Hello, which a master refuses; tests only).
    The master must prove the key of ``session.pin`` first; ``on_pinned(key)`` persists a key
    pinned on first use (it runs in a worker thread, before the Hello is sent; an OSError from it
    undoes the pin and the connection is dropped). ``registry`` holds the refusal counter.
    """

    def __init__(
        self,
        master: tuple[str, int],
        session: HeartbeatSession,
        *,
        secret: ClusterSecret,
        hello: Callable[[], Hello],
        observations: Callable[[float], tuple[VolumeObservation, ...]],
        on_ack: Callable[[Ack], None],
        interval: float = 1.0,
        backoff: Backoff | None = None,
        connect_timeout: float | None = None,
        supervisor: TaskSupervisor | None = None,
        identity: NodeKey | None = None,
        skipped: Callable[[], tuple[SkippedVolume, ...]] = tuple,
        on_pinned: Callable[[bytes], None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("the heartbeat interval must be positive")
        self.master = master
        self.session = session
        self.secret = secret
        self.identity = identity
        self._on_pinned = on_pinned
        self.master_refused = Counter(
            "sparrow_node_master_refused",
            "Heartbeat connections whose master did not prove the pinned master key, by reason",
            ["reason"],
            registry=registry,
        )
        self._hello = hello
        self._observations = observations
        self._skipped = skipped
        self._on_ack = on_ack
        self.interval = interval
        self.backoff = backoff or Backoff()
        if connect_timeout is None:
            connect_timeout = default_connect_timeout(interval)
        self.connect_timeout = connect_timeout
        self.supervisor = supervisor if supervisor is not None else TaskSupervisor()
        self._task: asyncio.Task[None] | None = None
        #: True while a connection is open and its Hello has been written.
        self.connected = False
        #: Why the last connection ended or failed (None before any failure).
        self.last_error: str | None = None
        #: Acks applied over the life of the process.
        self.acks = 0
        #: Connections opened over the life of the process.
        self.connections = 0
        #: The lease the last Ack granted; sets how long a silent master is waited for.
        self._last_lease = DEFAULT_LEASE_SECONDS
        self._last_ack_at = 0.0
        #: Set by :meth:`send_now`: the next heartbeat goes out at once.
        self._now = asyncio.Event()

    def send_now(self) -> None:
        """Send the next heartbeat at once (a replica stopped acknowledging: the master must hear
        it now, not at the next tick); the schedule stays as it was."""
        self._now.set()

    def silence_limit(self) -> float:
        """How long a connection may go without an Ack before it is dropped and made again: twice
        the last lease, and never less than four heartbeats. Fencing does not wait for this (the
        lease timer fences on its own); it only keeps a node from holding a connection to a master
        host that vanished without a reset until TCP gives up, minutes later."""
        return max(4 * self.interval, 2 * self._last_lease)

    def start(self) -> None:
        if self._task is None:
            self._task = self.supervisor.spawn(self.run(), name=TASK)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Connect, heartbeat, and reconnect with backoff after every failure; never returns."""
        attempt = 0
        host, port = self.master
        while True:
            acks_before = self.acks
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (stop())
                # that arrives as the connection completes.
                async with asyncio.timeout(self.connect_timeout):
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError) as e:
                self._failed(f"cannot connect: {e or type(e).__name__}", attempt)
            else:
                try:
                    await self._converse(reader, writer)
                except MasterRefused as e:
                    self._refused(e, attempt)
                except MasterNotProven as e:
                    self._not_proven(e, attempt)
                except (OSError, HeartbeatProtocolError, ChannelError, EOFError) as e:
                    self._failed(str(e) or type(e).__name__, attempt)
                except Exception as e:  # a bug (building the Hello, applying an Ack): reconnect
                    self.supervisor.failed(TASK, e)
                    self._failed(f"{type(e).__name__}: {e}", attempt)
                finally:
                    self.connected = False
                    self.session.connection_lost()
                    writer.close()
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await writer.wait_closed()
            attempt = 0 if self.acks > acks_before else attempt + 1
            await asyncio.sleep(self.backoff.delay(attempt, random.random()))

    def _failed(self, reason: str, attempt: int) -> None:
        if reason != self.last_error or attempt == 0:
            log.warning(
                "master connection failed", master=f"{self.master[0]}:{self.master[1]}", reason=reason
            )
        self.last_error = reason

    def _refused(self, refusal: MasterRefused, attempt: int) -> None:
        """A refusal is the operator's to act on: logged at error level, with this node's key."""
        if str(refusal) != self.last_error or attempt == 0:
            log.error(
                "master refused this node",
                master=f"{self.master[0]}:{self.master[1]}",
                reason=refusal.reason,
                detail=refusal.detail,
                node_key=None if self.identity is None else key_text(self.identity.public),
            )
        self.last_error = str(refusal)

    def _not_proven(self, error: MasterNotProven, attempt: int) -> None:
        """A peer that plays master without the pinned key: the operator's to act on (error level,
        both keys named), counted; the node said nothing to it and applied nothing from it."""
        self.master_refused.labels(reason=error.code.value).inc()
        if str(error) != self.last_error or attempt == 0:
            pinned = self.session.pin.pinned
            log.error(
                "master refused: it did not prove the pinned master key",
                master=f"{self.master[0]}:{self.master[1]}",
                reason=error.code.value,
                pinned_master_key=None if pinned is None else key_text(pinned),
                offered_master_key=None if error.offered is None else key_text(error.offered),
                detail=str(error),
            )
        self.last_error = str(error)

    async def _master_proof(self, reader: asyncio.StreamReader, channel: Channel) -> MasterAdmitted:
        """Read until the master's first message and admit it (at most ``connect_timeout``); a
        key pinned on first use is persisted before this returns."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            admitted = None
            while admitted is None:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise EOFError("the master closed the connection before proving its key")
                plain = b"".join(e.data for e in channel.feed(data, loop.time()) if isinstance(e, Plaintext))
                if plain:
                    admitted = self.session.master_proof(plain)
        if admitted.first_use:
            try:
                if self._on_pinned is not None:
                    await asyncio.to_thread(self._on_pinned, admitted.key)
            except OSError:
                self.session.pin.forget_first_use(admitted)
                raise
            log.warning(
                "master key pinned on first use",
                master=f"{self.master[0]}:{self.master[1]}",
                master_key=key_text(admitted.key),
            )
        return admitted

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Channel:
        """Authenticate both ends (at most ``connect_timeout``); returns the open channel."""
        loop = asyncio.get_running_loop()
        channel = Channel(
            self.secret, Side.CLIENT, Purpose.HEARTBEAT, loop.time(), handshake_timeout=self.connect_timeout
        )
        writer.write(channel.initiate())
        while not channel.established:
            deadline = channel.deadline()
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                channel.check(loop.time())
                continue
            if not data:
                raise EOFError("the master closed the connection in the handshake")
            for event in channel.feed(data, loop.time()):
                if isinstance(event, HandshakeBytes):
                    writer.write(event.data)
        return channel

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        channel = await self._handshake(reader, writer)
        self.session.connection_made(channel.binding)
        await self._master_proof(reader, channel)
        hello = self._hello()
        if self.identity is not None:
            hello = self.identity.sign_hello(hello, channel.binding)
        writer.write(channel.send(self.session.hello(hello)))
        self.connected = True
        self.connections += 1
        log.info("connected to master", master=f"{self.master[0]}:{self.master[1]}")
        receiving = loop.create_task(self._receive(reader, channel), name="node-heartbeat-receive")
        self._last_ack_at = loop.time()
        try:
            next_at = loop.time()
            while True:
                now = loop.time()
                if now - self._last_ack_at > self.silence_limit():
                    raise TimeoutError(f"no Ack from the master for {now - self._last_ack_at:.1f}s")
                frame = self.session.heartbeat(self._observations(now), now, self._skipped())
                writer.write(channel.send(frame))
                await writer.drain()
                if now >= next_at:  # the scheduled one (one sent early by send_now moves nothing)
                    next_at += self.interval
                    if next_at <= loop.time():  # fell behind (a stalled write): do not burst
                        next_at = loop.time() + self.interval
                poked = loop.create_task(self._now.wait(), name="node-heartbeat-now")
                try:
                    done, _ = await asyncio.wait(
                        {receiving, poked}, timeout=next_at - loop.time(), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    poked.cancel()
                self._now.clear()
                if receiving in done:
                    receiving.result()  # raises why the receive side ended
                    raise EOFError("the master closed the connection")
        finally:
            receiving.cancel()
            # Wait for the receiver without swallowing a cancellation of *this* task (stop()):
            # asyncio.wait never raises the receiver's own CancelledError or exception.
            await asyncio.wait({receiving})
            if not receiving.cancelled():
                error = receiving.exception()  # retrieved: the reason was already raised above ...
                if isinstance(error, MasterRefused):
                    raise error  # ... unless a write failed first: the refusal says why it did

    async def _receive(self, reader: asyncio.StreamReader, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                return
            plain = b"".join(e.data for e in channel.feed(data, loop.time()) if isinstance(e, Plaintext))
            for ack in self.session.receive(plain):
                self.acks += 1
                self._last_ack_at = asyncio.get_running_loop().time()
                self._last_lease = ack.lease_seconds
                self._on_ack(ack)
                self.supervisor.recovered(TASK)
