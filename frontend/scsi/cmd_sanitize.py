"""SANITIZE (SBC-3 4.11, 5.30): an operation of the logical unit that outlives its command."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from frontend.scsi.cdb import invalid_cdb, invalid_param, u16
from frontend.scsi.lubase import (
    ALL_BLOCKS,
    GOOD,
    SANITIZE_UNMAP_CHUNK,
    SANITIZE_WRITE_CHUNK,
    LuBase,
    SanitizeRun,
)
from frontend.scsi.opcodes import SanitizeAction
from frontend.scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    PARAMETER_LIST_LENGTH_ERROR,
    SANITIZE_COMMAND_FAILED,
    CheckCondition,
    SenseKey,
)
from frontend.scsi.types import ScsiRequest, ScsiResult, ScsiStatus
from store.blockstore import StoreError


class SanitizeCommands(LuBase):
    """The SANITIZE command and the operation it starts."""

    # ---- SANITIZE (SBC-3 4.11, 5.30) ---------------------------------------------------------------

    @property
    def sanitize_in_progress(self) -> bool:
        return self._sanitizing is not None

    async def sanitize_done(self) -> None:
        """Wait until no sanitize operation is running (tests; an orderly shutdown)."""
        run = self._sanitizing
        if run is not None and run.task is not None:
            await asyncio.shield(run.task)

    async def _sanitize(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """SANITIZE (SBC-3 5.30). The operation runs as a task of the logical unit, not of the
        command: an aborted command, a LUN or target reset, or the loss of the I_T nexus leaves it
        running (SBC-3 4.11.2); meanwhile every command but INQUIRY, REPORT LUNS and REQUEST SENSE
        gets NOT READY / SANITIZE IN PROGRESS with the progress in the sense data.

        Service actions: OVERWRITE writes the initialization pattern over every logical block,
        OVERWRITE COUNT times (alternating with its inverse when INVERT=1, the last pass writing the
        pattern itself). BLOCK ERASE deallocates every logical block (reads then return zeros).
        CRYPTO ERASE: Sparrow stores no encryption key, so there is no key to change; CRYPTO ERASE
        is carried out like BLOCK ERASE, by deallocating every block, which makes every block read
        as zeros and its old data unrecoverable through the logical unit. EXIT FAILURE MODE ends the
        failure mode of a failed sanitize that was started with AUSE=1.
        """
        if not self._unmap:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        immed = bool(cdb[1] & 0x80)
        ause = bool(cdb[1] & 0x20)
        if cdb[1] & 0x40:
            raise invalid_cdb(1, 6)  # ZNR: not a zoned block device
        for i in range(2, 7):
            if cdb[i]:
                raise invalid_cdb(i)
        action = cdb[1] & 0x1F
        if action not in self._sanitize_actions:
            raise invalid_cdb(1, 4)
        plen = u16(cdb, 7)
        failed = self._sanitize_failed
        if action == SanitizeAction.EXIT_FAILURE_MODE:
            if plen:
                raise invalid_cdb(7)  # EXIT FAILURE MODE takes no parameter list
            if failed is not None:
                if not failed.ause:
                    # restricted completion mode: only a successful sanitize ends it (SBC-3 4.11.3)
                    raise invalid_cdb(1, 4)
                self._sanitize_failed = None
            return GOOD
        if failed is not None and not failed.ause and ause:
            raise invalid_cdb(1, 5)  # restricted mode may not be left for unrestricted (4.11.3)
        capacity = self.capacity
        if action == SanitizeAction.OVERWRITE:
            pattern, passes, invert = self._overwrite_parameters(req, plen)
            run = SanitizeRun(SanitizeAction(action), ause, total=capacity * passes)
            work = functools.partial(self._overwrite, run, capacity, pattern, passes, invert)
        else:
            if plen:
                raise invalid_cdb(7)  # BLOCK and CRYPTO ERASE take no parameter list
            run = SanitizeRun(SanitizeAction(action), ause, total=capacity)
            work = functools.partial(self._deallocate_all, run, capacity)
        # From here on the logical unit is sanitizing: later commands see it at once.
        self._sanitizing = run
        run.task = asyncio.get_running_loop().create_task(self._run_sanitize(run, work))
        if not immed:
            # shield: if this command is aborted, the operation goes on (SBC-3 4.11.2)
            await asyncio.shield(run.task)
            if run.failed:
                raise CheckCondition(SenseKey.MEDIUM_ERROR, SANITIZE_COMMAND_FAILED)
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    def _overwrite_parameters(self, req: ScsiRequest, plen: int) -> tuple[bytes, int, bool]:
        """The OVERWRITE parameter list (SBC-3 5.30.2.2, table 78): (pattern, passes, invert)."""
        bs = self._bs
        if plen < 5 or plen > bs + 4:
            raise invalid_cdb(7)
        params = memoryview(req.data_out).cast("B")[:plen]
        if len(params) < plen:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        invert = bool(params[0] & 0x80)
        if params[0] & 0x60:
            raise invalid_param(0, 6)  # TEST: no test modes
        passes = params[0] & 0x1F
        if not passes:
            raise invalid_param(0, 4)  # OVERWRITE COUNT 0
        length = u16(params, 2)
        if not length or length > bs or length != plen - 4:
            raise invalid_param(2)  # INITIALIZATION PATTERN LENGTH
        return bytes(params[4 : 4 + length]), passes, invert

    async def _overwrite(
        self, run: SanitizeRun, capacity: int, pattern: bytes, passes: int, invert: bool
    ) -> None:
        bs = self._bs
        block = (pattern * (bs // len(pattern) + 1))[:bs]
        inverse = bytes(b ^ 0xFF for b in block)
        per_chunk = max(1, SANITIZE_WRITE_CHUNK // bs)
        for n in range(passes):
            # INVERT: passes alternate, and the last one writes the pattern itself.
            data = (inverse if invert and (passes - n) % 2 == 0 else block) * per_chunk
            lba = 0
            while lba < capacity:
                count = min(per_chunk, capacity - lba)
                chunk = data if count == per_chunk else memoryview(data)[: count * bs]
                await self.store.write(lba * bs, chunk)
                lba += count
                run.done += count

    async def _deallocate_all(self, run: SanitizeRun, capacity: int) -> None:
        bs = self._bs
        per_chunk = max(1, SANITIZE_UNMAP_CHUNK // bs)
        lba = 0
        while lba < capacity:
            count = min(per_chunk, capacity - lba)
            await self.store.unmap(lba * bs, count * bs)
            lba += count
            run.done += count

    async def _run_sanitize(self, run: SanitizeRun, work: Callable[[], Awaitable[None]]) -> None:
        """The operation itself: waits for the commands already running to finish (an exclusive
        hold on every block), does the work, makes it durable. A failure puts the logical unit in
        failure mode (SBC-3 4.11.3): medium access commands then get SANITIZE COMMAND FAILED."""
        try:
            token = await self._ranges.acquire_exclusive(0, ALL_BLOCKS)
            try:
                await work()
                await self.store.flush()
            finally:
                self._ranges.release_exclusive(token)
        except (StoreError, OSError):
            run.failed = True
        finally:
            self._sanitizing = None
            self._sanitize_failed = run if run.failed else None
