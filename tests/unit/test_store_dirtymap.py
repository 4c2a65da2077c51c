"""The dirty-region bitmap: bits, codec, doubt means dirty, set before writing, batched marks, lazy clears."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from store.blockstore import FileBlockStore, StoreError
from store.dirtymap import (
    HEADER_SIZE,
    REGION_SIZE,
    BitmapCorrupt,
    DirtyBitmap,
    DirtyMap,
    MarkingStore,
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


async def test_covered_is_every_region_of_the_range_durably_dirty(tmp_path: Path) -> None:
    """``covered`` (one region tested directly, the common write) agrees with its definition at
    and across region boundaries and the map's end."""
    dirty = DirtyMap.open(tmp_path / "c.dirty", VID, 4 * MIB, missing_clean=True)
    await dirty.mark(MIB, 2 * MIB)  # regions 1 and 2 durably dirty
    for offset in (
        0,
        512,
        MIB - 4096,
        MIB - 512,
        MIB,
        2 * MIB - 4096,
        3 * MIB - 4096,
        3 * MIB,
        4 * MIB - 512,
        4 * MIB,
    ):
        for length in (0, 512, 4096, 8192, MIB, MIB + 4096, 2 * MIB, 3 * MIB):
            span = region_span(offset, length)
            expected = span.stop <= dirty.regions and all(r in dirty.durable for r in span)
            assert dirty.covered(offset, length) is expected, (offset, length)
    assert dirty.covered(MIB, 4096) and not dirty.covered(MIB - 4096, 8192) and not dirty.covered(0, 512)
    dirty.close()


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


