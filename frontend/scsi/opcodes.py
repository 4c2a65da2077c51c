"""Operation codes, service actions, and REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).

The commands themselves are listed once, in commands.py; ``commands.command_table`` derives the
``CommandInfo`` entries this module encodes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from frontend.scsi.cdb import invalid_cdb, truncate, u16, u32


class Opcode(enum.IntEnum):
    """SPC-4 / SBC-3 operation codes this logical unit knows (SPC-4 annex D.3.1)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    SANITIZE = 0x48
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


class ServiceActionIn16(enum.IntEnum):
    """SERVICE ACTION IN(16) service actions (SBC-3 table 36)."""

    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class MaintenanceIn(enum.IntEnum):
    """MAINTENANCE IN service actions (SPC-4 table D.9)."""

    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C


class SanitizeAction(enum.IntEnum):
    """SANITIZE service actions (SBC-3 5.30.1, table 76)."""

    OVERWRITE = 0x01
    BLOCK_ERASE = 0x02
    CRYPTO_ERASE = 0x03
    EXIT_FAILURE_MODE = 0x1F


class RsocOption(enum.IntEnum):
    """REPORTING OPTIONS of REPORT SUPPORTED OPERATION CODES (SPC-4 table 303)."""

    ALL = 0b000
    ONE_COMMAND = 0b001
    ONE_COMMAND_WITH_SA = 0b010
    ONE_COMMAND_EITHER = 0b011


#: Timeout descriptor values (SPC-4 6.35.4), seconds: nominal and recommended command timeout.
NOMINAL_TIMEOUT = 1
RECOMMENDED_TIMEOUT = 30


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """One reported command: its opcode, service action, and CDB USAGE DATA (SPC-4 6.35.3).

    ``usage`` is the CDB usage bitmap: byte 0 is the opcode, and every other bit is set when the
    device server evaluates that bit of the CDB (a clear bit is reserved or unsupported).
    """

    opcode: int
    service_action: int | None
    usage: bytes

    @property
    def has_service_action(self) -> bool:
        return self.service_action is not None


#: The SANITIZE service actions a thin-provisioned logical unit carries out (see lu.py).
SANITIZE_ACTIONS: tuple[SanitizeAction, ...] = (
    SanitizeAction.OVERWRITE,
    SanitizeAction.BLOCK_ERASE,
    SanitizeAction.CRYPTO_ERASE,
    SanitizeAction.EXIT_FAILURE_MODE,
)


_TIMEOUTS = struct.pack(">HBBII", 0x0A, 0, 0, NOMINAL_TIMEOUT, RECOMMENDED_TIMEOUT)


def report_supported_operation_codes(cdb: bytes, table: Sequence[CommandInfo]) -> bytes | bytearray:
    """The parameter data for REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), cut to the allocation
    length. Raises ``CheckCondition`` for invalid reporting options (SPC-4 6.35.1)."""
    rctd = bool(cdb[2] & 0x80)
    option = cdb[2] & 0x07
    opcode = cdb[3]
    sa = u16(cdb, 4)
    alloc = u32(cdb, 6)
    if option == RsocOption.ALL:
        body = bytearray()
        for c in table:
            body += struct.pack(
                ">BBHBBH",
                c.opcode,
                0,
                c.service_action or 0,
                0,
                (0x02 if rctd else 0) | (0x01 if c.has_service_action else 0),
                len(c.usage),
            )
            if rctd:
                body += _TIMEOUTS
        return truncate(struct.pack(">I", len(body)) + body, alloc)
    matches = [c for c in table if c.opcode == opcode]
    has_sa = any(c.has_service_action for c in matches)
    found: CommandInfo | None
    if option == RsocOption.ONE_COMMAND:
        if has_sa:
            raise invalid_cdb(2, 0)
        found = matches[0] if matches else None
    elif option == RsocOption.ONE_COMMAND_WITH_SA:
        if matches and not has_sa:
            raise invalid_cdb(2, 0)
        found = next((c for c in matches if c.service_action == sa), None)
    elif option == RsocOption.ONE_COMMAND_EITHER:
        found = next((c for c in matches if not has_sa or c.service_action == sa), None)
    else:
        raise invalid_cdb(2, 2)
    if found is None:
        # SUPPORT 001b: not supported; no CDB usage data (SPC-4 table 306).
        return truncate(struct.pack(">BBH", 0, 0x01, 0), alloc)
    out = struct.pack(">BBH", 0, (0x80 if rctd else 0) | 0x03, len(found.usage)) + found.usage
    if rctd:
        out += _TIMEOUTS
    return truncate(out, alloc)
