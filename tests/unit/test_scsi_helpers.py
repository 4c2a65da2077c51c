"""Shared helpers for the SCSI logical unit tests: CDB builders and result decoding."""

from __future__ import annotations

import asyncio
import struct

from frontend.scsi.lu import LogicalUnit, LuIdentity
from frontend.scsi.opcodes import SANITIZE_ACTIONS
from frontend.scsi.types import Nexus, ScsiRequest, ScsiResult, ScsiStatus
from store.memstore import MemoryBlockStore

A = Nexus("iqn.1994-05.com.example:a", 0x23D000000001, "iqn.2026-11.io.sparrow:vol", 1)
B = Nexus("iqn.1994-05.com.example:b", 0x23D000000002, "iqn.2026-11.io.sparrow:vol", 1)

BS = 512
NBLOCKS = 4096
IDENTITY = LuIdentity(volume="vol", serial="0123456789abcdef", naa=bytes.fromhex("6" + "0" * 31))


def make_lu(
    nblocks: int = NBLOCKS, block_size: int = BS, *, supports_unmap: bool = True, tpgt: int = 1
) -> tuple[LogicalUnit, MemoryBlockStore]:
    store = MemoryBlockStore(nblocks * block_size, block_size, supports_unmap=supports_unmap)
    return LogicalUnit(store, IDENTITY, tpgt=tpgt, sanitize_actions=SANITIZE_ACTIONS), store


def request(cdb: bytes, data: bytes | bytearray | memoryview = b"", nexus: Nexus = A) -> ScsiRequest:
    return ScsiRequest(
        nexus=nexus, lun=0, cdb=bytes(cdb).ljust(16, b"\0"), data_out=data, expected_length=len(data)
    )


async def run(
    lu: LogicalUnit, cdb: bytes, data: bytes | bytearray | memoryview = b"", nexus: Nexus = A
) -> ScsiResult:
    return await lu.execute(request(cdb, data, nexus))


