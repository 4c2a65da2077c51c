"""MODE SENSE / MODE SELECT: pages, page control, descriptors, changeable fields (SPC-4 6.11-6.14)."""

from __future__ import annotations

import struct

from tests.unit.test_scsi_helpers import (
    BS,
    NBLOCKS,
    field_pointer,
    good,
    make_lu,
    mode_select6,
    mode_sense6,
    mode_sense10,
    run,
    sense,
)


def pages(data: bytes, offset: int) -> dict[int, bytes]:
    out, pos = {}, offset
    while pos < len(data):
        code, length = data[pos] & 0x3F, data[pos + 1]
        out[code] = data[pos : pos + 2 + length]
        pos += 2 + length
    return out


async def test_mode_sense6_all_pages_with_block_descriptor() -> None:
    lu, _ = make_lu()
    data = bytes(good(await run(lu, mode_sense6(0x3F))).data)
    assert data[0] == len(data) - 1
    assert data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8
    nblocks, _, blen = struct.unpack_from(">IB3s", data, 4)
    assert nblocks == NBLOCKS and int.from_bytes(blen, "big") == BS
    got = pages(data, 12)
    assert set(got) == {0x01, 0x08, 0x0A, 0x1C}
    assert got[0x08][2] & 0x04  # WCE=1 by default
    lu.write_cache_enabled = False  # changed by the daemon: every nexus is told
    assert sense(await run(lu, mode_sense6(0x08, dbd=True))) == (0x06, 0x2A, 0x01)
    data = bytes(good(await run(lu, mode_sense6(0x08, dbd=True))).data)
    assert data[3] == 0 and data[4] == 0x08 and not data[6] & 0x04


async def test_mode_sense_page_control() -> None:
    lu, _ = make_lu()
    lu.write_cache_enabled = False
    changeable = pages(bytes(good(await run(lu, mode_sense6(0x3F, pc=1, dbd=True))).data), 4)
    assert changeable[0x08][2] == 0x04 and not any(changeable[0x08][3:])
    assert changeable[0x0A][4] == 0x08 and not any(changeable[0x01][2:])
    default = pages(bytes(good(await run(lu, mode_sense6(0x08, pc=2, dbd=True))).data), 4)
    assert default[0x08][2] & 0x04
    assert sense(await run(lu, mode_sense6(0x08, pc=3))) == (0x05, 0x39, 0x00)


async def test_mode_sense_invalid_page_and_subpage() -> None:
    lu, _ = make_lu()
    res = await run(lu, mode_sense6(0x19))
    assert sense(res) == (0x05, 0x24, 0x00)
    assert field_pointer(res) == (True, 2)
    assert sense(await run(lu, mode_sense6(0x08, subpage=1)))[:2] == (0x05, 0x24)
    good(await run(lu, mode_sense6(0x3F, subpage=0xFF)))


async def test_mode_sense_truncation_keeps_the_header() -> None:
    lu, _ = make_lu()
    full = bytes(good(await run(lu, mode_sense6(0x3F))).data)
    res = good(await run(lu, mode_sense6(0x3F, alloc=4)))
    assert bytes(res.data) == full[:4]


async def test_mode_sense10_long_lba_descriptor() -> None:
    lu, _ = make_lu()
    data = bytes(good(await run(lu, mode_sense10(0x0A, llbaa=True))).data)
    assert struct.unpack_from(">H", data)[0] == len(data) - 2
    assert data[4] & 0x01 and struct.unpack_from(">H", data, 6)[0] == 16
    nblocks, _, blen = struct.unpack_from(">QII", data, 8)
    assert (nblocks, blen) == (NBLOCKS, BS)
    assert set(pages(data, 24)) == {0x0A}
    data = bytes(good(await run(lu, mode_sense10(0x1C, dbd=True))).data)
    assert struct.unpack_from(">H", data, 6)[0] == 0 and set(pages(data, 8)) == {0x1C}


async def test_mode_select_round_trips_what_mode_sense_returned() -> None:
    lu, _ = make_lu()
    data = bytearray(good(await run(lu, mode_sense6(0x3F))).data)
    data[0] = 0  # MODE DATA LENGTH is reserved in MODE SELECT
    data[2] = 0
    data[12 + 12 + 2] &= ~0x04  # caching page (after the 12-byte error recovery page): WCE=0
    good(await run(lu, mode_select6(len(data)), bytes(data)))
    assert not lu.write_cache_enabled


async def test_mode_select_rejects_unchangeable_fields_and_bad_lists() -> None:
    lu, _ = make_lu()
    control = bytearray(good(await run(lu, mode_sense6(0x0A, dbd=True))).data)[4:]
    control[2] |= 0x04  # D_SENSE is not changeable
    params = bytes(4) + bytes(control)
    res = await run(lu, mode_select6(len(params)), params)
    assert sense(res) == (0x05, 0x26, 0x00)
    assert field_pointer(res) == (False, 4 + 2)
    bad_len = bytes(4) + bytes((0x08, 0x10)) + bytes(16)
    assert sense(await run(lu, mode_select6(len(bad_len)), bad_len))[:2] == (0x05, 0x26)
    assert sense(await run(lu, mode_select6(3), bytes(3))) == (0x05, 0x1A, 0x00)
    assert sense(await run(lu, mode_select6(4, sp=True), bytes(4)))[:2] == (0x05, 0x24)
    wrong_bs = bytes((0, 0, 0, 8)) + struct.pack(">IB", 0, 0) + (4096).to_bytes(3, "big")
    assert sense(await run(lu, mode_select6(len(wrong_bs)), wrong_bs))[:2] == (0x05, 0x26)
    assert lu.write_cache_enabled
