"""WRITE SAME, UNMAP and GET LBA STATUS (SBC-3 5.44-5.46, 5.28, 5.6): thin provisioning."""

from __future__ import annotations

import struct

from frontend.scsi.cdb import (
    check_range,
    invalid_cdb,
    invalid_param,
    lba_out_of_range,
    truncate,
    u16,
    u32,
    u64,
)
from frontend.scsi.lubase import (
    GOOD,
    MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT,
    WRITE_SAME_CHUNK,
    LuBase,
    result_with,
)
from frontend.scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    PARAMETER_LIST_LENGTH_ERROR,
    CheckCondition,
    SenseKey,
)
from frontend.scsi.types import ScsiRequest, ScsiResult, ScsiStatus


class ProvisioningCommands(LuBase):
    """Handlers of the provisioning commands."""

    # ---- WRITE SAME, UNMAP, GET LBA STATUS (SBC-3 5.44-5.46, 5.28, 5.6) ---------------------------

    async def _write_same(
        self, req: ScsiRequest, lba: int, n: int, flags: int, length_byte: int
    ) -> ScsiResult:
        ndob = bool(flags & 0x01) and length_byte == 10
        unmap = bool(flags & 0x08)
        anchor = bool(flags & 0x10)
        if flags & 0xE0:
            raise invalid_cdb(1, 7)
        if anchor:
            raise invalid_cdb(1, 4)  # ANC_SUP=0 (and ANCHOR without UNMAP is invalid anyway)
        if unmap and not self._unmap:
            raise invalid_cdb(1, 3)
        capacity = self.capacity
        if lba > capacity:
            raise lba_out_of_range()
        if n == 0:  # WSNZ=0: up to the last logical block
            n = capacity - lba
        check_range(lba, n, capacity)
        if n > self.limits.max_write_same:
            raise invalid_cdb(length_byte)
        bs = self._bs
        data = memoryview(req.data_out).cast("B")
        if ndob:
            block = bytes(bs)
        elif len(data) != bs:
            raise invalid_cdb(length_byte)  # Data-Out must be exactly one logical block
        else:
            block = bytes(data)
        if n:
            offset, nbytes = lba * bs, n * bs
            token = await self._hold(lba, n)
            try:
                if unmap:
                    # SBC-3 4.7.3.4: UNMAP=1 asks for deallocation; the blocks then read back as
                    # zeros whatever the Data-Out held (as libiscsi's WriteSame*.UnmapUntilEnd and
                    # Linux expect: Linux sends its discard as WRITE SAME with UNMAP set).
                    await self.store.unmap(offset, nbytes)
                else:
                    chunk = block * max(1, min(n, WRITE_SAME_CHUNK // bs))
                    pos, end = offset, offset + nbytes
                    while pos < end:
                        take = min(len(chunk), end - pos)
                        await self.store.write(pos, chunk if take == len(chunk) else memoryview(chunk)[:take])
                        pos += take
            finally:
                self._ranges.release_shared(token)
            await self._flush_if_needed(False)
        return ScsiResult(ScsiStatus.GOOD, b"", None, 0 if ndob else bs)

    async def _write_same_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write_same(req, u32(cdb, 2), u16(cdb, 7), cdb[1] & 0xFE, 7)

    async def _write_same_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write_same(req, u64(cdb, 2), u32(cdb, 10), cdb[1], 10)

    async def _unmap_cmd(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if not self._unmap:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        if cdb[1] & 0x01:
            raise invalid_cdb(1, 0)  # ANCHOR: ANC_SUP=0
        plen = u16(cdb, 7)
        if plen == 0:
            return GOOD
        if plen < 8:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        params = bytes(memoryview(req.data_out).cast("B")[:plen])
        if len(params) < 8:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        desc_len = min(u16(params, 2), len(params) - 8)
        count = desc_len // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise invalid_param(2)
        capacity = self.capacity
        extents: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            lba, n = struct.unpack_from(">QI", params, 8 + 16 * i)
            check_range(lba, n, capacity)
            total += n
            if n:
                extents.append((lba, n))
        if total > MAX_UNMAP_LBA_COUNT:
            raise invalid_param(8)
        bs = self._bs
        if extents:
            first = min(lba for lba, _ in extents)
            token = await self._hold(first, max(lba + n for lba, n in extents) - first)
            try:
                for lba, n in extents:
                    await self.store.unmap(lba * bs, n * bs)
            finally:
                self._ranges.release_shared(token)
            await self._flush_if_needed(False)
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    async def _get_lba_status(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba = u64(cdb, 2)
        alloc = u32(cdb, 10)
        capacity = self.capacity
        if lba >= capacity:
            raise lba_out_of_range()
        bs = self._bs
        max_desc = max(1, min(256, (alloc - 8) // 16))
        descs: list[list[int]] = []  # [lba, count, provisioning status]
        block = lba
        calls = 0
        while block < capacity and len(descs) < max_desc and calls < 4 * max_desc + 64:
            mapped, nbytes = await self.store.mapped_extent(block * bs)
            calls += 1
            count = min(max(1, nbytes // bs), capacity - block)
            status = 0 if mapped else 1  # 0h mapped, 1h deallocated (SBC-3 table 57)
            if descs and descs[-1][2] == status and descs[-1][1] + count <= 0xFFFFFFFF:
                descs[-1][1] += count
            else:
                while count > 0xFFFFFFFF and len(descs) < max_desc:
                    descs.append([block, 0xFFFFFFFF, status])
                    block += 0xFFFFFFFF
                    count -= 0xFFFFFFFF
                if len(descs) >= max_desc:
                    break
                descs.append([block, count, status])
            block += count
        body = b"".join(struct.pack(">QIB3x", d[0], d[1], d[2]) for d in descs)
        data = struct.pack(">I4x", len(body) + 4) + body
        return result_with(ScsiStatus.GOOD, truncate(data, alloc))
