"""The replica side of the replication channel (docs/replication.md): ``sparrow node --replication``.

:class:`ReplicaServer` listens for primaries. Each connection runs the cluster channel's handshake
(``Purpose.REPLICATION``: a peer that does not prove it holds the cluster secret is refused), then
feeds the channel's plaintext to a :class:`~sparrow.replication.protocol.ReplicaStream`, which
checks every message against what this node has persisted for the volume (``NodeState``: epoch,
role, primary) and hands out the writes, unmaps, write-sames and flushes to apply in seq order.
One task per connection applies them to the volume's local store (opened by the adapter for role
REPLICA) and writes the ACK after each.

Bounds (like the heartbeat server's): at most ``max_handshaking`` connections between accept and
an accepted OPEN (the handshake and the OPEN must both arrive within ``handshake_timeout``); a
channel record or a replication message begun and not completed within ``frame_timeout`` closes
the connection; reading pauses while more than ``max_unapplied_bytes`` (or
``max_unapplied`` messages) are received and not yet applied; a peer that leaves its ACKs unread
(the write buffer above its high-water mark) for ``stall_timeout``, or lets more than
:data:`MAX_ACK_BUFFER` bytes of them pile up, is disconnected. Reading is never paused for long: a
pause that outlasts ``frame_timeout`` with a record half received ends the connection (a replica that
slow is dropped by the primary's ack timeout first). Every refusal is
a warning log line ``refused replication connection`` with the peer, the reason and the detail,
counted in ``sparrow_replication_refused_total{reason}``; a refusal after the handshake is also
sent to the peer as a REFUSE message.

``sparrow serve`` (one node) starts no listener: a single-copy volume has no replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable
from typing import Any, cast

import structlog
from prometheus_client import CollectorRegistry, Counter

from frontend.constructors import positional_constructor
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
from sparrow.cluster.nodestate import NodeState
from sparrow.node.convergence import NodeVolumes
from sparrow.replication.protocol import (
    MAX_MESSAGE,
    Apply,
    ApplyCheckpoint,
    ApplyFlush,
    ApplyNop,
    ApplyUnmap,
    ApplyWrite,
    ApplyWriteRun,
    ApplyWriteSame,
    ErrorCode,
    Lookup,
    Opened,
    ReplicaPositions,
    ReplicaStream,
    ReplicationError,
    VolumeView,
    dirty_report,
)
from store.blockstore import BlockStore, InlineWrites, StoreError
from store.dirtymap import REGION_SIZE, DirtyBitmap, DirtyMap, region_span, regions_for

log = structlog.get_logger("sparrow.node.replication")

DEFAULT_MAX_HANDSHAKING = 64
DEFAULT_STALL_TIMEOUT = 5.0
DEFAULT_MAX_UNAPPLIED_BYTES = 16 << 20
DEFAULT_MAX_UNAPPLIED = 4096
#: The write buffer (ACKs not yet taken by the kernel) above which the stall clock runs...
WRITE_HIGH_WATER = 64 << 10
#: ... and above which the peer is cut off at once.
MAX_ACK_BUFFER = 1 << 20
#: The replica ACKs at least every this many applies while more are queued (docs/replication.md).
ACK_EVERY = 16
#: The kernel send buffer asked for on each connection: a replica sends only small ACKs.
SEND_BUFFER = 16 << 10
#: Zeros written at a time where the store cannot punch holes, and write-same chunks.
CHUNK = 1 << 20
#: Seconds a REFUSE gets to leave before the connection is aborted.
REFUSE_LINGER = 1.0

StoreFor = Callable[[str], BlockStore | None]
#: The stream key this node holds as a replica for (volume id, epoch) (``Convergence.stream_key``).
KeyFor = Callable[[str, int], bytes | None]
#: The volume's dirty map on this node (None: unknown, reported as every region dirty).
DirtyFor = Callable[[str], DirtyMap | None]
#: A VolumeView is built for every record a replica receives (its persisted role, read afresh).
_make_view = positional_constructor(VolumeView)


async def start_replica_server(
    *,
    host: str,
    port: int,
    secret: ClusterSecret,
    state: NodeState,
    volumes: NodeVolumes,
    registry: CollectorRegistry | None,
    stream_key: KeyFor,
) -> ReplicaServer:
    """Bind the node's replication listener (raises OSError when the address is taken)."""
    lookup, store_for = node_lookup(state, volumes, stream_key)
    loop = asyncio.get_running_loop()
    server = ReplicaServer(
        secret=secret,
        lookup=lookup,
        store_for=store_for,
        clock=loop.time,
        registry=registry,
        dirty_for=volumes.dirty_map,
    )
    await server.start(host, port)
    return server


