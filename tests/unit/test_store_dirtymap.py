"""The dirty-region bitmap: bits, codec, doubt means dirty, set before writing, batched marks, lazy clears."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from store.dirtymap import (
    HEADER_SIZE,
    REGION_SIZE,
    BitmapCorrupt,
    DirtyBitmap,
    DirtyMap,
    region_span,
    regions_for,
)

VID = "0123456789abcdef0123456789abcdef"
MIB = 1 << 20


def test_region_arithmetic() -> None:
    assert regions_for(1) == 1
    assert regions_for(MIB) == 1
    assert regions_for(MIB + 1) == 2
    assert list(region_span(0, 4096)) == [0]
    assert list(region_span(MIB - 4096, 8192)) == [0, 1]
    assert list(region_span(3 * MIB, MIB)) == [3]
    assert list(region_span(5, 0)) == []


def test_bits_set_clear_iterate_and_all() -> None:
    bits = DirtyBitmap(11)
    assert bits.add(3) and not bits.add(3)
    bits.add(10)
    assert list(bits) == [3, 10] and bits.count() == 2
    bits.discard(3)
    assert list(bits) == [10]
    bits.set_all()
    assert list(bits) == list(range(11))
    assert bits.to_bytes() == b"\xff\x07"


def test_codec_round_trip_and_every_corruption_refused() -> None:
    bits = DirtyBitmap(20)
    for r in (0, 7, 19):
        bits.add(r)
    data = bits.encode(VID)
    assert len(data) == HEADER_SIZE + 3
    assert list(DirtyBitmap.decode(data, VID, 20)) == [0, 7, 19]
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    bad = {
        "short": data[:10],
        "magic": b"X" + data[1:],
        "checksum": bytes(flipped),
        "volume": bits.encode("f" * 32),
        "regions": DirtyBitmap(21).encode(VID),
        "truncated body": data[:-1],
    }
    for what, raw in bad.items():
        with pytest.raises(BitmapCorrupt):
            DirtyBitmap.decode(raw, VID, 20)
        assert what


def test_missing_map_is_all_dirty_unless_created_in_sync(tmp_path: Path) -> None:
    dirty = DirtyMap.open(tmp_path / "a.dirty", VID, 4 * MIB)
    assert dirty.dirty_regions() == [0, 1, 2, 3]
    assert dirty.covered(0, 4 * MIB)
    dirty.close()
    clean = DirtyMap.open(tmp_path / "b.dirty", VID, 4 * MIB, missing_clean=True)
    assert clean.dirty_regions() == [] and not clean.covered(0, 1)
    clean.close()
    # Both were written at once: they load as they were.
    assert DirtyMap.open(tmp_path / "a.dirty", VID, 4 * MIB).dirty_regions() == [0, 1, 2, 3]
    assert DirtyMap.open(tmp_path / "b.dirty", VID, 4 * MIB).dirty_regions() == []


def test_corrupt_map_loads_all_dirty(tmp_path: Path) -> None:
    path = tmp_path / "v.dirty"
    DirtyMap.open(path, VID, 3 * MIB, missing_clean=True).close()
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE] ^= 0x02
    path.write_bytes(bytes(raw))
    assert DirtyMap.open(path, VID, 3 * MIB).dirty_regions() == [0, 1, 2]
    # A map of another size (the volume grew) is not trusted either.
    assert DirtyMap.open(path, VID, 5 * MIB).dirty_regions() == [0, 1, 2, 3, 4]


async def test_mark_is_durable_before_it_returns_and_rewrites_cost_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v.dirty"
    dirty = DirtyMap.open(path, VID, 8 * MIB, missing_clean=True)
    await dirty.mark(2 * MIB + 4096, 4096)
    assert DirtyBitmap.decode(path.read_bytes(), VID, 8).count() == 1
    assert dirty.covered(2 * MIB, MIB)
    before = path.stat().st_mtime_ns
    await dirty.mark(2 * MIB, 8192)  # already durably dirty: no write
    assert path.stat().st_mtime_ns == before
    dirty.close()


async def test_concurrent_marks_share_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirty = DirtyMap.open(tmp_path / "v.dirty", VID, 64 * MIB, missing_clean=True)
    writes: list[bytes] = []
    real = dirty._write_bytes

    def counting(data: bytes) -> None:
        writes.append(data)
        real(data)

    monkeypatch.setattr(dirty, "_write_bytes", counting)
    await asyncio.gather(*(dirty.mark(r * REGION_SIZE, 4096) for r in range(32)))
    assert dirty.dirty_regions() == list(range(32))
    assert 1 <= len(writes) <= 2  # the first mark's write, then one for every later one
    assert DirtyBitmap.decode(writes[-1], VID, 64).count() == 32
    dirty.close()


async def test_clears_are_lazy_and_a_cleared_region_is_marked_again(tmp_path: Path) -> None:
    path = tmp_path / "v.dirty"
    dirty = DirtyMap.open(path, VID, 4 * MIB)
    dirty.clear([0, 1, 2])
    assert dirty.dirty_regions() == [3]
    assert DirtyBitmap.decode(path.read_bytes(), VID, 4).count() == 4  # not yet on disk
    assert not dirty.covered(0, 4096)
    await dirty.mark(0, 4096)  # written with the clears
    assert list(DirtyBitmap.decode(path.read_bytes(), VID, 4)) == [0, 3]
    dirty.clear([0])
    dirty.close()  # pending clears are written at close
    assert DirtyMap.open(path, VID, 4 * MIB).dirty_regions() == [3]


async def test_mark_all(tmp_path: Path) -> None:
    path = tmp_path / "v.dirty"
    dirty = DirtyMap.open(path, VID, 3 * MIB, missing_clean=True)
    await dirty.mark_all()
    assert list(DirtyBitmap.decode(path.read_bytes(), VID, 3)) == [0, 1, 2]
    dirty.close()
