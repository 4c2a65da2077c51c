"""Decoding helpers for CDB fields (SPC-4 4.2, SBC-3 5).

Every helper reads big-endian fields with ``struct.unpack_from`` and raises ``CheckCondition`` with a
sense-key specific field pointer (SPC-4 4.5.2.4.2) when a field is invalid, so command handlers stay
short: ``lba, n = rw10(cdb)`` then ``check_range(lba, n, capacity)``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from frontend.scsi.sense import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    CheckCondition,
    FieldPointer,
    SenseKey,
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

#: CDB length of each opcode group (SPC-4 4.2.5.1, table 4); groups 3, 6 and 7 are reserved/vendor.
_GROUP_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}


def u16(buf: bytes | bytearray | memoryview, offset: int) -> int:
    return int(_U16.unpack_from(buf, offset)[0])


def u32(buf: bytes | bytearray | memoryview, offset: int) -> int:
    return int(_U32.unpack_from(buf, offset)[0])


def u64(buf: bytes | bytearray | memoryview, offset: int) -> int:
    return int(_U64.unpack_from(buf, offset)[0])


def cdb_length(opcode: int) -> int | None:
    """The CDB length implied by the opcode's group code, or None for reserved groups."""
    return _GROUP_LENGTH.get(opcode >> 5)


def invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at ``byte`` (and ``bit``)."""
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field=FieldPointer(in_cdb=True, byte=byte, bit=bit)
    )


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at ``byte`` of the Data-Out."""
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST,
        INVALID_FIELD_IN_PARAMETER_LIST,
        field=FieldPointer(in_cdb=False, byte=byte, bit=bit),
    )


def lba_out_of_range() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def check_range(lba: int, nblocks: int, capacity: int) -> None:
    """SBC-3 4.5: LBA OUT OF RANGE when the LBA or the last block addressed is past the capacity."""
    if lba > capacity or lba + nblocks > capacity:
        raise lba_out_of_range()


@dataclass(frozen=True, slots=True)
class BlockRange:
    """The LBA, block count and flag byte (byte 1) of a READ/WRITE-family CDB."""

    lba: int
    nblocks: int
    flags: int


def rw6(cdb: bytes) -> BlockRange:
    """READ(6)/WRITE(6) (SBC-3 5.15, 5.40): 21-bit LBA; a TRANSFER LENGTH of 0 means 256 blocks."""
    lba = ((cdb[1] & 0x1F) << 16) | u16(cdb, 2)
    n = cdb[4] or 256
    return BlockRange(lba, n, 0)


def rw10(cdb: bytes) -> BlockRange:
    """10-byte CDBs with LBA in bytes 2-5 and length in bytes 7-8 (READ/WRITE/VERIFY(10) ...)."""
    return BlockRange(u32(cdb, 2), u16(cdb, 7), cdb[1])


def rw12(cdb: bytes) -> BlockRange:
    """12-byte CDBs with LBA in bytes 2-5 and length in bytes 6-9."""
    return BlockRange(u32(cdb, 2), u32(cdb, 6), cdb[1])


def rw16(cdb: bytes) -> BlockRange:
    """16-byte CDBs with LBA in bytes 2-9 and length in bytes 10-13."""
    return BlockRange(u64(cdb, 2), u32(cdb, 10), cdb[1])


def truncate(data: bytes | bytearray, allocation_length: int) -> bytes | bytearray:
    """SPC-4 4.2.5.6: return no more than the allocation length."""
    return data if len(data) <= allocation_length else data[:allocation_length]
