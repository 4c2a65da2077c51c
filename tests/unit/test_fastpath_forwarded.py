"""The replicated write on the fast path (``LogicalUnit.write_fast``, ``AwaitForwarded``).

Two connections, one with the fast path and one without, each on its own LogicalUnit over a
ReplicatedStore with one replica behind a fake link (no sockets), are fed the same command streams;
the replica's ACKs are given by the test. Both must send the same bytes, forward the same
operations in the same order and store the same blocks; nothing is answered before the replica's
ACK; a PDU behind forwarded writes waits for them; a fence or a hold timeout answers 02/04/0A.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator

import pytest

from frontend.iscsi.connection import AwaitForwarded, Connection, ExecuteScsi, LoggedIn
from frontend.iscsi.pdu import (
    LoginRequest,
    NopIn,
    ScsiResponse,
    TargetPdu,
    TaskManagementResponse,
    encode_bytes,
    target_reader,
)
from frontend.iscsi.session import SessionTable
from frontend.scsi.lu import AccessState, LogicalUnit, LuIdentity
from frontend.scsi.sense import LU_NOT_ACCESSIBLE_TRANSITION, SenseKey
from frontend.server import _Resumed
from frontend.target import Target, TargetRegistry, TargetSettings
from sparrow.node.replicated_store import ReplicatedStore
from sparrow.replication import protocol
from sparrow.replication.protocol import MessageDecoder, PrimaryStream
from store.memstore import MemoryBlockStore
from tests.unit.test_fastpath import (
    BS,
    DIGEST_IDS,
    DIGESTS,
    IQN,
    LOGIN_KEYS,
    NONE,
    SIZE,
    Digests,
    Metrics,
    Stream,
)

VOLUME = uuid.UUID(int=9).hex
TRANSITION = (LU_NOT_ACCESSIBLE_TRANSITION.asc, LU_NOT_ACCESSIBLE_TRANSITION.ascq)


class Replica:
    """The fake link to the one replica: records what it is sent, ACKs when told."""

    def __init__(self, store: ReplicatedStore, node: str, stream: PrimaryStream) -> None:
        self.store, self.node, self.stream = store, node, stream
        self.sent: list[protocol.Message] = []
        self._decoder = MessageDecoder()
        asyncio.get_running_loop().call_soon(self._up)  # the channel is up in the next turn

    def _up(self) -> None:
        self.store.stream_open(self.node, self.stream)
        self.ack(self.stream.first_seq - 1)

    def send(self, data: bytes) -> None:
        self._decoder.feed(data)
        while (m := self._decoder.next_message()) is not None:
            if not isinstance(m, protocol.Open):
                self.sent.append(m)

    def close(self) -> None:
        pass

    def ack(self, applied: int) -> None:
        data = protocol.encode(protocol.Ack(VOLUME, self.stream.epoch, applied, 0))
        for acked in self.stream.feed(data):
            self.store.on_acked(self.node, self.stream, acked)  # type: ignore[arg-type]

    def ack_all(self) -> None:
        self.ack(self.stream.last_seq)


class Side:
    """A connection, its LU and its replicated store, driven as frontend/server.py drives them."""

    def __init__(self, fast: bool, *, hold_timeout: float = 30.0, digests: Digests = NONE) -> None:
        self.digests = digests
        self.store = MemoryBlockStore(SIZE, BS)
        self.replica: Replica | None = None
        self.replicated = ReplicatedStore(
            self.store, VOLUME, "n1", clock=lambda: 0.0, open_link=self._link, hold_timeout=hold_timeout
        )
        self.replicated.configure(1, [("n2", "h:1")])
        self.lu = LogicalUnit(self.replicated, LuIdentity("fast", "FAST0001", bytes.fromhex("6" + "0" * 31)))
        registry = TargetRegistry()
        registry.add(Target(IQN, "fast", self.lu))
        self.metrics = Metrics()
        self.conn = Connection(
            TargetSettings(nop_interval=0),
            registry,
            SessionTable(),
            now=0.0,
            metrics=self.metrics,
            fast_path=fast,
        )
        self.out = bytearray()
        self.tasks: list[asyncio.Task[None]] = []
        self.forwarded = 0
        self.answered = asyncio.Event()
        keys = {**LOGIN_KEYS, "HeaderDigest": "CRC32C" if digests[0] else "None",
                "DataDigest": "CRC32C" if digests[1] else "None"}
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        self.feed(encode_bytes(LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000001, 0, 1, 0, 1, 0, text)))
        self.login_bytes = len(self.out)

    def _link(self, store: ReplicatedStore, node: str, portal: str, stream: PrimaryStream) -> Replica:
        self.replica = Replica(store, node, stream)
        return self.replica

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data, 1.0)
        self.pump()

    def pump(self) -> None:
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, ExecuteScsi):  # run eagerly, as the server does; a Task once it waits
                coro = self._execute(ev)
                try:
                    first = coro.send(None)
                except StopIteration:
                    continue
                self.tasks.append(asyncio.get_running_loop().create_task(_finish(_Resumed(coro, first))))
            elif isinstance(ev, AwaitForwarded):
                self.forwarded += 1
                ev.lu.forwarded(ev.ticket).add_done_callback(
                    lambda done, ev=ev: self._answer(ev, done)  # type: ignore[misc]
                )
            else:
                assert isinstance(ev, LoggedIn), ev
        for piece in self.conn.data_to_send():
            self.out += piece

    async def _execute(self, ev: ExecuteScsi) -> None:
        assert ev.lu is not None
        result = await ev.lu.execute(ev.request)
        self.metrics.command_done("fast", "x", 0, 0.0)  # the server counts these
        self.conn.complete(ev.task_id, result, 1.0)
        self.pump()

    def _answer(self, ev: AwaitForwarded, done: asyncio.Future[None]) -> None:
        self.conn.forwarded_done(ev.batch, ev.lu.forwarded_sense(done.exception()), 1.0)
        self.pump()
        self.answered.set()

    def responses(self) -> list[TargetPdu]:
        reader = target_reader(header_digest=self.digests[0], data_digest=self.digests[1])
        reader.feed(bytes(self.out[self.login_bytes :]))
        return list(iter(reader.next_pdu, None))


async def _finish(rest: _Resumed) -> None:
    await rest


async def settle() -> None:
    for _ in range(8):
        await asyncio.sleep(0)


def writes(count: int, *, start: int = 0) -> Iterator[tuple[int, int]]:
    for i in range(count):
        yield (start + i * 9) % 300, 1 + i % 8


@pytest.mark.parametrize("digests", DIGESTS, ids=DIGEST_IDS)
async def test_forwarded_writes_send_the_same_bytes_and_ops_as_the_general_path(digests: Digests) -> None:
    sides = Side(True, digests=digests), Side(False, digests=digests)
    s = Stream(digests)
    for i, (lba, blocks) in enumerate(writes(24)):
        s.write((0x2A, 0x8A)[i % 2], lba, blocks)
        if i % 5 == 4:
            s.read(0x28, lba, blocks)  # reads the local copy at once on either path
    stream = s.bytes()
    cuts = [0, 700, 5000, 9000, 20000, len(stream)]
    for side in sides:
        for a, b in itertools.pairwise(cuts):
            side.feed(stream[a:b])
    await settle()
    fast, general = sides
    assert fast.forwarded >= 3 and not fast.tasks  # every write forwarded on the fast path
    assert general.tasks and not general.forwarded
    for side in sides:  # the reads are answered; no write before its replica's ACK
        assert side.responses() and all(not isinstance(r, ScsiResponse) for r in side.responses())
    assert bytes(fast.out) == bytes(general.out)
    for side in sides:
        assert side.replica is not None
        side.replica.ack_all()
    await settle()
    assert bytes(fast.out) == bytes(general.out)
    assert sum(isinstance(r, ScsiResponse) and r.status == 0 for r in fast.responses()) == 24
    assert fast.store._blocks == general.store._blocks
    assert fast.replica is not None and general.replica is not None
    assert [(m.seq, m.offset, bytes(m.data)) for m in fast.replica.sent] == [  # type: ignore[union-attr]
        (m.seq, m.offset, bytes(m.data))
        for m in general.replica.sent  # type: ignore[union-attr]
    ]
    assert len(fast.metrics.done) == len(general.metrics.done)
    assert fast.conn.stat_sn == general.conn.stat_sn and not fast.conn.internal_errors


async def test_writes_acknowledged_in_part_are_answered_in_part() -> None:
    side = Side(True)
    s = Stream()
    s.write(0x2A, 0, 1)
    side.feed(s.bytes())
    first = len(s.pdus)
    s.write(0x2A, 8, 1)
    s.write(0x2A, 16, 1)
    side.feed(b"".join(s.pdus[first:]))
    await settle()
    assert side.forwarded == 2 and not side.responses()
    assert side.replica is not None
    side.replica.ack(1)  # the first batch only
    await settle()
    assert [r.itt for r in side.responses()] == [0x100]  # type: ignore[union-attr]
    side.replica.ack(3)
    await settle()
    assert [r.itt for r in side.responses()] == [0x100, 0x101, 0x102]  # type: ignore[union-attr]


async def test_a_pdu_behind_forwarded_writes_waits_until_they_are_answered() -> None:
    side = Side(True)
    s = Stream()
    for lba, blocks in writes(4):
        s.write(0x2A, lba, blocks)
    side.feed(s.bytes())
    first = len(s.pdus)
    s.nop()
    s.tmf(1, 0x101)  # ABORT TASK of the second write, forwarded and not yet acknowledged
    s.write(0x2A, 40, 1)  # a plain write behind them waits too (CmdSN order)
    side.feed(b"".join(s.pdus[first:]))
    await settle()
    assert side.forwarded == 1 and side.responses() == []
    assert side.replica is not None
    side.replica.ack_all()
    await settle()
    kinds = [type(r).__name__ for r in side.responses()]
    assert kinds[:6] == ["ScsiResponse"] * 4 + ["NopIn", "TaskManagementResponse"], kinds
    nop, tmf = side.responses()[4:6]
    assert isinstance(nop, NopIn) and isinstance(tmf, TaskManagementResponse)
    assert tmf.response in (0, 1)  # the task is done: function complete or no such task
    side.replica.ack_all()  # the write after them, forwarded once they were answered
    await settle()
    last = side.responses()[-1]
    assert isinstance(last, ScsiResponse) and last.itt == 0x106 and last.status == 0
    assert not side.conn.internal_errors


async def test_a_forwarded_write_acknowledged_after_the_fence_is_never_good() -> None:
    sides = Side(True), Side(False)
    s = Stream()
    for lba, blocks in writes(3):
        s.write(0x2A, lba, blocks)
    for side in sides:
        side.feed(s.bytes())
    await settle()
    assert sides[0].forwarded == 1
    for side in sides:
        side.lu.access_state = AccessState.TRANSITIONING  # the lease fence, while they wait
        assert side.replica is not None
        side.replica.ack_all()
    await settle()
    fast, general = sides
    responses = [r for r in fast.responses() if isinstance(r, ScsiResponse)]
    assert len(responses) == 3 and all(r.status == 2 for r in responses)
    assert all(r.data[2] & 0x0F == SenseKey.NOT_READY for r in responses)
    assert all((r.data[12], r.data[13]) == TRANSITION for r in responses)
    assert [bytes(r.data) for r in responses] == [
        bytes(r.data) for r in general.responses() if isinstance(r, ScsiResponse)
    ]


async def test_a_forwarded_write_past_the_hold_bound_fails_retryably() -> None:
    side = Side(True, hold_timeout=0.05)
    s = Stream()
    s.write(0x2A, 0, 1)
    side.feed(s.bytes())
    async with asyncio.timeout(5.0):  # the hold timer fires after 0.05 s
        await side.answered.wait()
    (response,) = side.responses()
    assert side.forwarded == 1 and isinstance(response, ScsiResponse) and response.status == 2
    assert response.data[2] & 0x0F == SenseKey.NOT_READY
    assert (response.data[12], response.data[13]) == TRANSITION


async def test_another_sessions_target_reset_drops_forwarded_writes_and_reads_what_waited() -> None:
    side = Side(True)
    s = Stream()
    s.write(0x2A, 0, 1)
    s.write(0x2A, 8, 1)
    side.feed(s.bytes())
    first = len(s.pdus)
    s.nop()
    side.feed(b"".join(s.pdus[first:]))
    await settle()
    assert side.forwarded == 1 and side.responses() == []
    side.conn.abort_all_tasks()  # as for a target reset from another session: no responses
    side.pump()
    (nop,) = side.responses()
    assert isinstance(nop, NopIn)
    assert side.replica is not None
    side.replica.ack_all()
    await settle()
    assert [type(r) for r in side.responses()] == [NopIn]
    assert not side.conn.internal_errors
