"""The reconcile pass at the start of a primary's term (sparrow/node/reconcile.py): which streams
ask for the replica's dirty map, and the driver's region copies to an in-sync replica, driven with
fake links and the time passed in (no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from frontend.scsi.rangelock import RangeLock
from sparrow.cluster.messages import SyncState
from sparrow.node.reconcile import Reconcile
from sparrow.node.resync import TokenBucket
from sparrow.replication import protocol
from store.dirtymap import DirtyMap
from store.memstore import MemoryBlockStore
from tests.unit.test_node_resync import bits, up_with_report
from tests.unit.test_replicated_store import VOLUME, Harness, settle

MIB = 1 << 20


def harness(tmp_path: Path, size: int = 4 * MIB) -> tuple[Harness, list[str]]:
    """A store with a dirty map (as on a cluster node) that records each reconcile it asks for."""
    h = Harness()
    h.inner = MemoryBlockStore(size, 4096)
    h.store.inner = h.inner
    h.store.dirty_map = DirtyMap.open(tmp_path / "v.dirty", VOLUME, size, missing_clean=True)
    asked: list[str] = []
    h.store.on_reconcile = lambda store, node: asked.append(node)
    return h, asked


async def test_a_new_term_asks_each_in_sync_replica_for_its_dirty_map_until_reconciled(
    tmp_path: Path,
) -> None:
    h, asked = harness(tmp_path)
    h.store.configure(1, [("n2", "h:1"), ("n3", "h:2")])
    await settle()
    assert asked == ["n2", "n3"]
    assert h.links == {}  # streams open lazily, as before: at the first write
    write = asyncio.create_task(h.store.write(0, b"w" * 4096))
    await settle()
    assert all(h.links[n].stream.report_dirty for n in ("n2", "n3"))  # the term's first streams
    write.cancel()
    assert h.store.reconciling("n2") is not None
    h.store.reconciled("n2")
    # A new epoch in the same term: n3 (not reconciled yet) asks again, n2 no more; a copy added
    # back in sync (n4) was resynced, not reconciled.
    n2, n3 = h.links["n2"], h.links["n3"]
    h.store.configure(2, [("n2", "h:1"), ("n3", "h:2"), ("n4", "h:3")])
    await settle()
    assert asked == ["n2", "n3"]
    assert n2.closed and n3.closed
    assert not h.links["n2"].stream.report_dirty and h.links["n3"].stream.report_dirty
    assert h.store.reconciling("n4") is None and not h.links["n4"].stream.report_dirty
    # Demoted, then primary again: a new term, every in-sync replica reconciled again.
    h.store.stand_down()
    h.store.configure(4, [("n2", "h:1")])
    await settle()
    assert asked == ["n2", "n3", "n2"] and h.store.reconciling("n2") is not None


async def test_no_reconcile_without_a_dirty_map() -> None:
    h = Harness()
    asked: list[str] = []
    h.store.on_reconcile = lambda store, node: asked.append(node)
    h.store.configure(1, [("n2", "h:1")])
    await settle()
    assert asked == [] and "n2" not in h.links


async def test_the_union_is_copied_to_the_replica_under_the_range_lock_while_it_stays_in_sync(
    tmp_path: Path,
) -> None:
    h, _ = harness(tmp_path)
    assert h.store.dirty_map is not None
    await h.store.dirty_map.mark(1 * MIB, 4096)  # this copy may differ in region 1
    lock = RangeLock()
    h.store.configure(1, [("n2", "h:1"), ("n3", "h:2")])
    await h.inner.write(2 * MIB, b"old!" * 1024)
    reconcile = Reconcile(
        h.store, "n2", lock_for=lambda volume_id: lock, bucket=TokenBucket(0, h.now), clock=lambda: h.now
    )
    # A write in flight on region 2 (its shared hold): the copy must wait for it.
    token = lock.add_shared(2 * MIB // 4096, 2 * MIB // 4096 + 1)
    run = asyncio.create_task(reconcile.run())
    first = asyncio.create_task(h.store.write(0, b"w" * 4096))  # the term's first write opens the streams
    await settle()
    up_with_report(h, "n2", bits(4, 2))  # the replica may differ in region 2
    h.links["n3"].up()
    for _ in range(5):
        await settle()
    _, copy1 = h.links["n2"].ops()  # region 1 queued; region 2 waits on the lock
    assert isinstance(copy1, protocol.Write) and copy1.offset == MIB and len(copy1.data) == MIB
    await h.inner.write(2 * MIB, b"new!" * 1024)  # the write lands, then releases its hold
    lock.release_shared(token)
    await asyncio.wait_for(run, 1.0)
    _, _, copy2 = h.links["n2"].ops()
    assert isinstance(copy2, protocol.Write) and copy2.offset == 2 * MIB
    assert bytes(copy2.data[:4096]) == b"new!" * 1024
    assert [type(m).__name__ for m in h.links["n3"].ops()] == ["Write", "Nop", "Nop"]  # seqs agree
    assert reconcile.total == reconcile.queued == 2 * MIB
    assert h.store.reconciling("n2") is None  # its next stream asks for no map
    # In sync all along: writes wait for n2 as for any in-sync copy, a later one behind the copies.
    h.links["n3"].ack(1)
    await settle()
    assert not first.done()
    h.links["n2"].ack(1)
    await settle()
    assert first.done() and first.exception() is None
    later = asyncio.create_task(h.store.write(0, b"x" * 4096))
    await settle()
    h.links["n3"].ack(4)
    h.links["n2"].ack(3)
    await settle()
    assert not later.done()
    h.links["n2"].ack(4)
    await settle()
    assert later.done() and later.exception() is None
    assert [s.state for s in h.store.replica_states(h.now)] == [SyncState.IN_SYNC, SyncState.IN_SYNC]
    h.store.dirty_map.close()


async def test_a_replica_dropped_from_the_in_sync_set_is_resynced_instead(tmp_path: Path) -> None:
    h, _ = harness(tmp_path)
    lock = RangeLock()
    h.store.configure(1, [("n2", "h:1")])
    reconcile = Reconcile(
        h.store, "n2", lock_for=lambda volume_id: lock, bucket=TokenBucket(0, h.now), clock=lambda: h.now
    )
    run = asyncio.create_task(reconcile.run())
    await settle()
    h.store.configure(2, [], [("n2", "h:1")])  # syncing now: the resync copies the union
    await asyncio.wait_for(run, 1.0)
    assert reconcile.total == 0 and h.store.reconciling("n2") is None
    assert h.store.syncing_replica("n2") is not None
    assert h.store.dirty_map is not None
    h.store.dirty_map.close()
