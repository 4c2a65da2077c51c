"""Mode parameters: MODE SENSE(6/10) data and MODE SELECT(6/10) parsing (SPC-4 6.11-6.14, 7.5;
SBC-3 6.4).

Pages: read-write error recovery (01h), caching (08h, WCE tells the truth about the write-back
store), control (0Ah, SWP changeable), informational exceptions control (1Ch). Only WCE and SWP are
changeable; saved values are not supported.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

from frontend.scsi.cdb import invalid_cdb, invalid_param, u16
from frontend.scsi.sense import (
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    CheckCondition,
    SenseKey,
)


class PageCode(enum.IntEnum):
    READ_WRITE_ERROR_RECOVERY = 0x01
    CACHING = 0x08
    CONTROL = 0x0A
    INFORMATIONAL_EXCEPTIONS = 0x1C
    ALL = 0x3F


class PageControl(enum.IntEnum):
    """PC field of MODE SENSE (SPC-4 table 98)."""

    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


#: Device-specific parameter bits for direct-access devices (SBC-3 6.4.1).
WP = 0x80
DPOFUA = 0x10


@dataclass(frozen=True, slots=True)
class ModeState:
    """The changeable mode parameters of one logical unit."""

    wce: bool = True  # caching page: write cache enabled
    swp: bool = False  # control page: software write protect


DEFAULTS = ModeState()

_WCE_BIT = 0x04  # caching page byte 2
_SWP_BIT = 0x08  # control page byte 4


def _page_bytes(code: PageCode, state: ModeState) -> bytes:
    if code == PageCode.READ_WRITE_ERROR_RECOVERY:
        return bytes((0x01, 0x0A, 0x00, 0x00, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0x00))
    if code == PageCode.CACHING:
        page = bytearray(20)
        page[0:2] = (0x08, 0x12)
        page[2] = _WCE_BIT if state.wce else 0x00
        return bytes(page)
    if code == PageCode.CONTROL:
        # QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering), TAS=1, BUSY TIMEOUT unlimited.
        page = bytearray(12)
        page[0:2] = (0x0A, 0x0A)
        page[2] = 0x02  # GLTSD
        page[3] = 0x10  # QAM = 1
        page[4] = _SWP_BIT if state.swp else 0x00
        page[5] = 0x40  # TAS
        page[8:10] = b"\xff\xff"
        return bytes(page)
    if code == PageCode.INFORMATIONAL_EXCEPTIONS:
        return bytes((0x1C, 0x0A, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0))  # DEXCPT=1, MRIE 0
    raise ValueError(code)


def _changeable(code: PageCode) -> bytes:
    mask = bytearray(len(_page_bytes(code, DEFAULTS)))
    mask[0:2] = _page_bytes(code, DEFAULTS)[0:2]
    if code == PageCode.CACHING:
        mask[2] = _WCE_BIT
    elif code == PageCode.CONTROL:
        mask[4] = _SWP_BIT
    return bytes(mask)


_PAGES = (
    PageCode.READ_WRITE_ERROR_RECOVERY,
    PageCode.CACHING,
    PageCode.CONTROL,
    PageCode.INFORMATIONAL_EXCEPTIONS,
)


def _pages(code: int, subpage: int, pc: PageControl, state: ModeState) -> bytes:
    if subpage not in (0x00, 0xFF) or (subpage == 0xFF and code != PageCode.ALL):
        raise invalid_cdb(3)
    if code == PageCode.ALL:
        codes: tuple[PageCode, ...] = _PAGES
    elif code in _PAGES:
        codes = (PageCode(code),)
    else:
        raise invalid_cdb(2, 5)
    if pc == PageControl.CHANGEABLE:
        return b"".join(_changeable(c) for c in codes)
    source = DEFAULTS if pc == PageControl.DEFAULT else state
    return b"".join(_page_bytes(c, source) for c in codes)


@dataclass(frozen=True, slots=True)
class Geometry:
    nblocks: int
    block_size: int


def mode_sense(cdb: bytes, state: ModeState, geometry: Geometry) -> bytes:
    """MODE SENSE(6) or (10) parameter data, not yet cut to the allocation length."""
    ten = cdb[0] == 0x5A
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = PageControl(cdb[2] >> 6)
    if pc == PageControl.SAVED:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED)
    pages = _pages(cdb[2] & 0x3F, cdb[3], pc, state)
    dsp = DPOFUA | (WP if state.swp else 0)
    if dbd:
        desc = b""
    elif llbaa:
        desc = struct.pack(">QII", geometry.nblocks, 0, geometry.block_size)
    else:
        nblocks = min(geometry.nblocks, 0xFFFFFFFF)
        desc = struct.pack(">IB", nblocks, 0) + geometry.block_size.to_bytes(3, "big")
    if ten:
        length = 6 + len(desc) + len(pages)
        header = struct.pack(">HBBBBH", length, 0, dsp, 0x01 if llbaa else 0, 0, len(desc))
    else:
        length = 3 + len(desc) + len(pages)
        header = struct.pack(">BBBB", min(length, 0xFF), 0, dsp, len(desc))
    return header + desc + pages


def mode_select(
    cdb: bytes, params: bytes | bytearray | memoryview, state: ModeState, block_size: int
) -> ModeState:
    """Apply MODE SELECT(6)/(10) parameter data; return the new state (SPC-4 6.11, 6.12).

    Fields that are not changeable must carry their current value, otherwise the command fails
    with INVALID FIELD IN PARAMETER LIST and nothing changes.
    """
    ten = cdb[0] == 0x55
    if cdb[1] & 0x01:  # SP: saving pages is not supported
        raise invalid_cdb(1, 0)
    length = u16(cdb, 7) if ten else cdb[4]
    if length == 0:
        return state
    data = bytes(params[:length])
    hlen = 8 if ten else 4
    if len(data) < hlen:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    bdlen = u16(data, 6) if ten else data[3]
    long_lba = ten and bool(data[4] & 0x01)
    pos = hlen
    if bdlen:
        dlen = 16 if long_lba else 8
        if bdlen % dlen or pos + bdlen > len(data):
            raise invalid_param(6 if ten else 3)
        for off in range(pos, pos + bdlen, dlen):
            size = int.from_bytes(data[off + 12 : off + 16] if long_lba else data[off + 5 : off + 8], "big")
            if size != block_size:
                raise invalid_param(off + (12 if long_lba else 5))
        pos += bdlen
    new = state
    while pos < len(data):
        if pos + 2 > len(data):
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        code = data[pos] & 0x3F
        if data[pos] & 0x40:  # SPF: no subpages here
            raise invalid_param(pos, 6)
        if code not in _PAGES:
            raise invalid_param(pos)
        page_code = PageCode(code)
        current = _page_bytes(page_code, state)
        plen = data[pos + 1] + 2
        if plen != len(current):
            raise invalid_param(pos + 1)
        if pos + plen > len(data):
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        page = data[pos : pos + plen]
        mask = _changeable(page_code)
        for i in range(2, plen):
            if (page[i] ^ current[i]) & ~mask[i] & 0xFF:
                raise invalid_param(pos + i)
        if page_code == PageCode.CACHING:
            new = replace(new, wce=bool(page[2] & _WCE_BIT))
        elif page_code == PageCode.CONTROL:
            new = replace(new, swp=bool(page[4] & _SWP_BIT))
        pos += plen
    return new
