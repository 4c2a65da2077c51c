"""The tasks of one connection: a SCSI command from its arrival to its response (RFC 7143 3.2.2.1,
4.2.5; SAM-5 5.1), as a state table. ``Connection`` moves them; ``dataout.DataOutCollector`` fills
their buffers; ``tmf`` aborts them. A move that is not in ``TASK_TRANSITIONS`` raises
``IllegalTransition``.
"""

from __future__ import annotations

import enum
from typing import Final

from frontend.iscsi.errors import IllegalTransition
from frontend.iscsi.pdu import ScsiCommand
from frontend.scsi.types import ScsiResult


class TaskState(enum.Enum):
    AWAITING_CMDSN = "awaiting-cmdsn"      # received, a lower CmdSN is still missing
    COLLECTING_DATA = "collecting-data"    # its turn came; Data-Out still to come
    READY = "ready"                        # all data here; waiting for earlier commands' release
    EXECUTING = "executing"                # handed to the SCSI layer (ExecuteScsi)
    ABORTED = "aborted"                    # by a TMF, logout or reset: no response will be sent
    DONE = "done"                          # response sent, or the aborted execution came back

    __hash__ = object.__hash__  # members are singletons; enum's own hash is slow Python code


class TaskInput(enum.Enum):
    ACCEPT_NEEDS_DATA = "accept-needs-data"   # CmdSN reached (or immediate), data missing
    ACCEPT_COMPLETE = "accept-complete"       # CmdSN reached (or immediate), data complete
    DATA_COMPLETE = "data-complete"
    RELEASE = "release"
    COMPLETE = "complete"
    ABORT = "abort"

    __hash__ = object.__hash__  # members are singletons; enum's own hash is slow Python code


TASK_TRANSITIONS: Final[dict[tuple[TaskState, TaskInput], TaskState]] = {
    (TaskState.AWAITING_CMDSN, TaskInput.ACCEPT_NEEDS_DATA): TaskState.COLLECTING_DATA,
    (TaskState.AWAITING_CMDSN, TaskInput.ACCEPT_COMPLETE): TaskState.READY,
    (TaskState.COLLECTING_DATA, TaskInput.DATA_COMPLETE): TaskState.READY,
    (TaskState.READY, TaskInput.RELEASE): TaskState.EXECUTING,
    (TaskState.EXECUTING, TaskInput.COMPLETE): TaskState.DONE,
    (TaskState.AWAITING_CMDSN, TaskInput.ABORT): TaskState.ABORTED,
    (TaskState.COLLECTING_DATA, TaskInput.ABORT): TaskState.ABORTED,
    (TaskState.READY, TaskInput.ABORT): TaskState.ABORTED,
    (TaskState.EXECUTING, TaskInput.ABORT): TaskState.ABORTED,
    (TaskState.ABORTED, TaskInput.COMPLETE): TaskState.DONE,
}

ACTIVE: Final = frozenset(
    {TaskState.AWAITING_CMDSN, TaskState.COLLECTING_DATA, TaskState.READY, TaskState.EXECUTING}
)


class R2TSequence:
    """One outstanding R2T: the data it asked for and what has arrived (RFC 7143 11.8)."""

    __slots__ = ("length", "next_data_sn", "offset", "received")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.received = 0
        self.next_data_sn = 0


class Task:
    """One SCSI command on this connection."""

    __slots__ = (
        "buffer", "cmd", "discarding", "failure", "id", "lun", "next_r2t_offset", "r2t_sn", "r2ts",
        "received",
        "state", "unsolicited_data_sn", "unsolicited_done", "unsolicited_limit",
    )

    def __init__(self, task_id: int, cmd: ScsiCommand, lun: int) -> None:
        self.id = task_id
        self.cmd = cmd
        self.lun = lun
        self.state = TaskState.AWAITING_CMDSN
        self.buffer: bytes | bytearray | memoryview = b""
        self.received = 0
        self.unsolicited_limit = 0
        self.unsolicited_done = True
        self.unsolicited_data_sn = 0
        self.next_r2t_offset = 0
        self.r2t_sn = 0
        self.r2ts: dict[int, R2TSequence] = {}
        self.failure: ScsiResult | None = None
        self.discarding = False

    @property
    def itt(self) -> int:
        return self.cmd.itt

    @property
    def data_complete(self) -> bool:
        return not self.cmd.write or self.received >= self.cmd.expected_length

    def move(self, event: TaskInput) -> None:
        try:
            self.state = TASK_TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(
                f"task {self.itt:#x}: {event.value} in state {self.state.value}"
            ) from None

    def store(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        buf = self.buffer
        if offset == 0 and not buf and n == self.cmd.expected_length:
            self.buffer = data                      # all data in one PDU: no copy
        else:
            if not isinstance(buf, bytearray):
                buf = self.buffer = bytearray(buf)
            if offset == len(buf):
                buf += data
            else:
                if offset + n > len(buf):
                    buf.extend(bytes(offset + n - len(buf)))
                buf[offset : offset + n] = data
        self.received += n
