"""The state of a logical unit and what every command family shares (lu.py, cmd_*.py).

``LuBase`` declares the state ``LogicalUnit.__init__`` sets up; the handler modules (one class per
command family, registered by name in commands.py) derive from it and ``LogicalUnit`` combines them.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from frontend.constructors import positional_constructor
from frontend.scsi import mode as modes
from frontend.scsi.cdb import BlockRange, check_range, invalid_cdb
from frontend.scsi.inquiry import BlockLimits, VpdContext
from frontend.scsi.opcodes import CommandInfo, SanitizeAction
from frontend.scsi.rangelock import RangeLock
from frontend.scsi.reservations import Reservations
from frontend.scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    LU_NOT_ACCESSIBLE_STANDBY,
    LU_NOT_ACCESSIBLE_TRANSITION,
    LU_NOT_ACCESSIBLE_UNAVAILABLE,
    LU_NOT_READY_SANITIZE_IN_PROGRESS,
    Asc,
    CheckCondition,
    SenseKey,
    fixed_sense,
)
from frontend.scsi.types import Nexus, ScsiRequest, ScsiResult, ScsiStatus
from store.blockstore import BlockStore

if TYPE_CHECKING:
    from frontend.scsi.lu import LuIdentity


class AccessState(enum.IntEnum):
    """Asymmetric access states (SPC-4 6.37, table 279)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    TRANSITIONING = 0xF


# ---- limits (SBC-3 6.5.3) -----------------------------------------------------------------------

MAX_TRANSFER_BYTES = 32 * 1024 * 1024
OPTIMAL_TRANSFER_BYTES = 1024 * 1024
MAX_ATOMIC_BYTES = 1024 * 1024
MAX_COMPARE_AND_WRITE_BLOCKS = 255
MAX_UNMAP_DESCRIPTORS = 2048
MAX_UNMAP_LBA_COUNT = 0xFFFFFFFF  # no limit
MAX_WRITE_SAME_BYTES = 1024 * 1024 * 1024
#: Size of the buffer WRITE SAME repeats its block into.
WRITE_SAME_CHUNK = 1024 * 1024
#: Bytes a sanitize operation writes (OVERWRITE) per store call; it awaits each one, so the event
#: loop keeps serving other volumes while a sanitize runs.
SANITIZE_WRITE_CHUNK = 1024 * 1024
#: Bytes a sanitize operation deallocates (BLOCK/CRYPTO ERASE) per store call.
SANITIZE_UNMAP_CHUNK = 1024 * 1024 * 1024
#: End of every LBA range: a lock over [0, ALL_BLOCKS) covers the whole logical unit.
ALL_BLOCKS = 1 << 64
#: Unit attentions kept per I_T nexus; older ones are dropped past this.
MAX_PENDING_UAS = 16

ALUA_NOT_READY = {
    AccessState.STANDBY: LU_NOT_ACCESSIBLE_STANDBY,
    AccessState.UNAVAILABLE: LU_NOT_ACCESSIBLE_UNAVAILABLE,
    AccessState.TRANSITIONING: LU_NOT_ACCESSIBLE_TRANSITION,
}


#: ``ScsiResult(status, data, sense, transfer_length)`` without keyword handling (hot path).
make_result = positional_constructor(ScsiResult)


def result_with(
    status: ScsiStatus, data: bytes | bytearray | memoryview = b"", transfer_length: int | None = None
) -> ScsiResult:
    """A result without sense data."""
    return ScsiResult(status, data, None, transfer_length)


def check_result(key: SenseKey, code: Asc) -> ScsiResult:
    """CHECK CONDITION with fixed-format sense data."""
    return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=fixed_sense(key, code))


GOOD = ScsiResult(ScsiStatus.GOOD)
CONFLICT = ScsiResult(ScsiStatus.RESERVATION_CONFLICT)
INVALID_OPCODE = check_result(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)


