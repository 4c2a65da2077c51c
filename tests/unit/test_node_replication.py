"""The replica's asyncio layer (sparrow.node.replication) driven with a fake transport, a gated
store and an injected clock: no sockets, no sleeps. Flow control, the ack buffer bounds, the
deadlines and the handshake cap."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sparrow.cluster.channel import Channel, ClusterSecret, HandshakeBytes, Plaintext, Purpose, Side
from sparrow.cluster.messages import Role
from sparrow.node.replication import MAX_ACK_BUFFER, ReplicaConnection, ReplicaServer
from sparrow.replication.protocol import (
    MAX_MESSAGE,
    Ack,
    Checkpoint,
    Dirty,
    Flush,
    Message,
    MessageDecoder,
    Open,
    VolumeView,
    Write,
    encode,
)
from sparrow.replication.streamauth import derive_stream_key
from store.blockstore import BlockStore, FileBlockStore
from store.dirtymap import DirtyBitmap, DirtyMap, MarkingStore
from store.memstore import MemoryBlockStore

SECRET = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")
VID = "0123456789abcdef0123456789abcdef"
MiB = 1 << 20
#: The stream key the replica holds for (VID, 2); the Peer's OPENs prove it.
KEY = derive_stream_key(b"m" * 32, VID, 2, "n1", "n2")
VIEW = VolumeView(VID, 2, Role.REPLICA, "n1", 16 * MiB, 512, stream_key=KEY)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.paused = False
        self.buffer_size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default


class GatedStore(MemoryBlockStore):
    """A memory store whose writes wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__(16 * MiB, 512)
        self.gate = asyncio.Event()
        self.flushes = 0

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.gate.wait()
        await super().write(offset, data)

    async def flush(self) -> None:
        self.flushes += 1
        await super().flush()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Peer:
    """The primary's end: a client channel over the fake transport."""

    def __init__(self, conn: ReplicaConnection, transport: FakeTransport) -> None:
        self.conn = conn
        self.transport = transport
        self.channel = Channel(SECRET, Side.CLIENT, Purpose.REPLICATION, 0.0, max_plaintext=MAX_MESSAGE)
        self.decoder = MessageDecoder()
        self._read = 0
        conn.data_received(self.channel.initiate())
        self._pump()
        assert self.channel.established

    def _pump(self) -> list[bytes]:
        new, self._read = bytes(self.transport.written[self._read :]), len(self.transport.written)
        plain = []
        for event in self.channel.feed(new, 0.0) if new else []:
            if isinstance(event, HandshakeBytes):
                self.conn.data_received(event.data)
            elif isinstance(event, Plaintext):
                plain.append(event.data)
        return plain

    def send(self, *messages: Message, key: bytes | None = KEY, together: bool = False) -> None:
        """Send ``messages``, a record each (``together``: in one record, as a primary sends what
        one loop turn queued); an OPEN proves ``key`` on this connection (None: sent as given)."""
        wires = []
        for m in messages:
            if isinstance(m, Open) and key is not None:
                m = m.signed(key, self.channel.binding)
            wires.append(encode(m))
        for wire in [b"".join(wires)] if together else wires:
            self.conn.data_received(self.channel.send(wire))

    def received(self) -> list[Message]:
        for data in self._pump():
            self.decoder.feed(data)
        out = []
        while (m := self.decoder.next_message()) is not None:
            out.append(m)
        return out


def server(store: BlockStore | None, clock: Clock, **kwargs: Any) -> ReplicaServer:
    return ReplicaServer(
        secret=SECRET,
        lookup=lambda vid: VIEW if vid == VID else None,
        store_for=lambda vid: store,
        clock=clock,
        **kwargs,
    )


