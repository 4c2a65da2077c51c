"""Catch-up and full rebuild (docs/replication.md, "Catch-up"): the primary's resync of one copy
that is not in the in-sync set.

The copy is a *syncing* replica of the volume's :class:`~sparrow.node.replicated_store.ReplicatedStore`:
it is fed every operation in the one ordered stream (live writes reach it while it syncs) but no
write waits for it. Its stream opens with REPORT_DIRTY, so the replica answers with its own dirty
map. :class:`Resync` then copies every region of ``union(this copy's dirty map, the replica's)``:
for each, it takes the LU's range lock on the region exclusively (the writes in flight there finish
first, new ones wait), reads it, queues it as the next op(s) of the stream (to that replica only; the
others get a NOP in its place) and releases the lock. A live write ordered before the copy is in the
data it carries; one after it is applied after it: a copy never overwrites newer data. When every
copy is acknowledged, a flush for that replica; once it is durable, the store reports the copy
IN_SYNC (``ReplicatedStore.resynced``) and the master adds it back under a new epoch.

The plan starts over (a new *generation*) when the replica skipped ops (it fell off the forward log)
or lost its stream position (it restarted): what it missed is in the dirty maps. Copies are paced by
a :class:`TokenBucket` on bytes shared by the node's resyncs (``sparrow node --resync-rate``), and at
most :data:`WINDOW` bytes of copies are unacknowledged at a time.

:func:`plan` and :class:`TokenBucket` are sans-IO (``now`` passed in); :class:`Resync` is the asyncio
driver.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from frontend.scsi.rangelock import RangeLock
from sparrow.replication.protocol import DirtyReport
from store.dirtymap import REGION_SIZE, DirtyBitmap, DirtyMap

if TYPE_CHECKING:
    from sparrow.node.replicated_store import ReplicatedStore

log = structlog.get_logger("sparrow.node.resync")

#: Default ``sparrow node --resync-rate``: bytes per second of region copies per node (0: unlimited).
DEFAULT_RESYNC_RATE = 200 << 20
#: Region copies queued and not yet acknowledged by the replica, at most.
WINDOW = 32 << 20
#: How long to wait for the LU (its range lock) before trying again.
RETRY = 0.05


@dataclass(frozen=True, slots=True)
class Region:
    offset: int
    length: int


def plan(size: int, own: DirtyBitmap, report: DirtyReport | None) -> tuple[Region, ...]:
    """The regions to copy to a replica of a ``size``-byte volume: every region dirty here or in
    the replica's ``report``, in order; a report that does not describe this volume's regions (or
    none) counts as every region dirty. The last region stops at ``size``."""
    regions = -(-size // REGION_SIZE)
    theirs: DirtyBitmap | None = None
    if report is not None and report.regions == regions:
        try:
            theirs = DirtyBitmap.from_bytes(report.bitmap, regions)
        except ValueError:
            theirs = None
    dirty = set(r for r in own if r < regions)
    if theirs is None:
        dirty = set(range(regions))
    else:
        dirty.update(theirs)
    dirty.update(range(own.regions, regions))  # the volume grew past this map: dirty
    return tuple(Region(r * REGION_SIZE, min(REGION_SIZE, size - r * REGION_SIZE)) for r in sorted(dirty))


def total_bytes(regions: Iterable[Region]) -> int:
    return sum(r.length for r in regions)


class TokenBucket:
    """Pacing on bytes (sans-IO): ``rate`` bytes per second, bursts up to ``burst`` bytes;
    ``rate`` 0 is unlimited."""

    def __init__(self, rate: int, now: float, *, burst: int | None = None) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(REGION_SIZE, rate // 10)
        self.tokens = float(self.burst)
        self.at = now

    def delay(self, size: int, now: float) -> float:
        """Take ``size`` bytes; the seconds to wait before sending them (0: at once)."""
        if self.rate == 0:
            return 0.0
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= size
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class ResyncMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.copied = Counter(
            "sparrow_resync_bytes",
            "Bytes of region copies acknowledged by syncing replicas",
            registry=registry,
        )
        self.remaining = Gauge(
            "sparrow_resync_remaining_bytes",
            "Bytes of region copies still to be acknowledged, per volume and replica",
            ["volume_id", "replica"],
            registry=registry,
        )
        self.completed = Counter(
            "sparrow_resync_completed", "Resyncs that brought a copy back in sync", registry=registry
        )


LockFor = Callable[[str], RangeLock | None]


class Resync:
    """The resync of replica ``node`` of ``store`` (see the module docstring); :meth:`run` until
    the copy is resynced or no longer syncing."""

    def __init__(
        self,
        store: ReplicatedStore,
        node: str,
        *,
        dirty: DirtyMap | None,
        lock_for: LockFor,
        bucket: TokenBucket,
        metrics: ResyncMetrics,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.node = node
        self.dirty = dirty
        self.lock_for = lock_for
        self.bucket = bucket
        self.metrics = metrics
        self.clock = clock
        #: Bytes copied (acknowledged) in the last completed resync; the plan's total.
        self.copied = 0
        self.total = 0

    async def run(self) -> None:
        try:
            while True:
                replica = self.store.syncing_replica(self.node)
                if replica is None or replica.resynced or self.store.closed:
                    return
                if await self._pass():
                    return
        finally:
            with contextlib.suppress(KeyError):
                self.metrics.remaining.remove(self.store.volume_id, self.node)

    async def _changed(self) -> bool:
        """Wait until the replica's state moves; False if it is gone (no longer syncing)."""
        replica = self.store.syncing_replica(self.node)
        if replica is None or replica.changed is None:
            return False
        replica.changed.clear()
        await replica.changed.wait()
        return self.store.syncing_replica(self.node) is replica

    async def _pass(self) -> bool:
        """One generation of the resync; True once resynced (or gone), False to start over."""
        replica = self.store.syncing_replica(self.node)
        if replica is None:
            return True
        generation = replica.generation
        while replica.dirty_report is None:  # the replica's dirty map answers the OPEN
            if not await self._changed() or replica.generation != generation:
                return self.store.syncing_replica(self.node) is None
        own = self.dirty.bits.copy() if self.dirty is not None else DirtyBitmap(1, dirty=True)
        regions = plan(self.store.size, own, replica.dirty_report)
        self.total = total_bytes(regions)
        done = 0
        replica.progress = (0, self.total)
        labels = (self.store.volume_id, self.node)
        self.metrics.remaining.labels(*labels).set(self.total)
        log.info(
            "resync started",
            volume_id=self.store.volume_id,
            replica=self.node,
            regions=len(regions),
            total_bytes=self.total,
            generation=generation,
        )
        started = self.clock()
        in_flight: collections.deque[tuple[int, int]] = collections.deque()  # (op index, bytes)
        queued = 0

        def settle() -> None:
            nonlocal done, queued
            while in_flight and in_flight[0][0] <= replica.applied:
                _, size = in_flight.popleft()
                done += size
                queued -= size
                self.metrics.copied.inc(size)
            replica.progress = (done, self.total)
            self.metrics.remaining.labels(*labels).set(self.total - done)

        for region in regions:
            while queued + region.length > WINDOW and in_flight:
                if not await self._changed() or replica.generation != generation:
                    return self.store.syncing_replica(self.node) is None
                settle()
            wait = self.bucket.delay(region.length, self.clock())
            if wait > 0:
                await asyncio.sleep(wait)  # pacing, not waiting for a condition
            await self.store.room(region.length)
            if self.store.syncing_replica(self.node) is not replica or replica.generation != generation:
                return self.store.syncing_replica(self.node) is None
            index = await self._copy(region)
            if index is None:
                return self.store.syncing_replica(self.node) is None
            in_flight.append((index, region.length))
            queued += region.length
            settle()
        flush = self.store.flush_replica(self.node)
        while replica.durable < flush:
            if not await self._changed() or replica.generation != generation:
                return self.store.syncing_replica(self.node) is None
            settle()
        settle()
        self.copied = done
        elapsed = self.clock() - started
        log.info(
            "resync done",
            volume_id=self.store.volume_id,
            replica=self.node,
            copied_bytes=done,
            seconds=round(elapsed, 3),
            mib_per_s=round(done / (1 << 20) / elapsed, 1) if elapsed > 0 else None,
        )
        self.metrics.completed.inc()
        self.store.resynced(self.node)
        return True

    async def _copy(self, region: Region) -> int | None:
        def wanted() -> bool:
            return self.store.syncing_replica(self.node) is not None

        return await copy_locked(self.store, self.node, region, self.lock_for, wanted)


async def copy_locked(
    store: ReplicatedStore, node: str, region: Region, lock_for: LockFor, wanted: Callable[[], bool]
) -> int | None:
    """Read ``region`` under the LU's exclusive range claim and queue it for ``node`` only (the
    ordering point of a region copy); its op index, or None once ``wanted()`` turns False."""
    bs = store.block_size
    while True:
        lock = lock_for(store.volume_id)
        if lock is not None:
            break
        if not wanted():
            return None
        await asyncio.sleep(RETRY)  # the LU is not exported yet: nothing writes either
    first, end = region.offset // bs, (region.offset + region.length) // bs
    token = await lock.acquire_exclusive(first, end)
    try:
        data = await store.inner.read(region.offset, region.length)
        if not wanted():
            return None
        return store.copy_region(node, region.offset, data)
    finally:
        lock.release_exclusive(token)
