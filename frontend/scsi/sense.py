"""SCSI sense data (SPC-4 4.5) and the error that carries it.

A command handler raises ``CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)``; the
logical unit turns it into CHECK CONDITION status with fixed-format sense bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class SenseKey(enum.IntEnum):
    """SPC-4 table 45."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


@dataclass(frozen=True, slots=True)
class Asc:
    """An additional sense code and qualifier (SPC-4 table D.1)."""

    asc: int
    ascq: int
    name: str


NO_ADDITIONAL_SENSE = Asc(0x00, 0x00, "NO ADDITIONAL SENSE INFORMATION")
LU_NOT_READY_CAUSE_NOT_REPORTABLE = Asc(0x04, 0x00, "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE")
#: A paused volume (sparrow volume pause): 04/01, the NOT READY every initiator retries (Linux sd
#: waits and retries, and its spin-up loop waits rather than sending START UNIT as it would for
#: 04/02); 04/03 (manual intervention required) is failed at once, and 04/0A-0C are path states that
#: make multipath fail the path over, while a pause holds on every path. docs/operations.md.
LU_NOT_READY_BECOMING_READY = Asc(0x04, 0x01, "LOGICAL UNIT IS IN PROCESS OF BECOMING READY")
LU_NOT_ACCESSIBLE_TRANSITION = Asc(
    0x04, 0x0A, "LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION"
)
LU_NOT_ACCESSIBLE_STANDBY = Asc(0x04, 0x0B, "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE")
LU_NOT_ACCESSIBLE_UNAVAILABLE = Asc(
    0x04, 0x0C, "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE"
)
LU_NOT_READY_SANITIZE_IN_PROGRESS = Asc(0x04, 0x1B, "LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS")
WRITE_ERROR = Asc(0x0C, 0x00, "WRITE ERROR")
UNRECOVERED_READ_ERROR = Asc(0x11, 0x00, "UNRECOVERED READ ERROR")
MISCOMPARE_DURING_VERIFY = Asc(0x1D, 0x00, "MISCOMPARE DURING VERIFY OPERATION")
PARAMETER_LIST_LENGTH_ERROR = Asc(0x1A, 0x00, "PARAMETER LIST LENGTH ERROR")
INVALID_COMMAND_OPERATION_CODE = Asc(0x20, 0x00, "INVALID COMMAND OPERATION CODE")
LBA_OUT_OF_RANGE = Asc(0x21, 0x00, "LOGICAL BLOCK ADDRESS OUT OF RANGE")
INVALID_FIELD_IN_CDB = Asc(0x24, 0x00, "INVALID FIELD IN CDB")
LOGICAL_UNIT_NOT_SUPPORTED = Asc(0x25, 0x00, "LOGICAL UNIT NOT SUPPORTED")
INVALID_FIELD_IN_PARAMETER_LIST = Asc(0x26, 0x00, "INVALID FIELD IN PARAMETER LIST")
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = Asc(0x26, 0x04, "INVALID RELEASE OF PERSISTENT RESERVATION")
WRITE_PROTECTED = Asc(0x27, 0x00, "WRITE PROTECTED")
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = Asc(0x27, 0x07, "SPACE ALLOCATION FAILED WRITE PROTECT")
POWER_ON_RESET = Asc(0x29, 0x00, "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED")
POWER_ON_OCCURRED = Asc(0x29, 0x01, "POWER ON OCCURRED")
BUS_DEVICE_RESET = Asc(0x29, 0x03, "BUS DEVICE RESET FUNCTION OCCURRED")
I_T_NEXUS_LOSS = Asc(0x29, 0x07, "I_T NEXUS LOSS OCCURRED")
MODE_PARAMETERS_CHANGED = Asc(0x2A, 0x01, "MODE PARAMETERS CHANGED")
RESERVATIONS_PREEMPTED = Asc(0x2A, 0x03, "RESERVATIONS PREEMPTED")
RESERVATIONS_RELEASED = Asc(0x2A, 0x04, "RESERVATIONS RELEASED")
REGISTRATIONS_PREEMPTED = Asc(0x2A, 0x05, "REGISTRATIONS PREEMPTED")
ASYMMETRIC_ACCESS_STATE_CHANGED = Asc(0x2A, 0x06, "ASYMMETRIC ACCESS STATE CHANGED")
CAPACITY_DATA_CHANGED = Asc(0x2A, 0x09, "CAPACITY DATA HAS CHANGED")
COMMAND_SEQUENCE_ERROR = Asc(0x2C, 0x00, "COMMAND SEQUENCE ERROR")
REPORTED_LUNS_DATA_CHANGED = Asc(0x3F, 0x0E, "REPORTED LUNS DATA HAS CHANGED")
SAVING_PARAMETERS_NOT_SUPPORTED = Asc(0x39, 0x00, "SAVING PARAMETERS NOT SUPPORTED")
MEDIUM_NOT_PRESENT = Asc(0x3A, 0x00, "MEDIUM NOT PRESENT")
INSUFFICIENT_REGISTRATION_RESOURCES = Asc(0x55, 0x04, "INSUFFICIENT REGISTRATION RESOURCES")
MEDIUM_REMOVAL_PREVENTED = Asc(0x53, 0x02, "MEDIUM REMOVAL PREVENTED")
SANITIZE_COMMAND_FAILED = Asc(0x31, 0x03, "SANITIZE COMMAND FAILED")
INTERNAL_TARGET_FAILURE = Asc(0x44, 0x00, "INTERNAL TARGET FAILURE")


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Sense-key specific field pointer (SPC-4 4.5.2.4.2): which byte/bit was wrong."""

    in_cdb: bool
    byte: int
    bit: int | None = None


class CheckCondition(Exception):
    """A command failed with CHECK CONDITION and this sense."""

    def __init__(
        self,
        key: SenseKey,
        code: Asc,
        *,
        information: int | None = None,
        field: FieldPointer | None = None,
        progress: int | None = None,
    ) -> None:
        super().__init__(f"{key.name}: {code.name}")
        self.key = key
        self.code = code
        self.information = information
        self.field = field
        self.progress = progress

    def fixed_sense(self) -> bytes:
        return fixed_sense(
            self.key, self.code, information=self.information, field=self.field, progress=self.progress
        )


def fixed_sense(
    key: SenseKey,
    code: Asc,
    *,
    information: int | None = None,
    field: FieldPointer | None = None,
    progress: int | None = None,
    current: bool = True,
) -> bytes:
    """Fixed-format sense data, 18 bytes (SPC-4 4.5.3).

    The sense-key specific bytes carry either a field pointer (SPC-4 4.5.2.4.2) or, with NOT READY,
    a progress indication (SPC-4 4.5.2.4.4): ``progress`` is the fraction done, 0..65535.
    """
    response_code = 0x70 if current else 0x71
    valid = 0x80 if information is not None else 0
    sks = b"\x00\x00\x00"
    if progress is not None:
        sks = b"\x80" + struct.pack(">H", max(0, min(progress, 0xFFFF)))
    elif field is not None:
        b = 0x80 | (0x40 if field.in_cdb else 0)
        if field.bit is not None:
            b |= 0x08 | (field.bit & 0x7)
        sks = bytes([b]) + struct.pack(">H", field.byte)
    return struct.pack(
        ">BBBIBIBBB3s",
        response_code | valid,
        0,
        int(key),
        (information or 0) & 0xFFFFFFFF,
        10,
        0,
        code.asc,
        code.ascq,
        0,
        sks,
    )