def connect(srv: ReplicaServer) -> tuple[ReplicaConnection, FakeTransport]:
    conn = ReplicaConnection(srv)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_reading_pauses_while_too_much_is_unapplied_and_resumes_once_applied() -> None:
    store, clock = GatedStore(), Clock()
    srv = server(store, clock, max_unapplied_bytes=2 * MiB)
    conn, transport = connect(srv)
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 1, "n1"))
    assert peer.received() == [Ack(VID, 2, 0, 0)]
    peer.send(*(Write(VID, 2, seq, (seq - 1) * MiB, bytes([seq]) * MiB) for seq in (1, 2)))
    assert not transport.paused  # 2 MiB unapplied: at the bound, not past it
    peer.send(Write(VID, 2, 3, 2 * MiB, b"\x03" * MiB))
    await settle()
    assert transport.paused and conn.stream.unapplied_bytes == 3 * MiB  # the store holds every write
    store.gate.set()
    await settle()
    assert not transport.paused and conn.stream.unapplied_bytes == 0
    peer.send(Flush(VID, 2, 4))
    await settle()
    acks = peer.received()
    # ACKs are cumulative: one for the run of writes applied back to back, one for the flush.
    assert acks[-1] == Ack(VID, 2, 4, 4) and [a.applied_seq for a in acks if isinstance(a, Ack)] == [3, 4]
    assert bytes(await store.read(2 * MiB, 4)) == b"\x03" * 4 and store.flushes == 1
    transport.close()
    conn.connection_lost(None)
    await settle()
    assert srv.positions.get(VID, 2) == (4, 4)


async def test_a_peer_whose_acks_pile_up_is_cut_off() -> None:
    store, clock = GatedStore(), Clock()
    store.gate.set()
    srv = server(store, clock)
    conn, transport = connect(srv)
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 1, "n1"))
    transport.buffer_size = MAX_ACK_BUFFER + 1
    peer.send(Write(VID, 2, 1, 0, b"x" * 512))
    await settle()
    assert transport.aborted and conn.closed_reason == "refused: not_reading"


async def test_a_peer_that_leaves_the_write_buffer_full_is_cut_off_after_the_stall_timeout() -> None:
    clock = Clock()
    srv = server(GatedStore(), clock, stall_timeout=5.0)
    conn, transport = connect(srv)
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 1, "n1"))
    clock.now = 10.0
    conn.pause_writing()
    assert conn.deadline() == 15.0
    clock.now = 14.9
    conn.check_deadline()
    assert not transport.closing
    conn.resume_writing()
    assert conn.deadline() is None  # reading the ACKs again: no deadline
    conn.pause_writing()
    clock.now = 19.9
    conn.check_deadline()
    assert transport.aborted and conn.closed_reason == "refused: not_reading"


async def test_an_authenticated_peer_that_sends_no_open_is_cut_off() -> None:
    clock = Clock()
    conn, transport = connect(server(GatedStore(), clock, handshake_timeout=5.0))
    Peer(conn, transport)
    clock.now = 4.9
    conn.check_deadline()
    assert not transport.closing
    clock.now = 5.0
    conn.check_deadline()
    assert transport.aborted and conn.closed_reason == "refused: open_timeout"


async def test_a_message_begun_and_not_completed_is_refused_after_the_frame_timeout() -> None:
    clock = Clock()
    conn, transport = connect(server(GatedStore(), clock, frame_timeout=5.0))
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 1, "n1"))
    peer.received()
    clock.now = 1.0
    conn.data_received(peer.channel.send(encode(Write(VID, 2, 1, 0, b"x" * 512))[:100]))
    assert conn.deadline() == 6.0
    clock.now = 6.0
    conn.check_deadline()
    assert conn.closed_reason == "refused: truncated" and transport.closing
    [refusal] = peer.received()
    assert refusal.code.reason == "truncated"  # type: ignore[union-attr]


async def test_the_deadline_timer_is_kept_across_messages_not_rearmed_per_message() -> None:
    clock = Clock()
    srv = server(GatedStore(), clock, frame_timeout=5.0)
    srv.loop = asyncio.get_running_loop()  # as a started server: the connection arms its timer
    conn, transport = connect(srv)
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 1, "n1"))
    peer.received()
    data = encode(Write(VID, 2, 1, 0, b"x" * 512))
    clock.now = 1.0
    conn.data_received(peer.channel.send(data[:100]))  # a message begun: due at 6.0
    timer = conn._timer
    assert timer is not None
    for now in (2.0, 3.0):  # more records: the same timer, no new one per message
        clock.now = now
        conn.data_received(peer.channel.send(data[100 + int(now) : 101 + int(now)]))
        assert conn._timer is timer
    clock.now = 6.0  # it fires: nothing has moved the message's own deadline
    conn.check_deadline()
    assert conn.closed_reason == "refused: truncated"