def node_lookup(
    state: NodeState, volumes: NodeVolumes, stream_key: KeyFor = lambda volume_id, epoch: None
) -> tuple[Lookup, StoreFor]:
    """What a replica stream checks (the persisted role, whether the volume is open here, the
    stream key for the persisted epoch) and where it applies (the local store of the open volume)."""

    def lookup(volume_id: str) -> VolumeView | None:
        role = state.get(volume_id)
        if role is None:
            return None
        volume = volumes.find(volume_id)
        open_ = volume is not None and volumes.is_exported(volume_id)
        size = volume.meta.size if volume is not None else role.size
        key = stream_key(volume_id, role.epoch)
        return _make_view(volume_id, role.epoch, role.role, role.primary, size, role.block_size, open_, key)

    def store_for(volume_id: str) -> BlockStore | None:
        # The store that marks the dirty map before each write (the volume's own if it has none).
        tracked = volumes.marking_store(volume_id)
        if tracked is not None:
            return tracked
        volume = volumes.find(volume_id)
        return None if volume is None else volume.store

    return lookup, store_for


class ReplicationMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.refused = Counter(
            "sparrow_replication_refused",
            "Replication connections refused or closed for a protocol violation, by reason",
            ["reason"],
            registry=registry,
        )
        self.applied = Counter(
            "sparrow_replication_applied", "Replication messages applied by this replica", registry=registry
        )
        self.applied_bytes = Counter(
            "sparrow_replication_applied_bytes", "Payload bytes applied by this replica", registry=registry
        )