@pytest.fixture
def shm_path() -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm), where a map's marks are written on the loop."""
    path = Path(tempfile.mkdtemp(prefix="sparrow-test-dirty-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_a_map_on_tmpfs_marks_on_the_loop_durably_before_it_returns(
    shm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On tmpfs a mark is a memory copy: written at once, never through the executor (whose hop
    cost a replica ~150 us of CPU per new region); on a disk the map still batches on the executor
    and ``mark_now`` declines, changing nothing."""
    loop = asyncio.get_running_loop()

    def no_executor(*args: object) -> None:
        raise AssertionError("a map on tmpfs used the executor")

    path = shm_path / "v.dirty"
    dirty = DirtyMap.open(path, VID, 8 * MIB, missing_clean=True)
    assert dirty.inline
    monkeypatch.setattr(loop, "run_in_executor", no_executor)
    assert dirty.mark_now(2 * MIB + 4096, 4096)
    assert list(DirtyBitmap.decode(path.read_bytes(), VID, 8)) == [2] and dirty.covered(2 * MIB, MIB)
    await dirty.mark(5 * MIB, 2 * MIB)  # the general call: inline too
    assert list(DirtyBitmap.decode(path.read_bytes(), VID, 8)) == [2, 5, 6]
    dirty.clear([2])
    await dirty.sync()
    assert list(DirtyBitmap.decode(path.read_bytes(), VID, 8)) == [5, 6]
    assert not dirty.mark_now(8 * MIB, 4096)  # past the map (a grown volume): the general path
    dirty.close()
    monkeypatch.undo()

    on_disk = DirtyMap.open(tmp_path / "v.dirty", VID, 8 * MIB, missing_clean=True)
    assert not on_disk.inline  # tmp_path is not tmpfs here (the test's premise)
    assert not on_disk.mark_now(0, 4096) and on_disk.dirty_regions() == []
    on_disk.close()


async def test_a_mark_on_tmpfs_that_cannot_be_written_raises_and_stays_pending(
    shm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirty = DirtyMap.open(shm_path / "v.dirty", VID, 8 * MIB, missing_clean=True)

    def failing(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dirty, "_write_bytes", failing)
    with pytest.raises(StoreError):
        dirty.mark_now(0, 4096)
    assert not dirty.covered(0, 4096)  # not durable: no write may go ahead
    with pytest.raises(StoreError):
        await dirty.mark(0, 4096)
    monkeypatch.undo()
    assert dirty.mark_now(0, 4096) and dirty.covered(0, 4096)
    dirty.close()


async def test_a_marking_store_on_tmpfs_marks_then_writes_a_run_inline(
    shm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MarkingStore.write_inline`` into a clean region of a map on tmpfs: the bit is on disk
    before the data is written, and the run is written at once (no worker, no executor)."""
    store = await FileBlockStore.open(str(shm_path / "v.img"), block_size=512, size=8 * MIB, create=True)
    dirty = DirtyMap.open(shm_path / "v.dirty", VID, 8 * MIB, missing_clean=True)
    order: list[str] = []
    real_mark, real_write = dirty._write_bytes, FileBlockStore.write_inline

    def marking(data: bytes) -> None:
        order.append("mark")
        real_mark(data)

    def writing(self: FileBlockStore, offset: int, buffers: Sequence[bytes | memoryview]) -> bool:
        order.append("write")
        return real_write(self, offset, buffers)

    monkeypatch.setattr(dirty, "_write_bytes", marking)
    monkeypatch.setattr(FileBlockStore, "write_inline", writing)
    try:
        marking_store = MarkingStore(store, dirty)
        assert marking_store.write_inline(3 * MIB, [b"a" * 512, b"b" * 512])
        assert order == ["mark", "write"] and dirty.covered(3 * MIB, 1024)
        assert await store.read(3 * MIB, 1024) == b"a" * 512 + b"b" * 512
        assert marking_store.write_inline(3 * MIB + 1024, [b"c" * 512])  # covered: no mark
        assert order == ["mark", "write", "write"]
    finally:
        dirty.close()
        await store.close()


async def test_a_marking_store_on_tmpfs_marks_then_writes_inline_on_the_fast_path(
    shm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MarkingStore.write_now`` (the primary's fast path) into a clean region of a map on tmpfs:
    marked durably, then written, at once; with the map on a disk it declines (the general path
    marks on the executor first)."""
    store = await FileBlockStore.open(str(shm_path / "v.img"), block_size=512, size=8 * MIB, create=True)
    dirty = DirtyMap.open(shm_path / "v.dirty", VID, 8 * MIB, missing_clean=True)
    on_disk = DirtyMap.open(tmp_path / "v.dirty", VID, 8 * MIB, missing_clean=True)
    order: list[str] = []
    real_mark, real_write = dirty._write_bytes, FileBlockStore.write_now

    def marking(data: bytes) -> None:
        order.append("mark")
        real_mark(data)

    def writing(self: FileBlockStore, offset: int, data: bytes | bytearray | memoryview) -> bool:
        order.append("write")
        return real_write(self, offset, data)

    monkeypatch.setattr(dirty, "_write_bytes", marking)
    monkeypatch.setattr(FileBlockStore, "write_now", writing)
    try:
        assert MarkingStore(store, dirty).write_now(5 * MIB, b"x" * 4096)
        assert order == ["mark", "write"] and list(
            DirtyBitmap.decode((shm_path / "v.dirty").read_bytes(), VID, 8)
        ) == [5]
        assert await store.read(5 * MIB, 4096) == b"x" * 4096
        assert not MarkingStore(store, on_disk).write_now(6 * MIB, b"y" * 4096)
        assert order == ["mark", "write"] and on_disk.dirty_regions() == []
    finally:
        dirty.close()
        on_disk.close()
        await store.close()


async def test_a_fast_path_write_whose_mark_cannot_be_written_declines_and_the_general_path_reports(
    shm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MarkingStore.write_now`` is ``InlineIo``: on a map on tmpfs whose mark cannot be written it
    answers False, having written no data (the iSCSI fast path then hands the command to the
    general path, which marks again and reports the error as a CHECK CONDITION); raising out of it
    broke the connection's data_received."""
    store = await FileBlockStore.open(str(shm_path / "v.img"), block_size=512, size=8 * MIB, create=True)
    dirty = DirtyMap.open(shm_path / "v.dirty", VID, 8 * MIB, missing_clean=True)

    def failing(data: bytes) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(dirty, "_write_bytes", failing)
    try:
        marking_store = MarkingStore(store, dirty)
        assert not marking_store.write_now(5 * MIB, b"x" * 4096)
        assert await store.read(5 * MIB, 4096) == bytes(4096)  # no data without its mark
        assert not dirty.covered(5 * MIB, 4096)
        with pytest.raises(StoreError):
            await marking_store.write(5 * MIB, b"x" * 4096)  # the general path reports it
        monkeypatch.undo()
        assert marking_store.write_now(5 * MIB, b"x" * 4096) and dirty.covered(5 * MIB, 4096)
    finally:
        dirty.close()
        await store.close()
