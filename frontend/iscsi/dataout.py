"""Write data collection for one connection (RFC 7143 4.2.5, 11.7, 11.8), without I/O.

Immediate data is stored when the command arrives (``Connection``); then unsolicited Data-Out
(InitialR2T=No) up to FirstBurstLength, then R2Ts of at most MaxBurstLength, at most
MaxOutstandingR2T at a time. ``DataOutCollector.receive`` checks that a Data-Out continues its
task's sequence (DataSN per sequence, BufferOffset, TTT, F bit) and stores its data; a PDU that
breaks it is answered by the connection as ``DataOutFault`` says (ERL 0 has no within-command
recovery, 7.1.4: the task ends with CHECK CONDITION, ABORTED COMMAND and the fault's ASC). R2Ts go
out through the ``send_r2t`` callback the connection gives, which puts them on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from frontend.iscsi.pdu import RESERVED_TAG, DataOut
from frontend.iscsi.tasks import R2TSequence, Task, TaskState
from frontend.scsi.sense import Asc

# iSCSI sense codes with ABORTED COMMAND, RFC 7143 11.4.7.2 (and SPC-4 for DATA PHASE ERROR)
PROTOCOL_SERVICE_CRC_ERROR: Final = Asc(0x47, 0x05, "PROTOCOL SERVICE CRC ERROR")
UNEXPECTED_UNSOLICITED_DATA: Final = Asc(0x0C, 0x0C, "WRITE ERROR - UNEXPECTED UNSOLICITED DATA")
INCORRECT_AMOUNT_OF_DATA: Final = Asc(0x0C, 0x0D, "WRITE ERROR - NOT ENOUGH UNSOLICITED DATA")
DATA_PHASE_ERROR: Final = Asc(0x4B, 0x00, "DATA PHASE ERROR")


@dataclass(frozen=True, slots=True)
class DataOutFault:
    """A Data-Out that breaks its task's data sequence: the ASC the task ends with, and why."""

    code: Asc
    why: str


#: send_r2t(task, ttt, r2t_sn, offset, length)
SendR2T = Callable[[Task, int, int, int, int], None]


class DataOutCollector:
    """The R2T and Data-Out rules of one connection (see the module docstring)."""

    __slots__ = ("max_burst", "max_r2t", "new_ttt", "send_r2t")

    def __init__(
        self, send_r2t: SendR2T, new_ttt: Callable[[], int], *, max_burst: int, max_r2t: int
    ) -> None:
        self.send_r2t = send_r2t
        self.new_ttt = new_ttt
        self.max_burst = max_burst
        self.max_r2t = max(1, max_r2t)

    def solicit(self, task: Task) -> None:
        """Send R2Ts for the data not yet asked for (RFC 7143 4.2.5.2, 11.8)."""
        if not task.unsolicited_done or task.state is not TaskState.COLLECTING_DATA:
            return
        if not task.r2ts and task.next_r2t_offset < task.received:
            task.next_r2t_offset = task.received
        edtl = task.cmd.expected_length
        while len(task.r2ts) < self.max_r2t and task.next_r2t_offset < edtl:
            offset = task.next_r2t_offset
            length = min(self.max_burst, edtl - offset)
            ttt = self.new_ttt()
            task.r2ts[ttt] = R2TSequence(offset, length)
            task.next_r2t_offset = offset + length
            self.send_r2t(task, ttt, task.r2t_sn, offset, length)
            task.r2t_sn += 1

    def receive(self, task: Task, pdu: DataOut) -> DataOutFault | None:
        """Store a Data-Out of ``task`` (a write collecting its data) if it continues the task's
        sequence, soliciting what comes next; else the fault, with nothing stored."""
        n = len(pdu.data)
        if pdu.ttt == RESERVED_TAG:
            # unsolicited data (RFC 7143 4.2.5.1): contiguous from the immediate data
            if task.unsolicited_done:
                return DataOutFault(UNEXPECTED_UNSOLICITED_DATA, "unsolicited Data-Out after its sequence")
            if pdu.data_sn != task.unsolicited_data_sn:
                why = f"DataSN {pdu.data_sn}, expected {task.unsolicited_data_sn}"
                return DataOutFault(DATA_PHASE_ERROR, why)
            if pdu.buffer_offset != task.received or task.received + n > task.unsolicited_limit:
                return DataOutFault(INCORRECT_AMOUNT_OF_DATA, "unsolicited Data-Out outside the first burst")
            task.unsolicited_data_sn += 1
            if n:
                task.store(pdu.buffer_offset, pdu.data)
            if pdu.final or task.received >= task.unsolicited_limit:
                task.unsolicited_done = True
                self.solicit(task)
            return None
        seq = task.r2ts.get(pdu.ttt)
        if seq is None:
            return DataOutFault(DATA_PHASE_ERROR, f"unknown Target Transfer Tag {pdu.ttt:#x}")
        if pdu.data_sn != seq.next_data_sn:
            return DataOutFault(DATA_PHASE_ERROR, f"DataSN {pdu.data_sn}, expected {seq.next_data_sn}")
        if pdu.buffer_offset != seq.offset + seq.received or seq.received + n > seq.length:
            return DataOutFault(INCORRECT_AMOUNT_OF_DATA, "Data-Out outside the R2T's range")
        seq.next_data_sn += 1
        if n:
            task.store(pdu.buffer_offset, pdu.data)
            seq.received += n
        if seq.received >= seq.length:
            del task.r2ts[pdu.ttt]
            self.solicit(task)
        elif pdu.final:
            return DataOutFault(INCORRECT_AMOUNT_OF_DATA, "F bit before the R2T's data was complete")
        return None
