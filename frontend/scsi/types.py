"""Values that cross the boundary between the iSCSI layer and the SCSI layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ScsiStatus(enum.IntEnum):
    """SAM-5 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class TaskAttr(enum.IntEnum):
    """Task attribute as carried in the iSCSI SCSI Command PDU (RFC 7143 11.3.1)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


@dataclass(frozen=True, slots=True)
class Nexus:
    """One I_T nexus: an initiator port talking to a target port."""

    initiator_name: str
    isid: int
    target_name: str
    tpgt: int

    @property
    def initiator_port(self) -> str:
        """SPC TransportID (iSCSI, format 1) name of the initiator port."""
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    @property
    def target_port(self) -> str:
        return f"{self.target_name},t,0x{self.tpgt:04x}"


@dataclass(frozen=True, slots=True)
class ScsiRequest:
    nexus: Nexus
    lun: int
    cdb: bytes
    data_out: bytes | bytearray | memoryview
    expected_length: int
    task_attr: TaskAttr = TaskAttr.SIMPLE
    read: bool = False
    write: bool = False


@dataclass(frozen=True, slots=True)
class ScsiResult:
    status: ScsiStatus
    data: bytes | bytearray | memoryview = b""
    sense: bytes | None = None
    transfer_length: int | None = None


GOOD = ScsiResult(ScsiStatus.GOOD)