async def test_the_handshake_cap() -> None:
    srv = server(GatedStore(), Clock(), max_handshaking=2)
    (c1, _), (c2, _), (c3, t3) = connect(srv), connect(srv), connect(srv)
    assert t3.aborted and c3.closed_reason == "refused: handshake_cap" and srv.handshaking == 2
    peer = Peer(c1, c1.transport)  # type: ignore[arg-type]
    peer.send(Open(VID, 2, 1, "n1"))
    assert srv.handshaking == 1  # an accepted OPEN leaves the handshake
    _, t4 = connect(srv)
    assert not t4.closing and srv.handshaking == 2
    c2.connection_lost(None)  # a peer that gives up in the handshake is counted and frees its slot
    assert srv.handshaking == 1 and c2.closed_reason == "refused: handshake_abandoned"
    await settle()


async def test_a_run_of_contiguous_writes_is_applied_with_one_pwritev_and_acked_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a store that writes inline (tmpfs), plain writes of one record that continue each other
    are applied with one pwritev; a gap starts another run; a later write over the first run lands
    after it; the messages applied back to back are reported with one cumulative ACK."""
    calls: list[list[bytes]] = []
    real_pwritev = os.pwritev

    def counting_pwritev(fd: int, buffers: Any, offset: int) -> int:
        calls.append([bytes(b) for b in buffers])
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counting_pwritev)
    path = Path("/dev/shm") / f"sparrow-test-replica-{os.getpid()}.img"
    store = await FileBlockStore.open(path, block_size=512, size=16 * MiB, create=True)
    try:
        srv = server(store, Clock())
        conn, transport = connect(srv)
        peer = Peer(conn, transport)
        peer.send(Open(VID, 2, 1, "n1"))
        assert peer.received() == [Ack(VID, 2, 0, 0)]
        peer.send(
            Write(VID, 2, 1, 0, b"a" * 512),
            Write(VID, 2, 2, 512, b"b" * 1024),
            Write(VID, 2, 3, 1536, b"c" * 512),
            Write(VID, 2, 4, 8192, b"d" * 512),  # not contiguous: a run of its own
            Write(VID, 2, 5, 512, b"e" * 512),  # over the first run: applied after it
            together=True,
        )
        await settle()
        assert calls == [[b"a" * 512, b"b" * 1024, b"c" * 512]]
        assert peer.received() == [Ack(VID, 2, 5, 0)]
        assert await store.read(0, 2048) == b"a" * 512 + b"e" * 512 + b"b" * 512 + b"c" * 512
        assert await store.read(8192, 512) == b"d" * 512
        transport.close()
        conn.connection_lost(None)
        await settle()
        assert srv.positions.get(VID, 2) == (5, 0)
    finally:
        await store.close()
        os.unlink(path)


async def test_writes_reaching_an_idle_replica_are_applied_and_acked_in_the_same_turn() -> None:
    """The worker waits for work: plain writes to a store that writes inline are applied in the
    ``data_received`` that brought them, with one ACK; what cannot go inline (a FLUSH) and all
    after it is left to the worker, in order."""
    path = Path("/dev/shm") / f"sparrow-test-replica-now-{os.getpid()}.img"
    store = await FileBlockStore.open(path, block_size=512, size=16 * MiB, create=True)
    try:
        srv = server(store, Clock())
        conn, transport = connect(srv)
        peer = Peer(conn, transport)
        peer.send(Open(VID, 2, 1, "n1"))
        assert peer.received() == [Ack(VID, 2, 0, 0)]
        await settle()  # the worker waits

        def together(*messages: Message) -> None:  # one record: one data_received
            conn.data_received(peer.channel.send(b"".join(encode(m) for m in messages)))

        together(Write(VID, 2, 1, 0, b"a" * 512), Write(VID, 2, 2, 512, b"b" * 512))
        assert peer.received() == [Ack(VID, 2, 2, 0)]  # no turn of the loop in between, one ACK
        assert await store.read(0, 1024) == b"a" * 512 + b"b" * 512
        together(
            Write(VID, 2, 3, 1024, b"c" * 512),
            Flush(VID, 2, 4),
            Write(VID, 2, 5, 0, b"d" * 512),  # after the flush: not before it
        )
        assert peer.received() == [Ack(VID, 2, 3, 0)]
        acks: list[Message] = []
        await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 5, 4) in acks)
        assert acks == [Ack(VID, 2, 4, 4), Ack(VID, 2, 5, 4)]
        assert await store.read(0, 1536) == b"d" * 512 + b"b" * 512 + b"c" * 512
    finally:
        await store.close()
        os.unlink(path)


async def until(condition: Callable[[], object], within: float = 5.0) -> None:
    """Wait for ``condition`` (the dirty map's marks sync in a thread), failing after ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


# -- resync: the dirty map on this replica --------------------------------------------------------


async def test_the_replica_marks_reports_and_clears_its_dirty_map_on_a_checkpoint(tmp_path: Path) -> None:
    inner = GatedStore()
    inner.gate.set()
    dirty = DirtyMap.open(tmp_path / "v.dirty", VID, 16 * MiB, missing_clean=True)
    await dirty.mark(15 * MiB, 512)  # dirty before this session: sticky
    marking = MarkingStore(inner, dirty)
    srv = server(None, Clock(), dirty_for=lambda vid: dirty)
    srv.store_for = lambda vid: marking
    conn, transport = connect(srv)
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 1, "n1", report_dirty=True, session=7))
    ack, *report = peer.received()
    assert ack == Ack(VID, 2, 0, 0)
    (slice_,) = report  # the map as it was at the OPEN: region 15
    assert isinstance(slice_, Dirty) and slice_.last
    assert list(DirtyBitmap.from_bytes(slice_.bitmap, slice_.regions)) == [15]
    peer.send(
        Write(VID, 2, 1, 0, b"a" * 512),
        Write(VID, 2, 2, 3 * MiB, b"b" * 512),
        Write(VID, 2, 3, 15 * MiB, b"c" * 512),
        Flush(VID, 2, 4),
        Write(VID, 2, 5, 5 * MiB, b"d" * 512),
        Checkpoint(VID, 2, 6, 4),  # every copy made seqs <= 4 durable
    )
    acks: list[Message] = []
    await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 6, 4) in acks)
    # Regions 0 and 3 cleared; 5 (written after the flush) and the sticky 15 stay.
    assert dirty.dirty_regions() == [5, 15]
    dirty.close()