class ReplicaServer:
    """The replication listener of one node; see the module docstring."""

    def __init__(
        self,
        *,
        secret: ClusterSecret,
        lookup: Lookup,
        store_for: StoreFor,
        clock: Callable[[], float],
        registry: CollectorRegistry | None = None,
        max_handshaking: int = DEFAULT_MAX_HANDSHAKING,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        max_unapplied_bytes: int = DEFAULT_MAX_UNAPPLIED_BYTES,
        max_unapplied: int = DEFAULT_MAX_UNAPPLIED,
        dirty_for: DirtyFor | None = None,
    ) -> None:
        self.secret = secret
        self.dirty_for = dirty_for
        #: Per volume, for the primary session streaming to it (docs/replication.md, "Clearing"):
        #: the session, the (epoch, seq) that last wrote each region, and the regions already
        #: dirty when the session's first stream opened (never cleared by its checkpoints).
        self.touched: dict[str, tuple[int, dict[int, tuple[int, int]]]] = {}
        self.sticky: dict[str, set[int]] = {}
        self.lookup = lookup
        self.store_for = store_for
        self.clock = clock
        self.metrics = ReplicationMetrics(registry)
        self.max_handshaking = max_handshaking
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.stall_timeout = stall_timeout
        self.max_unapplied_bytes = max_unapplied_bytes
        self.max_unapplied = max_unapplied
        self.positions = ReplicaPositions()
        self.connections: set[ReplicaConnection] = set()
        self.handshaking = 0
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str, port: int) -> asyncio.Server:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: ReplicaConnection(self), host, port, reuse_address=True
        )
        return self._server

    @property
    def sockets(self) -> tuple[Any, ...]:
        return () if self._server is None else tuple(self._server.sockets)

    def refused(self, peer: str, reason: str, detail: str, volume_id: str | None = None) -> None:
        log.warning(
            "refused replication connection", peer=peer, reason=reason, detail=detail, volume_id=volume_id
        )
        self.metrics.refused.labels(reason).inc()

    async def close(self) -> None:
        """Stop listening, close every connection, and wait for their applies to finish."""
        if self._server is not None:
            self._server.close()
        connections = list(self.connections)
        workers = [c.worker for c in connections if c.worker is not None]
        for conn in connections:
            conn.close("node shutting down", abort=True)
        if workers:
            await asyncio.wait(workers, timeout=10.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class ReplicaConnection(asyncio.Protocol):
    """One primary's connection (one volume); see the module docstring."""

    def __init__(self, server: ReplicaServer) -> None:
        self.server = server
        now = server.clock()
        self.channel = Channel(
            server.secret,
            Side.SERVER,
            Purpose.REPLICATION,
            now,
            handshake_timeout=server.handshake_timeout,
            frame_timeout=server.frame_timeout,
            max_plaintext=MAX_MESSAGE,
        )
        self.stream = ReplicaStream(server.lookup, server.positions)
        self.started = now
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed_reason: str | None = None
        self.worker: asyncio.Task[None] | None = None
        self._queue: collections.deque[Apply] = collections.deque()
        self._wakeup = asyncio.Event()
        self._handshaking = False
        self._opened = False
        self._reading_paused = False
        self._writing_paused_since: float | None = None
        self._message_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: The primary session of this connection's stream (set at OPEN).
        self._session: int | None = None
        #: The store applied to last, and it as ``InlineWrites`` (None if it is not one).
        self._store: BlockStore | None = None
        self._inline: InlineWrites | None = None
        #: The worker waits for work (nothing it took is unfinished): what arrives may be applied
        #: at once (``_apply_now``).
        self._idle = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.server.handshaking >= self.server.max_handshaking:
            self.refuse("handshake_cap", f"{self.server.handshaking} connections already in the handshake")
            return
        self.server.handshaking += 1
        self._handshaking = True
        self.worker = asyncio.get_running_loop().create_task(self._apply_loop())
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
            self.refuse(e.code.value, e.message)
            return
        try:
            for event in events:
                if isinstance(event, HandshakeBytes):
                    self._write(event.data)
                elif isinstance(event, Established):
                    self.stream.binding = self.channel.binding  # what the OPEN's proof is bound to
                    log.debug("replication peer authenticated", peer=self.peer)
                else:
                    for applied in self.stream.feed(event.data):
                        if isinstance(applied, Opened):
                            self._track(applied.volume_id, applied.session)
                            self._opened = True
                            self._left_handshake()
                            log.info(
                                "replication stream opened",
                                peer=self.peer,
                                volume_id=applied.volume_id,
                                epoch=applied.epoch,
                                primary=self.stream.primary,
                                first_seq=self.stream.next_seq,
                            )
                            self._write(self.channel.send(applied.ack))
                            if applied.report_dirty:
                                for message in self._dirty_report(applied.volume_id, applied.epoch):
                                    self._write(self.channel.send(message))
                        else:
                            self._queue.append(applied)
        except ReplicationError as e:
            self.refuse(e.code.reason, e.message)
            return
        if self._queue:
            if self._idle:
                self._apply_now()
            if self._queue and self.closed_reason is None:
                self._idle = False
                self._wakeup.set()
        if self.stream.decoder.buffered == 0:
            self._message_since = None
        elif self._message_since is None:
            self._message_since = now
        self._flow()
        self._arm()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._handshaking and self.closed_reason is None:
            self.closed_reason = "refused: handshake_abandoned"
            self.server.refused(self.peer, "handshake_abandoned", str(exc) if exc else "closed by peer")
        self._left_handshake()
        if self.closed_reason is None:
            self.closed_reason = str(exc) if exc else "closed by peer"
        self._cancel_timer()
        self._wakeup.set()  # the worker stops
        if self.worker is None:
            self.stream.close()
        self.transport = None

    def pause_writing(self) -> None:
        self._writing_paused_since = self.server.clock()
        self._flow()
        self._arm()

    def resume_writing(self) -> None:
        self._writing_paused_since = None
        self._flow()
        self._arm()

    def _track(self, volume_id: str, session: int) -> None:
        """A stream of ``session`` opened: a new session forgets what the earlier one wrote (its
        bits stay set) and takes the bits set now as sticky."""
        self._session = session
        held = self.server.touched.get(volume_id)
        if held is not None and held[0] == session:
            return
        dirty = None if self.server.dirty_for is None else self.server.dirty_for(volume_id)
        self.server.touched[volume_id] = (session, {})
        self.server.sticky[volume_id] = set(dirty.bits) if dirty is not None else set()

    def _touch_run(self, run: ApplyWriteRun) -> None:
        """:meth:`_touch` for a run of plain writes, with one lookup and one entry per region: every
        region of the run is recorded as written at the run's last seq. That is at or after the seq
        of every write to it, so a checkpoint clears a region no earlier than the writes' own seqs
        would let it (perhaps one checkpoint later)."""
        volume_id = self.stream.volume_id
        held = None if volume_id is None else self.server.touched.get(volume_id)
        if volume_id is None or held is None or held[0] != self._session:
            return  # another session took over: this stream's writes stay dirty
        touched, at = held[1], (self.stream.epoch, run.seq)
        start, length = run.offset, run.length
        for region in region_span(start, length):
            touched[region] = at
        if start % REGION_SIZE == 0 or start // REGION_SIZE != (start + length - 1) // REGION_SIZE:
            pos = start  # a region starts within the run: at a write's start?
            for data in run.buffers:
                if pos % REGION_SIZE == 0:
                    self._whole_region(volume_id, pos, len(data))
                pos += len(data)

    def _whole_region(self, volume_id: str, offset: int, length: int) -> None:
        """A write at the start of a region: if it covers the region (a resync's copy), this copy
        holds what the primary holds there."""
        view = self.server.lookup(volume_id)
        if length == REGION_SIZE or (view is not None and offset + length >= view.size):
            self.server.sticky.get(volume_id, set()).discard(offset // REGION_SIZE)

    def _touch(self, apply: Apply) -> None:
        """Record the regions ``apply`` wrote, or clear the ones a checkpoint covers."""
        volume_id = self.stream.volume_id
        held = None if volume_id is None else self.server.touched.get(volume_id)
        if volume_id is None or held is None or held[0] != self._session:
            return  # another session took over: this stream's writes stay dirty
        touched, epoch = held[1], self.stream.epoch
        if isinstance(apply, ApplyWrite | ApplyUnmap | ApplyWriteSame):
            length = len(apply.data) if isinstance(apply, ApplyWrite) else apply.length
            for region in region_span(apply.offset, length):
                touched[region] = (epoch, apply.seq)
            if isinstance(apply, ApplyWrite) and apply.offset % REGION_SIZE == 0:
                self._whole_region(volume_id, apply.offset, length)
        elif isinstance(apply, ApplyCheckpoint):
            sticky = self.server.sticky.get(volume_id, set())
            done = [r for r, at in touched.items() if at <= (epoch, apply.upto)]
            for region in done:
                del touched[region]
            dirty = self.server.dirty_for(volume_id) if self.server.dirty_for is not None else None
            if dirty is not None:
                dirty.clear(r for r in done if r not in sticky)

    async def _sync_dirty(self, volume_id: str | None) -> None:
        """Write the cleared bits now (once per checkpoint), so a restart copies less."""
        dirty_for = self.server.dirty_for
        dirty = None if dirty_for is None or volume_id is None else dirty_for(volume_id)
        if dirty is not None:
            try:
                await dirty.sync()
            except StoreError as e:
                log.warning("dirty map not written", volume_id=volume_id, error=str(e))

    def _dirty_report(self, volume_id: str, epoch: int) -> list[bytes]:
        """This copy's dirty map, as DIRTY messages (every region dirty when there is none)."""
        dirty = None if self.server.dirty_for is None else self.server.dirty_for(volume_id)
        if dirty is None:
            view = self.server.lookup(volume_id)
            bits = DirtyBitmap(regions_for(view.size if view is not None else 1), dirty=True)
        else:
            bits = dirty.bits
        return dirty_report(volume_id, epoch, self.stream.applied_seq, bits.regions, bits.to_bytes())

    # -- flow control and deadlines -------------------------------------------------------------------

    def _flow(self) -> None:
        transport = self.transport
        if transport is None or self.closed_reason is not None:
            return
        full = (
            self.stream.unapplied_bytes > self.server.max_unapplied_bytes
            or self.stream.unapplied >= self.server.max_unapplied
        )
        if full and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not full and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def deadline(self) -> float | None:
        deadlines = [d for d in (self.channel.deadline(),) if d is not None]
        if not self._opened:
            deadlines.append(self.started + self.server.handshake_timeout)
        if self._message_since is not None and not self._reading_paused:
            deadlines.append(self._message_since + self.server.frame_timeout)
        if self._writing_paused_since is not None:
            deadlines.append(self._writing_paused_since + self.server.stall_timeout)
        return min(deadlines) if deadlines else None

    def check_deadline(self) -> None:
        self._timer = None
        if self.closed_reason is not None:
            return
        now = self.server.clock()
        try:
            self.channel.check(now)
        except ChannelError as e:
            self.refuse(e.code.value, e.message)
            return
        if not self._opened and now >= self.started + self.server.handshake_timeout:
            self.refuse("open_timeout", f"no OPEN within {self.server.handshake_timeout}s")
            return
        if (
            self._message_since is not None
            and not self._reading_paused
            and now >= self._message_since + self.server.frame_timeout
        ):
            self.refuse(
                ErrorCode.TRUNCATED.reason,
                f"a message begun {now - self._message_since:.1f}s ago is incomplete "
                f"({self.stream.decoder.buffered} bytes)",
            )
            return
        if (
            self._writing_paused_since is not None
            and now >= self._writing_paused_since + self.server.stall_timeout
        ):
            self.refuse(
                ErrorCode.NOT_READING.reason,
                f"the peer has not read its ACKs for {now - self._writing_paused_since:.1f}s",
                send=False,
            )
            return
        self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        """Arm the one timer (only once the server runs: unit tests call check_deadline). A timer
        already armed at or before the deadline is kept (most messages move a deadline later):
        firing early, ``check_deadline`` finds nothing due and arms it again."""
        loop = self.server.loop
        deadline = self.deadline()
        if loop is None or deadline is None or self.closed_reason is not None:
            self._cancel_timer()
            return
        timer = self._timer
        if timer is not None and timer.when() <= deadline:
            return
        self._cancel_timer()
        self._timer = loop.call_at(deadline, self.check_deadline)

    # -- applying -------------------------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        try:
            while self.closed_reason is None:
                if not self._queue:
                    self._wakeup.clear()
                    self._idle = True
                    await self._wakeup.wait()
                    self._idle = False
                    continue
                volume_id = self.stream.volume_id
                store = None if volume_id is None else self.server.store_for(volume_id)
                if store is None:
                    self.refuse(ErrorCode.UNKNOWN_VOLUME.reason, f"volume {volume_id} is no longer open here")
                    return
                if not await self._apply_run(store):
                    return
        except Exception:
            log.exception("replication apply loop failed", peer=self.peer, volume_id=self.stream.volume_id)
            self.server.metrics.refused.labels("internal_error").inc()
            self.close("internal error", abort=True)
        finally:
            # Only now, with no apply running, may the next stream of this volume and epoch open.
            self.stream.close()
            if self._opened:
                log.info(
                    "replication stream closed",
                    peer=self.peer,
                    volume_id=self.stream.volume_id,
                    applied_seq=self.stream.applied_seq,
                    durable_seq=self.stream.durable_seq,
                    reason=self.closed_reason,
                )

    def _inline_writes(self, store: BlockStore) -> InlineWrites | None:
        if store is not self._store:  # a runtime Protocol check costs microseconds: once per store
            self._store = store
            self._inline = store if isinstance(store, InlineWrites) else None
        return self._inline

    def _apply_now(self) -> None:
        """The worker is idle: apply the runs of plain writes at the head of the queue here, in the
        turn they arrived, a run per pwritev, and ACK once for all of them (a store that writes
        inline: tmpfs, a durably dirty region). Whatever cannot go inline, and all after it, is left
        to the worker, in order."""
        volume_id = self.stream.volume_id
        store = None if volume_id is None else self.server.store_for(volume_id)
        inline = None if store is None else self._inline_writes(store)
        if inline is None:
            return  # the worker applies (or refuses: the volume is no longer open here)
        queue = self._queue
        applied = payload = seq = 0
        while queue:
            run = queue[0]
            if type(run) is not ApplyWriteRun:
                break
            try:
                written = inline.write_inline(run.offset, run.buffers)
            except StoreError as e:
                queue.popleft()
                if applied:
                    self.stream.done(seq)
                log.error("replica apply failed", peer=self.peer, volume_id=volume_id, seq=run.seq, error=e)
                self.refuse("apply_failed", str(e))
                return
            if not written:
                break  # a dirty bit to make durable first: the worker
            queue.popleft()
            self._touch_run(run)
            seq = run.seq
            applied += run.seq - run.first_seq + 1
            payload += run.length
        if applied:
            ack = self.stream.done(seq)
            self.server.metrics.applied.inc(applied)
            self.server.metrics.applied_bytes.inc(payload)
            self._write(self.channel.send(ack))

    async def _apply_run(self, store: BlockStore) -> bool:
        """Apply what is queued, in order, up to ACK_EVERY messages or a durable one, then report
        them done and ACK once (ACKs are cumulative). Plain writes to contiguous blocks go to a
        store that writes inline (tmpfs) with one pwritev, on the loop. False if the connection
        ends."""
        queue = self._queue
        inline = self._inline_writes(store)
        applied = 0
        payload = 0
        seq = 0
        durable = False
        while queue and applied < ACK_EVERY and not durable and self.closed_reason is None:
            apply = queue.popleft()
            try:
                if isinstance(apply, ApplyWriteRun):
                    # A marking store writes inline only into regions already durably dirty.
                    if inline is None or not inline.write_inline(apply.offset, apply.buffers):
                        await self._apply(store, apply)
                    self._touch_run(apply)
                    seq = apply.seq
                    applied += apply.seq - apply.first_seq + 1
                    payload += apply.length
                    continue
                durable = await self._apply(store, apply)
            except StoreError as e:
                if applied:
                    self.stream.done(seq)
                log.error(
                    "replica apply failed", peer=self.peer, volume_id=self.stream.volume_id, seq=apply.seq,
                    error=str(e),
                )  # fmt: skip
                self.refuse("apply_failed", str(e))
                return False
            self._touch(apply)
            seq = apply.seq
            applied += 1
            if isinstance(apply, ApplyWrite):
                payload += len(apply.data)
            if isinstance(apply, ApplyCheckpoint):
                await self._sync_dirty(self.stream.volume_id)
                break  # the cleared bits written: ACK what came before
        if not applied:
            return self.closed_reason is None
        ack = self.stream.done(seq, durable=durable)
        self.server.metrics.applied.inc(applied)
        if payload:
            self.server.metrics.applied_bytes.inc(payload)
        if self.closed_reason is not None:
            return False
        self._write(self.channel.send(ack))
        self._flow()
        return True

    @staticmethod
    async def _apply(store: BlockStore, apply: Apply) -> bool:
        """Apply one message to ``store``; True if everything up to it is now durable."""
        if isinstance(apply, ApplyWriteRun):  # one write through the store's general path: its
            buffers = apply.buffers  # dirty-map mark of the run's regions, its I/O pool
            await store.write(apply.offset, buffers[0] if len(buffers) == 1 else b"".join(buffers))
            return False
        if isinstance(apply, ApplyWrite):
            await store.write(apply.offset, apply.data)
            if apply.fua:
                await store.flush()
            return apply.fua
        if isinstance(apply, ApplyFlush):
            await store.flush()
            return True
        if isinstance(apply, ApplyNop | ApplyCheckpoint):
            return False
        if isinstance(apply, ApplyUnmap) and store.supports_unmap:
            await store.unmap(apply.offset, apply.length)
            return False
        pattern = apply.pattern if isinstance(apply, ApplyWriteSame) else bytes(4096)
        chunk = bytes(pattern) * max(1, CHUNK // len(pattern))
        pos, end = apply.offset, apply.offset + apply.length
        while pos < end:
            take = min(len(chunk), end - pos)
            await store.write(pos, chunk if take == len(chunk) else memoryview(chunk)[:take])
            pos += take
        return False

    # -- writing and closing ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_ACK_BUFFER:
            self.refuse(
                ErrorCode.NOT_READING.reason, f"more than {MAX_ACK_BUFFER} bytes of ACKs unread", send=False
            )

    def refuse(self, reason: str, detail: str, *, send: bool = True) -> None:
        """Log, count and close; once authenticated, tell the peer why (a REFUSE) first."""
        if self.closed_reason is not None:
            return
        self.server.refused(self.peer, reason, detail, self.stream.volume_id)
        if send and self.channel.established:
            code = next((c for c in ErrorCode if c.reason == reason), None)
            if code is not None:
                with contextlib.suppress(ChannelError):
                    self._write(self.channel.send(self.stream.refusal(ReplicationError(code, detail))))
                self.close(f"refused: {reason}")
                return
        self.close(f"refused: {reason}", abort=True)

    def close(self, reason: str, *, abort: bool = False) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._cancel_timer()
        self._wakeup.set()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            transport.abort()
        else:
            transport.close()  # the REFUSE leaves first; a peer that does not take it is cut off
            if self.server.loop is not None:
                self.server.loop.call_later(REFUSE_LINGER, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