def sense(res: ScsiResult) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of a CHECK CONDITION result."""
    assert res.status == ScsiStatus.CHECK_CONDITION, res
    assert res.sense is not None
    return res.sense[2] & 0x0F, res.sense[12], res.sense[13]


def information(res: ScsiResult) -> int:
    assert res.sense is not None and res.sense[0] & 0x80, "VALID bit must be set"
    return int(struct.unpack_from(">I", res.sense, 3)[0])


def field_pointer(res: ScsiResult) -> tuple[bool, int]:
    """(C/D bit, byte) of the sense-key specific field pointer."""
    assert res.sense is not None and res.sense[15] & 0x80, "SKSV must be set"
    return bool(res.sense[15] & 0x40), int(struct.unpack_from(">H", res.sense, 16)[0])


def good(res: ScsiResult) -> ScsiResult:
    assert res.status == ScsiStatus.GOOD, (res.status, res.sense)
    return res


# ---- CDB builders ---------------------------------------------------------------------------------


def tur() -> bytes:
    return bytes(6)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def read6(lba: int, n: int) -> bytes:
    return struct.pack(">BBHBB", 0x08, (lba >> 16) & 0x1F, lba & 0xFFFF, n & 0xFF, 0)


def write6(lba: int, n: int) -> bytes:
    return struct.pack(">BBHBB", 0x0A, (lba >> 16) & 0x1F, lba & 0xFFFF, n & 0xFF, 0)


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def read10(lba: int, n: int, flags: int = 0) -> bytes:
    return rw10(0x28, lba, n, flags)


def write10(lba: int, n: int, flags: int = 0) -> bytes:
    return rw10(0x2A, lba, n, flags)


def read16(lba: int, n: int, flags: int = 0) -> bytes:
    return rw16(0x88, lba, n, flags)


def write16(lba: int, n: int, flags: int = 0) -> bytes:
    return rw16(0x8A, lba, n, flags)


def compare_and_write(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQBBBBBB", 0x89, flags, lba, 0, 0, 0, n, 0, 0)


def write_same10(lba: int, n: int, flags: int = 0) -> bytes:
    return rw10(0x41, lba, n, flags)


def write_same16(lba: int, n: int, flags: int = 0) -> bytes:
    return rw16(0x93, lba, n, flags)


def unmap(plen: int, anchor: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x42, anchor, 0, 0, plen, 0)


def unmap_params(*extents: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in extents)
    return struct.pack(">HH4x", len(descs) + 6, len(descs)) + descs


def get_lba_status(lba: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def read_capacity10() -> bytes:
    return bytes((0x25,)) + bytes(9)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, subpage: int = 0) -> bytes:
    return struct.pack(">BBBBBB", 0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0)


def mode_sense10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 1024) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBBxxxHB", 0x5A, flags, (pc << 6) | page, 0, alloc, 0)


def mode_select6(plen: int, sp: bool = False) -> bytes:
    return struct.pack(">BBBBBB", 0x15, 0x10 | (0x01 if sp else 0), 0, 0, plen, 0)


def request_sense(alloc: int = 252, desc: bool = False) -> bytes:
    return struct.pack(">BBBBBB", 0x03, 0x01 if desc else 0, 0, 0, alloc, 0)


def report_luns(alloc: int = 64, select: int = 0) -> bytes:
    return struct.pack(">BBBxxxIBB", 0xA0, 0, select, alloc, 0, 0)


def rsoc(option: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False, alloc: int = 65535) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | option, opcode, sa, alloc, 0, 0)


def rtpg(fmt: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBxxxxIBB", 0xA3, 0x0A | (fmt << 5), alloc, 0, 0)


def sanitize(action: int, plen: int = 0, byte1_extra: int = 0) -> bytes:
    return struct.pack(">BBxxxxxHB", 0x48, action | byte1_extra, plen, 0)


def overwrite_params(pattern: bytes, count: int = 1, invert: bool = False, test: int = 0) -> bytes:
    """SANITIZE OVERWRITE parameter list (SBC-3 table 78)."""
    return struct.pack(">BxH", (0x80 if invert else 0) | (test << 5) | count, len(pattern)) + pattern


class GatedStore(MemoryBlockStore):
    """A MemoryBlockStore whose reads, writes and unmaps stop at a gate the test controls, so that
    interleavings of concurrent commands are chosen by the test, not by timing.

    ``log`` records every operation in the order it reached the store (before the gate).
    ``close()``/``open()`` the gate; ``release(n)`` lets the first ``n`` waiting operations through;
    ``await arrivals(n)`` returns once ``n`` operations are waiting.
    """

    def __init__(self, size: int, block_size: int = BS) -> None:
        super().__init__(size, block_size)
        self.log: list[tuple[str, int]] = []
        self.is_open = True
        self._waiting: list[asyncio.Future[None]] = []
        self._arrived = asyncio.Event()

    def shut(self) -> None:
        self.is_open = False

    def open(self) -> None:
        self.is_open = True
        self.release(len(self._waiting))

    def release(self, n: int = 1) -> None:
        for fut in self._waiting[:n]:
            fut.set_result(None)
        del self._waiting[:n]

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def arrivals(self, n: int = 1) -> None:
        while len(self._waiting) < n:
            self._arrived.clear()
            await self._arrived.wait()

    async def _gate(self, op: str, offset: int) -> None:
        self.log.append((op, offset))
        if self.is_open:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._arrived.set()
        await fut

    async def read(self, offset: int, length: int) -> bytes:
        await self._gate("read", offset)
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._gate("write", offset)
        await super().write(offset, data)

    async def unmap(self, offset: int, length: int) -> None:
        await self._gate("unmap", offset)
        await super().unmap(offset, length)


async def settle() -> None:
    """Let every runnable task run until it blocks (a fixed number of loop turns; no clock)."""
    for _ in range(20):
        await asyncio.sleep(0)
