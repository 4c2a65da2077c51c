"""Resync (sparrow/node/resync.py): the plan, the pacing, and a syncing replica of ReplicatedStore
driven with fake links and the time passed in (no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from frontend.scsi.rangelock import RangeLock
from sparrow.cluster.messages import SyncState
from sparrow.node import replicated_store
from sparrow.node.checkpoint import checkpoint_round
from sparrow.node.resync import Region, Resync, ResyncMetrics, TokenBucket, plan, total_bytes
from sparrow.replication import protocol
from sparrow.replication.protocol import DirtyReport
from store.dirtymap import REGION_SIZE, DirtyBitmap, DirtyMap
from store.memstore import MemoryBlockStore
from tests.unit.test_replicated_store import VOLUME, Harness, settle

MIB = 1 << 20


def bits(regions: int, *dirty: int) -> DirtyBitmap:
    b = DirtyBitmap(regions)
    for r in dirty:
        b.add(r)
    return b


# -- the plan and the pacing (sans-IO) ---------------------------------------------------------------


def test_the_plan_is_the_union_of_both_dirty_maps_in_order() -> None:
    size = 5 * MIB + 4096  # the last region is short
    own = bits(6, 1, 5)
    theirs = DirtyReport(6, bits(6, 0, 1).to_bytes())
    regions = plan(size, own, theirs)
    assert regions == (Region(0, MIB), Region(MIB, MIB), Region(5 * MIB, 4096))
    assert total_bytes(regions) == 2 * MIB + 4096


def test_a_report_that_does_not_fit_the_volume_means_a_full_copy() -> None:
    own = bits(4)
    for report in (None, DirtyReport(3, bits(3).to_bytes()), DirtyReport(4, b"\xff")):
        assert [r.offset for r in plan(4 * MIB, own, report)] == [0, MIB, 2 * MIB, 3 * MIB]
    # Clean on both sides: nothing to copy.
    assert plan(4 * MIB, own, DirtyReport(4, bits(4).to_bytes())) == ()


def test_the_token_bucket_paces_bytes() -> None:
    bucket = TokenBucket(10 * MIB, now=0.0, burst=MIB)
    assert bucket.delay(MIB, 0.0) == 0.0  # the burst
    assert bucket.delay(MIB, 0.0) == pytest.approx(0.1)
    assert bucket.delay(MIB, 0.15) == pytest.approx(0.05)  # 0.15 s paid 1.5 MiB of the 2 owed
    unlimited = TokenBucket(0, now=0.0)
    assert unlimited.delay(1 << 40, 0.0) == 0.0


# -- a syncing replica in the store ------------------------------------------------------------------


def up_with_report(h: Harness, node: str, dirty: DirtyBitmap) -> None:
    link = h.links[node]
    link.up()
    assert link.stream.report_dirty
    for data in protocol.dirty_report(VOLUME, link.stream.epoch, 0, dirty.regions, dirty.to_bytes()):
        for event in link.stream.feed(data):
            assert isinstance(event, DirtyReport)
            h.store.on_dirty_report(node, link.stream, event)


async def test_a_syncing_copy_gets_every_write_but_no_write_waits_for_it() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1")], [("n3", "h:2")])
    await settle()
    assert "n3" in h.links  # opened at once (for its dirty map), not lazily
    task = asyncio.create_task(h.store.write(0, b"a" * 4096))
    await h.up()
    h.links["n2"].ack(1)
    await settle()
    assert task.done() and task.exception() is None  # n3 never acknowledged
    (w,) = h.links["n3"].ops()
    assert isinstance(w, protocol.Write) and bytes(w.data) == b"a" * 4096
    # Lagging does not apply to it: nothing to report, no heartbeat forced.
    h.now += 60
    states = {s.node_id: s for s in h.store.replica_states(h.now)}
    assert states["n3"].state is SyncState.SYNCING and states["n2"].state is SyncState.IN_SYNC
    assert h.lagged == 0


async def test_a_region_copy_goes_to_its_replica_only_and_the_others_get_a_nop() -> None:
    h = Harness()
    h.store.configure(1, [("n2", "h:1")], [("n3", "h:2")])
    index = h.store.copy_region("n3", 0, b"c" * 4096)
    write = asyncio.create_task(h.store.write(4096, b"w" * 4096))
    await h.up()
    n2, n3 = h.links["n2"].ops(), h.links["n3"].ops()
    assert [type(m).__name__ for m in n2] == ["Nop", "Write"]
    assert [type(m).__name__ for m in n3] == ["Write", "Write"]
    assert [m.seq for m in n2] == [m.seq for m in n3] == [1, 2]  # the seqs of every stream agree
    assert index == 1
    h.links["n2"].ack(2)
    await settle()
    assert write.done()


async def test_a_resynced_copy_is_reported_in_sync_waited_for_and_joins_the_next_epoch() -> None:
    h = Harness()
    h.store.configure(1, [], [("n3", "h:2")])
    await h.up()
    h.store.resynced("n3")
    assert h.lagged == 1  # reported at once
    assert [s.state for s in h.store.replica_states(h.now)] == [SyncState.IN_SYNC]
    task = asyncio.create_task(h.store.write(0, b"a" * 4096))
    await settle()
    assert not task.done()  # from now on writes wait for it
    h.links["n3"].ack(1)
    await settle()
    assert task.done()
    old = h.links["n3"]
    h.store.configure(2, [("n3", "h:2")])  # the master added it back
    assert h.store.syncing_replica("n3") is None and old.closed


async def test_a_syncing_copy_that_holds_the_log_full_is_skipped_and_its_resync_starts_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replicated_store, "LOG_OPS", 4)
    h = Harness()
    h.store.configure(1, [("n2", "h:1")], [("n3", "h:2")])
    await h.up()
    replica = h.store.syncing_replica("n3")
    assert replica is not None
    generation = replica.generation
    first = h.links["n3"]
    for i in range(6):  # n2 keeps up, n3 never answers
        task = asyncio.create_task(h.store.write(i * 4096, b"x" * 4096))
        await h.up()
        h.links["n2"].ack(i + 1)
        await settle()
        assert task.done() and task.exception() is None, i
    assert replica.generation > generation and replica.rebase
    assert first.closed and h.links["n3"] is not first  # a new stream, re-based on its refusal


# -- the driver ----------------------------------------------------------------------------------------


async def test_the_driver_copies_the_dirty_regions_under_the_range_lock_then_reports_in_sync(
    tmp_path: Path,
) -> None:
    h = Harness()  # a 1 MiB volume: one region
    lock = RangeLock()
    h.store.configure(1, [], [("n3", "h:2")])
    await settle()
    await h.inner.write(0, b"old!" * 1024)
    resync = Resync(
        h.store,
        "n3",
        # Clean here (created in sync): the replica's own map says region 0.
        dirty=DirtyMap.open(tmp_path / "v.dirty", VOLUME, MIB, missing_clean=True),
        lock_for=lambda volume_id: lock,
        bucket=TokenBucket(0, h.now),
        metrics=ResyncMetrics(CollectorRegistry()),
        clock=lambda: h.now,
    )
    # A write in flight on the region (its shared hold): the copy must wait for it.
    token = lock.add_shared(0, 8)
    run = asyncio.create_task(resync.run())
    up_with_report(h, "n3", bits(1, 0))
    await settle()
    assert h.links["n3"].ops() == []  # waiting on the lock
    await h.inner.write(0, b"new!" * 1024)  # the write lands, then releases its hold
    lock.release_shared(token)
    for _ in range(20):
        await settle()
    copy, flush = h.links["n3"].ops()  # every copy queued, then a flush for that replica
    assert isinstance(copy, protocol.Write) and bytes(copy.data[:4096]) == b"new!" * 1024
    assert len(copy.data) == REGION_SIZE and isinstance(flush, protocol.Flush)
    h.links["n3"].ack(1)
    await settle()
    assert [(s.state, s.resync_done) for s in h.store.replica_states(h.now)] == [
        (SyncState.SYNCING, REGION_SIZE)
    ]
    assert not run.done()  # the flush is not durable yet
    h.links["n3"].ack(2, 2)
    await asyncio.wait_for(run, 1.0)
    assert resync.copied == resync.total == REGION_SIZE
    assert [(s.state, s.resync_done) for s in h.store.replica_states(h.now)] == [(SyncState.IN_SYNC, 0)]


# -- checkpoints: clearing dirty bits ------------------------------------------------------------------


async def test_a_checkpoint_round_clears_what_every_copy_made_durable(tmp_path: Path) -> None:
    h = Harness()
    h.inner = MemoryBlockStore(8 * MIB, 4096)
    h.store.inner = h.inner
    dirty = DirtyMap.open(tmp_path / "v.dirty", VOLUME, 8 * MIB, missing_clean=True)
    await dirty.mark(7 * MIB, 4096)  # dirty before this term: sticky
    h.store.dirty_map = dirty
    lock = RangeLock()
    h.store.configure(1, [("n2", "h:1")], complete=True)
    for region in (0, 3, 7):
        await dirty.mark(region * MIB, 4096)  # what the MarkingStore under it does
        task = asyncio.create_task(h.store.write(region * MIB, b"a" * 4096))
        await h.up()
        h.links["n2"].ack(h.store.last)
        await settle()
        assert task.done()
    assert h.store.checkpoint_due()
    round_ = asyncio.create_task(checkpoint_round(h.store, lock))
    await settle()
    assert isinstance(h.links["n2"].ops()[-1], protocol.Flush)
    writer = asyncio.create_task(h.store.write(5 * MIB, b"b" * 4096))  # after the flush
    await dirty.mark(5 * MIB, 4096)
    await settle()
    h.links["n2"].ack(5, 4)  # the flush (seq 4) durable, the later write applied
    cleared = await asyncio.wait_for(round_, 1.0)
    await writer
    assert cleared == 2
    assert dirty.dirty_regions() == [5, 7]  # written after the flush; sticky
    checkpoint = h.links["n2"].ops()[-1]
    assert checkpoint == protocol.Checkpoint(VOLUME, 1, 6, 4)
    assert h.store.touched == {5: 5}
    dirty.close()


async def test_no_checkpoint_while_a_copy_is_out_of_sync(tmp_path: Path) -> None:
    h = Harness()
    h.store.dirty_map = DirtyMap.open(tmp_path / "v.dirty", VOLUME, MIB, missing_clean=True)
    h.store.configure(1, [("n2", "h:1")], [("n3", "h:2")], complete=True)
    h.store.touched[0] = 1
    assert not h.store.checkpoint_due()  # n3 syncs
    h.store.configure(2, [("n2", "h:1"), ("n3", "h:2")], complete=False)
    assert not h.store.checkpoint_due()  # a copy without a portal, say
    h.store.configure(3, [("n2", "h:1"), ("n3", "h:2")], complete=True)
    assert h.store.checkpoint_due()
