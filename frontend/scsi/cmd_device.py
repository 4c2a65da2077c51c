"""The commands about the device rather than its blocks: capacity, defects, power and medium
(SBC-3 5.11-5.25), INQUIRY, REPORT LUNS, REQUEST SENSE, mode pages, target port groups and
supported operation codes (SPC-4 6).
"""

from __future__ import annotations

import struct

from frontend.scsi import mode as modes
from frontend.scsi.cdb import invalid_cdb, truncate, u16, u32, u64
from frontend.scsi.inquiry import standard_inquiry, vpd_page
from frontend.scsi.lubase import ALUA_NOT_READY, GOOD, LuBase, result_with
from frontend.scsi.opcodes import Opcode, report_supported_operation_codes
from frontend.scsi.sense import (
    LU_NOT_READY_BECOMING_READY,
    MODE_PARAMETERS_CHANGED,
    NO_ADDITIONAL_SENSE,
    SANITIZE_COMMAND_FAILED,
    SenseKey,
    fixed_sense,
)
from frontend.scsi.types import ScsiRequest, ScsiResult, ScsiStatus

# ---- REPORT LUNS (also answered for LUNs with nothing behind them, lu.no_such_lun) ------------


def report_luns(cdb: bytes) -> ScsiResult:
    """REPORT LUNS (SPC-4 6.33): the target has exactly one logical unit, LUN 0."""
    select = cdb[2]
    if select in (0x00, 0x02):
        luns = bytes(8)
    elif select == 0x01:
        luns = b""  # well known logical units only: we have none
    else:
        raise invalid_cdb(2)
    data = struct.pack(">I4x", len(luns)) + luns
    return result_with(ScsiStatus.GOOD, truncate(data, u32(cdb, 6)))


class DeviceCommands(LuBase):
    """Handlers of the device and information commands."""

    # ---- capacity, defects, medium (SBC-3 5.11, 5.12, 5.19, 5.20, 5.25) -------------------------

    async def _read_capacity_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if not cdb[8] & 0x01 and u32(cdb, 2):
            raise invalid_cdb(2)
        last = self.capacity - 1
        return result_with(ScsiStatus.GOOD, struct.pack(">II", min(last, 0xFFFFFFFF), self._bs))

    async def _read_capacity_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if not cdb[14] & 0x01 and u64(cdb, 2):
            raise invalid_cdb(2)
        last = self.capacity - 1
        lbp = (0x80 if self._unmap else 0x00) | (0x40 if self._lbprz else 0x00)  # LBPME, LBPRZ
        data = struct.pack(">QIBBBB", last, self._bs, 0, self._lbppbe, lbp, 0).ljust(32, b"\0")
        return result_with(ScsiStatus.GOOD, truncate(data, u32(cdb, 10)))

    async def _read_defect_data_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        data = struct.pack(">BBH", 0, cdb[2] & 0x1F, 0)  # empty PLIST/GLIST in the requested format
        return result_with(ScsiStatus.GOOD, truncate(data, u16(cdb, 7)))

    async def _read_defect_data_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        data = struct.pack(">BBHI", 0, cdb[1] & 0x1F, 0, 0)
        return result_with(ScsiStatus.GOOD, truncate(data, u32(cdb, 6)))

    async def _start_stop_unit(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        condition = cdb[4] >> 4
        if condition not in (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB):
            raise invalid_cdb(4, 7)
        if condition:
            return GOOD  # no power conditions to enter: nothing to do
        if cdb[4] & 0x02:
            raise invalid_cdb(4, 1)  # LOEJ: the medium is not removable
        if not cdb[4] & 0x01 and not cdb[4] & 0x04:
            await self.store.flush()  # stopping without NO_FLUSH writes the cache out
        return GOOD

    async def _prevent_allow(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if cdb[4] & 0x03 > 1:
            raise invalid_cdb(4, 1)
        return GOOD  # not removable: prevention has no effect

    async def _test_unit_ready(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return GOOD

    # ---- SPC-4 informational commands --------------------------------------------------------------

    async def _inquiry(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if cdb[1] & 0x02:
            raise invalid_cdb(1, 1)  # CMDDT (obsolete)
        alloc = u16(cdb, 3)
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise invalid_cdb(2)
            return result_with(ScsiStatus.GOOD, truncate(standard_inquiry(self._vpd), alloc))
        page = vpd_page(cdb[2], self._vpd)
        if page is None:
            raise invalid_cdb(2)
        return result_with(ScsiStatus.GOOD, truncate(page, alloc))

    async def _report_luns(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return report_luns(cdb)

    async def _request_sense(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """REQUEST SENSE (SPC-4 6.39): a pending UA is returned and cleared; else SANITIZE IN
        PROGRESS with its progress, or SANITIZE COMMAND FAILED; else the NOT READY condition of the
        access state, or of a pause (04/01); else NO SENSE."""
        if cdb[1] & 0x01:
            raise invalid_cdb(1, 0)  # DESC: only fixed format sense data
        queue = self._uas.get(req.nexus)
        if queue:
            data = fixed_sense(SenseKey.UNIT_ATTENTION, queue.pop(0))
        elif self._sanitizing is not None:
            data = self._sanitize_in_progress().fixed_sense()  # with the progress (SBC-3 4.11.2)
        elif self._sanitize_failed is not None:
            data = fixed_sense(SenseKey.MEDIUM_ERROR, SANITIZE_COMMAND_FAILED)
        elif self._access_state in ALUA_NOT_READY:
            data = fixed_sense(SenseKey.NOT_READY, ALUA_NOT_READY[self._access_state])
        elif self._paused:
            data = fixed_sense(SenseKey.NOT_READY, LU_NOT_READY_BECOMING_READY)
        else:
            data = fixed_sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE)
        return result_with(ScsiStatus.GOOD, truncate(data, cdb[4]))

    async def _mode_sense(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        alloc = u16(cdb, 7) if cdb[0] == Opcode.MODE_SENSE_10 else cdb[4]
        data = modes.mode_sense(cdb, self._mode, modes.Geometry(self.capacity, self._bs))
        return result_with(ScsiStatus.GOOD, truncate(data, alloc))

    async def _mode_select(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        plen = u16(cdb, 7) if cdb[0] == Opcode.MODE_SELECT_10 else cdb[4]
        params = memoryview(req.data_out).cast("B")[:plen]
        new = modes.mode_select(cdb, params, self._mode, self._bs)
        if new != self._mode:
            self._mode = new
            # SPC-4 7.5.2: other I_T nexuses learn of the change through MODE PARAMETERS CHANGED.
            self._queue_ua_all(MODE_PARAMETERS_CHANGED, except_nexus=req.nexus)
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    async def _report_target_port_groups(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """One target port group, numbered like our TPGT, holding our one port (SPC-4 6.37)."""
        fmt = cdb[1] >> 5
        if fmt not in (0, 1):
            raise invalid_cdb(1, 7)
        supported = 0x80 | 0x08 | 0x04 | 0x02 | 0x01  # T_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP
        desc = struct.pack(">BBHBBBB", int(self._access_state), supported, self.tpgt, 0, 0, 0, 1)
        desc += struct.pack(">HH", 0, self.tpgt)
        if fmt == 1:
            data = struct.pack(">IBBH", len(desc) + 4, 0x10, 0, 0) + desc
        else:
            data = struct.pack(">I", len(desc)) + desc
        return result_with(ScsiStatus.GOOD, truncate(data, u32(cdb, 6)))

    async def _report_supported_opcodes(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return result_with(ScsiStatus.GOOD, report_supported_operation_codes(cdb, self._table))
