"""ReplicatedStore: the acknowledgement rule with fake links, the time passed in (no sockets)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from sparrow.cluster.messages import SyncState
from sparrow.node.replicated_store import ReplicatedStore
from sparrow.replication import protocol
from sparrow.replication.protocol import MessageDecoder, PrimaryStream
from store.blockstore import StoreUnavailable
from store.dirtymap import REGION_SIZE, DirtyMap
from store.memstore import MemoryBlockStore

VOLUME = uuid.UUID(int=7).hex
BS = 4096


class FakeLink:
    def __init__(self, store: ReplicatedStore, node: str, stream: PrimaryStream) -> None:
        self.store, self.node, self.stream = store, node, stream
        self.sent: list[protocol.Message] = []
        #: What each ``send`` was handed.
        self.raw: list[bytes] = []
        self.closed = False
        self.is_up = False
        self._decoder = MessageDecoder()

    def send(self, data: bytes) -> None:
        self.raw.append(data)
        self._decoder.feed(data)
        while (m := self._decoder.next_message()) is not None:
            self.sent.append(m)

    def close(self) -> None:
        self.closed = True

    def up(self) -> None:
        """The channel is up and the replica answers the OPEN."""
        if not self.is_up:
            self.is_up = True
            self.store.stream_open(self.node, self.stream)
            self.ack(self.stream.first_seq - 1)

    def ack(self, applied: int, durable: int = 0) -> None:
        data = protocol.encode(protocol.Ack(VOLUME, self.stream.epoch, applied, durable))
        for acked in self.stream.feed(data):
            self.store.on_acked(self.node, self.stream, acked)

    def ops(self) -> list[protocol.Message]:
        return [m for m in self.sent if not isinstance(m, protocol.Open)]


class Harness:
    def __init__(self, *, hold_timeout: float = 30.0, size: int = 1 << 20) -> None:
        self.now = 100.0
        self.links: dict[str, FakeLink] = {}
        self.lagged = 0
        self.inner = MemoryBlockStore(size, BS)
        self.store = ReplicatedStore(
            self.inner,
            VOLUME,
            "n1",
            clock=lambda: self.now,
            open_link=self.open_link,
            ack_timeout=2.0,
            hold_timeout=hold_timeout,
            on_lagging=self.on_lagging,
        )

    def open_link(self, store: ReplicatedStore, node: str, portal: str, stream: PrimaryStream) -> FakeLink:
        link = FakeLink(store, node, stream)
        self.links[node] = link
        return link

    def on_lagging(self) -> None:
        self.lagged += 1

    async def up(self) -> None:
        """Let the started operations run, then bring up every link they opened (lazily)."""
        await settle()
        for link in list(self.links.values()):
            link.up()
        await settle()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_write_completes_only_after_every_replica_acknowledged_it() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1"), ("n3", "h:2")])
    task = asyncio.create_task(h.store.write(0, b"a" * BS))
    await h.up()
    await settle()
    assert not task.done()
    assert await h.inner.read(0, BS) == b"a" * BS  # the local write ran meanwhile
    (w,) = h.links["n2"].ops()
    assert isinstance(w, protocol.Write) and w.seq == 1 and bytes(w.data) == b"a" * BS
    h.links["n2"].ack(1)
    await settle()
    assert not task.done()  # n3 has not acknowledged
    h.links["n3"].ack(1)
    await settle()
    assert task.done() and task.exception() is None


async def test_the_writes_of_one_turn_go_to_each_replica_in_one_send_encoded_once_for_both() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1"), ("n3", "h:2")])
    first = asyncio.create_task(h.store.write(0, b"a" * BS))
    await h.up()
    for link in h.links.values():
        link.ack(1)
        link.raw.clear()
    await first
    tasks = [asyncio.create_task(h.store.write(i * BS, bytes([i]) * BS)) for i in range(1, 9)]
    await settle()
    n2, n3 = h.links["n2"], h.links["n3"]
    assert len(n2.raw) == 1 and n3.raw[0] is n2.raw[0]  # one send each, the same bytes
    assert [(m.seq, m.offset) for m in n2.ops()[1:]] == [(i + 1, i * BS) for i in range(1, 9)]
    assert all(bytes(m.data) == bytes([m.seq - 1]) * BS for m in n3.ops()[1:])
    for link in (n2, n3):
        link.ack(9)
    await asyncio.gather(*tasks)


async def test_an_ack_in_a_turn_that_appended_sends_nothing_before_the_turn_ends() -> None:
    """An ACK arriving in the turn that queued writes (before the send at its end) does not send
    them to its replica at once: each replica still gets this turn's writes in one send, encoded
    once for both (not a record at the ACK and the rest at the end of the turn)."""
    h = Harness()
    h.store.configure(1, [("n2", "h:1"), ("n3", "h:2")])
    first = h.store.write_forward(0, b"a" * BS)
    assert first == 1
    await h.up()
    n2, n3 = h.links["n2"], h.links["n3"]
    for link in (n2, n3):
        link.raw.clear()
    # One turn: a write, n2's ACK of op 1, another write.
    assert h.store.write_forward(BS, b"b" * BS) == 2
    n2.ack(1)
    assert n2.raw == []  # nothing sent at the ACK: the end of the turn sends
    assert h.store.write_forward(2 * BS, b"c" * BS) == 3
    await settle()
    assert len(n2.raw) == 1 and len(n3.raw) == 1 and n2.raw[0] is n3.raw[0]
    assert [m.seq for m in n2.ops()[-2:]] == [2, 3]
    n3.ack(1)
    await h.store.written(1)
    done = h.store.written(3)
    for link in (n2, n3):
        link.ack(3)
    await done


async def test_touched_records_every_region_a_write_covers(tmp_path: Path) -> None:
    """The op index that last wrote each region (what a checkpoint may clear): one entry for a
    write inside a region, one per region for a write across a boundary."""
    h = Harness(size=4 * REGION_SIZE)
    h.store.configure(1, [("n2", "h:1")])
    h.store.dirty_map = DirtyMap.open(tmp_path / "v.dirty", VOLUME, 1 << 22, missing_clean=True)
    assert h.store.write_forward(REGION_SIZE - BS, b"a" * BS) == 1
    assert h.store.touched == {0: 1}
    assert h.store.write_forward(REGION_SIZE - BS, b"b" * 2 * BS) == 2
    assert h.store.touched == {0: 2, 1: 2}
    assert h.store.write_forward(2 * REGION_SIZE, b"c" * BS) == 3
    assert h.store.touched == {0: 2, 1: 2, 2: 3}
    await h.up()
    h.links["n2"].ack(3)
    await h.store.written(3)
    h.store.dirty_map.close()


async def test_a_replica_at_another_position_gets_its_own_encoding() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1")])
    task = asyncio.create_task(h.store.write(0, b"a" * BS))
    await h.up()
    h.links["n2"].ack(1)
    await task
    h.store.configure(2, [("n2", "h:1"), ("n3", "h:2")])  # n3 added: starts at op 2, seq 1
    tasks = [asyncio.create_task(h.store.write(i * BS, bytes([i]) * BS)) for i in range(1, 4)]
    await h.up()
    assert [m.seq for m in h.links["n3"].ops()] == [1, 2, 3]
    assert [m.seq for m in h.links["n2"].ops()] == [1, 2, 3]  # a new epoch: seq 1 again
    h.store.configure(2, [("n2", "h:1"), ("n3", "h:2")])
    for link in h.links.values():
        link.ack(3)
    await asyncio.gather(*tasks)


async def test_a_flush_waits_for_durability_not_just_applied() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1")])
    task = asyncio.create_task(h.store.flush())
    await h.up()
    await settle()
    assert isinstance(h.links["n2"].ops()[0], protocol.Flush)
    h.links["n2"].ack(1, 0)
    await settle()
    assert not task.done()
    h.links["n2"].ack(1, 1)
    await settle()
    assert task.done() and task.exception() is None


async def test_writes_wait_before_the_first_configuration_and_are_sent_once_known() -> None:
    h = Harness()
    task = asyncio.create_task(h.store.write(BS, b"b" * BS))
    await h.up()
    await settle()
    assert not task.done()
    h.store.configure(1, [("n2", "h:1")])
    h.links["n2"].up()
    assert [m.seq for m in h.links["n2"].ops()] == [1]
    h.links["n2"].ack(1)
    await settle()
    assert task.done()


async def test_no_replicas_is_the_plain_store() -> None:
    h = Harness()
    h.store.configure(1, [])
    await h.store.write(0, b"c" * BS)
    await h.store.flush()
    assert h.links == {}
    assert await h.inner.read(0, BS) == b"c" * BS


async def test_a_lagging_replica_is_reported_and_writes_wait_until_a_new_epoch_drops_it() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1"), ("n3", "h:2")])
    task = asyncio.create_task(h.store.write(0, b"d" * BS))
    await h.up()
    await settle()
    h.links["n2"].ack(1)
    h.now += 1.9
    assert not h.store.check(h.now)
    assert {s.node_id: s.state for s in h.store.replica_states(h.now)} == {
        "n2": SyncState.IN_SYNC,
        "n3": SyncState.IN_SYNC,
    }
    h.now += 0.1
    assert h.store.check(h.now) and h.lagged == 1
    assert {s.node_id: s.state for s in h.store.replica_states(h.now)}["n3"] is SyncState.FAILED
    await settle()
    assert not task.done()  # never completed without n3 while n3 is in sync
    old_n2 = h.links["n2"]
    h.store.configure(2, [("n2", "h:1")])  # the master dropped n3 under epoch 2
    await settle()
    assert task.done() and task.exception() is None
    assert h.links["n3"].closed and old_n2.closed
    later = asyncio.create_task(h.store.write(BS, b"d" * BS))
    await h.up()
    assert h.links["n2"] is not old_n2 and h.links["n2"].stream.epoch == 2
    assert "n3" not in h.store.replicas
    h.links["n2"].ack(1)
    await settle()
    assert later.done() and later.exception() is None


async def test_a_new_epoch_resends_what_a_replica_has_not_acknowledged() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1")])
    first = asyncio.create_task(h.store.write(0, b"e" * BS))
    second = asyncio.create_task(h.store.write(BS, b"f" * BS))
    await h.up()
    await settle()
    h.links["n2"].ack(1)
    await settle()
    assert first.done() and not second.done()
    h.store.configure(2, [("n2", "h:1")])
    link = h.links["n2"]
    link.up()
    (again,) = link.ops()
    assert isinstance(again, protocol.Write) and again.epoch == 2 and again.seq == 1 and again.offset == BS
    link.ack(1)
    await settle()
    assert second.done() and second.exception() is None


async def test_past_the_hold_bound_a_write_fails_retryably_never_succeeds() -> None:
    h = Harness(hold_timeout=0.05)
    h.store.configure(1, [("n2", "h:1")])
    assert h.links == {}  # opened lazily, by the first operation
    with pytest.raises(StoreUnavailable, match="n2"):
        await h.store.write(0, b"g" * BS)


async def test_a_write_larger_than_a_message_is_split_and_waits_for_its_last_part() -> None:
    h = Harness()
    h.inner = MemoryBlockStore(4 << 20, BS)
    h.store.inner = h.inner
    h.store.configure(1, [("n2", "h:1")])
    data = bytes(range(256)) * (protocol.MAX_PAYLOAD // 256 + 16)
    task = asyncio.create_task(h.store.write(0, data))
    await h.up()
    await settle()
    ops = h.links["n2"].ops()
    assert [len(m.data) for m in ops if isinstance(m, protocol.Write)] == [protocol.MAX_PAYLOAD, 4096]
    h.links["n2"].ack(1)
    await settle()
    assert not task.done()
    h.links["n2"].ack(2)
    await settle()
    assert task.done()


async def test_a_write_may_run_outside_a_task() -> None:
    """The iSCSI server steps a command eagerly, outside any asyncio Task, until it suspends
    (frontend/server.py): waiting for the replicas must work there (no asyncio.timeout)."""
    h = Harness()
    h.store.configure(1, [("n2", "h:1")])
    coro = h.store.write(0, b"h" * BS)  # its link is opened and never answers
    loop = asyncio.get_running_loop()
    stepped: asyncio.Future[object] = loop.create_future()

    def step() -> None:  # a loop callback: no current task
        try:
            stepped.set_result(coro.send(None))
        except BaseException as e:
            stepped.set_exception(e)

    loop.call_soon(step)
    assert isinstance(await stepped, asyncio.Future)  # suspended on the replicas' ACK
    coro.close()


async def test_standing_down_fails_the_waiting_writes_and_stops_forwarding() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1")])
    task = asyncio.create_task(h.store.write(0, b"i" * BS))
    await h.up()
    h.store.stand_down()  # demoted: a new epoch made another node primary
    await settle()
    assert isinstance(task.exception(), StoreUnavailable)
    assert h.links["n2"].closed and h.store.replicas == {} and h.store.epoch is None
    h.store.configure(3, [("n3", "h:2")])  # primary again later: afresh, nothing old resent
    again = asyncio.create_task(h.store.write(BS, b"j" * BS))
    await h.up()
    assert [(m.epoch, m.seq) for m in h.links["n3"].ops()] == [(3, 1)]
    h.links["n3"].ack(1)
    await settle()
    assert again.done() and again.exception() is None


async def test_a_write_whose_local_io_runs_across_the_stand_down_fails_at_once() -> None:
    """Demoted while a write's local I/O runs: when that returns, the write fails (retryably) at
    once rather than wait the hold bound for replicas it will never hear from again."""
    h = Harness(hold_timeout=30.0)
    h.store.configure(1, [("n2", "h:1")])
    release = asyncio.Event()
    write = h.inner.write

    async def slow_write(offset: int, data: bytes | bytearray | memoryview) -> None:
        await release.wait()
        await write(offset, data)

    h.inner.write = slow_write  # type: ignore[method-assign]
    task = asyncio.create_task(h.store.write(0, b"s" * BS))
    await h.up()
    h.store.stand_down()
    release.set()
    await settle()
    assert task.done() and isinstance(task.exception(), StoreUnavailable)
    assert "no longer the volume's primary" in str(task.exception())


async def test_a_restarted_primary_resumes_the_epoch_where_the_replica_stands() -> None:
    """Same epoch, new process: the replica refuses seq 1 as a REPEAT at its position (520); the
    next stream goes on at 521 and the write completes once it is acknowledged there."""
    h = Harness()
    h.store.configure(1, [("n2", "h:1")])
    task = asyncio.create_task(h.store.write(0, b"k" * BS))
    await settle()
    first = h.links["n2"]
    h.store.on_link_lost("n2", first.stream, "repeat", ahead=520)
    h.store._reconnect("n2")  # the 50 ms timer's callback
    again = h.links["n2"]
    assert again is not first and again.stream.first_seq == 521
    again.up()
    assert [m.seq for m in again.ops()] == [521]
    again.ack(521)
    await settle()
    assert task.done() and task.exception() is None


async def test_writes_of_one_turn_share_one_hold_timer_yet_complete_and_cancel_on_their_own() -> None:
    """The operations that start waiting in one turn of the loop share one waiter entry and one
    hold timer (not one each); each still completes when its own op is acknowledged, an aborted
    one leaves the others waiting, and past the bound all of them fail retryably."""
    h = Harness(hold_timeout=5.0)
    h.store.configure(1, [("n2", "h:1")])
    loop = asyncio.get_running_loop()
    timers = 0
    real_call_later = loop.call_later

    def counting_call_later(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += 1
        return real_call_later(delay, callback, *args)

    loop.call_later = counting_call_later  # type: ignore[method-assign]
    try:
        tasks = [asyncio.create_task(h.store.write(i * BS, bytes([i]) * BS)) for i in range(4)]
        await h.up()
        assert timers == 1 and len(h.store._waiters) == 1
        tasks[1].cancel()  # an aborted command
        h.links["n2"].ack(1)
        await settle()
        assert tasks[0].done() and tasks[0].exception() is None
        assert tasks[1].cancelled() and not tasks[2].done() and not tasks[3].done()
        h.links["n2"].ack(3)
        await settle()
        assert tasks[2].done() and not tasks[3].done()
        (waiters,) = h.store._waiters
        assert waiters.timer is not None
        h.store._expire(waiters)  # the hold timer's callback: the bound passed
        await settle()
        assert isinstance(tasks[3].exception(), StoreUnavailable) and h.store._waiters == []
    finally:
        loop.call_later = real_call_later  # type: ignore[method-assign]


async def test_inline_io_only_where_the_awaited_call_is_the_inner_store() -> None:
    """The iSCSI fast path (store.blockstore.InlineIo): reads always; writes only with no replica
    and a configured epoch; with replicas a write must await their ACKs, so it declines."""
    h = Harness()
    assert not h.store.write_now(0, b"d" * BS)          # no epoch yet: writes wait
    h.store.configure(1, [])
    assert h.store.write_now(0, b"d" * BS)
    assert h.store.read_now(0, BS) == b"d" * BS == await h.inner.read(0, BS)
    h.store.configure(2, [("n2", "h:1")])
    assert not h.store.write_now(0, b"e" * BS)
    assert h.store.read_now(0, BS) == b"d" * BS


async def test_a_waiter_after_its_turns_entry_was_woken_gets_an_entry_of_its_own() -> None:
    """The writes of one loop turn share an entry; once that entry is woken (every op in it
    acknowledged), a write that starts waiting later in the same turn must not join it (nothing
    would wake it again): it gets a new entry and completes on its own ACK."""
    h = Harness()
    h.store.configure(1, [("n2", "h:1")])
    first = asyncio.create_task(h.store.write(0, b"a" * BS))
    second = asyncio.create_task(h.store.write(BS, b"b" * BS))
    await h.up()
    assert not first.done() and not second.done()
    # One turn, stepped by hand: a waiter for op 1, its ACK, then a waiter for op 2.
    early = h.store._wait(1, durable=False)
    early_future = early.send(None)
    h.links["n2"].ack(1)
    assert early_future.done()
    late = h.store._wait(2, durable=False)
    late_future = late.send(None)
    h.links["n2"].ack(2)
    assert late_future.done(), "the late waiter joined an entry that was already woken"
    for coro in (early, late):
        with pytest.raises(StopIteration):
            coro.send(None)
    await settle()
    assert first.done() and second.done()
