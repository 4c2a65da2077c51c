"""The primary's write path: a BlockStore that forwards every write, unmap and flush to each in-sync
replica and returns only once its own operation and every in-sync replica's ACK are in
(docs/replication.md, "The acknowledgement rule").

Below the LU: the LU calls ``write``/``unmap``/``flush`` as on any store (WRITE SAME arrives as
writes or an unmap, a FUA write as a write then a flush). Each operation is appended to the volume's
forward log in call order (one op index per message; a write larger than ``MAX_PAYLOAD`` is several)
and handed to every replica's stream at the end of the loop turn (a run of WRITEs encoded once for
every stream at the same position), so all replicas get the same operations in the same order; the
local operation runs meanwhile. The caller waits until every replica of the current target
set has applied its last op (made it durable, for a flush). The log keeps each op until every target
has applied it, so a stream reopened under a new epoch (or a new connection) resends what is not yet
acknowledged, in order.

A target set is known only once the node has persisted the assignment (``configure``, called after
each convergence plan); until then writes wait (no targets known is not zero targets). A replica
whose oldest unacknowledged op is ``ack_timeout`` old is *lagging*: reported not IN_SYNC
(``replica_states``) and ``on_lagging`` is called (the daemon sends a heartbeat at once); writes go on
waiting for it until a new epoch's target set no longer names it. Past ``hold_timeout`` a write fails
with :class:`StoreUnavailable` (the LU answers NOT READY, 04/0A, which initiators retry), never GOOD.

The core (log, per-replica progress, waiters, lag) takes ``now`` from ``clock``; the network side is
:class:`ChannelLink` (one cluster-channel connection per (volume, replica)), created through
``open_link`` so unit tests pass fake links.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import structlog
from prometheus_client import CollectorRegistry

from sparrow.cluster.channel import Channel, ClusterSecret, HandshakeBytes, Plaintext, Purpose, Side
from sparrow.cluster.messages import ReplicaState, SyncState
from sparrow.node.checkpoint import CHECKPOINT_INTERVAL, checkpoint_round
from sparrow.node.reconcile import Reconcile
from sparrow.node.resync import DEFAULT_RESYNC_RATE, LockFor, Resync, ResyncMetrics, TokenBucket
from sparrow.replication import protocol
from sparrow.replication.protocol import MAX_PAYLOAD, Acked, MsgType, PrimaryStream, ReplicationError
from store.blockstore import BlockStore, StoreUnavailable
from store.delegating import DelegatingStore
from store.dirtymap import REGION_SIZE, DirtyMap, region_span

log = structlog.get_logger("sparrow.node.forward")

#: How long a write may wait for its replicas (including a lagging one being dropped by the master
#: under a new epoch) before it fails with a retryable error.
DEFAULT_HOLD_TIMEOUT = 10.0
#: The forward log's bounds: appending waits while this many ops or bytes are not yet applied by
#: every target.
LOG_OPS = 4096
LOG_BYTES = 64 << 20
#: An UNMAP message's length is a u32: larger unmaps are sent as several of this size.
UNMAP_CHUNK = 1 << 30
#: Between two connection attempts to a replica (it may not have persisted the epoch yet).
RECONNECT_DELAY = 0.05
#: ... and to a syncing copy (it may be down for long: nothing waits for it).
SYNCING_RECONNECT_DELAY = 0.5


@dataclass(slots=True)
class _Op:
    kind: MsgType
    offset: int
    data: memoryview | None
    length: int
    at: float
    #: A region copy of a resync: sent to this replica only (the others get a NOP in its place).
    only: str | None = None


@dataclass(slots=True)
class _Waiters:
    """The operations that started waiting in one turn of the loop, each for every target to have
    applied (made durable) its op index: one entry and one hold timer for them all."""

    durable: bool
    #: (op index, future) per operation, and the highest index among them.
    futures: list[tuple[int, asyncio.Future[None]]]
    index: int
    timer: asyncio.TimerHandle | None = None


class Link(Protocol):
    """One connection carrying a stream to one replica (the I/O side)."""

    def send(self, data: bytes) -> None:
        """Send ``data`` (whole messages, at most ``protocol.MAX_MESSAGE`` bytes) now."""

    def close(self) -> None: ...


@dataclass(slots=True)
class _Replica:
    node_id: str
    portal: str | None
    #: Highest op index applied by the replica / made durable (as its ACKs said).
    applied: int
    durable: int
    #: The stream of the current connection; op index = base + seq.
    stream: PrimaryStream | None = None
    base: int = 0
    #: Highest op index handed to the current stream.
    sent: int = 0
    link: Link | None = None
    lagging: bool = False
    #: A lost connection waits RECONNECT_DELAY before the next attempt.
    backing_off: bool = False
    #: ``base`` is chosen for the epoch (by its first stream); the highest op index sent in it.
    based: bool = False
    sent_high: int = 0
    #: Not in the in-sync set: fed every op, copied its dirty regions (sparrow/node/resync.py),
    #: never waited for until ``resynced`` (then reported IN_SYNC and waited for).
    syncing: bool = False
    resynced: bool = False
    #: Ops were skipped (the replica fell off the log): the next refusal's seq re-bases the stream.
    rebase: bool = False
    #: Bumped whenever the resync must start over (skipped ops, a replica that lost its position).
    generation: int = 0
    #: The replica's dirty map from the last OPEN, (done, total) bytes of the current resync.
    dirty_report: protocol.DirtyReport | None = None
    progress: tuple[int, int] = (0, 0)
    lagging_at: float = 0.0
    changed: asyncio.Event | None = None
    #: In sync at the start of this primary's term, its dirty regions not yet all queued
    #: (sparrow/node/reconcile.py): its streams ask for its dirty map.
    reconcile: bool = False


OpenLink = Callable[["ReplicatedStore", str, str, PrimaryStream], Link]


class ReplicatedStore(DelegatingStore):
    """A primary's store: ``inner`` plus forwarding to the in-sync replicas (see the module docstring)."""

    def __init__(
        self,
        inner: BlockStore,
        volume_id: str,
        node_id: str,
        *,
        clock: Callable[[], float],
        open_link: OpenLink | None,
        ack_timeout: float = protocol.DEFAULT_ACK_TIMEOUT,
        hold_timeout: float = DEFAULT_HOLD_TIMEOUT,
        on_lagging: Callable[[], None] | None = None,
        on_syncing: Callable[[ReplicatedStore, str], None] | None = None,
        on_reconcile: Callable[[ReplicatedStore, str], None] | None = None,
    ) -> None:
        super().__init__(inner)
        #: Called when a replica starts syncing (the node starts its resync driver), and for each
        #: in-sync replica at the start of a term (the node starts its reconcile).
        self.on_syncing = on_syncing
        self.on_reconcile = on_reconcile
        #: This copy's dirty map (cleared by checkpoints, sparrow/node/checkpoint.py), the random
        #: id of this process's streams, the op index that last wrote each region in this term
        #: as primary, and the regions dirty when the term began (never cleared by it).
        self.dirty_map: DirtyMap | None = None
        self.session = secrets.randbits(63)
        self.touched: dict[int, int] = {}
        self.sticky: frozenset[int] | None = None
        #: The assignment lists every copy in sync (checkpoints may clear dirty bits).
        self.complete = False
        self.volume_id = volume_id
        self.node_id = node_id
        self.clock = clock
        self.open_link = open_link
        self.ack_timeout = ack_timeout
        self.hold_timeout = hold_timeout
        self.on_lagging = on_lagging
        #: None until the first ``configure``: writes wait.
        self.epoch: int | None = None
        self.replicas: dict[str, _Replica] = {}
        self._ops: collections.deque[_Op] = collections.deque()
        self._first = 1  # op index of _ops[0]
        self.last = 0  # op index of the last op appended
        self._log_bytes = 0
        self._waiters: list[_Waiters] = []
        #: The waiters still open to joiners in this turn of the loop (applied, durable).
        self._joinable: dict[bool, _Waiters] = {}
        self._room_waiters: list[asyncio.Future[None]] = []
        #: A send of what this turn appended is scheduled (``_send_all``); the last run of WRITEs
        #: encoded, with its first op index: the next stream at that position sends it too.
        self._send_scheduled = False
        self._run: tuple[int, protocol.WriteRun] | None = None
        self.closed = False
        #: Demoted or released (``stand_down``) and not configured since: an operation still in
        #: flight then (its local I/O running) fails at once instead of waiting the hold bound.
        self._stood_down = False

    # ---- BlockStore (size, reads, extents, resize: the inner store's, DelegatingStore) -------------

    # ``store.blockstore.InlineIo`` (the iSCSI fast path): reads as ``read`` does; a write only in
    # the one-copy case, where ``write`` is the inner store's. With replicas it must await their ACKs:
    # False, and the fast path forwards it (``write_forward``) or hands it to the general path.

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        inline = self.inline_io
        if self.epoch is None or self.replicas or inline is None:
            return False
        return inline.write_now(offset, data)

    # ``store.blockstore.ForwardedWrites`` (the fast path's replicated write): the local write done
    # inline and the op queued to every replica in one step (so no range lock is needed to keep a
    # region copy behind it: it is in the log before anything can read the region again); the
    # caller then waits for ``written(index)``, as ``write`` does.

    def write_forward(self, offset: int, data: bytes | bytearray | memoryview) -> int | None:
        """Write ``data`` locally at once and queue it to the replicas: its op index; or None,
        having done nothing, when ``write`` must do it (no replicas, no epoch, not inline, a dirty
        bit to make durable first, the log full, more than one message)."""
        inline = self.inline_io
        size = len(data)
        if (
            self.epoch is None
            or not self.replicas
            or inline is None
            or self._stood_down
            or self.closed
            or size > MAX_PAYLOAD
            or not self._has_room(size)
            or not inline.write_now(offset, data)
        ):
            return None
        # The log keeps the op until every replica applied it: never a view of a buffer that changes.
        view = memoryview(bytes(data) if isinstance(data, bytearray) else data)
        return self._append(_Op(MsgType.WRITE, offset, view, size, self.clock()))

    def written(self, index: int, *, durable: bool = False) -> asyncio.Future[None]:
        """A future done once every target waited for has applied (made durable) op ``index``;
        StoreUnavailable past the hold bound, or once this node stood down."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._done(index, durable):
            future.set_result(None)
            return future
        if self._stood_down:
            future.set_exception(
                StoreUnavailable(f"volume {self.volume_id}: this node is no longer the volume's primary")
            )
            return future
        waiters = self._joinable.get(durable)
        if waiters is None:
            waiters = _Waiters(durable, [(index, future)], index)
            waiters.timer = loop.call_later(max(0.0, self.hold_timeout), self._expire, waiters)
            self._waiters.append(waiters)
            if not self._joinable:
                loop.call_soon(self._joinable.clear)  # the next turn opens new ones
            self._joinable[durable] = waiters
        else:
            waiters.futures.append((index, future))
            if index > waiters.index:
                waiters.index = index
        return future

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.epoch is not None and not self.replicas:
            await self.inner.write(offset, data)  # one copy: no overhead
            return
        view = memoryview(data).cast("B")
        if not self._has_room(len(view)):
            await self._room(len(view))
        index = 0
        for start in range(0, len(view), MAX_PAYLOAD):
            chunk = view[start : start + MAX_PAYLOAD]
            index = self._append(_Op(MsgType.WRITE, offset + start, chunk, len(chunk), self.clock()))
        await self.inner.write(offset, data)
        await self._wait(index, durable=False)

    async def unmap(self, offset: int, length: int) -> None:
        if self.epoch is not None and not self.replicas:
            await self.inner.unmap(offset, length)
            return
        if not self._has_room(0):
            await self._room(0)
        index = 0
        for start in range(0, length, UNMAP_CHUNK):
            take = min(UNMAP_CHUNK, length - start)
            index = self._append(_Op(MsgType.UNMAP, offset + start, None, take, self.clock()))
        await self.inner.unmap(offset, length)
        await self._wait(index, durable=False)

    async def flush(self) -> None:
        if self.epoch is not None and not self.replicas:
            await self.inner.flush()
            return
        if not self._has_room(0):
            await self._room(0)
        index = self._append(_Op(MsgType.FLUSH, 0, None, 0, self.clock()))
        await self.inner.flush()
        await self._wait(index, durable=True)

    async def close(self) -> None:
        self.closed = True
        for replica in self.replicas.values():
            self._changed(replica)
            if replica.link is not None:
                replica.link.close()
                replica.link = None
        self._fail_waiters("the volume was closed here")
        await self.inner.close()

    # ---- configuration ------------------------------------------------------------------------------

    def configure(
        self,
        epoch: int,
        targets: Sequence[tuple[str, str | None]],
        syncing: Sequence[tuple[str, str]] = (),
        *,
        complete: bool = False,
    ) -> None:
        """The persisted assignment at ``epoch`` names ``targets`` (in-sync replicas, with their
        replication portals) and ``syncing`` (its other copies that have a portal: resynced while
        fed every op, never waited for until caught up). A new epoch reopens every stream under it
        (resending what each replica has not acknowledged); a replica no longer named stops counting
        for the waiting writes."""
        if self.epoch is not None and epoch < self.epoch:
            return
        wanted = dict(targets)
        resync = {node: portal for node, portal in syncing if node not in wanted}
        new_epoch = epoch != self.epoch
        term = self.epoch is None  # a new term as primary
        if term and self.dirty_map is not None:
            self.sticky = frozenset(self.dirty_map.bits)
        reconcile = []
        self.epoch = epoch
        self._stood_down = False
        self.complete = complete and not resync
        for node, address in resync.items():
            self._sync(node, address, new_epoch)
        for node in [n for n in self.replicas if n not in wanted and n not in resync]:
            gone = self.replicas.pop(node)
            self._changed(gone)  # its resync stops
            if gone.link is not None:
                gone.link.close()
            log.info("replica no longer forwarded to", volume_id=self.volume_id, replica=node, epoch=epoch)
        for node, portal in wanted.items():
            replica = self.replicas.get(node)
            if replica is None:
                # Named in sync by the master: at the first configuration every op still in the log
                # (queued before it) is sent; later (added back) everything the log still holds.
                start = self._first - 1
                replica = _Replica(node, portal, applied=start, durable=start)
                self.replicas[node] = replica
                if term and self.dirty_map is not None:
                    # It may differ from this copy where the old primary's last writes went.
                    replica.reconcile, replica.changed = True, asyncio.Event()
                    reconcile.append(node)
                self._connect(replica)
            elif replica.syncing:
                # Back in the in-sync set (resynced and reported): waited for from now on. One
                # that skipped ops since cannot hold them: lagging at once (the master drops it).
                replica.syncing = replica.resynced = False
                self._changed(replica)
                replica.portal = portal
                replica.based = replica.based and not new_epoch
                if replica.rebase:
                    replica.lagging = True
                    if self.on_lagging is not None:
                        self.on_lagging()
                self._connect(replica)
            elif new_epoch or portal != replica.portal:
                replica.portal = portal
                replica.based = replica.based and not new_epoch
                self._connect(replica)
        self._progress()
        for node in reconcile:
            if self.on_reconcile is not None:
                self.on_reconcile(self, node)

    def _sync(self, node: str, portal: str, new_epoch: bool) -> None:
        replica = self.replicas.get(node)
        if replica is None:
            # Fed from now on; everything before is in the dirty maps the resync copies.
            replica = _Replica(node, portal, applied=self.last, durable=self.last, syncing=True)
            replica.changed = asyncio.Event()
            self.replicas[node] = replica
            log.info("replica syncing", volume_id=self.volume_id, replica=node, epoch=self.epoch)
        elif not replica.syncing:  # dropped from the in-sync set: its stream goes on
            replica.syncing, replica.resynced, replica.lagging = True, False, False
            replica.generation += 1
            replica.progress = (0, 0)
            replica.changed = replica.changed or asyncio.Event()
            self._changed(replica)  # a reconcile gives way
            log.info("replica syncing", volume_id=self.volume_id, replica=node, epoch=self.epoch)
        elif not new_epoch and portal == replica.portal:
            return
        replica.portal = portal
        replica.based = replica.based and not new_epoch
        self._connect(replica)
        if self.on_syncing is not None:
            self.on_syncing(self, node)

    # ---- the resync driver's side (sparrow/node/resync.py) ---------------------------------------

    def syncing_replica(self, node: str) -> _Replica | None:
        replica = self.replicas.get(node)
        return replica if replica is not None and replica.syncing else None

    def copy_region(self, node: str, offset: int, data: bytes) -> int:
        """Queue a region copy for ``node`` (the caller holds the region's range lock and has just
        read ``data``): the next op(s) in the one ordered stream; the op index of the last."""
        view = memoryview(data)
        index = 0
        for start in range(0, len(view), MAX_PAYLOAD):
            chunk = view[start : start + MAX_PAYLOAD]
            index = self._append(_Op(MsgType.WRITE, offset + start, chunk, len(chunk), self.clock(), node))
        return index

    def flush_replica(self, node: str) -> int:
        """Queue a flush for ``node`` only; its op index."""
        return self._append(_Op(MsgType.FLUSH, 0, None, 0, self.clock(), node))

    def resynced(self, node: str) -> None:
        """``node`` has every region and every op since: report it IN_SYNC (the master adds it back
        under a new epoch) and wait for it from now on."""
        replica = self.syncing_replica(node)
        if replica is None or replica.resynced:
            return
        replica.resynced = True
        log.info("replica resynced", volume_id=self.volume_id, replica=node, applied=replica.applied)
        if self.on_lagging is not None:
            self.on_lagging()  # report it now

    async def room(self, size: int) -> None:
        await self._room(size)

    # ---- the reconcile's side (sparrow/node/reconcile.py) -------------------------------------------

    def reconciling(self, node: str) -> _Replica | None:
        """``node`` if it is in sync and its reconcile has not queued every region yet."""
        replica = self.replicas.get(node)
        return replica if replica is not None and replica.reconcile and not replica.syncing else None

    def reconciled(self, node: str) -> None:
        """Every region queued (or the reconcile gave way to a resync): no more dirty maps asked."""
        replica = self.replicas.get(node)
        if replica is not None:
            replica.reconcile = False

    # ---- checkpoints (sparrow/node/checkpoint.py) --------------------------------------------------

    def checkpoint_due(self) -> bool:
        """Every copy in sync and keeping up, and regions written since the last checkpoint."""
        return (
            self.epoch is not None
            and self.complete
            and self.dirty_map is not None
            and bool(self.touched)
            and all(not r.syncing and not r.lagging for r in self.replicas.values())
        )

    def flush_everywhere(self) -> int:
        """Queue a flush for every replica (the caller holds off writers); its op index."""
        return self._append(_Op(MsgType.FLUSH, 0, None, 0, self.clock()))

    async def durable_everywhere(self, index: int) -> None:
        """Until every in-sync replica has made op ``index`` durable (bounded: StoreUnavailable)."""
        await self._wait(index, durable=True)

    def checkpoint(self, upto: int) -> list[int]:
        """Every copy has made every op up to ``upto`` durable (and this one its own writes):
        queue a CHECKPOINT so the replicas clear what those ops dirtied, and clear it here; the
        regions cleared here."""
        self._append(_Op(MsgType.CHECKPOINT, upto, None, 0, self.clock()))
        sticky = self.sticky or frozenset()
        done = [r for r, index in self.touched.items() if index <= upto]
        for region in done:
            del self.touched[region]
        cleared = [r for r in done if r not in sticky]
        if self.dirty_map is not None:
            self.dirty_map.clear(cleared)
        return cleared

    def _detach(self, replica: _Replica) -> None:
        """A syncing replica holds the log full: skip it to the end (its resync starts over; every
        op skipped is in this copy's dirty map) so the writers go on."""
        log.warning(
            "syncing replica fell behind: resync starts over",
            volume_id=self.volume_id,
            replica=replica.node_id,
            applied=replica.applied,
            last=self.last,
        )
        replica.applied = replica.durable = replica.sent = self.last
        replica.rebase = True
        replica.generation += 1
        self._changed(replica)
        if replica.link is not None:
            replica.link.close()
            replica.link = None
        replica.stream = None
        self._connect(replica)

    @staticmethod
    def _changed(replica: _Replica) -> None:
        if replica.changed is not None:
            replica.changed.set()

    def on_dirty_report(self, node: str, stream: PrimaryStream, report: protocol.DirtyReport) -> None:
        replica = self.replicas.get(node)
        if replica is None or replica.stream is not stream:
            return
        replica.dirty_report = report
        self._changed(replica)

    def stand_down(self) -> None:
        """No longer this volume's primary (demoted or released): stop forwarding, forget the log,
        fail the waiting operations (the LU no longer answers them GOOD anyway); a later
        ``configure`` starts afresh."""
        for replica in self.replicas.values():
            self._changed(replica)
            if replica.link is not None:
                replica.link.close()
        self.replicas.clear()
        self.epoch = None
        self.touched.clear()
        self.sticky = None
        self.complete = False
        self._ops.clear()
        self._log_bytes = 0
        self._first = self.last + 1
        self._stood_down = True
        self._fail_waiters("this node is no longer the volume's primary")

    def replica_states(self, now: float) -> tuple[ReplicaState, ...]:
        """Each target as this primary reports it: IN_SYNC while it keeps up, FAILED once lagging;
        a syncing copy SYNCING (with its progress) until resynced."""
        self.check(now)
        return tuple(_state(r) for r in self.replicas.values())

    def check(self, now: float) -> bool:
        """Mark replicas whose oldest unacknowledged op is ``ack_timeout`` old as lagging; True
        (and ``on_lagging`` called) if one newly is."""
        newly = False
        for replica in self.replicas.values():
            if replica.syncing and not replica.resynced:
                continue
            if replica.lagging:
                if replica.syncing and now - replica.lagging_at >= self.hold_timeout:
                    # Resynced, not added back, and not keeping up: syncing again, not waited for.
                    replica.resynced = replica.lagging = False
                    replica.generation += 1
                    self._changed(replica)
                    if self.on_syncing is not None:
                        self.on_syncing(self, replica.node_id)
                continue
            since = self._oldest_pending(replica)
            if since is not None and now - since >= self.ack_timeout:
                replica.lagging = True
                replica.lagging_at = now
                newly = True
                log.warning(
                    "replica lagging",
                    volume_id=self.volume_id,
                    replica=replica.node_id,
                    epoch=self.epoch,
                    applied=replica.applied,
                    last=self.last,
                )
        if newly and self.on_lagging is not None:
            self.on_lagging()
        return newly

    def deadline(self) -> float | None:
        """When the next replica would turn lagging unless ACKs arrive (None: nothing pending)."""
        times = [
            t
            for r in self.replicas.values()
            if not r.lagging
            and (r.resynced or not r.syncing)
            and (t := self._oldest_pending(r)) is not None
        ]
        return min(times) + self.ack_timeout if times else None

    # ---- link events --------------------------------------------------------------------------------

    def on_acked(self, node: str, stream: PrimaryStream, acked: Acked) -> None:
        replica = self.replicas.get(node)
        if replica is None or replica.stream is not stream:
            return  # a closed stream's late ACK
        applied = replica.base + acked.applied_seq
        if applied > replica.applied:
            replica.applied = applied
        if acked.durable_seq > 0:
            replica.durable = max(replica.durable, replica.base + acked.durable_seq)
        if replica.syncing:
            self._changed(replica)
        self._progress()

    def on_link_lost(
        self,
        node: str,
        stream: PrimaryStream,
        reason: str,
        *,
        ahead: int | None = None,
        gap: int | None = None,
    ) -> None:
        """The stream ended; ``ahead``: the replica refused it as a REPEAT, having applied that
        seq of this epoch. Ops of ours: it has them. More than this process sent in the epoch
        (this primary restarted at the same epoch): the next stream goes on after its position;
        what the earlier process sent and did not get acknowledged was never acknowledged to
        an initiator."""
        replica = self.replicas.get(node)
        if replica is None or replica.stream is not stream or self.closed:
            return
        position = ahead if ahead is not None else gap
        if replica.syncing and position is not None and (replica.rebase or gap is not None):
            # Skipped ops, or the replica lost its position (restarted): go on from its seq; the
            # resync starts over (what it lacks is in the dirty maps).
            replica.base = replica.applied - position
            replica.rebase = False
            if gap is not None:
                replica.generation += 1
                self._changed(replica)
        elif ahead is not None and replica.based:
            if replica.base + ahead <= replica.sent_high:
                replica.applied = max(replica.applied, replica.base + ahead)
            else:
                replica.base = replica.applied - ahead
        log.info("replication stream lost", volume_id=self.volume_id, replica=node, reason=reason)
        replica.link = None
        replica.stream = None
        replica.backing_off = True
        loop = asyncio.get_running_loop()
        delay = SYNCING_RECONNECT_DELAY if replica.syncing and not replica.resynced else RECONNECT_DELAY
        loop.call_later(delay, self._reconnect, node)

    def _reconnect(self, node: str) -> None:
        replica = self.replicas.get(node)
        if replica is None or self.closed:
            return
        replica.backing_off = False
        if replica.stream is None:
            self._connect(replica)

    # ---- internals ----------------------------------------------------------------------------------

    def _connect(self, replica: _Replica) -> None:
        if replica.link is not None:
            replica.link.close()
            replica.link = None
        replica.stream = None
        if replica.portal is None or self.epoch is None or self.open_link is None:
            return  # waited for until the master knows its portal or drops it
        if self._oldest_pending(replica) is None and not replica.syncing:
            return  # lazily: the first op to send opens the stream (and asks for a reconcile's map)
        if not replica.based:
            # The epoch's first stream: seq 1 is the first op the replica has not acknowledged,
            # or a flush it applied and has not yet said is durable (resent under the new epoch).
            start = replica.applied
            for index in range(max(replica.durable + 1, self._first), replica.applied + 1):
                if self._ops[index - self._first].kind is MsgType.FLUSH:
                    start = index - 1
                    break
            replica.base, replica.based, replica.sent_high = start, True, start
            replica.sent = start
        else:  # the same epoch again: the replica's position goes on, nothing is resent
            replica.sent = replica.applied
        stream = PrimaryStream(
            self.volume_id,
            self.epoch,
            self.node_id,
            first_seq=replica.sent - replica.base + 1,
            ack_timeout=self.ack_timeout,
            report_dirty=replica.syncing or replica.reconcile,
            session=self.session,
        )
        replica.dirty_report = None
        replica.stream = stream
        replica.link = self.open_link(self, replica.node_id, replica.portal, stream)

    def stream_open(self, node: str, stream: PrimaryStream) -> None:
        """The link's channel is up: send the OPEN and everything pending."""
        replica = self.replicas.get(node)
        if replica is None or replica.stream is not stream or replica.link is None:
            return
        replica.link.send(stream.open(self.clock()))
        self._pump(replica)

    def _append(self, op: _Op) -> int:
        self._ops.append(op)
        self._log_bytes += op.length if op.data is not None else 0
        self.last += 1
        if self.dirty_map is not None and op.only is None and op.kind in _WRITES:
            first = op.offset // REGION_SIZE
            if op.length > 0 and (op.offset + op.length - 1) // REGION_SIZE == first:
                self.touched[first] = self.last  # one region: most writes
            else:
                for region in region_span(op.offset, op.length):
                    self.touched[region] = self.last
        for replica in self.replicas.values():
            if replica.link is None and not replica.backing_off:
                self._connect(replica)
        if not self._send_scheduled:
            # Sent once per turn of the loop: what this turn appended goes out as runs, each
            # encoded once for every stream (``_pump``), one send per stream.
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_all)
        return self.last

    def _send_all(self) -> None:
        self._send_scheduled = False
        for replica in self.replicas.values():
            self._pump(replica)
        self._run = None

    def _pump(self, replica: _Replica) -> None:
        """Hand the replica's stream every op it has not been sent that its window takes: plain
        WRITEs as runs (encoded once for every stream at the same position: ``_write_run``), the
        rest one by one; all of it in one ``link.send`` per record."""
        stream, link = replica.stream, replica.link
        if stream is None or link is None or stream.state is protocol.PrimaryState.NEW:
            return
        now = self.clock()
        out: list[bytes] = []
        size = 0
        try:
            while replica.sent < self.last:
                index = replica.sent + 1
                op = self._ops[index - self._first]
                other = op.only is not None and op.only != replica.node_id
                if op.kind is MsgType.WRITE and op.only is None and op.data is not None:
                    run = self._write_run(replica, stream, index)
                    if run is None:
                        break
                    data = stream.send_run(run, now)
                    count = run.count
                else:
                    if not stream.can_send(op.length if op.data is not None and not other else 0):
                        break
                    if other:
                        _, data = stream.nop(now)
                    elif op.kind is MsgType.CHECKPOINT:
                        _, data = stream.checkpoint(op.offset - replica.base, now)
                    elif op.kind is MsgType.WRITE:
                        assert op.data is not None
                        _, data = stream.write(op.offset, op.data, now)
                    elif op.kind is MsgType.UNMAP:
                        _, data = stream.unmap(op.offset, op.length, now)
                    else:
                        _, data = stream.flush(now)
                    count = 1
                if out and size + len(data) > protocol.MAX_MESSAGE:
                    link.send(out[0] if len(out) == 1 else b"".join(out))
                    out, size = [], 0
                out.append(data)
                size += len(data)
                replica.sent += count
                if replica.sent > replica.sent_high:
                    replica.sent_high = replica.sent
        except ReplicationError as e:  # the stream failed (a REFUSE): the link reconnects
            log.debug("stream cannot send", volume_id=self.volume_id, replica=replica.node_id, error=str(e))
        if out:
            link.send(out[0] if len(out) == 1 else b"".join(out))

    def _write_run(self, replica: _Replica, stream: PrimaryStream, index: int) -> protocol.WriteRun | None:
        """The plain WRITEs from op ``index`` on, as many as the stream's window and one record
        take, encoded: the run already encoded for another stream at the same position (same
        epoch and seq: the same bytes), else a new one; None if the window takes none."""
        run = self._run
        seq = index - replica.base
        if run is not None and run[0] == index and run[1].first_seq == seq and run[1].epoch == stream.epoch:
            messages, room = stream.room()
            if run[1].count <= messages and run[1].size <= room:
                return run[1]
        messages, room = stream.room()
        writes: list[tuple[int, memoryview]] = []
        total = 0
        ops, first = self._ops, self._first
        for i in range(index, min(self.last, index + messages - 1) + 1):
            op = ops[i - first]
            data = op.data
            if op.kind is not MsgType.WRITE or op.only is not None or data is None:
                break
            total += protocol.WRITE_OVERHEAD + op.length
            if total > protocol.MAX_MESSAGE or room < op.length:
                break
            room -= op.length
            writes.append((op.offset, data))
        if not writes:
            return None
        encoded = protocol.encode_write_run(self.volume_id, stream.epoch, seq, writes)
        self._run = (index, encoded)
        return encoded

    def _oldest_pending(self, replica: _Replica) -> float | None:
        if replica.applied < self.last:
            return self._ops[replica.applied + 1 - self._first].at
        for index in range(max(replica.durable + 1, self._first), self.last + 1):
            op = self._ops[index - self._first]
            if op.kind is MsgType.FLUSH:
                return op.at
        return None

    def _waited_for(self) -> tuple[int, int]:
        """The highest op index every target the writers wait for (not a copy still syncing) has
        applied, and has made durable (``last`` with no target): the one rule of :meth:`_done` and
        :meth:`_progress`."""
        applied = durable = -1  # none waited for yet
        for r in self.replicas.values():  # a loop, not generators: it runs on every ACK
            if r.syncing and not r.resynced:
                continue
            if applied < 0 or r.applied < applied:
                applied = r.applied
            if durable < 0 or r.durable < durable:
                durable = r.durable
        return (self.last, self.last) if applied < 0 else (applied, durable)

    def _done(self, index: int, durable: bool) -> bool:
        if self.epoch is None:
            return False
        applied, made_durable = self._waited_for()
        return index <= (made_durable if durable else applied)

    def _progress(self) -> None:
        # Wake the writers whose ops every target has.
        if self._waiters and self.epoch is not None:
            applied, durable = self._waited_for()
            keep = []
            for waiters in self._waiters:
                floor = durable if waiters.durable else applied
                if waiters.index <= floor:
                    self._wake(waiters, None)
                    if self._joinable.get(waiters.durable) is waiters:
                        del self._joinable[waiters.durable]  # a later waiter of this turn: a new entry
                    continue
                for index, future in waiters.futures:
                    if index <= floor and not future.done():
                        future.set_result(None)
                keep.append(waiters)
            self._waiters = keep
        # A send of this turn's ops is scheduled (``_send_all``): it pumps every replica at the end
        # of the turn, so an ACK arriving meanwhile sends nothing now (one record per stream per
        # turn, the run encoded once for both, instead of a record now and the rest at the end).
        pump = not self._send_scheduled
        for replica in self.replicas.values():
            if replica.lagging and self._oldest_pending(replica) is None:
                replica.lagging = False  # caught up (the master decides whether it is back in sync)
            if pump:
                self._pump(replica)
        # Trim what every target has applied, but no flush that a target has not made durable.
        if self.epoch is not None:
            floor = min((r.applied for r in self.replicas.values()), default=self.last)
            floor_durable = min((r.durable for r in self.replicas.values()), default=self.last)
            while self._ops and self._first <= floor:
                op = self._ops[0]
                if op.kind is MsgType.FLUSH and self._first > floor_durable:
                    break
                self._ops.popleft()
                self._log_bytes -= op.length if op.data is not None else 0
                self._first += 1
        if self._room_waiters and self._has_room(0):
            for future in self._room_waiters:
                if not future.done():
                    future.set_result(None)
            self._room_waiters = []

    def _has_room(self, size: int) -> bool:
        return len(self._ops) < LOG_OPS and self._log_bytes + size <= LOG_BYTES

    async def _room(self, size: int) -> None:
        size = min(size, LOG_BYTES)
        started = self.clock()
        if not self._has_room(size):
            floor = min((r.applied for r in self.replicas.values() if not r.syncing), default=self.last)
            for replica in list(self.replicas.values()):
                if replica.syncing and not replica.resynced and replica.applied < floor:
                    self._detach(replica)
            self._progress()
        while not self._has_room(size):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room_waiters.append(future)
            left = self.hold_timeout - (self.clock() - started)
            await self._bounded(future, left, "the replicas did not keep up")

    async def _wait(self, index: int, *, durable: bool) -> None:
        if self._done(index, durable):
            return
        if self._stood_down:
            raise StoreUnavailable(f"volume {self.volume_id}: this node is no longer the volume's primary")
        await self.written(index, durable=durable)

    def _expire(self, waiters: _Waiters) -> None:
        """The hold bound passed: fail the operations, retryably (StoreUnavailable)."""
        waiters.timer = None
        if waiters in self._waiters:
            self._waiters.remove(waiters)
        if self._joinable.get(waiters.durable) is waiters:
            del self._joinable[waiters.durable]
        behind = sorted(r.node_id for r in self.replicas.values() if self._oldest_pending(r) is not None)
        self._wake(
            waiters,
            StoreUnavailable(
                f"volume {self.volume_id}: no acknowledgement from every replica in "
                f"{self.hold_timeout:g}s (behind: {', '.join(behind) or 'none'})"
            ),
        )

    @staticmethod
    def _wake(waiters: _Waiters, error: Exception | None) -> None:
        if waiters.timer is not None:
            waiters.timer.cancel()
            waiters.timer = None
        for _, future in waiters.futures:
            if not future.done():  # woken already, or an aborted command's (cancelled)
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    async def _bounded(self, future: asyncio.Future[None], within: float, why: str) -> None:
        """Await ``future``; past ``within`` seconds it fails with StoreUnavailable. (A timer, not
        ``asyncio.timeout``: SCSI commands may run outside a task.)"""

        def expire() -> None:
            if not future.done():
                behind = sorted(
                    r.node_id for r in self.replicas.values() if self._oldest_pending(r) is not None
                )
                future.set_exception(
                    StoreUnavailable(
                        f"volume {self.volume_id}: {why} (behind: {', '.join(behind) or 'none'})"
                    )
                )

        timer = asyncio.get_running_loop().call_later(max(0.0, within), expire)
        try:
            await future
        finally:
            timer.cancel()

    def _fail_waiters(self, reason: str) -> None:
        for waiters in self._waiters:
            self._wake(waiters, StoreUnavailable(f"volume {self.volume_id}: {reason}"))
        self._waiters = []
        self._joinable.clear()


