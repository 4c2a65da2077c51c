"""READ, WRITE, WRITE AND VERIFY, VERIFY, COMPARE AND WRITE, ORWRITE, WRITE ATOMIC, SYNCHRONIZE CACHE
and PRE-FETCH (SBC-3 5.3-5.43): the commands that move blocks. READ/WRITE(10)/(16) are the hot
path: decoded inline, with the general checks only when a command is not the plain case.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from frontend.scsi.cdb import BlockRange, check_range, invalid_cdb, rw6, rw10, rw12, rw16, u16, u64
from frontend.scsi.lubase import GOOD, MAX_COMPARE_AND_WRITE_BLOCKS, LuBase, make_result
from frontend.scsi.sense import MISCOMPARE_DURING_VERIFY, CheckCondition, SenseKey
from frontend.scsi.types import ScsiRequest, ScsiResult, ScsiStatus


def _first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (they have the same length), or -1."""
    if a == b:
        return -1
    lo, hi = 0, len(a)
    ma, mb = memoryview(a), memoryview(b)
    while hi - lo > 64:  # narrow down by halves, comparing in C
        mid = (lo + hi) // 2
        if ma[lo:mid] != mb[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if ma[i] != mb[i]:
            return i
    return -1


def _miscompare(offset: int) -> CheckCondition:
    """MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION, INFORMATION = offset of the first differing
    byte in the Data-Out buffer (SBC-3 5.3, 5.29)."""
    return CheckCondition(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)


class BlockIoCommands(LuBase):
    """Handlers of the block I/O commands."""

    async def _read(self, r: BlockRange, length_byte: int) -> ScsiResult:
        self._blocks(r, length_byte)
        need = r.nblocks * self._bs
        if not need:
            return GOOD
        data = await self._read_blocks(r.lba, r.nblocks)
        return make_result(ScsiStatus.GOOD, data, None, need)

    async def _write(
        self, req: ScsiRequest, r: BlockRange, length_byte: int, *, verify: bool = False
    ) -> ScsiResult:
        self._blocks(r, length_byte)
        need = r.nblocks * self._bs
        payload = self._payload(req, need)
        if len(payload):
            ranges = self._ranges
            lba, end = r.lba, r.lba + len(payload) // self._bs
            if ranges.uncontended:
                token = ranges.add_shared(lba, end)
            else:
                token = await ranges.acquire_shared(lba, end)
            try:
                await self.store.write(lba * self._bs, payload)
            finally:
                ranges.release_shared(token)
            # WRITE AND VERIFY reads back what is on the medium: make it durable first.
            await self._flush_if_needed(verify or bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    async def _read_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._read(rw6(cdb), 4)

    async def _read_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">IxH", cdb, 2)
        return await self._read_common(cdb, lba, n, rw10, 7)

    async def _read_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._read(rw12(cdb), 6)

    async def _read_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">QI", cdb, 2)
        return await self._read_common(cdb, lba, n, rw16, 10)

    async def _read_common(
        self, cdb: bytes, lba: int, n: int, decode: Callable[[bytes], BlockRange], length_byte: int
    ) -> ScsiResult:
        """READ(10)/(16). Hot path: an in-range, unprotected read decoded inline; anything else
        (protection bits, a range or length error) goes through ``_read``."""
        bs = self._bs
        if cdb[1] & 0xE0 or lba + n > self.store.size // bs or n > self._max_transfer:
            return await self._read(decode(cdb), length_byte)
        if not n:
            return GOOD
        ranges = self._ranges
        if ranges.uncontended:  # no CAW/ORWRITE/WRITE ATOMIC/SANITIZE anywhere
            token = ranges.add_shared(lba, lba + n)
        else:
            token = await ranges.acquire_shared(lba, lba + n)
        try:
            data = await self.store.read(lba * bs, n * bs)
        finally:
            ranges.release_shared(token)
        return make_result(ScsiStatus.GOOD, data, None, n * bs)

    async def _write_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw6(cdb), 4)

    async def _write_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">IxH", cdb, 2)
        return await self._write_common(req, cdb, lba, n, rw10, 7)

    async def _write_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw12(cdb), 6)

    async def _write_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">QI", cdb, 2)
        return await self._write_common(req, cdb, lba, n, rw16, 10)

    async def _write_common(
        self,
        req: ScsiRequest,
        cdb: bytes,
        lba: int,
        n: int,
        decode: Callable[[bytes], BlockRange],
        length_byte: int,
    ) -> ScsiResult:
        """WRITE(10)/(16). Hot path: a full, in-range, unprotected write decoded inline; anything
        else (protection bits, a range or length error, short Data-Out) goes through ``_write``."""
        bs = self._bs
        need = n * bs
        data = req.data_out
        if (
            cdb[1] & 0xE0
            or not n
            or lba + n > self.store.size // bs
            or n > self._max_transfer
            or len(data) != need
        ):
            return await self._write(req, decode(cdb), length_byte)
        ranges = self._ranges
        if ranges.uncontended:
            token = ranges.add_shared(lba, lba + n)
        else:
            token = await ranges.acquire_shared(lba, lba + n)
        try:
            await self.store.write(lba * bs, data)
        finally:
            ranges.release_shared(token)
        if cdb[1] & 0x08 or not self._mode.wce:  # FUA, or the write cache is off: durable first
            await self.store.flush()
        return make_result(ScsiStatus.GOOD, b"", None, need)

    async def _write_verify_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw10(cdb), 7, verify=True)

    async def _write_verify_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw12(cdb), 6, verify=True)

    async def _write_verify_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw16(cdb), 10, verify=True)

    # ---- VERIFY (SBC-3 5.29-5.31) ---------------------------------------------------------------

    async def _verify(self, req: ScsiRequest, r: BlockRange, length_byte: int) -> ScsiResult:
        self._blocks(r, length_byte)
        bytchk = (r.flags >> 1) & 0x3
        bs = self._bs
        if bytchk == 0b10:
            raise invalid_cdb(1, 2)
        if bytchk == 0 or not r.nblocks:
            return GOOD  # medium verification only: nothing can be wrong with our medium
        data = memoryview(req.data_out).cast("B")
        if bytchk == 0b01:
            need = r.nblocks * bs
            expected = data[: min(need, len(data) - len(data) % bs)]
        else:  # 11b: one block of Data-Out compared with every block
            need = bs
            if len(data) < bs:
                return ScsiResult(ScsiStatus.GOOD, b"", None, need)
            expected = memoryview(bytes(data[:bs]) * r.nblocks)
        if len(expected):
            medium = await self._read_blocks(r.lba, len(expected) // bs)
            at = _first_difference(expected, medium)
            if at >= 0:
                raise _miscompare(at)
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    async def _verify_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._verify(req, rw10(cdb), 7)

    async def _verify_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._verify(req, rw12(cdb), 6)

    async def _verify_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._verify(req, rw16(cdb), 10)

    # ---- COMPARE AND WRITE, ORWRITE, WRITE ATOMIC (SBC-3 5.3, 5.8; SBC-4 5.48) -------------------

    async def _compare_and_write(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        r = BlockRange(u64(cdb, 2), cdb[13], cdb[1])
        self._blocks(r, 13, max_blocks=MAX_COMPARE_AND_WRITE_BLOCKS)
        need = r.nblocks * self._bs
        data = memoryview(req.data_out).cast("B")
        if len(data) != 2 * need:
            raise invalid_cdb(13)  # Data-Out must hold the verify and the write data exactly
        if not need:
            return GOOD
        offset = r.lba * self._bs
        # SBC-3 5.3: read, compare and write are one atomic operation for every other command.
        token = await self._ranges.acquire_exclusive(r.lba, r.lba + r.nblocks)
        try:
            medium = await self.store.read(offset, need)
            at = _first_difference(data[:need], medium)
            if at >= 0:
                raise _miscompare(at)
            await self.store.write(offset, data[need:])
        finally:
            self._ranges.release_exclusive(token)
        await self._flush_if_needed(bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, 2 * need)

    async def _orwrite_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        r = rw16(cdb)
        self._blocks(r, 10)
        need = r.nblocks * self._bs
        payload = self._payload(req, need)
        if len(payload):
            offset = r.lba * self._bs
            token = await self._ranges.acquire_exclusive(r.lba, r.lba + len(payload) // self._bs)
            try:
                medium = await self.store.read(offset, len(payload))
                merged = int.from_bytes(medium, "big") | int.from_bytes(payload, "big")
                await self.store.write(offset, merged.to_bytes(len(payload), "big"))
            finally:
                self._ranges.release_exclusive(token)
            await self._flush_if_needed(bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    async def _write_atomic_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        r = BlockRange(u64(cdb, 2), u16(cdb, 12), cdb[1])
        if u16(cdb, 10):  # ATOMIC BOUNDARY: we advertise no boundary support
            raise invalid_cdb(10)
        self._blocks(r, 12, max_blocks=self.limits.max_atomic_transfer)
        need = r.nblocks * self._bs
        data = memoryview(req.data_out).cast("B")
        if len(data) < need:
            raise invalid_cdb(12)  # an atomic write is all or nothing
        if need:
            token = await self._ranges.acquire_exclusive(r.lba, r.lba + r.nblocks)
            try:
                await self.store.write(r.lba * self._bs, data[:need])
            finally:
                self._ranges.release_exclusive(token)
            await self._flush_if_needed(bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    # ---- cache (SBC-3 5.9, 5.10, 5.22, 5.23) ------------------------------------------------------

    async def _sync_cache(self, r: BlockRange) -> ScsiResult:
        check_range(r.lba, r.nblocks, self.capacity)
        await self.store.flush()
        return GOOD

    async def _sync_cache_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._sync_cache(rw10(cdb))

    async def _sync_cache_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._sync_cache(rw16(cdb))

    async def _prefetch(self, r: BlockRange) -> ScsiResult:
        """PRE-FETCH: we keep no cache of our own to load the blocks into, so per SBC-3 5.10 (the
        cache cannot hold the blocks) the command completes with GOOD, not CONDITION MET."""
        check_range(r.lba, r.nblocks, self.capacity)
        return GOOD

    async def _prefetch_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._prefetch(rw10(cdb))

    async def _prefetch_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._prefetch(rw16(cdb))
