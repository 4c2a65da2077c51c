"""Clearing dirty bits (docs/replication.md, "Clearing dirty bits"): the primary's checkpoints.

A dirty bit may be cleared only once every copy of the assignment holds the same data in its region,
durably. A checkpoint round of a volume whose every copy is in sync (``ReplicatedStore.checkpoint_due``):

1. Hold off writers for an instant (the LU's range lock over every block, exclusive: the writes in
   flight finish first) and queue a FLUSH for every replica at op index ``f``: every op before it
   has completed on this copy.
2. Flush this copy, and wait until every in-sync replica has made ``f`` durable.
3. If every copy is still in sync, queue a CHECKPOINT up to ``f``: each replica clears the bits
   that ops of this primary session up to ``f`` set (``ReplicaConnection._touch``), and this copy
   clears the bits its own writes up to ``f`` set; bits that were set before (sticky: an earlier
   process or primary, another session) stay. The clears reach the disk lazily.

A copy that falls behind in the meantime is dropped by the master and resynced from the union of
the dirty maps, in which everything after ``f`` is still set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from frontend.scsi.rangelock import RangeLock
from store.blockstore import StoreError

if TYPE_CHECKING:
    from sparrow.node.replicated_store import ReplicatedStore

log = structlog.get_logger("sparrow.node.checkpoint")

#: Seconds between checkpoint rounds of a volume (bits written meanwhile stay set until the next).
CHECKPOINT_INTERVAL = 5.0
#: Past every block of any volume (an exclusive claim over the whole LU).
ALL_BLOCKS = 1 << 62


async def checkpoint_round(store: ReplicatedStore, lock: RangeLock) -> int:
    """One round (see the module docstring); the regions cleared on this copy (0: none, or the
    round was abandoned because a copy fell out of sync or did not answer in time)."""
    epoch = store.epoch
    token = await lock.acquire_exclusive(0, ALL_BLOCKS)
    try:
        if not store.checkpoint_due() or store.epoch != epoch:
            return 0
        upto = store.flush_everywhere()
    finally:
        lock.release_exclusive(token)
    try:
        await store.inner.flush()
        await store.durable_everywhere(upto)
    except StoreError as e:
        log.info("checkpoint abandoned", volume_id=store.volume_id, reason=str(e))
        return 0
    if store.epoch != epoch or not store.checkpoint_due():
        return 0
    cleared = store.checkpoint(upto)
    if store.dirty_map is not None:
        try:
            await store.dirty_map.sync()
        except StoreError as e:
            log.warning("dirty map not written", volume_id=store.volume_id, error=str(e))
    log.debug("checkpoint", volume_id=store.volume_id, epoch=epoch, upto=upto, cleared=len(cleared))
    return len(cleared)