async def test_a_new_primary_session_leaves_what_the_earlier_one_wrote_dirty(tmp_path: Path) -> None:
    inner = GatedStore()
    inner.gate.set()
    dirty = DirtyMap.open(tmp_path / "v.dirty", VID, 16 * MiB, missing_clean=True)
    marking = MarkingStore(inner, dirty)
    srv = server(None, Clock(), dirty_for=lambda vid: dirty)
    srv.store_for = lambda vid: marking
    conn, transport = connect(srv)
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 1, "n1", session=7), Write(VID, 2, 1, 2 * MiB, b"a" * 512))
    await until(lambda: srv.positions.get(VID, 2)[0] == 1)
    transport.close()
    conn.connection_lost(None)
    await settle()
    # The primary restarted (another session) in the same epoch: it goes on at seq 2.
    conn, transport = connect(srv)
    peer = Peer(conn, transport)
    peer.send(Open(VID, 2, 2, "n1", session=8), Flush(VID, 2, 2), Checkpoint(VID, 2, 3, 2))
    await until(lambda: srv.positions.get(VID, 2)[0] == 3)
    assert dirty.dirty_regions() == [2]  # written by session 7: not this checkpoint's to clear
    dirty.close()


async def test_a_marking_store_writes_a_run_inline_only_into_regions_already_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica's dirty-map marking store over tmpfs: a run into a clean region is declined inline
    (not covered) and takes the general path (marked durably, then written, as one write); a later
    run into the region, now durably dirty, goes inline; every write of an inline run is recorded
    for the checkpoint, which clears their regions."""
    inline: list[tuple[int, int, bool]] = []
    real_write_inline = FileBlockStore.write_inline

    def spying(self: FileBlockStore, offset: int, buffers: Any) -> bool:
        length = sum(len(b) for b in buffers)
        inline.append((offset, length, dirty.covered(offset, length)))
        return real_write_inline(self, offset, buffers)

    monkeypatch.setattr(FileBlockStore, "write_inline", spying)
    path = Path("/dev/shm") / f"sparrow-test-marking-{os.getpid()}.img"
    store = await FileBlockStore.open(path, block_size=512, size=16 * MiB, create=True)
    dirty = DirtyMap.open(tmp_path / "v.dirty", VID, 16 * MiB, missing_clean=True)
    try:
        marking = MarkingStore(store, dirty)
        srv = server(marking, Clock(), dirty_for=lambda vid: dirty)
        conn, transport = connect(srv)
        peer = Peer(conn, transport)
        peer.send(Open(VID, 2, 1, "n1", session=7))
        assert peer.received() == [Ack(VID, 2, 0, 0)]
        peer.send(
            Write(VID, 2, 1, 0, b"a" * 512),
            Write(VID, 2, 2, 512, b"b" * 512),
            Write(VID, 2, 3, 1024, b"c" * 512),
            together=True,
        )
        peer.send(
            Write(VID, 2, 4, 3 * MiB, b"d" * 512), Write(VID, 2, 5, 3 * MiB + 512, b"e" * 512), together=True
        )
        acks: list[Message] = []
        await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 5, 0) in acks)
        # Each run into a clean region was declined inline (not covered: it never reached the
        # file's write_inline), then marked and written.
        assert inline == []
        peer.send(Write(VID, 2, 6, 1536, b"c" * 512))
        await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 6, 0) in acks)
        assert inline[-1] == (1536, 512, True)  # region 0 is durably dirty now: inline
        assert dirty.dirty_regions() == [0, 3]
        assert await store.read(0, 2048) == b"a" * 512 + b"b" * 512 + b"c" * 1024
        assert await store.read(3 * MiB, 1024) == b"d" * 512 + b"e" * 512
        peer.send(Flush(VID, 2, 7), Checkpoint(VID, 2, 8, 7))
        await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 8, 7) in acks)
        assert dirty.dirty_regions() == []  # the inline writes were recorded as this session's
        # A region's latest write is the one a checkpoint must cover: one written inline after the
        # checkpoint's seq keeps the region dirty although an earlier write there is covered.
        peer.send(Write(VID, 2, 9, 0, b"f" * 512), Flush(VID, 2, 10), Write(VID, 2, 11, 512, b"g" * 512))
        peer.send(Checkpoint(VID, 2, 12, 10))
        await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 12, 10) in acks)
        assert inline[-1] == (512, 512, True)
        assert dirty.dirty_regions() == [0]
    finally:
        dirty.close()
        await store.close()
        os.unlink(path)


async def test_a_run_is_recorded_at_its_last_seq_so_a_checkpoint_clears_it_only_once_covering_it(
    tmp_path: Path,
) -> None:
    """A run of contiguous writes applied inline is recorded once per region, at the run's last seq:
    a checkpoint covering only part of the run clears none of its regions (they stay dirty a
    checkpoint longer, never less), one covering all of it clears them all."""
    path = Path("/dev/shm") / f"sparrow-test-run-touch-{os.getpid()}.img"
    store = await FileBlockStore.open(path, block_size=512, size=16 * MiB, create=True)
    dirty = DirtyMap.open(tmp_path / "v.dirty", VID, 16 * MiB, missing_clean=True)
    try:
        srv = server(MarkingStore(store, dirty), Clock(), dirty_for=lambda vid: dirty)
        conn, transport = connect(srv)
        peer = Peer(conn, transport)
        peer.send(Open(VID, 2, 1, "n1", session=7))
        assert peer.received() == [Ack(VID, 2, 0, 0)]
        await dirty.mark(0, 2 * MiB)  # after the OPEN: this session's to clear, and inline at once
        await settle()  # the worker waits

        def together(*messages: Message) -> None:  # one record: one data_received, one run
            conn.data_received(peer.channel.send(b"".join(encode(m) for m in messages)))

        together(
            Write(VID, 2, 1, MiB - 1024, b"a" * 512),
            Write(VID, 2, 2, MiB - 512, b"b" * 512),  # region 0's last write
            Write(VID, 2, 3, MiB, b"c" * 512),
            Write(VID, 2, 4, MiB + 512, b"d" * 512),
        )
        assert peer.received() == [Ack(VID, 2, 4, 0)]  # applied inline, as one run
        assert srv.touched[VID][1] == {0: (2, 4), 1: (2, 4)}
        peer.send(Flush(VID, 2, 5), Checkpoint(VID, 2, 6, 2))  # covers region 0's writes only
        acks: list[Message] = []
        await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 6, 5) in acks)
        assert dirty.dirty_regions() == [0, 1]
        peer.send(Checkpoint(VID, 2, 7, 5))
        await until(lambda: acks.extend(peer.received()) or Ack(VID, 2, 7, 5) in acks)
        assert dirty.dirty_regions() == []
    finally:
        dirty.close()
        await store.close()
        os.unlink(path)
