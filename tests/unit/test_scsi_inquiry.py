"""INQUIRY: standard data and the VPD pages libiscsi and Linux read (SPC-4 6.6, 7.8; SBC-3 6.5)."""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_scsi_helpers import BS, good, inquiry, make_lu, run, sense


async def test_standard_inquiry() -> None:
    lu, _ = make_lu()
    data = bytes(good(await run(lu, inquiry(alloc=260))).data)
    assert len(data) == 96 and data[4] == len(data) - 5
    assert data[0] == 0x00  # qualifier 0, direct access
    assert data[2] == 0x06  # SPC-4
    assert data[3] == 0x12  # HISUP, response data format 2
    assert data[5] & 0x30 == 0x10 and not data[5] & 0x08  # TPGS=01b, 3PC=0
    assert data[7] & 0x02  # CMDQUE
    assert data[8:16] == b"SPARROW " and data[16:32] == b"VOLUME".ljust(16) and data[32:36] == b"0001"
    descriptors = struct.unpack_from(">8H", data, 58)
    assert {0x0460, 0x04C0, 0x0960, 0x00A0} <= set(descriptors)


async def test_inquiry_allocation_length_truncates_for_every_length() -> None:
    lu, _ = make_lu()
    full = bytes(good(await run(lu, inquiry(alloc=255))).data)
    for alloc in range(256):
        res = good(await run(lu, inquiry(alloc=alloc)))
        assert bytes(res.data) == full[:alloc]
        assert res.transfer_length is None  # the iSCSI layer takes len(data)
    assert bytes(good(await run(lu, inquiry(alloc=256))).data) == full


async def test_inquiry_invalid_fields() -> None:
    lu, _ = make_lu()
    assert sense(await run(lu, inquiry(evpd=0, page=1))) == (0x05, 0x24, 0x00)
    assert sense(await run(lu, inquiry(evpd=1, page=0x42))) == (0x05, 0x24, 0x00)
    assert sense(await run(lu, inquiry(evpd=2)))[:2] == (0x05, 0x24)  # CMDDT


async def vpd(page: int, *, supports_unmap: bool = True, alloc: int = 255) -> bytes:
    lu, _ = make_lu(supports_unmap=supports_unmap, tpgt=3)
    data = bytes(good(await run(lu, inquiry(evpd=1, page=page, alloc=alloc))).data)
    assert data[1] == page
    return data


async def test_supported_pages_are_all_readable() -> None:
    data = await vpd(0x00)
    pages = list(data[4 : 4 + data[3]])
    assert pages == sorted(pages) and {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    for page in pages:
        body = await vpd(page)
        assert struct.unpack_from(">H", body, 2)[0] == len(body) - 4


async def test_unit_serial_number() -> None:
    assert (await vpd(0x80))[4:] == b"0123456789abcdef"


def designators(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 4
    while pos < len(data):
        code_set, flags, length = data[pos], data[pos + 1], data[pos + 3]
        out.append((code_set, flags & 0x30, flags & 0x0F, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return out


async def test_device_identification() -> None:
    ds = designators(await vpd(0x83))
    by_type = {(assoc, typ): (cs, value) for cs, assoc, typ, value in ds}
    assert by_type[(0x00, 0x3)] == (0x01, bytes.fromhex("6" + "0" * 31))  # NAA, binary
    assert by_type[(0x00, 0x1)][1].startswith(b"SPARROW ")  # T10 vendor id, ASCII
    assert by_type[(0x10, 0x4)][1] == struct.pack(">HH", 0, 3)  # relative target port = TPGT
    assert by_type[(0x10, 0x5)][1] == struct.pack(">HH", 0, 3)  # target port group


async def test_block_limits() -> None:
    data = await vpd(0xB0)
    assert data[3] == 0x3C and len(data) == 64
    assert data[4] & 0x01 == 0  # WSNZ
    assert data[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    max_xfer, opt_xfer = struct.unpack_from(">II", data, 8)
    assert max_xfer >= 256 and 0 < opt_xfer <= max_xfer
    max_unmap, max_desc = struct.unpack_from(">II", data, 20)
    assert max_unmap and 256 <= max_desc <= 1024 * 1024
    (max_ws,) = struct.unpack_from(">Q", data, 36)
    assert max_ws >= 256
    (max_atomic,) = struct.unpack_from(">I", data, 44)
    assert 256 <= max_atomic <= max_xfer
    thick = await vpd(0xB0, supports_unmap=False)
    assert struct.unpack_from(">II", thick, 20) == (0, 0)


async def test_block_device_characteristics_and_provisioning() -> None:
    bdc = await vpd(0xB1)
    assert struct.unpack_from(">H", bdc, 4)[0] == 1  # non-rotating
    assert bdc[7] >> 6 == 0b01  # WABEREQ: block erase supported, reads succeed after it
    lbp = await vpd(0xB2)
    assert lbp[5] & 0xE4 == 0xE4  # LBPU, LBPWS, LBPWS10, LBPRZ
    assert lbp[5] & 0x02 == 0  # ANC_SUP
    assert lbp[6] & 0x07 == 0x02  # thin
    thick = await vpd(0xB2, supports_unmap=False)
    assert thick[5] == 0 and thick[6] & 0x07 == 0
    assert (await vpd(0xB1, supports_unmap=False))[7] == 0


@pytest.mark.parametrize("alloc", [0, 3, 10, 40])
async def test_vpd_truncation(alloc: int) -> None:
    full = await vpd(0xB0)
    lu, _ = make_lu(tpgt=3)
    assert bytes(good(await run(lu, inquiry(evpd=1, page=0xB0, alloc=alloc))).data) == full[:alloc]
    assert BS == 512


async def test_block_device_characteristics_tell_reads_work_after_block_and_crypto_erase() -> None:
    lu, _ = make_lu()
    b1 = bytes(good(await run(lu, inquiry(1, 0xB1))).data)
    assert b1[7] & 0xF0 == 0x50  # WABEREQ=01b, WACEREQ=01b
    thick, _ = make_lu(supports_unmap=False)
    assert bytes(good(await run(thick, inquiry(1, 0xB1))).data)[7] & 0xF0 == 0
