"""The reconcile pass at the start of a primary's term (docs/replication.md, "Failover and the
dirty maps").

After a failover the new primary keeps the other survivors in sync (write positions are 0), yet one
of them may have applied a write the old primary sent and never acknowledged that the new primary
never got, or lack one the new primary has. Each copy marked such a region in its dirty map before
applying the write, and no checkpoint cleared it (a checkpoint needs the write durable on every
copy). So when a node begins a term as a volume's primary (the first ``ReplicatedStore.configure``
after it was not primary: a promotion, a planned failover, a restart), each in-sync replica's first
stream of the term (opened lazily, as every stream: with the term's first operation) opens with
REPORT_DIRTY, and :class:`Reconcile` copies every region of
``union(this copy's dirty map, the replica's)`` to that replica in the one ordered stream, each
under the LU's exclusive range claim (:func:`sparrow.node.resync.copy_locked`: a copy never
overwrites newer data), to that replica only (the others get a NOP). The replica stays in sync all
along: live writes go on and wait for it as for any in-sync copy (the acknowledgement rule is
unchanged), and the copies are ops like any other, so the log resends them on a new connection.

The plan is :func:`sparrow.node.resync.plan` (sans-IO); copies are paced by the node's resync
:class:`~sparrow.node.resync.TokenBucket`. A replica that leaves the in-sync set meanwhile is
resynced instead (from the same union) and its reconcile stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from sparrow.node.resync import LockFor, TokenBucket, copy_locked, plan, total_bytes
from store.dirtymap import DirtyBitmap

if TYPE_CHECKING:
    from sparrow.node.replicated_store import ReplicatedStore

log = structlog.get_logger("sparrow.node.reconcile")


class Reconcile:
    """The reconcile of in-sync replica ``node`` of ``store`` at the start of the term (see the
    module docstring); :meth:`run` until every region is queued or the replica no longer needs it."""

    def __init__(
        self,
        store: ReplicatedStore,
        node: str,
        *,
        lock_for: LockFor,
        bucket: TokenBucket,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.node = node
        self.lock_for = lock_for
        self.bucket = bucket
        self.clock = clock
        #: Bytes queued for the replica, of the plan's total.
        self.queued = 0
        self.total = 0

    def _wanted(self) -> bool:
        return self.store.reconciling(self.node) is not None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.store.reconciled(self.node)

    async def _run(self) -> None:
        replica = self.store.reconciling(self.node)
        while replica is not None and replica.dirty_report is None:  # the answer to the OPEN
            changed = replica.changed
            assert changed is not None
            changed.clear()
            await changed.wait()
            replica = self.store.reconciling(self.node)
        if replica is None or replica.dirty_report is None:
            return
        dirty = self.store.dirty_map
        own = dirty.bits.copy() if dirty is not None else DirtyBitmap(1, dirty=True)
        regions = plan(self.store.size, own, replica.dirty_report)
        self.total = total_bytes(regions)
        log.info(
            "reconcile started",
            volume_id=self.store.volume_id,
            replica=self.node,
            epoch=self.store.epoch,
            regions=len(regions),
            total_bytes=self.total,
        )
        for region in regions:
            wait = self.bucket.delay(region.length, self.clock())
            if wait > 0:
                await asyncio.sleep(wait)  # pacing, not waiting for a condition
            await self.store.room(region.length)
            if not self._wanted():
                log.info("reconcile stopped", volume_id=self.store.volume_id, replica=self.node)
                return
            if await copy_locked(self.store, self.node, region, self.lock_for, self._wanted) is None:
                log.info("reconcile stopped", volume_id=self.store.volume_id, replica=self.node)
                return
            self.queued += region.length
        log.info(
            "reconcile queued", volume_id=self.store.volume_id, replica=self.node, queued_bytes=self.queued
        )