@dataclass(slots=True)
class SanitizeRun:
    """One sanitize operation (SBC-3 4.11): what it does, how far it got, how it ended."""

    action: SanitizeAction
    ause: bool  # unrestricted completion mode: EXIT FAILURE MODE may end a failure
    total: int  # units of work (logical blocks written or deallocated)
    done: int = 0
    failed: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def progress(self) -> int:
        """PROGRESS INDICATION (SPC-4 4.5.2.4.4): the fraction done, in 65536ths."""
        return min(0xFFFF, self.done * 0x10000 // max(1, self.total))


class LuBase:
    """The state of one logical unit (set up by ``LogicalUnit.__init__``) and shared helpers."""

    store: BlockStore
    identity: LuIdentity
    reservations: Reservations
    _on_reservations_changed: Callable[[dict[str, Any]], Awaitable[None]] | None
    tpgt: int
    limits: BlockLimits
    _access_state: AccessState
    _mode: modes.ModeState
    _uas: dict[Nexus, list[Asc]]
    _ranges: RangeLock
    _sanitizing: SanitizeRun | None
    _paused: bool
    _sanitize_failed: SanitizeRun | None
    _bs: int
    _unmap: bool
    _lbppbe: int
    _lbprz: bool
    _max_transfer: int
    _vpd: VpdContext
    _sanitize_actions: frozenset[int]
    _table: tuple[CommandInfo, ...]

    @property
    def capacity(self) -> int:
        """Number of logical blocks, read from the store each time (it can grow)."""
        return self.store.size // self._bs

    # ---- unit attentions (SAM-5 5.14, SPC-4 4.5.5) ----------------------------------------------

    def _queue_ua(self, nexus: Nexus, asc: Asc) -> None:
        queue = self._uas.setdefault(nexus, [])
        if asc.asc == 0x29:
            queue.clear()  # a reset supersedes what was pending (SAM-5 6.3.3)
        elif asc in queue:
            return
        queue.append(asc)
        del queue[:-MAX_PENDING_UAS]

    def _queue_ua_all(self, asc: Asc, *, except_nexus: Nexus | None = None) -> None:
        for nexus in list(self._uas):
            if nexus != except_nexus:
                self._queue_ua(nexus, asc)

    # ---- helpers -----------------------------------------------------------------------------------

    def _blocks(self, r: BlockRange, length_byte: int, *, max_blocks: int | None = None) -> None:
        """PROTECT field, LBA range and transfer length checks shared by the block commands."""
        if r.flags & 0xE0:  # RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT: no protection information
            raise invalid_cdb(1, 7)
        check_range(r.lba, r.nblocks, self.capacity)
        if r.nblocks > (self._max_transfer if max_blocks is None else max_blocks):
            raise invalid_cdb(length_byte)

    async def _flush_if_needed(self, fua: bool) -> None:
        if fua or not self._mode.wce:
            await self.store.flush()

    def _payload(self, req: ScsiRequest, need: int) -> memoryview:
        """The Data-Out to write: the CDB's amount, or the whole blocks actually received when the
        initiator sent less (libiscsi test_write10_residuals: write only what arrived)."""
        data = memoryview(req.data_out).cast("B")
        if len(data) >= need:
            return data[:need] if len(data) > need else data
        return data[: len(data) - len(data) % self._bs]

    # ---- shared holds on block ranges (rangelock.py) ---------------------------------------------------

    @property
    def range_lock(self) -> RangeLock:
        """The LU's range lock: an exclusive claim waits for the writes in flight on its blocks and
        holds off new ones (a resync's region copy, sparrow/node/resync.py)."""
        return self._ranges

    async def _hold(self, lba: int, nblocks: int) -> int:
        """A shared hold on ``nblocks`` blocks from ``lba`` (release with ``_ranges.release_shared``):
        O(1) and without awaiting unless some CAW/ORWRITE/WRITE ATOMIC/SANITIZE claims blocks."""
        ranges = self._ranges
        if ranges.uncontended:
            return ranges.add_shared(lba, lba + nblocks)
        return await ranges.acquire_shared(lba, lba + nblocks)

    async def _read_blocks(self, lba: int, nblocks: int) -> bytes:
        """Read whole blocks under a shared hold (READ(10)/(16) inline the same steps)."""
        ranges = self._ranges
        if ranges.uncontended:
            token = ranges.add_shared(lba, lba + nblocks)
        else:
            token = await ranges.acquire_shared(lba, lba + nblocks)
        try:
            return await self.store.read(lba * self._bs, nblocks * self._bs)
        finally:
            ranges.release_shared(token)

    def _sanitize_in_progress(self) -> CheckCondition:
        run = self._sanitizing
        return CheckCondition(
            SenseKey.NOT_READY,
            LU_NOT_READY_SANITIZE_IN_PROGRESS,
            progress=run.progress if run is not None else None,
        )
