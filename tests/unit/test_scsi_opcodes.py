"""REPORT SUPPORTED OPERATION CODES against the dispatch table (SPC-4 6.35)."""

from __future__ import annotations

import struct

import pytest

from frontend.scsi.commands import command_table
from tests.unit.test_scsi_helpers import good, make_lu, rsoc, run, sense


def descriptors(data: bytes, rctd: bool) -> list[tuple[int, int, int, int]]:
    (length,) = struct.unpack_from(">I", data)
    assert length == len(data) - 4
    size = 20 if rctd else 8
    out = []
    for off in range(4, len(data), size):
        op, sa, flags, cdb_len = struct.unpack_from(">BxHxBH", data, off)
        out.append((op, sa, flags, cdb_len))
        if rctd:
            assert struct.unpack_from(">H", data, off + 8)[0] == 0x0A
    return out


@pytest.mark.parametrize("rctd", [False, True])
async def test_all_commands(rctd: bool) -> None:
    lu, _ = make_lu()
    descs = descriptors(bytes(good(await run(lu, rsoc(rctd=rctd))).data), rctd)
    assert len(descs) == len(command_table(supports_unmap=True))
    for op, sa, flags, cdb_len in descs:
        assert bool(flags & 0x02) == rctd
        assert flags & 0x01 or sa == 0  # SERVACTV clear -> SA zero
        assert cdb_len == {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[op >> 5]


async def test_every_listed_command_is_dispatched_and_answers_one_command_queries() -> None:
    lu, _ = make_lu()
    for op, sa, flags, cdb_len in descriptors(bytes(good(await run(lu, rsoc())).data), False):
        servactv = bool(flags & 0x01)
        one = await run(lu, rsoc(option=1, opcode=op, sa=sa))
        two = await run(lu, rsoc(option=2, opcode=op, sa=sa))
        if servactv:
            assert sense(one)[:2] == (0x05, 0x24)
            data = bytes(good(two).data)
        else:
            assert sense(two)[:2] == (0x05, 0x24)
            data = bytes(good(one).data)
        assert data[1] & 0x07 == 0x03 and struct.unpack_from(">H", data, 2)[0] == cdb_len
        assert data[4] == op and len(data) == 4 + cdb_len
        # The command itself is implemented: it never answers INVALID COMMAND OPERATION CODE.
        cdb = bytes((op, sa if servactv else 0)).ljust(cdb_len, b"\0")
        res = await run(lu, cdb)
        assert res.sense is None or res.sense[12] != 0x20, hex(op)


async def test_one_command_details() -> None:
    lu, _ = make_lu()
    data = bytes(good(await run(lu, rsoc(option=1, opcode=0x2A, rctd=True))).data)
    assert data[1] & 0x80 and data[5] & 0x18 == 0x18  # CTDP, DPO/FUA usable in WRITE(10)
    assert struct.unpack_from(">H", data, 4 + 10)[0] == 0x0A
    unsupported = bytes(good(await run(lu, rsoc(option=1, opcode=0xC7))).data)
    assert unsupported == bytes((0, 0x01, 0, 0))
    assert sense(await run(lu, rsoc(option=5)))[:2] == (0x05, 0x24)
    assert len(good(await run(lu, rsoc(alloc=7))).data) == 7


async def test_thick_volumes_do_not_list_unmap_or_sanitize() -> None:
    lu, _ = make_lu(supports_unmap=False)
    ops = {d[0] for d in descriptors(bytes(good(await run(lu, rsoc())).data), False)}
    assert 0x42 not in ops and 0x48 not in ops and 0x2A in ops


@pytest.mark.parametrize(("sa", "plen_usage"), [(0x01, 0xFF), (0x02, 0x00), (0x03, 0x00), (0x1F, 0x00)])
async def test_sanitize_service_actions_and_their_usage_data(sa: int, plen_usage: int) -> None:
    """SBC-3 5.30: IMMED and AUSE are evaluated; only OVERWRITE has a parameter list."""
    lu, _ = make_lu()
    data = bytes(good(await run(lu, rsoc(option=2, opcode=0x48, sa=sa))).data)
    usage = data[4:]
    assert usage[:2] == bytes((0x48, 0xA0 | sa))
    assert usage[7:9] == bytes((plen_usage, plen_usage))
