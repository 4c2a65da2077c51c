"""Standard INQUIRY data and the vital product data pages (SPC-4 6.6, 7.8; SBC-3 6.5).

Pure functions of a ``VpdContext``: the logical unit fills one in from its identity and store, and
gets back the full page; cutting to the allocation length is the caller's job.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class VpdPage(enum.IntEnum):
    SUPPORTED_PAGES = 0x00  # SPC-4 7.8.16
    UNIT_SERIAL_NUMBER = 0x80  # SPC-4 7.8.18
    DEVICE_IDENTIFICATION = 0x83  # SPC-4 7.8.6
    BLOCK_LIMITS = 0xB0  # SBC-3 6.5.3
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1  # SBC-3 6.5.2
    LOGICAL_BLOCK_PROVISIONING = 0xB2  # SBC-3 6.5.4


SUPPORTED_VPD_PAGES: tuple[VpdPage, ...] = tuple(VpdPage)

#: Version descriptors (SPC-4 table 144): SAM-5, iSCSI, SPC-4, SBC-3 (no revision claimed).
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)

PERIPHERAL_DIRECT_ACCESS = 0x00
#: Peripheral qualifier 011b + type 1Fh: no logical unit at this LUN (SPC-4 6.6.2).
PERIPHERAL_NO_LUN = 0x7F

#: Protocol identifier for iSCSI (SPC-4 table 362).
PROTOCOL_ISCSI = 0x5


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """Values advertised in the Block Limits VPD page, in logical blocks (SBC-3 6.5.3)."""

    max_compare_and_write: int
    optimal_granularity: int
    max_transfer: int
    optimal_transfer: int
    max_unmap_lba_count: int
    max_unmap_descriptors: int
    optimal_unmap_granularity: int
    max_write_same: int
    max_atomic_transfer: int


@dataclass(frozen=True, slots=True)
class VpdContext:
    vendor: str
    product: str
    revision: str
    serial: str
    naa: bytes
    relative_port: int
    port_group: int
    supports_unmap: bool
    limits: BlockLimits
    #: Unmapped blocks read as zeros *and we promise it* (LBPRZ, SBC-3 4.7.3.4); see lu.py for when
    #: the promise is withheld although reads do return zeros.
    lbprz: bool = True


def _ascii(text: str, width: int) -> bytes:
    """Left-aligned, space-padded ASCII (SPC-4 4.4.1); non-printable characters become '?'."""
    raw = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)
    return raw.encode("ascii")[:width].ljust(width, b" ")


def standard_inquiry(ctx: VpdContext) -> bytes:
    """Standard INQUIRY data, 96 bytes (SPC-4 6.6.2).

    VERSION 6 (SPC-4); HISUP=1; RESPONSE DATA FORMAT 2; TPGS=01b (implicit ALUA only); 3PC=0;
    PROTECT=0; CMDQUE=1; version descriptors for SAM-5, iSCSI, SPC-4 and SBC-3.
    """
    head = struct.pack(
        ">BBBBBBBB",
        PERIPHERAL_DIRECT_ACCESS,
        0x00,  # RMB=0: not removable
        0x06,
        0x10 | 0x02,  # HISUP, response data format 2
        96 - 5,
        0x10,  # TPGS = 01b
        0x00,
        0x02,  # CMDQUE
    )
    ident = _ascii(ctx.vendor, 8) + _ascii(ctx.product, 16) + _ascii(ctx.revision, 4)
    vendor_specific = bytes(20)
    descriptors = b"".join(struct.pack(">H", d) for d in VERSION_DESCRIPTORS).ljust(16, b"\0")
    data = head + ident + vendor_specific + bytes(2) + descriptors
    return data.ljust(96, b"\0")


def no_lun_inquiry() -> bytes:
    """Standard INQUIRY data for a LUN with no logical unit behind it (SPC-4 6.6.2)."""
    head = struct.pack(">BBBBBBBB", PERIPHERAL_NO_LUN, 0, 0x06, 0x02, 36 - 5, 0, 0, 0)
    return head + _ascii("", 8) + _ascii("", 16) + _ascii("", 4)


def _page(code: int, body: bytes) -> bytes:
    return struct.pack(">BBH", PERIPHERAL_DIRECT_ACCESS, code, len(body)) + body


def _designator(code_set: int, piv_assoc_type: int, value: bytes, protocol: int = 0) -> bytes:
    return struct.pack(">BBBB", (protocol << 4) | code_set, piv_assoc_type, 0, len(value)) + value


def vpd_page(code: int, ctx: VpdContext) -> bytes | None:
    """The full VPD page ``code``, or None when the page is not supported."""
    if code == VpdPage.SUPPORTED_PAGES:
        return _page(code, bytes(SUPPORTED_VPD_PAGES))
    if code == VpdPage.UNIT_SERIAL_NUMBER:
        return _page(code, ctx.serial.encode("ascii", "replace")[:32])
    if code == VpdPage.DEVICE_IDENTIFICATION:
        return _page(code, _device_identification(ctx))
    if code == VpdPage.BLOCK_LIMITS:
        return _page(code, _block_limits(ctx.limits, ctx.supports_unmap))
    if code == VpdPage.BLOCK_DEVICE_CHARACTERISTICS:
        # MEDIUM ROTATION RATE 1: non-rotating medium. WABEREQ=01b and WACEREQ=01b when BLOCK ERASE
        # and CRYPTO ERASE are supported: reads after either erase succeed (and return zeros).
        erase_req = 0x40 | 0x10 if ctx.supports_unmap else 0x00
        return _page(code, struct.pack(">HBB", 0x0001, 0, erase_req).ljust(0x3C, b"\0"))
    if code == VpdPage.LOGICAL_BLOCK_PROVISIONING:
        if ctx.supports_unmap:
            # LBPU, LBPWS, LBPWS10, LBPRZ (when promised); provisioning type 010b (thin).
            flags, ptype = 0x80 | 0x40 | 0x20 | (0x04 if ctx.lbprz else 0x00), 0x02
        else:
            flags, ptype = 0x00, 0x00
        return _page(code, struct.pack(">BBBB", 0, flags, ptype, 0))
    return None


def _device_identification(ctx: VpdContext) -> bytes:
    """Designators (SPC-4 7.8.6): NAA (LU), T10 vendor id (LU), relative target port, target port
    group."""
    naa = _designator(0x1, 0x03, ctx.naa)  # binary, LU, NAA
    t10 = _designator(0x2, 0x01, _ascii(ctx.vendor, 8) + ctx.serial.encode("ascii", "replace"))
    rel_port = _designator(0x1, 0x80 | 0x10 | 0x04, struct.pack(">HH", 0, ctx.relative_port), PROTOCOL_ISCSI)
    tpg = _designator(0x1, 0x80 | 0x10 | 0x05, struct.pack(">HH", 0, ctx.port_group), PROTOCOL_ISCSI)
    return naa + t10 + rel_port + tpg


def _block_limits(limits: BlockLimits, supports_unmap: bool) -> bytes:
    """Block Limits page body, PAGE LENGTH 3Ch (SBC-3 table 194; SBC-4 atomic fields)."""
    unmap_lbas = limits.max_unmap_lba_count if supports_unmap else 0
    unmap_desc = limits.max_unmap_descriptors if supports_unmap else 0
    body = struct.pack(
        ">BBHIIIIIIIQIIIII",
        0x00,  # WSNZ=0: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 writes to the end of the medium
        limits.max_compare_and_write,
        limits.optimal_granularity,
        limits.max_transfer,
        limits.optimal_transfer,
        limits.max_transfer,  # MAXIMUM PREFETCH LENGTH
        unmap_lbas,
        unmap_desc,
        limits.optimal_unmap_granularity if supports_unmap else 0,
        0,  # UGAVALID=0
        limits.max_write_same,
        limits.max_atomic_transfer,
        0,  # ATOMIC ALIGNMENT: none
        0,  # ATOMIC TRANSFER LENGTH GRANULARITY: none
        0,  # MAXIMUM ATOMIC TRANSFER LENGTH WITH ATOMIC BOUNDARY
        0,  # MAXIMUM ATOMIC BOUNDARY SIZE
    )
    assert len(body) == 0x3C
    return body
