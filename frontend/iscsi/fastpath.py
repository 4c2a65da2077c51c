"""The fast path: a SCSI Command PDU that is READ/WRITE(10/16) in the plain case, from its BHS bytes
to its Data-In or SCSI Response bytes, with no PDU, task, request or result objects.

``Connection`` owns the sequencing (docs/architecture.md, "The fast path"); this module holds the
pure parts: which BHS is the plain case (``plain_command``), and the response headers packed into
one buffer per batch (``ResponseBatch``). Both paths must put the same bytes on the wire:
tests/unit/test_fastpath.py feeds the same streams through each and compares them.

The plain case (anything else takes the general path, which answers it as RFC 7143 and SBC-3 say):

- opcode SCSI Command (0x01) without the I bit, no AHS, LUN 0, ATTR SIMPLE, the F bit;
- READ(10)/(16) with R and not W and no data segment, or WRITE(10)/(16) with W and not R and all of
  its data immediate (DataSegmentLength == EDTL);
- CDB byte 1 without RDPROTECT/WRPROTECT (and without FUA for a write); CONTROL without NACA.

The LU then decides whether the command is plain on its side (``LogicalUnit.read_now`` /
``write_fast``: no UNIT ATTENTION, reservation, fence, sanitize, write protect, range lock; a valid
range; EDTL equal to the transfer length) and whether the store can answer inline. A write the
store forwards to replicas is written and forwarded inline and answered once they acknowledged it
(``Connection.forwarded_done``; tests/unit/test_fastpath_forwarded.py).
"""

from __future__ import annotations

import struct
from typing import Final

from frontend.iscsi.digest import DIGEST_LENGTH, crc32c_one, pack_digest_into
from frontend.iscsi.pdu import BHS_LENGTH, RESERVED_TAG, data_tail
from frontend.scsi.commands import COMMANDS, MetricKind

#: b0, b1, b2, b3, TotalAHSLength|DataSegmentLength, LUN, ITT, EDTL, CmdSN, ExpStatSN (bytes 0..31).
COMMAND_FIELDS: Final = struct.Struct(">BBBBIQIIII")
#: A target BHS: b0..b3, DataSegmentLength, LUN, ITT, then seven words (RFC 7143 11.4, 11.7).
_TARGET_BHS: Final = struct.Struct(">BBBBIQI7I")
_RW10: Final = struct.Struct(">IxH")   # CDB bytes 2..8: LBA, group, TRANSFER LENGTH
_RW16: Final = struct.Struct(">QI")    # CDB bytes 2..13: LBA, TRANSFER LENGTH

#: Byte 1 of the BHS: F | R | ATTR SIMPLE, and F | W | ATTR SIMPLE.
READ_FLAGS: Final = 0x80 | 0x40 | 0x01
WRITE_FLAGS: Final = 0x80 | 0x20 | 0x01
_PROTECT: Final = 0xE0
_FUA: Final = 0x08
_NACA: Final = 0x04

#: opcode -> (is a write, CDB length), derived from the command table's ``fast_path`` entries
#: (frontend/scsi/commands.py: READ/WRITE(10)/(16)).
FAST_COMMANDS: Final[dict[int, tuple[bool, int]]] = {
    s.opcode: (s.metric is MetricKind.WRITE, s.length) for s in COMMANDS if s.fast_path
}
_LBA_AND_LENGTH: Final = {10: _RW10, 16: _RW16}


def plain_command(bhs: bytes | bytearray | memoryview, b1: int) -> tuple[bool, int, int] | None:
    """(write, lba, blocks) of a READ/WRITE(10/16) CDB in the plain case; None for anything else.
    ``b1`` is BHS byte 1, already known to be ``READ_FLAGS`` or ``WRITE_FLAGS``; the CDB is BHS
    bytes 32..47."""
    fast = FAST_COMMANDS.get(bhs[32])
    if fast is None:
        return None
    write, length = fast
    lba, n = _LBA_AND_LENGTH[length].unpack_from(bhs, 34)
    refused = _PROTECT | _FUA if write else _PROTECT
    if write is not (b1 == WRITE_FLAGS) or bhs[31 + length] & _NACA or bhs[33] & refused:
        return None
    return write, lba, n


class ResponseBatch:
    """The response headers of one batch of fast commands, packed into one buffer (one allocation
    per batch). ``data_in`` adds a Data-In with status (S and F bits, GOOD, no residual: RFC 7143
    11.7.2 phase collapse) followed by its data, uncopied; ``response`` adds a GOOD SCSI Response
    with no data. Consecutive responses leave as one buffer slice. ``close`` returns the list for
    ``writelines``.

    With ``header_digest`` each header is followed by its CRC32C (RFC 7143 11.1, 13.1), packed in
    the same buffer; with ``data_digest`` the data of a Data-In is followed by its padding and
    digest (``pdu.data_tail``), as the general path's ``encode_data_in`` frames them."""

    __slots__ = ("_buf", "_dd", "_hd", "_hlen", "_out", "_pos", "_run", "_view")

    def __init__(
        self, count: int, out: list[bytes | memoryview], header_digest: bool = False,
        data_digest: bool = False,
    ) -> None:
        self._hd = header_digest
        self._dd = data_digest
        self._hlen = BHS_LENGTH + DIGEST_LENGTH if header_digest else BHS_LENGTH
        self._buf = bytearray(self._hlen * count)
        self._view = memoryview(self._buf)
        self._out = out
        self._pos = 0
        self._run = 0

    def _digest(self, pos: int) -> int:
        """Pack the header digest of the BHS at ``pos`` after it; the position after both."""
        end = pos + BHS_LENGTH
        if self._hd:
            pack_digest_into(self._buf, end, crc32c_one(self._view[pos:end]))
            end += DIGEST_LENGTH
        return end

    def data_in(self, itt: int, data: bytes, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int) -> None:
        pos = self._pos
        _TARGET_BHS.pack_into(self._buf, pos, 0x25, 0x81, 0, 0, len(data), 0, itt, RESERVED_TAG, stat_sn,
                              exp_cmd_sn, max_cmd_sn, 0, 0, 0)
        self._pos = pos = self._digest(pos)
        out = self._out
        out.append(self._view[self._run : pos])
        out.append(data)
        tail = data_tail(data, self._dd)
        if tail:
            out.append(tail)
        self._run = pos

    def response(self, itt: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int) -> None:
        pos = self._pos
        _TARGET_BHS.pack_into(self._buf, pos, 0x21, 0x80, 0, 0, 0, 0, itt, 0, stat_sn, exp_cmd_sn, max_cmd_sn,
                              0, 0, 0)
        self._pos = self._digest(pos)

    def close(self) -> None:
        if self._run < self._pos:
            self._out.append(self._view[self._run : self._pos])
        self._run = self._pos
