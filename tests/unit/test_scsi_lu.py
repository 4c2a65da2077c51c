"""LogicalUnit: block commands, errors and sense bytes, write-cache truth, UAs, ALUA, reservations."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
import structlog

from frontend.scsi.lu import AccessState, LogicalUnit, ResetKind, no_such_lun
from frontend.scsi.opcodes import SANITIZE_ACTIONS
from frontend.scsi.reservations import Reservations
from frontend.scsi.types import ScsiStatus
from store.memstore import MemoryBlockStore
from tests.unit.test_scsi_helpers import (
    BS,
    IDENTITY,
    NBLOCKS,
    A,
    B,
    GatedStore,
    compare_and_write,
    field_pointer,
    get_lba_status,
    good,
    information,
    inquiry,
    make_lu,
    mode_select6,
    mode_sense6,
    overwrite_params,
    read6,
    read10,
    read16,
    read_capacity10,
    read_capacity16,
    report_luns,
    request,
    request_sense,
    rsoc,
    rtpg,
    run,
    rw10,
    rw12,
    rw16,
    sanitize,
    sense,
    settle,
    tur,
    unmap,
    unmap_params,
    write6,
    write10,
    write16,
    write_same10,
    write_same16,
)

ILLEGAL, INVALID_FIELD = 0x05, 0x24


def pattern(nblocks: int, seed: int = 1) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(nblocks * BS))


# ---- basic commands ---------------------------------------------------------------------------------


async def test_test_unit_ready_and_unknown_opcode() -> None:
    lu, _ = make_lu()
    good(await run(lu, tur()))
    assert sense(await run(lu, bytes([0xC7]) + bytes(15))) == (ILLEGAL, 0x20, 0x00)
    # Unknown service action of SERVICE ACTION IN(16): INVALID COMMAND OPERATION CODE too.
    assert sense(await run(lu, bytes([0x9E, 0x1F]) + bytes(14))) == (ILLEGAL, 0x20, 0x00)


async def test_naca_is_rejected_with_field_pointer_at_control_byte() -> None:
    lu, _ = make_lu()
    res = await run(lu, bytes(5) + b"\x04")
    assert sense(res) == (ILLEGAL, INVALID_FIELD, 0)
    assert field_pointer(res) == (True, 5)


async def test_read_capacity_10_and_16() -> None:
    lu, _ = make_lu()
    data = good(await run(lu, read_capacity10())).data
    assert struct.unpack(">II", data) == (NBLOCKS - 1, BS)
    data = bytes(good(await run(lu, read_capacity16())).data)
    assert len(data) == 32
    assert struct.unpack_from(">QI", data) == (NBLOCKS - 1, BS)
    assert data[12] == 0  # no protection information
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    assert bytes(good(await run(lu, read_capacity16(alloc=10))).data) == data[:10]
    # LBA without PMI is an invalid field.
    assert sense(await run(lu, bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)))) == (ILLEGAL, INVALID_FIELD, 0)


async def test_4096_byte_luns_do_not_promise_lbprz() -> None:
    """qemu 7.2 asserts on 4096-byte LUNs with LBPRZ=1 (block/iscsi.c, iscsi_co_block_status called
    with BDRV_REQUEST_MAX_BYTES): such LUNs report LBPRZ=0, and still read zeros after UNMAP."""
    lu, _ = make_lu(nblocks=512, block_size=4096)
    data = bytes(good(await run(lu, read_capacity16())).data)
    assert data[14] & 0xC0 == 0x80  # LBPME, not LBPRZ
    b2 = bytes(good(await run(lu, inquiry(1, 0xB2))).data)
    assert b2[5] & 0xE4 == 0xE0  # LBPU, LBPWS, LBPWS10, not LBPRZ
    good(await run(lu, write10(3, 1), b"x" * 4096))
    good(await run(lu, unmap(24), unmap_params((3, 1))))
    assert bytes(good(await run(lu, read10(3, 1))).data) == bytes(4096)
    lu512, _ = make_lu()
    b2 = bytes(good(await run(lu512, inquiry(1, 0xB2))).data)
    assert b2[5] & 0x04


async def test_physical_block_size_sets_lbppbe_and_unmap_granularity() -> None:
    store = MemoryBlockStore(NBLOCKS * BS, BS)
    lu = LogicalUnit(store, IDENTITY, physical_block_size=4096)
    data = bytes(good(await run(lu, read_capacity16())).data)
    assert data[13] & 0x0F == 3
    b0 = bytes(good(await run(lu, inquiry(1, 0xB0))).data)
    assert struct.unpack_from(">I", b0, 28)[0] == 8  # OPTIMAL UNMAP GRANULARITY
    assert bytes(good(await run(make_lu()[0], read_capacity16())).data)[13] == 0
    with pytest.raises(ValueError):
        LogicalUnit(MemoryBlockStore(NBLOCKS * BS, BS), IDENTITY, physical_block_size=1536)


async def test_read_capacity_16_without_unmap_support_has_no_lbpme() -> None:
    lu, _ = make_lu(supports_unmap=False)
    data = bytes(good(await run(lu, read_capacity16())).data)
    assert data[14] & 0xC0 == 0


@pytest.mark.parametrize(
    ("write", "read"),
    [
        (lambda lba, n: rw10(0x2A, lba, n), lambda lba, n: rw10(0x28, lba, n)),
        (lambda lba, n: rw12(0xAA, lba, n), lambda lba, n: rw12(0xA8, lba, n)),
        (lambda lba, n: rw16(0x8A, lba, n), lambda lba, n: rw16(0x88, lba, n)),
        (write6, read6),
    ],
    ids=["10", "12", "16", "6"],
)
async def test_write_then_read_round_trip(write: Any, read: Any) -> None:
    lu, _ = make_lu()
    data = pattern(3, seed=7)
    res = good(await run(lu, write(100, 3), data))
    assert res.transfer_length == 3 * BS
    res = good(await run(lu, read(100, 3)))
    assert bytes(res.data) == data
    assert res.transfer_length == 3 * BS


async def test_read6_zero_length_means_256_blocks() -> None:
    lu, _ = make_lu()
    res = good(await run(lu, read6(0, 0)))
    assert len(res.data) == 256 * BS


async def test_zero_block_transfers_are_good_and_move_nothing() -> None:
    lu, store = make_lu()
    for cdb in (read10(0, 0), write10(0, 0), read16(0, 0), write16(0, 0)):
        res = good(await run(lu, cdb, b""))
        assert res.data == b""
    assert store.mapped_blocks == frozenset()


@pytest.mark.parametrize(
    "cdb",
    [
        read10(NBLOCKS, 1),
        read10(NBLOCKS - 1, 2),
        read16(2**63, 1),
        read16(2**64 - 1, 1),
        write10(NBLOCKS - 1, 2),
    ],
)
async def test_lba_out_of_range(cdb: bytes) -> None:
    lu, _ = make_lu()
    assert sense(await run(lu, cdb, bytes(2 * BS))) == (ILLEGAL, 0x21, 0x00)


@pytest.mark.parametrize("flags", [0x20, 0x40, 0x60, 0x80, 0xE0])
async def test_protect_field_is_an_invalid_field(flags: int) -> None:
    lu, _ = make_lu()
    for cdb in (read10(0, 1, flags), write10(0, 1, flags), read16(0, 1, flags), rw12(0xA8, 0, 1, flags)):
        res = await run(lu, cdb, bytes(BS))
        assert sense(res) == (ILLEGAL, INVALID_FIELD, 0)
        assert field_pointer(res) == (True, 1)


async def test_transfer_longer_than_max_transfer_is_invalid() -> None:
    lu, _ = make_lu(nblocks=1 << 20)
    too_many = lu.limits.max_transfer + 1
    res = await run(lu, read16(0, too_many))
    assert sense(res) == (ILLEGAL, INVALID_FIELD, 0)
    assert field_pointer(res) == (True, 10)


async def test_dpo_fua_accepted_and_fua_flushes() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 1, 0x10), bytes(BS)))  # DPO
    assert store.flush_count == 0
    good(await run(lu, write10(0, 1, 0x08), bytes(BS)))  # FUA
    assert store.flush_count == 1
    good(await run(lu, write16(0, 1, 0x18), bytes(BS)))
    assert store.flush_count == 2
    good(await run(lu, read10(0, 1, 0x18)))


async def test_synchronize_cache_flushes() -> None:
    lu, store = make_lu()
    good(await run(lu, rw10(0x35, 0, 0)))
    good(await run(lu, rw16(0x91, 0, 8)))
    assert store.flush_count == 2
    assert sense(await run(lu, rw10(0x35, NBLOCKS + 1, 0))) == (ILLEGAL, 0x21, 0)


async def test_prefetch_is_good_and_range_checked() -> None:
    lu, _ = make_lu()
    good(await run(lu, rw10(0x34, 0, 8)))
    good(await run(lu, rw16(0x90, NBLOCKS - 1, 1, 0x02)))
    assert sense(await run(lu, rw16(0x90, NBLOCKS, 1))) == (ILLEGAL, 0x21, 0)


# ---- residuals: Data-Out shorter or longer than the CDB asks -------------------------------------


async def test_write_with_less_data_writes_only_whole_blocks_received() -> None:
    lu, _store = make_lu()
    good(await run(lu, write10(0, 2), b"a" * 2 * BS))
    res = good(await run(lu, write10(0, 2), b"b" * BS))
    assert res.transfer_length == 2 * BS
    assert bytes(good(await run(lu, read10(0, 2))).data) == b"b" * BS + b"a" * BS
    # Less than a block: nothing written, still GOOD (the iSCSI layer reports the overflow).
    good(await run(lu, write10(0, 1), b"c" * 200))
    assert bytes(good(await run(lu, read10(0, 1))).data) == b"b" * BS


async def test_write_with_more_data_writes_only_what_the_cdb_says() -> None:
    lu, _ = make_lu()
    good(await run(lu, write10(0, 2), b"a" * 2 * BS))
    res = good(await run(lu, write10(0, 1), b"b" * 2 * BS))
    assert res.transfer_length == BS
    assert bytes(good(await run(lu, read10(0, 2))).data) == b"b" * BS + b"a" * BS


# ---- write cache truth ---------------------------------------------------------------------------


def caching_page(wce: bool) -> bytes:
    page = bytearray(20)
    page[0:2] = b"\x08\x12"
    page[2] = 0x04 if wce else 0
    return bytes(page)


async def test_wce_zero_makes_every_write_command_flush() -> None:
    lu, store = make_lu()
    assert lu.write_cache_enabled
    params = bytes(4) + caching_page(False)
    good(await run(lu, mode_select6(len(params)), params))
    assert not lu.write_cache_enabled
    ms = bytes(good(await run(lu, mode_sense6(0x08, dbd=True))).data)
    assert ms[4] == 0x08 and ms[6] & 0x04 == 0
    commands = [
        (write10(0, 1), bytes(BS)),
        (write16(1, 1), bytes(BS)),
        (write6(2, 1), bytes(BS)),
        (rw12(0xAA, 3, 1), bytes(BS)),
        (rw10(0x2E, 4, 1), bytes(BS)),
        (write_same10(5, 4), b"x" * BS),
        (write_same16(9, 4, 0x08), bytes(BS)),
        (rw16(0x8B, 20, 1), bytes(BS)),
        (rw16(0x9C, 21, 1), bytes(BS)),
        (compare_and_write(22, 1), bytes(2 * BS)),
        (unmap(24), unmap_params((30, 2))),
    ]
    for i, (cdb, data) in enumerate(commands, start=1):
        good(await run(lu, cdb, data))
        assert store.flush_count == i, cdb.hex()
    # Back to write-back: plain writes stop flushing.
    params = bytes(4) + caching_page(True)
    good(await run(lu, mode_select6(len(params)), params))
    good(await run(lu, write10(0, 1), bytes(BS)))
    assert store.flush_count == len(commands)


# ---- VERIFY, WRITE AND VERIFY ---------------------------------------------------------------------


@pytest.mark.parametrize("op,make", [(0x2F, rw10), (0xAF, rw12), (0x8F, rw16)])
async def test_verify_bytchk(op: int, make: Any) -> None:
    lu, _ = make_lu()
    data = pattern(4)
    good(await run(lu, write10(10, 4), data))
    good(await run(lu, make(op, 10, 4, 0x00), b"junk"))  # BYTCHK 0: no compare
    good(await run(lu, make(op, 10, 4, 0x02), data))  # BYTCHK 01b: equal
    bad = bytearray(data)
    bad[777] ^= 0xFF
    res = await run(lu, make(op, 10, 4, 0x02), bytes(bad))
    assert sense(res) == (0x0E, 0x1D, 0x00)
    assert information(res) == 777
    assert sense(await run(lu, make(op, 10, 4, 0x04), data)) == (ILLEGAL, INVALID_FIELD, 0)  # 10b


async def test_verify_bytchk_11_compares_one_block_with_each() -> None:
    lu, _ = make_lu()
    good(await run(lu, write10(0, 3), b"q" * 3 * BS))
    good(await run(lu, rw10(0x2F, 0, 3, 0x06), b"q" * BS))
    good(await run(lu, write10(2, 1), b"q" * 5 + b"z" * (BS - 5)))
    res = await run(lu, rw10(0x2F, 0, 3, 0x06), b"q" * BS)
    assert sense(res) == (0x0E, 0x1D, 0)
    assert information(res) == 2 * BS + 5


async def test_write_and_verify_writes_and_flushes() -> None:
    lu, store = make_lu()
    data = pattern(2, seed=3)
    good(await run(lu, rw16(0x8E, 7, 2, 0x02), data))
    assert bytes(good(await run(lu, read10(7, 2))).data) == data
    assert store.flush_count == 1


# ---- COMPARE AND WRITE, ORWRITE, WRITE ATOMIC -----------------------------------------------------


async def test_compare_and_write_success_and_miscompare() -> None:
    lu, _ = make_lu()
    good(await run(lu, write10(5, 2), b"A" * 2 * BS))
    res = good(await run(lu, compare_and_write(5, 2), b"A" * 2 * BS + b"B" * 2 * BS))
    assert res.transfer_length == 4 * BS
    assert bytes(good(await run(lu, read10(5, 2))).data) == b"B" * 2 * BS
    verify = bytearray(b"B" * 2 * BS)
    verify[2 * BS - 27] = ord("C")
    res = await run(lu, compare_and_write(5, 2), bytes(verify) + b"D" * 2 * BS)
    assert sense(res) == (0x0E, 0x1D, 0x00)
    assert information(res) == 2 * BS - 27
    assert bytes(good(await run(lu, read10(5, 2))).data) == b"B" * 2 * BS  # unchanged


async def test_compare_and_write_rejects_wrong_data_out_size_and_too_many_blocks() -> None:
    lu, _ = make_lu()
    assert sense(await run(lu, compare_and_write(0, 1), bytes(4 * BS)))[:2] == (ILLEGAL, INVALID_FIELD)
    assert sense(await run(lu, compare_and_write(0, 3), bytes(4 * BS)))[:2] == (ILLEGAL, INVALID_FIELD)
    assert sense(await run(lu, compare_and_write(NBLOCKS - 1, 2), bytes(4 * BS))) == (ILLEGAL, 0x21, 0)
    good(await run(lu, compare_and_write(0, 0), b""))


class InterleavingStore(MemoryBlockStore):
    """Yields to the event loop inside every read and write so concurrent commands interleave."""

    async def read(self, offset: int, length: int) -> bytes:
        for _ in range(3):
            await asyncio.sleep(0)
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        await super().write(offset, data)


async def test_compare_and_write_is_atomic_against_another_compare_and_write() -> None:
    store = InterleavingStore(NBLOCKS * BS, BS)
    lu = LogicalUnit(store, IDENTITY)
    good(await run(lu, write10(0, 1), b"A" * BS))
    results = await asyncio.gather(
        run(lu, compare_and_write(0, 1), b"A" * BS + b"B" * BS, nexus=A),
        run(lu, compare_and_write(0, 1), b"A" * BS + b"C" * BS, nexus=B),
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION]
    winner = b"B" if results[0].status == ScsiStatus.GOOD else b"C"
    assert bytes(good(await run(lu, read10(0, 1))).data) == winner * BS


async def test_compare_and_write_is_atomic_against_an_ordinary_write() -> None:
    """SBC-3 5.3: a WRITE that arrives while a CAW is between its read and its write waits."""
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY, sanitize_actions=SANITIZE_ACTIONS)
    good(await run(lu, write10(0, 1), b"A" * BS))
    store.shut()
    caw = asyncio.create_task(run(lu, compare_and_write(0, 1), b"A" * BS + b"B" * BS, nexus=A))
    await store.arrivals(1)  # the CAW is reading
    write = asyncio.create_task(run(lu, write10(0, 1), b"W" * BS, nexus=B))
    other = asyncio.create_task(run(lu, write10(9, 1), b"O" * BS, nexus=B))  # elsewhere: not held up
    await store.arrivals(2)
    await settle()
    assert store.log[1:] == [("read", 0), ("write", 9 * BS)]
    store.open()
    good(await caw)
    good(await write)
    good(await other)
    assert store.log[3:] == [("write", 0), ("write", 0)]  # the CAW's write, then the WRITE's
    assert bytes(good(await run(lu, read10(0, 1))).data) == b"W" * BS


async def test_compare_and_write_waits_for_a_write_already_running() -> None:
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY, sanitize_actions=SANITIZE_ACTIONS)
    good(await run(lu, write10(0, 1), b"A" * BS))
    store.shut()
    write = asyncio.create_task(run(lu, write10(0, 1), b"W" * BS, nexus=B))
    await store.arrivals(1)
    caw = asyncio.create_task(run(lu, compare_and_write(0, 1), b"A" * BS + b"B" * BS, nexus=A))
    read = asyncio.create_task(run(lu, read10(0, 1), nexus=B))  # queued behind the CAW's claim
    await settle()
    assert store.log[1:] == [("write", 0)]
    store.open()
    good(await write)
    res = await caw
    assert sense(res) == (0x0E, 0x1D, 0x00)  # it compared against the WRITE's data
    assert bytes(good(await read).data) == b"W" * BS


async def test_orwrite_ors_into_the_medium() -> None:
    lu, _ = make_lu()
    good(await run(lu, write10(3, 1), b"\x0f" * BS))
    good(await run(lu, rw16(0x8B, 3, 1), b"\xf0" * (BS - 1) + b"\x01"))
    assert bytes(good(await run(lu, read10(3, 1))).data) == b"\xff" * (BS - 1) + b"\x0f"
    assert sense(await run(lu, rw16(0x8B, 3, 1, 0x20), bytes(BS)))[:2] == (ILLEGAL, INVALID_FIELD)


def write_atomic16(lba: int, n: int, boundary: int = 0) -> bytes:
    return struct.pack(">BBQHHBB", 0x9C, 0, lba, boundary, n, 0, 0)


async def test_write_atomic_16() -> None:
    lu, _ = make_lu()
    data = pattern(4, seed=9)
    good(await run(lu, write_atomic16(NBLOCKS - 4, 4), data))
    assert bytes(good(await run(lu, read16(NBLOCKS - 4, 4))).data) == data
    assert sense(await run(lu, write_atomic16(0, 1, boundary=1), bytes(BS)))[:2] == (ILLEGAL, INVALID_FIELD)
    too_long = lu.limits.max_atomic_transfer + 1
    assert sense(await run(lu, write_atomic16(0, too_long), bytes(too_long * BS)))[:2] == (
        ILLEGAL,
        INVALID_FIELD,
    )
    assert sense(await run(lu, write_atomic16(NBLOCKS, 1), bytes(BS))) == (ILLEGAL, 0x21, 0)


# ---- WRITE SAME, UNMAP, GET LBA STATUS, SANITIZE ---------------------------------------------------


async def test_write_same_writes_the_block_everywhere() -> None:
    lu, _ = make_lu()
    block = pattern(1, seed=5)
    res = good(await run(lu, write_same10(10, 300), block))
    assert res.transfer_length == BS
    assert bytes(good(await run(lu, read16(10, 300))).data) == block * 300
    good(await run(lu, write_same16(NBLOCKS - 2, 2), b"z" * BS))
    assert bytes(good(await run(lu, read16(NBLOCKS - 2, 2))).data) == b"z" * 2 * BS


async def test_write_same_unmap_and_ndob_deallocate() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 8), b"\xff" * 8 * BS))
    good(await run(lu, write_same10(0, 4, 0x08), bytes(BS)))
    assert store.mapped_blocks == frozenset(range(4, 8))
    res = good(await run(lu, write_same16(4, 4, 0x09), b""))  # UNMAP + NDOB
    assert res.transfer_length == 0
    assert store.mapped_blocks == frozenset()
    assert bytes(good(await run(lu, read10(0, 8))).data) == bytes(8 * BS)


async def test_write_same_unmap_deallocates_whatever_the_data() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 4), b"\xff" * 4 * BS))
    good(await run(lu, write_same10(0, 4, 0x08), b"\xff" * BS))
    assert store.mapped_blocks == frozenset()
    assert bytes(good(await run(lu, read10(0, 4))).data) == bytes(4 * BS)


async def test_write_same_zero_blocks_means_to_the_end() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(NBLOCKS - 5, 5), b"\xff" * 5 * BS))
    good(await run(lu, write_same16(NBLOCKS - 5, 0, 0x08), bytes(BS)))
    assert store.mapped_blocks == frozenset()
    assert sense(await run(lu, write_same10(NBLOCKS + 1, 0), bytes(BS))) == (ILLEGAL, 0x21, 0)


@pytest.mark.parametrize(
    ("cdb", "data"),
    [
        (write_same10(0, 1, 0x10), bytes(BS)),  # ANCHOR without UNMAP
        (write_same10(0, 1, 0x18), bytes(BS)),  # ANCHOR: ANC_SUP=0
        (write_same10(0, 1, 0x08), bytes(BS // 2)),  # short Data-Out
        (write_same10(0, 1, 0x08), bytes(2 * BS)),  # long Data-Out
        (write_same16(0, 1, 0x20), bytes(BS)),  # WRPROTECT
    ],
)
async def test_write_same_invalid_fields(cdb: bytes, data: bytes) -> None:
    lu, _ = make_lu()
    assert sense(await run(lu, cdb, data))[:2] == (ILLEGAL, INVALID_FIELD)


async def test_write_same_unmap_needs_thin_provisioning() -> None:
    lu, _ = make_lu(supports_unmap=False)
    assert sense(await run(lu, write_same10(0, 1, 0x08), bytes(BS)))[:2] == (ILLEGAL, INVALID_FIELD)


async def test_unmap_deallocates_extents() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 16), b"a" * 16 * BS))
    params = unmap_params((0, 2), (5, 3), (9, 0))
    res = good(await run(lu, unmap(len(params)), params))
    assert res.transfer_length == len(params)
    assert store.mapped_blocks == frozenset({2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15})
    assert bytes(good(await run(lu, read10(0, 2))).data) == bytes(2 * BS)


async def test_unmap_errors() -> None:
    lu, store = make_lu()
    good(await run(lu, unmap(0)))
    good(await run(lu, unmap(8), unmap_params()))
    good(await run(lu, unmap(24), unmap_params((NBLOCKS, 0))))
    assert sense(await run(lu, unmap(4), bytes(4))) == (ILLEGAL, 0x1A, 0)
    good(await run(lu, write10(0, 1), b"x" * BS))
    params = unmap_params((0, 1), (NBLOCKS - 1, 2))
    assert sense(await run(lu, unmap(len(params)), params)) == (ILLEGAL, 0x21, 0)
    assert store.mapped_blocks == frozenset({0})  # nothing unmapped when one extent is bad
    assert sense(await run(lu, unmap(24, anchor=1), unmap_params((0, 1))))[:2] == (ILLEGAL, INVALID_FIELD)
    thick, _ = make_lu(supports_unmap=False)
    assert sense(await run(thick, unmap(24), unmap_params((0, 1)))) == (ILLEGAL, 0x20, 0)


def lba_status(data: bytes) -> list[tuple[int, int, int]]:
    (length,) = struct.unpack_from(">I", data)
    assert length == len(data) - 4
    return [struct.unpack_from(">QIB", data, off) for off in range(8, len(data), 16)]


async def test_get_lba_status_reports_mapped_and_deallocated_runs() -> None:
    lu, _ = make_lu()
    good(await run(lu, write10(4, 4), b"a" * 4 * BS))
    descs = lba_status(bytes(good(await run(lu, get_lba_status(0))).data))
    assert descs == [(0, 4, 1), (4, 4, 0), (8, NBLOCKS - 8, 1)]
    descs = lba_status(bytes(good(await run(lu, get_lba_status(5, alloc=24))).data))
    assert descs == [(5, 3, 0)]
    assert len(good(await run(lu, get_lba_status(0, alloc=20))).data) == 20
    for lba in (NBLOCKS, NBLOCKS + 1, 2**63, 2**64 - 1):
        assert sense(await run(lu, get_lba_status(lba))) == (ILLEGAL, 0x21, 0)


async def test_sanitize_block_erase_unmaps_everything() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 4), b"a" * 4 * BS))
    good(await run(lu, write10(NBLOCKS - 4, 4), b"a" * 4 * BS))
    good(await run(lu, sanitize(0x02)))
    assert store.mapped_blocks == frozenset()
    assert store.flush_count == 1
    descs = lba_status(bytes(good(await run(lu, get_lba_status(0, alloc=256))).data))
    assert descs == [(0, NBLOCKS, 1)]


@pytest.mark.parametrize(
    "cdb",
    [
        sanitize(0x02, plen=8),
        sanitize(0x03, plen=8),
        sanitize(0x1F, plen=8),
        sanitize(0x02, byte1_extra=0x40),
        sanitize(0x01, plen=4),
        sanitize(0x01, plen=0),
        sanitize(0x01, plen=BS + 5),
        sanitize(0x00),
        sanitize(0x05),
    ]
    + [sanitize(0x02)[:i] + b"\x01" + sanitize(0x02)[i + 1 :] for i in range(2, 7)],
)
async def test_sanitize_rejects_invalid_cdb_fields(cdb: bytes) -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 1), b"a" * BS))
    assert sense(await run(lu, cdb, bytes(BS + 8))) == (ILLEGAL, INVALID_FIELD, 0)
    assert store.mapped_blocks == frozenset({0})
    assert not lu.sanitize_in_progress


@pytest.mark.parametrize(
    ("params", "byte"),
    [
        (overwrite_params(b"\xaa" * BS, count=0), 0),  # OVERWRITE COUNT 0
        (overwrite_params(b"\xaa" * BS, test=1), 0),  # TEST: no test modes
        (overwrite_params(b"") + b"\0", 2),  # INITIALIZATION PATTERN LENGTH 0
        (struct.pack(">BxH", 1, BS + 1) + bytes(BS), 2),  # longer than a block
        (struct.pack(">BxH", 1, 8) + bytes(16), 2),  # disagrees with the parameter list length
    ],
)
async def test_sanitize_overwrite_rejects_invalid_parameter_lists(params: bytes, byte: int) -> None:
    lu, _ = make_lu()
    good(await run(lu, write10(0, 1), b"a" * BS))
    res = await run(lu, sanitize(0x01, plen=len(params)), params)
    assert sense(res) == (ILLEGAL, 0x26, 0)
    assert field_pointer(res) == (False, byte)
    assert bytes(good(await run(lu, read10(0, 1))).data) == b"a" * BS


@pytest.mark.parametrize("pattern_len", [BS, BS // 2, 4, 3])
async def test_sanitize_overwrite_repeats_the_pattern_over_every_block(pattern_len: int) -> None:
    lu, store = make_lu()
    pat = bytes((i * 7 + 1) & 0xFF for i in range(pattern_len))
    good(await run(lu, sanitize(0x01, plen=pattern_len + 4), overwrite_params(pat)))
    expected = (pat * (BS // pattern_len + 1))[:BS]
    assert bytes(good(await run(lu, read10(0, 1))).data) == expected
    assert bytes(good(await run(lu, read10(NBLOCKS - 2, 2))).data) == expected * 2
    assert store.mapped_blocks == frozenset(range(NBLOCKS))
    assert store.flush_count >= 1


async def test_sanitize_overwrite_invert_alternates_and_ends_with_the_pattern() -> None:
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY, sanitize_actions=SANITIZE_ACTIONS)
    good(await run(lu, sanitize(0x01, plen=8), overwrite_params(b"\x0f\x0f\x0f\x0f", count=2, invert=True)))
    writes = [off for op, off in store.log if op == "write"]
    assert len(writes) == 2 * (NBLOCKS * BS // (1024 * 1024))  # two passes of 1 MiB chunks
    assert bytes(good(await run(lu, read10(7, 1))).data) == b"\x0f" * BS


async def test_sanitize_crypto_erase_deallocates_everything() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 4), b"a" * 4 * BS))
    good(await run(lu, write10(NBLOCKS - 4, 4), b"a" * 4 * BS))
    good(await run(lu, sanitize(0x03)))
    assert store.mapped_blocks == frozenset()
    assert bytes(good(await run(lu, read10(0, 4))).data) == bytes(4 * BS)


async def test_sanitize_immed_runs_in_background_with_not_ready_and_progress() -> None:
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY, sanitize_actions=SANITIZE_ACTIONS)
    store.shut()
    good(await run(lu, sanitize(0x01, plen=8, byte1_extra=0x80), overwrite_params(b"abcd")))
    await store.arrivals(1)
    assert lu.sanitize_in_progress
    for cdb in (tur(), read10(0, 1), sanitize(0x02), mode_sense6(0x08)):
        res = await run(lu, cdb)
        assert sense(res) == (0x02, 0x04, 0x1B)
        assert res.sense is not None and res.sense[15] == 0x80  # SKSV, progress indication
    good(await run(lu, inquiry()))
    good(await run(lu, report_luns()))
    data = bytes(good(await run(lu, request_sense())).data)
    assert (data[2], data[12], data[13]) == (0x02, 0x04, 0x1B)
    assert struct.unpack_from(">H", data, 16)[0] == 0  # nothing written yet
    store.release(1)  # the first of two 1 MiB chunks
    await store.arrivals(1)
    data = bytes(good(await run(lu, request_sense())).data)
    assert struct.unpack_from(">H", data, 16)[0] == 0x8000  # half done
    # Resets and the loss of the nexus do not stop a sanitize (SBC-3 4.11.2).
    lu.reset(ResetKind.LUN, A)
    lu.reset(ResetKind.TARGET_COLD, A)
    lu.nexus_lost(B)
    assert lu.sanitize_in_progress
    store.open()
    await lu.sanitize_done()
    assert not lu.sanitize_in_progress
    assert sense(await run(lu, tur()))[0] == 0x06  # the reset's UNIT ATTENTION, now that it is done
    good(await run(lu, tur()))
    assert bytes(good(await run(lu, read10(NBLOCKS - 1, 1))).data) == b"abcd" * (BS // 4)


async def test_aborted_sanitize_command_leaves_the_operation_running() -> None:
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY, sanitize_actions=SANITIZE_ACTIONS)
    store.shut()
    command = asyncio.create_task(run(lu, sanitize(0x01, plen=8), overwrite_params(b"wxyz")))
    await store.arrivals(1)
    command.cancel()  # what an aborted task amounts to for the SCSI layer
    with pytest.raises(asyncio.CancelledError):
        await command
    assert lu.sanitize_in_progress
    store.open()
    await lu.sanitize_done()
    good(await run(lu, tur()))
    assert bytes(good(await run(lu, read10(0, 1))).data) == b"wxyz" * (BS // 4)


async def test_sanitize_waits_for_commands_already_running() -> None:
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY, sanitize_actions=SANITIZE_ACTIONS)
    store.shut()
    write = asyncio.create_task(run(lu, write10(3, 1), b"W" * BS))
    await store.arrivals(1)
    good(await run(lu, sanitize(0x02, byte1_extra=0x80)))
    assert sense(await run(lu, read10(3, 1))) == (0x02, 0x04, 0x1B)
    await settle()
    assert [op for op, _ in store.log] == ["write"]  # the erase waits for the write
    store.open()
    good(await write)
    await lu.sanitize_done()
    assert [op for op, _ in store.log] == ["write", "unmap"]
    assert store.mapped_blocks == frozenset()


async def test_failed_sanitize_enters_failure_mode_until_exit_failure_mode() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 1), b"a" * BS))
    store.fail_next("unmap")
    assert sense(await run(lu, sanitize(0x02, byte1_extra=0x20))) == (0x03, 0x31, 0x03)  # AUSE=1
    assert sense(await run(lu, read10(0, 1))) == (0x03, 0x31, 0x03)
    assert sense(await run(lu, write10(0, 1), b"b" * BS)) == (0x03, 0x31, 0x03)
    good(await run(lu, tur()))
    data = bytes(good(await run(lu, request_sense())).data)
    assert (data[2], data[12], data[13]) == (0x03, 0x31, 0x03)
    good(await run(lu, sanitize(0x1F)))  # EXIT FAILURE MODE
    good(await run(lu, read10(0, 1)))


async def test_restricted_sanitize_failure_needs_a_successful_sanitize() -> None:
    lu, store = make_lu()
    store.fail_next("unmap")
    assert sense(await run(lu, sanitize(0x02))) == (0x03, 0x31, 0x03)  # AUSE=0: restricted
    assert sense(await run(lu, sanitize(0x1F)))[:2] == (ILLEGAL, INVALID_FIELD)
    assert sense(await run(lu, sanitize(0x02, byte1_extra=0x20)))[:2] == (ILLEGAL, INVALID_FIELD)
    assert sense(await run(lu, read10(0, 1))) == (0x03, 0x31, 0x03)
    good(await run(lu, sanitize(0x03)))  # a successful sanitize ends the failure mode
    good(await run(lu, read10(0, 1)))
    good(await run(lu, sanitize(0x1F)))  # nothing to exit: GOOD


async def test_sanitize_conflicts_with_another_initiators_reservation() -> None:
    lu, store = make_lu()
    good(await run(lu, write10(0, 1), b"a" * BS))
    good(await run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=B))  # RESERVE(6) by B
    assert (await run(lu, sanitize(0x01, plen=8), overwrite_params(b"abcd"))).status == (
        ScsiStatus.RESERVATION_CONFLICT
    )
    good(await run(lu, bytes((0x17, 0, 0, 0, 0, 0)), nexus=B))
    assert store.mapped_blocks == frozenset({0})


async def test_overwrite_is_not_offered_by_default() -> None:
    lu = LogicalUnit(MemoryBlockStore(NBLOCKS * BS, BS), IDENTITY)
    data = bytes(good(await run(lu, rsoc())).data)
    offered = {
        data[i + 3] & 0x1F if data[i + 5] & 1 else None for i in range(4, len(data), 8) if data[i] == 0x48
    }
    assert offered == {0x02, 0x03, 0x1F}
    res = await run(lu, sanitize(0x01, plen=8), overwrite_params(b"abcd"))
    assert sense(res) == (ILLEGAL, INVALID_FIELD, 0)
    good(await run(lu, sanitize(0x03)))


async def test_sanitize_is_not_supported_without_unmap() -> None:
    lu, _ = make_lu(supports_unmap=False)
    assert sense(await run(lu, sanitize(0x02))) == (ILLEGAL, 0x20, 0)


# ---- misc SBC commands -----------------------------------------------------------------------------


async def test_start_stop_unit_and_prevent_allow() -> None:
    lu, store = make_lu()
    good(await run(lu, bytes((0x1B, 0, 0, 0, 0x01, 0))))  # START
    good(await run(lu, bytes((0x1B, 0, 0, 0, 0x00, 0))))  # STOP: flushes
    assert store.flush_count == 1
    good(await run(lu, bytes((0x1B, 0, 0, 0, 0x04, 0))))  # STOP with NO_FLUSH
    assert store.flush_count == 1
    assert sense(await run(lu, bytes((0x1B, 1, 0, 0, 0x02, 0))))[:2] == (ILLEGAL, INVALID_FIELD)  # eject
    good(await run(lu, bytes((0x1B, 0, 0, 0, 0x32, 0))))  # power condition IDLE: LOEJ ignored
    assert sense(await run(lu, bytes((0x1B, 0, 0, 0, 0x40, 0))))[:2] == (ILLEGAL, INVALID_FIELD)
    good(await run(lu, bytes((0x1E, 0, 0, 0, 1, 0))))
    good(await run(lu, bytes((0x1E, 0, 0, 0, 0, 0))))
    assert sense(await run(lu, bytes((0x1E, 0, 0, 0, 2, 0))))[:2] == (ILLEGAL, INVALID_FIELD)


async def test_read_defect_data_is_empty() -> None:
    lu, _ = make_lu()
    data = bytes(good(await run(lu, bytes((0x37, 0, 0x1D, 0, 0, 0, 0, 0, 64, 0)))).data)
    assert data == bytes((0, 0x1D, 0, 0))
    data = bytes(good(await run(lu, bytes((0xB7, 0x15, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0)))).data)
    assert data == bytes((0, 0x15, 0, 0, 0, 0, 0, 0))


# ---- store errors -----------------------------------------------------------------------------------


async def test_store_errors_become_medium_errors() -> None:
    lu, store = make_lu()
    store.fail_next("read")
    assert sense(await run(lu, read10(0, 1))) == (0x03, 0x11, 0x00)
    store.fail_next("write")
    assert sense(await run(lu, write10(0, 1), bytes(BS))) == (0x03, 0x0C, 0x00)
    store.fail_next("flush")
    assert sense(await run(lu, rw10(0x35, 0, 0))) == (0x03, 0x0C, 0x00)


# ---- REQUEST SENSE, REPORT LUNS, no such LUN ---------------------------------------------------


async def test_request_sense_without_condition_is_no_sense() -> None:
    lu, _ = make_lu()
    data = bytes(good(await run(lu, request_sense())).data)
    assert len(data) == 18 and data[0] == 0x70 and data[2] == 0 and data[12:14] == b"\0\0"
    assert len(good(await run(lu, request_sense(alloc=8))).data) == 8
    assert sense(await run(lu, request_sense(desc=True)))[:2] == (ILLEGAL, INVALID_FIELD)


async def test_report_luns() -> None:
    lu, _ = make_lu()
    data = bytes(good(await run(lu, report_luns())).data)
    assert data == struct.pack(">I4x", 8) + bytes(8)
    assert bytes(good(await run(lu, report_luns(alloc=4))).data) == data[:4]
    assert bytes(good(await run(lu, report_luns(select=1))).data) == bytes(8)
    assert sense(await run(lu, report_luns(select=7)))[:2] == (ILLEGAL, INVALID_FIELD)


async def test_no_such_lun() -> None:
    data = bytes(good(no_such_lun(request(inquiry()))).data)
    assert data[0] == 0x7F and len(data) == 36 and data[4] == 31
    assert bytes(good(no_such_lun(request(inquiry(alloc=5)))).data) == data[:5]
    data = bytes(good(no_such_lun(request(report_luns()))).data)
    assert data[:4] == struct.pack(">I", 8)
    data = bytes(good(no_such_lun(request(request_sense()))).data)
    assert (data[2], data[12], data[13]) == (ILLEGAL, 0x25, 0x00)
    assert sense(no_such_lun(request(read10(0, 1)))) == (ILLEGAL, 0x25, 0x00)
    assert sense(no_such_lun(request(tur()))) == (ILLEGAL, 0x25, 0x00)


# ---- unit attentions -------------------------------------------------------------------------------


async def test_new_nexus_gets_no_unit_attention() -> None:
    lu, _ = make_lu()
    good(await run(lu, tur(), nexus=A))
    good(await run(lu, tur(), nexus=B))


async def test_lun_reset_gives_every_nexus_a_ua_and_inquiry_is_not_blocked() -> None:
    lu, _ = make_lu()
    good(await run(lu, tur(), nexus=A))
    good(await run(lu, tur(), nexus=B))
    lu.reset(ResetKind.LUN, A)
    good(await run(lu, inquiry(), nexus=A))  # INQUIRY is not stopped by a UA
    good(await run(lu, report_luns(), nexus=A))
    good(await run(lu, bytes((0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0)), nexus=A))  # nor PR IN
    assert sense(await run(lu, read10(0, 1), nexus=A)) == (0x06, 0x29, 0x03)
    good(await run(lu, read10(0, 1), nexus=A))  # reported once
    data = bytes(good(await run(lu, request_sense(), nexus=B)).data)
    assert (data[2], data[12], data[13]) == (0x06, 0x29, 0x03)  # REQUEST SENSE returns it ...
    good(await run(lu, tur(), nexus=B))  # ... and clears it


@pytest.mark.parametrize(("kind", "ascq"), [(ResetKind.TARGET_WARM, 0x00), (ResetKind.TARGET_COLD, 0x01)])
async def test_target_resets(kind: ResetKind, ascq: int) -> None:
    lu, _ = make_lu()
    good(await run(lu, tur()))
    lu.reset(kind, None)
    assert sense(await run(lu, tur())) == (0x06, 0x29, ascq)


async def test_capacity_change_ua_and_new_capacity() -> None:
    lu, store = make_lu()
    good(await run(lu, tur(), nexus=A))
    good(await run(lu, tur(), nexus=B))
    await store.resize(2 * NBLOCKS * BS)
    lu.capacity_changed()
    for nexus in (A, B):
        assert sense(await run(lu, read_capacity10(), nexus=nexus)) == (0x06, 0x2A, 0x09)
        data = good(await run(lu, read_capacity10(), nexus=nexus)).data
        assert struct.unpack(">II", data) == (2 * NBLOCKS - 1, BS)
    good(await run(lu, read10(2 * NBLOCKS - 1, 1)))


async def test_pending_uas_are_reported_in_order_and_not_duplicated() -> None:
    lu, _ = make_lu()
    good(await run(lu, tur()))
    lu.capacity_changed()
    lu.capacity_changed()
    lu.access_state = AccessState.ACTIVE_NON_OPTIMIZED
    assert sense(await run(lu, tur())) == (0x06, 0x2A, 0x09)
    assert sense(await run(lu, tur())) == (0x06, 0x2A, 0x06)
    good(await run(lu, tur()))


async def test_nexus_loss_forgets_the_nexus() -> None:
    lu, _ = make_lu()
    good(await run(lu, tur(), nexus=B))
    lu.capacity_changed()
    lu.nexus_lost(B)
    good(await run(lu, tur(), nexus=B))


async def test_mode_change_by_one_nexus_gives_the_others_a_ua() -> None:
    lu, _ = make_lu()
    good(await run(lu, tur(), nexus=A))
    good(await run(lu, tur(), nexus=B))
    params = bytes(4) + caching_page(False)
    good(await run(lu, mode_select6(len(params)), params, nexus=A))
    good(await run(lu, tur(), nexus=A))
    assert sense(await run(lu, tur(), nexus=B)) == (0x06, 0x2A, 0x01)


# ---- software write protect -------------------------------------------------------------------------


def control_page(swp: bool) -> bytes:
    page = bytearray(12)
    page[0:2] = b"\x0a\x0a"
    page[2], page[3], page[5] = 0x02, 0x10, 0x40
    page[4] = 0x08 if swp else 0
    page[8:10] = b"\xff\xff"
    return bytes(page)


async def test_swp_makes_writes_fail_with_write_protected() -> None:
    lu, _ = make_lu()
    params = bytes(4) + control_page(True)
    good(await run(lu, mode_select6(len(params)), params))
    ms = bytes(good(await run(lu, mode_sense6(0x0A, dbd=True))).data)
    assert ms[2] & 0x80  # WP in the device-specific parameter
    good(await run(lu, read10(0, 1)))
    assert sense(await run(lu, write10(0, 1), bytes(BS))) == (0x07, 0x27, 0x00)
    assert sense(await run(lu, unmap(24), unmap_params((0, 1)))) == (0x07, 0x27, 0x00)
    params = bytes(4) + control_page(False)
    good(await run(lu, mode_select6(len(params)), params))
    good(await run(lu, write10(0, 1), bytes(BS)))


# ---- ALUA access states -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "ascq"),
    [(AccessState.STANDBY, 0x0B), (AccessState.UNAVAILABLE, 0x0C), (AccessState.TRANSITIONING, 0x0A)],
)
async def test_inaccessible_states_refuse_media_access(state: AccessState, ascq: int) -> None:
    lu, _ = make_lu()
    good(await run(lu, tur()))
    lu.access_state = state
    assert sense(await run(lu, tur())) == (0x06, 0x2A, 0x06)  # the transition is announced
    for cdb, data in [
        (tur(), b""),
        (read10(0, 1), b""),
        (write10(0, 1), bytes(BS)),
        (rw10(0x35, 0, 0), b""),
        (rw10(0x2F, 0, 1), b""),
        (unmap(24), unmap_params((0, 1))),
        (get_lba_status(0), b""),
    ]:
        assert sense(await run(lu, cdb, data)) == (0x02, 0x04, ascq), cdb.hex()
    for cdb in (inquiry(), report_luns(), rtpg(), read_capacity10(), read_capacity16(), mode_sense6(0x3F)):
        good(await run(lu, cdb))
    data = bytes(good(await run(lu, request_sense())).data)
    assert (data[2], data[12], data[13]) == (0x02, 0x04, ascq)
    lu.access_state = AccessState.ACTIVE_NON_OPTIMIZED
    assert sense(await run(lu, read10(0, 1))) == (0x06, 0x2A, 0x06)
    good(await run(lu, read10(0, 1)))


# ---- fenced while a command runs --------------------------------------------------------------------


class FlushGatedStore(GatedStore):
    """A GatedStore whose flushes stop at the gate too (SYNCHRONIZE CACHE, FUA)."""

    async def flush(self) -> None:
        await self._gate("flush", 0)
        await super().flush()


NOT_READY_TRANSITION = (0x02, 0x04, 0x0A)


@pytest.mark.parametrize(
    ("cdb", "data", "fenced_during"),
    [
        (write10(2, 2), b"W" * 2 * BS, ("write", 2 * BS)),
        (write16(2, 2), b"W" * 2 * BS, ("write", 2 * BS)),
        (write10(2, 1, 0x08), b"W" * BS, ("flush", 0)),  # FUA: the write done, the flush in flight
        (write16(2, 1, 0x08), b"W" * BS, ("write", 2 * BS)),  # FUA, fenced before the flush
        (write_same10(2, 4), b"S" * BS, ("write", 2 * BS)),
        (write_same16(2, 4), b"S" * BS, ("write", 2 * BS)),
        (write_same16(2, 4, 0x08), bytes(BS), ("unmap", 2 * BS)),  # WRITE SAME with UNMAP
        (unmap(24), unmap_params((2, 3)), ("unmap", 2 * BS)),
        (compare_and_write(2, 1), b"A" * BS + b"C" * BS, ("write", 2 * BS)),
        (rw10(0x35, 0, 0), b"", ("flush", 0)),  # SYNCHRONIZE CACHE(10)
        (rw16(0x91, 0, 8), b"", ("flush", 0)),  # SYNCHRONIZE CACHE(16)
        (read10(2, 1), b"", ("read", 2 * BS)),  # no stale read answered after the fence either
    ],
    ids=[
        "write10",
        "write16",
        "write10-fua-in-flush",
        "write16-fua-in-write",
        "write-same10",
        "write-same16",
        "write-same16-unmap",
        "unmap",
        "compare-and-write",
        "sync-cache10",
        "sync-cache16",
        "read10",
    ],
)
async def test_a_command_in_flight_when_the_lu_is_fenced_is_failed_not_acknowledged(
    cdb: bytes, data: bytes, fenced_during: tuple[str, int]
) -> None:
    """Past every check when it started, its store I/O held at the gate until the node fences the
    LU (the fence timer sets TRANSITIONING): the command must not answer GOOD, but NOT READY,
    ASYMMETRIC ACCESS STATE TRANSITION (02/04/0A), as a fenced LU answers a new command."""
    store = FlushGatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY, sanitize_actions=SANITIZE_ACTIONS)
    good(await run(lu, write10(2, 1), b"A" * BS))
    store.shut()
    task = asyncio.create_task(run(lu, cdb, data))
    while True:  # let the command's store calls through until it reaches the one to fence during
        await store.arrivals(1)
        if store.log[-1] == fenced_during:
            break
        store.release(1)
    lu.access_state = AccessState.TRANSITIONING  # the fence, while the I/O is in flight
    store.open()
    assert sense(await task) == NOT_READY_TRANSITION
    assert sense(await run(lu, tur())) == (0x06, 0x2A, 0x06)  # then the state change is announced
    assert sense(await run(lu, cdb, data)) == NOT_READY_TRANSITION  # and new commands are refused


async def test_a_write_in_flight_when_the_lu_is_demoted_gets_the_new_states_answer() -> None:
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY)
    store.shut()
    task = asyncio.create_task(run(lu, write10(0, 1), b"W" * BS))
    await store.arrivals(1)
    lu.access_state = AccessState.STANDBY
    store.open()
    assert sense(await task) == (0x02, 0x04, 0x0B)


async def test_a_command_that_ends_in_a_serving_state_is_acknowledged() -> None:
    """The answer follows the state at the end: fenced and served again (a new lease) while the
    write was in flight, it is GOOD; commands the fenced state allows stay GOOD when fenced."""
    store = GatedStore(NBLOCKS * BS)
    lu = LogicalUnit(store, IDENTITY)
    store.shut()
    task = asyncio.create_task(run(lu, write10(0, 1), b"W" * BS))
    await store.arrivals(1)
    lu.access_state = AccessState.TRANSITIONING
    lu.access_state = AccessState.ACTIVE_OPTIMIZED
    store.open()
    good(await task)
    assert bytes(good(await run(lu, read10(0, 1), nexus=B)).data) == b"W" * BS


async def test_report_target_port_groups() -> None:
    lu, _ = make_lu(tpgt=7)
    data = bytes(good(await run(lu, rtpg())).data)
    assert struct.unpack_from(">I", data)[0] == len(data) - 4 == 12
    assert data[4] & 0x0F == AccessState.ACTIVE_OPTIMIZED
    assert data[5] == 0x8F
    assert struct.unpack_from(">H", data, 6)[0] == 7
    assert data[11] == 1 and struct.unpack_from(">H", data, 14)[0] == 7
    lu.access_state = AccessState.STANDBY
    assert sense(await run(lu, rtpg())) == (0x06, 0x2A, 0x06)
    data = bytes(good(await run(lu, rtpg(fmt=1))).data)
    assert data[4] == 0x10 and struct.unpack_from(">I", data)[0] == len(data) - 4
    assert data[8] & 0x0F == AccessState.STANDBY
    assert len(good(await run(lu, rtpg(alloc=6))).data) == 6


# ---- reservations ---------------------------------------------------------------------------------


async def test_reserve6_conflicts_for_other_nexus_and_lun_reset_drops_it() -> None:
    lu, _ = make_lu()
    good(await run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=A))
    good(await run(lu, read10(0, 1), nexus=A))
    assert (await run(lu, read10(0, 1), nexus=B)).status == ScsiStatus.RESERVATION_CONFLICT
    assert (await run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=B)).status == ScsiStatus.RESERVATION_CONFLICT
    good(await run(lu, inquiry(), nexus=B))
    lu.reset(ResetKind.LUN, A)
    assert sense(await run(lu, tur(), nexus=B)) == (0x06, 0x29, 0x03)
    good(await run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=B))
    good(await run(lu, bytes((0x17, 0, 0, 0, 0, 0)), nexus=B))


async def test_reserve10_and_release10_act_as_their_6_byte_forms_without_third_parties() -> None:
    lu, _ = make_lu()
    reserve10, release10 = bytes((0x56,)) + bytes(9), bytes((0x57,)) + bytes(9)
    good(await run(lu, reserve10, nexus=A))
    assert (await run(lu, read10(0, 1), nexus=B)).status == ScsiStatus.RESERVATION_CONFLICT
    assert (await run(lu, reserve10, nexus=B)).status == ScsiStatus.RESERVATION_CONFLICT
    good(await run(lu, release10, nexus=A))
    good(await run(lu, read10(0, 1), nexus=B))
    for flags in (0x10, 0x02):  # 3RDPTY, LONGID: third-party reservations are not supported
        third_party = bytes((0x56, flags)) + bytes(8)
        assert sense(await run(lu, third_party, nexus=A)) == (0x05, 0x24, 0x00)


def pr_out(action: int, key: int, sa_key: int, prtype: int = 0) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ4xBxH", key, sa_key, 0, 0)
    return struct.pack(">BBBxxIB", 0x5F, action, prtype, len(params), 0), params


async def test_persistent_reservations_are_persisted_and_their_uas_queued() -> None:
    records: list[dict[str, Any]] = []

    async def persist(record: dict[str, Any]) -> None:
        records.append(record)

    store = MemoryBlockStore(NBLOCKS * BS, BS)
    lu = LogicalUnit(store, IDENTITY, reservations=Reservations(), on_reservations_changed=persist)
    for nexus, key in ((A, 0xA), (B, 0xB)):
        cdb, params = pr_out(0x00, 0, key)
        good(await run(lu, cdb, params, nexus=nexus))
    assert len(records) == 2
    cdb, params = pr_out(0x01, 0xB, 0, prtype=0x01)  # B reserves WRITE EXCLUSIVE
    good(await run(lu, cdb, params, nexus=B))
    assert (await run(lu, write10(0, 1), bytes(BS), nexus=A)).status == ScsiStatus.RESERVATION_CONFLICT
    cdb, params = pr_out(0x04, 0xA, 0xB, prtype=0x01)  # A preempts B
    good(await run(lu, cdb, params, nexus=A))
    assert sense(await run(lu, tur(), nexus=B))[0] == 0x06  # B learns it was preempted
    data = bytes(good(await run(lu, bytes((0x5E, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0)), nexus=A)).data)
    assert struct.unpack_from(">I", data, 4)[0] == 8  # one key left
    assert bytes(good(await run(lu, bytes((0x5E, 0, 0, 0, 0, 0, 0, 0, 4, 0)), nexus=A)).data) == data[:4]


async def test_failed_persistence_is_a_hardware_error() -> None:
    async def broken(record: dict[str, Any]) -> None:
        raise OSError("disk full")

    lu = LogicalUnit(MemoryBlockStore(NBLOCKS * BS, BS), IDENTITY, on_reservations_changed=broken)
    cdb, params = pr_out(0x00, 0, 0x1)
    with structlog.testing.capture_logs() as logs:
        assert sense(await run(lu, cdb, params)) == (0x04, 0x44, 0x00)
    (record,) = [r for r in logs if r["event"] == "reservations not saved"]   # said where it happened
    assert isinstance(record["exc_info"], OSError)