_WRITES = frozenset({MsgType.WRITE, MsgType.UNMAP})


def _state(replica: _Replica) -> ReplicaState:
    if replica.lagging:
        return ReplicaState(replica.node_id, SyncState.FAILED, 0)
    if replica.syncing and not replica.resynced:
        done, total = replica.progress
        return ReplicaState(replica.node_id, SyncState.SYNCING, 0, done, total)
    return ReplicaState(replica.node_id, SyncState.IN_SYNC, 0)


# -- the network side ------------------------------------------------------------------------------


class ChannelLink(asyncio.Protocol):
    """One cluster-channel connection (``Purpose.REPLICATION``) to a replica's portal carrying one
    :class:`PrimaryStream`; reports ACKs and its end to the store.

    An asyncio Protocol: the ACKs are fed to the stream in the ``data_received`` that brings them
    (no reader task to wake), and ``send`` seals and writes at once (the store calls it once per
    stream per turn of the loop with everything that turn queued: ``ReplicatedStore._pump``)."""

    def __init__(
        self,
        store: ReplicatedStore,
        node: str,
        portal: str,
        stream: PrimaryStream,
        secret: ClusterSecret,
        stream_key: bytes | None = None,
    ) -> None:
        #: The key the OPEN proves (the latest Ack's for this replica; None: the OPEN is refused).
        self.stream_key = stream_key
        self.store = store
        self.node = node
        self.portal = portal
        self.stream = stream
        self.secret = secret
        self.loop = asyncio.get_running_loop()
        self.channel = Channel(
            secret, Side.CLIENT, Purpose.REPLICATION, self.loop.time(), max_plaintext=protocol.MAX_MESSAGE
        )
        self.transport: asyncio.Transport | None = None
        #: The channel is up and the OPEN may go (``store.stream_open`` was called).
        self.up = False
        self._closed = False
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None
        self.task = self.loop.create_task(self._open(), name=f"forward-{node}")

    async def _open(self) -> None:
        try:
            host, _, port = self.portal.rpartition(":")
            async with asyncio.timeout_at(self.channel.deadline()):
                await self.loop.create_connection(lambda: self, host.strip("[]"), int(port))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # refused, unreachable, timed out: the store reconnects
            self._end(f"{type(e).__name__}: {e}")

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._closed:
            self.transport.abort()
            return
        self.transport.write(self.channel.initiate())
        deadline = self.channel.deadline()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            for event in self.channel.feed(data, self.loop.time()):
                if isinstance(event, Plaintext):
                    self._acks(event.data)
                elif isinstance(event, HandshakeBytes):
                    assert self.transport is not None
                    self.transport.write(event.data)
            if not self.up and self.channel.established:
                self.up = True
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if self.stream_key is not None:
                    self.stream.authorize(self.stream_key, self.channel.binding)
                self.store.stream_open(self.node, self.stream)
        except ReplicationError as e:
            ahead = gap = None
            if e.remote and e.code is protocol.ErrorCode.REPEAT and e.seq is not None:
                ahead = e.seq
            if e.remote and e.code is protocol.ErrorCode.GAP and e.seq is not None:
                gap = e.seq
            self._end(f"{type(e).__name__}: {e}", ahead=ahead, gap=gap)
        except Exception as e:  # a broken channel, or a bug below: the store reconnects
            self._end(f"{type(e).__name__}: {e}")

    def eof_received(self) -> bool | None:
        self._end("EOFError: the replica closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"{type(exc).__name__}: {exc}" if exc is not None else "closed")

    def _handshake_timeout(self) -> None:
        self._timer = None
        self._end(f"TimeoutError: no handshake within {self.channel.handshake_timeout}s")

    # -- the store's side ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Seal ``data`` (whole messages, at most ``MAX_MESSAGE`` bytes) as one record and write it."""
        if not self.up or self._ended or self.transport is None:
            return
        self.transport.writelines(self.channel.seal(data))  # header and sealed bytes, not joined

    def close(self) -> None:
        self._closed = True
        self._ended = True
        self._stop()

    def _stop(self) -> None:
        if self.task is not asyncio.current_task():
            self.task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _end(self, reason: str, *, ahead: int | None = None, gap: int | None = None) -> None:
        """The connection is over: abort it and tell the store once (unless closed by it)."""
        if self._ended:
            return
        self._ended = True
        self._stop()
        if not self._closed:
            self.store.on_link_lost(self.node, self.stream, reason, ahead=ahead, gap=gap)

    def _acks(self, data: bytes) -> None:
        for acked in self.stream.feed(data):
            if isinstance(acked, Acked):
                self.store.on_acked(self.node, self.stream, acked)
            else:
                self.store.on_dirty_report(self.node, self.stream, acked)


class Forwarding:
    """The node's replicated stores by volume id: wraps each exported volume's store
    (:meth:`wrap`), configures it from the persisted assignments (:meth:`retarget`), reports its
    replicas (:meth:`replica_states`) and checks for lagging replicas on a timer."""

    def __init__(
        self,
        node_id: str,
        secret: ClusterSecret,
        *,
        ack_timeout: float = protocol.DEFAULT_ACK_TIMEOUT,
        hold_timeout: float = DEFAULT_HOLD_TIMEOUT,
        clock: Callable[[], float],
        resync_rate: int = DEFAULT_RESYNC_RATE,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.node_id = node_id
        #: The LU's range lock of a volume (NodeVolumes sets it): a region copy's ordering point.
        self.lock_for: LockFor = lambda volume_id: None
        self.bucket = TokenBucket(resync_rate, clock())
        self.resync_metrics = ResyncMetrics(registry)
        self.dirty: dict[str, DirtyMap | None] = {}
        self.resyncs: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.reconciles: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._checkpoints: asyncio.Task[None] | None = None
        self.secret = secret
        self.ack_timeout = ack_timeout
        self.hold_timeout = hold_timeout
        self.clock = clock
        self.stores: dict[str, ReplicatedStore] = {}
        #: Called when a replica newly lags (the daemon: send a heartbeat now).
        self.on_lagging: Callable[[], None] | None = None
        #: The stream key for (volume id, epoch, replica) (the daemon: ``Convergence.stream_key``).
        self.stream_key: Callable[[str, int, str], bytes | None] = lambda volume_id, epoch, replica: None
        self._ticker: asyncio.Task[None] | None = None

    def wrap(self, volume_id: str, inner: BlockStore, *, dirty: DirtyMap | None = None) -> BlockStore:
        """``inner``: the local store (marking ``dirty``, this copy's dirty map, before writing)."""
        self.dirty[volume_id] = dirty
        store = ReplicatedStore(
            inner,
            volume_id,
            self.node_id,
            clock=self.clock,
            open_link=self._open_link,
            ack_timeout=self.ack_timeout,
            hold_timeout=self.hold_timeout,
            on_lagging=self._lagging,
            on_syncing=self._resync,
            on_reconcile=self._reconcile,
        )
        store.dirty_map = dirty
        self.stores[volume_id] = store
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="forward-lag")
        if self._checkpoints is None:
            self._checkpoints = asyncio.get_running_loop().create_task(
                self._checkpoint_loop(), name="checkpoints"
            )
        return store

    def forget(self, volume_id: str) -> None:
        for key in [k for k in self.resyncs if k[0] == volume_id]:
            self.resyncs.pop(key).cancel()
        for key in [k for k in self.reconciles if k[0] == volume_id]:
            self.reconciles.pop(key).cancel()
        self.dirty.pop(volume_id, None)
        store = self.stores.pop(volume_id, None)
        if store is not None:
            for replica in store.replicas.values():
                if replica.link is not None:
                    replica.link.close()
            store._fail_waiters("the volume is no longer served here")

    def retarget(
        self,
        targets: Mapping[
            str, tuple[int, Sequence[tuple[str, str | None]], Sequence[tuple[str, str]], bool]
        ],
    ) -> None:
        """``targets``: for each volume this node serves as persisted primary, (epoch, in-sync
        replicas, copies to resync, whether every copy is in sync). Volumes not named are left as
        they are (not yet persisted: writes keep waiting)."""
        for volume_id, (epoch, replicas, syncing, complete) in targets.items():
            store = self.stores.get(volume_id)
            if store is not None:
                store.configure(epoch, replicas, syncing, complete=complete)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            for store in list(self.stores.values()):
                lock = self.lock_for(store.volume_id)
                if lock is None or not store.checkpoint_due():
                    continue
                try:
                    await checkpoint_round(store, lock)
                except Exception:
                    log.exception("checkpoint failed", volume_id=store.volume_id)

    def _resync(self, store: ReplicatedStore, node: str) -> None:
        """Start the resync of ``node`` (sparrow/node/resync.py) unless one runs."""
        key = (store.volume_id, node)
        running = self.resyncs.get(key)
        if running is not None and not running.done():
            return
        resync = Resync(
            store,
            node,
            dirty=self.dirty.get(store.volume_id),
            lock_for=self.lock_for,
            bucket=self.bucket,
            metrics=self.resync_metrics,
            clock=self.clock,
        )
        task = asyncio.get_running_loop().create_task(self._run_resync(resync), name=f"resync-{node}")
        self.resyncs[key] = task

    def _reconcile(self, store: ReplicatedStore, node: str) -> None:
        """Start the reconcile of in-sync ``node`` at the start of a term (sparrow/node/reconcile.py)."""
        key = (store.volume_id, node)
        running = self.reconciles.pop(key, None)
        if running is not None:
            running.cancel()  # an earlier term's
        reconcile = Reconcile(store, node, lock_for=self.lock_for, bucket=self.bucket, clock=self.clock)
        task = asyncio.get_running_loop().create_task(
            self._run_reconcile(key, reconcile), name=f"reconcile-{node}"
        )
        self.reconciles[key] = task

    async def _run_reconcile(self, key: tuple[str, str], reconcile: Reconcile) -> None:
        try:
            await reconcile.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconcile failed", volume_id=reconcile.store.volume_id, replica=reconcile.node)
        finally:
            if self.reconciles.get(key) is asyncio.current_task():
                del self.reconciles[key]

    async def _run_resync(self, resync: Resync) -> None:
        try:
            await resync.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("resync failed", volume_id=resync.store.volume_id, replica=resync.node)
        finally:
            # A resync that ended while its copy still syncs (a new generation) starts again.
            replica = resync.store.syncing_replica(resync.node)
            key = (resync.store.volume_id, resync.node)
            if self.resyncs.get(key) is asyncio.current_task():
                del self.resyncs[key]
            if replica is not None and not replica.resynced and not resync.store.closed:
                loop = asyncio.get_running_loop()
                loop.call_later(RECONNECT_DELAY, self._resync, resync.store, resync.node)

    def stand_down(self, volume_ids: Iterable[str]) -> None:
        """These volumes are held here but not as primary: no forwarding (see ReplicatedStore)."""
        for volume_id in volume_ids:
            store = self.stores.get(volume_id)
            if store is not None and store.epoch is not None:
                store.stand_down()

    def replica_states(self, now: float) -> dict[str, tuple[ReplicaState, ...]]:
        return {vid: s.replica_states(now) for vid, s in self.stores.items() if s.replicas}

    async def close(self) -> None:
        for task in [*self.resyncs.values(), *self.reconciles.values()]:
            task.cancel()
        self.resyncs.clear()
        self.reconciles.clear()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            self._checkpoints = None
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for volume_id in list(self.stores):
            self.forget(volume_id)

    def _open_link(self, store: ReplicatedStore, node: str, portal: str, stream: PrimaryStream) -> Link:
        key = self.stream_key(store.volume_id, stream.epoch, node)
        return ChannelLink(store, node, portal, stream, self.secret, key)

    def _lagging(self) -> None:
        if self.on_lagging is not None:
            self.on_lagging()

    async def _tick(self) -> None:
        period = min(0.1, self.ack_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            for store in list(self.stores.values()):
                store.check(now)
