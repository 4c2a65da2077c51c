"""PERSISTENT RESERVE IN/OUT and RESERVE/RELEASE(6)/(10) (SPC-4 5.13, 6.15, 6.16; SPC-2): the
handlers; the state and the rules are in reservations.py."""

from __future__ import annotations

import structlog

from frontend.scsi.cdb import invalid_cdb, truncate, u16, u32
from frontend.scsi.lubase import GOOD, LuBase, result_with
from frontend.scsi.sense import INTERNAL_TARGET_FAILURE, CheckCondition, SenseKey
from frontend.scsi.types import ScsiRequest, ScsiResult, ScsiStatus

log = structlog.get_logger("sparrow.scsi")


class ReservationCommands(LuBase):
    """Handlers of the reservation commands."""

    # ---- reservations (SPC-4 5.13, 6.15, 6.16; SPC-2 RESERVE/RELEASE(6)) -------------------------

    async def _persistent_reserve_in(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        data = self.reservations.persistent_reserve_in(req.nexus, cdb)
        return result_with(ScsiStatus.GOOD, truncate(data, u16(cdb, 7)))

    async def _persistent_reserve_out(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        plen = u32(cdb, 5)
        params = bytes(memoryview(req.data_out).cast("B")[:plen])
        outcome = self.reservations.persistent_reserve_out(req.nexus, cdb, params)
        for nexus, asc in outcome.unit_attentions:
            self._queue_ua(nexus, asc)
        if outcome.changed and self._on_reservations_changed is not None:
            try:
                await self._on_reservations_changed(self.reservations.to_record())
            except Exception as e:  # the new state is not durable: say why, and tell the initiator
                log.error("reservations not saved", volume=self.identity.volume, exc_info=e)
                raise CheckCondition(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE) from e
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    async def _reserve_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        self.reservations.reserve6(req.nexus)
        return GOOD

    async def _release_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        self.reservations.release6(req.nexus)
        return GOOD

    async def _reserve_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """RESERVE(10) (SPC-2 7.21): RESERVE(6) for this initiator; third-party reservations (3RDPTY,
        LONGID) are not supported."""
        if cdb[1] & 0x12:
            raise invalid_cdb(1, 4 if cdb[1] & 0x10 else 1)
        return await self._reserve_6(req, cdb)

    async def _release_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """RELEASE(10) (SPC-2 7.17), without third-party reservations."""
        if cdb[1] & 0x12:
            raise invalid_cdb(1, 4 if cdb[1] & 0x10 else 1)
        return await self._release_6(req, cdb)
