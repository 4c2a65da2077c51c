"""The BlockStore contract, run against FileBlockStore and MemoryBlockStore; then file-only details."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from store.blockstore import (
    BlockStore,
    FileBlockStore,
    InlineIo,
    IoPath,
    StoreClosed,
    StoreIOError,
    StoreOp,
    StoreOpenError,
    StoreRangeError,
)
from store.memstore import MemoryBlockStore

MiB = 1 << 20


@pytest.fixture(params=["file", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlockStore]:
    s: BlockStore
    if request.param == "file":
        s = await FileBlockStore.open(tmp_path / "v.img", block_size=512, size=4 * MiB, create=True)
    else:
        s = MemoryBlockStore(4 * MiB, 512)
    yield s
    await s.close()


async def file_store(tmp_path: Path, size: int = 4 * MiB, block_size: int = 512) -> FileBlockStore:
    return await FileBlockStore.open(tmp_path / "v.img", block_size=block_size, size=size, create=True)


# ---- the contract ----------------------------------------------------------------------------------


async def test_new_store_reads_zeros_and_is_unmapped(store: BlockStore) -> None:
    assert store.size == 4 * MiB
    assert store.supports_unmap
    assert await store.read(0, 8192) == bytes(8192)
    assert await store.read(store.size - 512, 512) == bytes(512)
    assert await store.mapped_extent(0) == (False, 4 * MiB)


async def test_write_read_round_trip(store: BlockStore) -> None:
    data = os.urandom(64 * 1024)
    await store.write(1 * MiB, data)
    assert await store.read(1 * MiB, len(data)) == data
    assert await store.read(1 * MiB - 512, 512) == bytes(512)
    assert await store.read(1 * MiB + len(data), 512) == bytes(512)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_write_accepts_every_buffer_type(store: BlockStore, kind: Any) -> None:
    payload = bytearray(os.urandom(4096))
    data = kind(payload) if kind is not memoryview else memoryview(payload)[512:1536]
    await store.write(512, data)
    expected = bytes(data)
    assert await store.read(512, len(expected)) == expected


async def test_unaligned_read_and_read_past_end_pad_with_zeros(store: BlockStore) -> None:
    await store.write(store.size - 1024, b"\xab" * 1024)
    assert await store.read(store.size - 1000, 100) == b"\xab" * 100
    # 512 bytes of data and 1024 beyond the end.
    assert await store.read(store.size - 512, 1536) == b"\xab" * 512 + bytes(1024)
    assert await store.read(store.size + 4096, 512) == bytes(512)


async def test_write_past_end_is_refused(store: BlockStore) -> None:
    with pytest.raises(StoreRangeError):
        await store.write(store.size - 512, bytes(1024))
    with pytest.raises(StoreRangeError):
        await store.write(-512, bytes(512))


async def test_unmap_reads_zeros_and_reports_holes(store: BlockStore) -> None:
    await store.write(0, b"\x11" * (256 * 1024))
    assert await store.mapped_extent(0) == (True, 256 * 1024)
    assert await store.mapped_extent(64 * 1024) == (True, 192 * 1024)
    assert await store.mapped_extent(256 * 1024) == (False, 4 * MiB - 256 * 1024)

    await store.unmap(64 * 1024, 64 * 1024)
    assert await store.read(64 * 1024, 64 * 1024) == bytes(64 * 1024)
    assert await store.read(0, 4096) == b"\x11" * 4096
    assert await store.read(128 * 1024, 4096) == b"\x11" * 4096
    assert await store.mapped_extent(0) == (True, 64 * 1024)
    assert await store.mapped_extent(64 * 1024) == (False, 64 * 1024)
    assert await store.mapped_extent(128 * 1024) == (True, 128 * 1024)


async def test_unmap_of_a_partial_block_zeroes_those_bytes(store: BlockStore) -> None:
    await store.write(0, b"\x22" * 8192)
    await store.unmap(512, 512)
    assert await store.read(0, 1536) == b"\x22" * 512 + bytes(512) + b"\x22" * 512


async def test_mapped_extent_is_capped_at_the_volume_size(store: BlockStore) -> None:
    await store.write(store.size - 4096, b"\x01" * 4096)
    assert await store.mapped_extent(store.size - 4096) == (True, 4096)
    assert await store.mapped_extent(store.size - 512) == (True, 512)
    with pytest.raises(StoreRangeError):
        await store.mapped_extent(store.size)


async def test_resize_grows_and_new_space_reads_zeros(store: BlockStore) -> None:
    await store.write(0, b"\x33" * 512)
    await store.resize(8 * MiB)
    assert store.size == 8 * MiB
    assert await store.read(0, 512) == b"\x33" * 512
    assert await store.read(6 * MiB, 4096) == bytes(4096)
    await store.write(8 * MiB - 512, b"\x44" * 512)
    assert await store.read(8 * MiB - 512, 512) == b"\x44" * 512


async def test_resize_refuses_shrink_and_unaligned(store: BlockStore) -> None:
    with pytest.raises(StoreRangeError):
        await store.resize(2 * MiB)
    with pytest.raises(StoreRangeError):
        await store.resize(8 * MiB + 100)
    assert store.size == 4 * MiB


async def test_closed_store_refuses_operations(store: BlockStore) -> None:
    await store.close()
    with pytest.raises(StoreClosed):
        await store.read(0, 512)
    with pytest.raises(StoreClosed):
        await store.write(0, bytes(512))
    await store.close()  # idempotent


def test_both_stores_satisfy_the_protocol() -> None:
    def accepts(_: type[BlockStore]) -> None: ...

    accepts(FileBlockStore)  # mypy checks these two lines
    accepts(MemoryBlockStore)


SHM_PRESENT = os.path.isdir("/dev/shm")


async def test_inline_io_does_what_the_awaited_calls_do_or_nothing(tmp_path: Path) -> None:
    """The fast path's InlineIo: on tmpfs both answer inline; out of range, closed, or with a
    failure armed they decline, having done nothing, and the awaited call reports."""
    stores: list[Any] = [MemoryBlockStore(4 * MiB, 512)]
    if SHM_PRESENT:
        path = Path("/dev/shm") / f"inline-{os.getpid()}.img"
        stores.append(await FileBlockStore.open(path, block_size=512, size=4 * MiB, create=True))
        assert stores[-1].io_path is IoPath.MEMORY
    for s in stores:
        assert isinstance(s, InlineIo)
        assert s.write_now(1024, b"\x5a" * 512)
        assert s.read_now(1024, 512) == b"\x5a" * 512 == await s.read(1024, 512)
        assert not s.write_now(4 * MiB, bytes(512))
        if isinstance(s, MemoryBlockStore):
            s.fail_next(StoreOp.READ)
            assert s.read_now(0, 512) is None
            with pytest.raises(StoreIOError):
                await s.read(0, 512)
        await s.close()
        assert s.read_now(0, 512) is None and not s.write_now(0, bytes(512))
    if len(stores) > 1:
        os.unlink(stores[1].path)
    disk = await file_store(tmp_path)
    if disk.io_path is not IoPath.MEMORY:
        assert not disk.write_now(0, bytes(512))       # a disk: writes go to the pool
    await disk.close()


# ---- FileBlockStore specifics ------------------------------------------------------------------------


async def test_create_makes_a_sparse_file_of_the_size(tmp_path: Path) -> None:
    s = await file_store(tmp_path, size=64 * MiB)
    try:
        st = os.stat(s.path)
        assert st.st_size == 64 * MiB
        assert st.st_blocks * 512 < 1 * MiB
    finally:
        await s.close()


async def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "v.img").write_bytes(b"old data")
    with pytest.raises(StoreOpenError, match="exists"):
        await file_store(tmp_path)
    assert (tmp_path / "v.img").read_bytes() == b"old data"


async def test_data_survives_reopen(tmp_path: Path) -> None:
    s = await file_store(tmp_path)
    await s.write(4096, b"\x5a" * 4096)
    await s.flush()
    await s.close()
    s = await FileBlockStore.open(tmp_path / "v.img", block_size=512)
    try:
        assert s.size == 4 * MiB
        assert await s.read(4096, 4096) == b"\x5a" * 4096
    finally:
        await s.close()


async def test_open_existing_file_uses_its_size_rounded_down(tmp_path: Path) -> None:
    path = tmp_path / "backing.raw"
    path.touch()
    os.truncate(path, 10 * 4096 + 100)
    s = await FileBlockStore.open(path, block_size=4096)
    try:
        assert s.size == 10 * 4096
    finally:
        await s.close()


async def test_open_existing_file_smaller_than_size_grows_it(tmp_path: Path) -> None:
    path = tmp_path / "backing.raw"
    path.write_bytes(b"\x07" * 4096)
    s = await FileBlockStore.open(path, block_size=512, size=1 * MiB)
    try:
        assert os.stat(path).st_size == 1 * MiB
        assert await s.read(0, 4096) == b"\x07" * 4096
    finally:
        await s.close()


async def test_open_refuses_missing_tiny_and_special_files(tmp_path: Path) -> None:
    with pytest.raises(StoreOpenError, match="No such file"):
        await FileBlockStore.open(tmp_path / "nope", block_size=512)
    (tmp_path / "tiny").write_bytes(b"x" * 100)
    with pytest.raises(StoreOpenError, match="less than one"):
        await FileBlockStore.open(tmp_path / "tiny", block_size=512)
    with pytest.raises(StoreOpenError, match="not a regular file"):
        await FileBlockStore.open(tmp_path, block_size=512)
    with pytest.raises(StoreOpenError, match="multiple"):
        await FileBlockStore.open(tmp_path / "x", block_size=512, size=1000, create=True)


async def test_flush_calls_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await file_store(tmp_path)
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    try:
        await s.write(0, bytes(512))
        assert calls == []
        await s.flush()
        await s.flush()
        assert len(calls) == 2
    finally:
        await s.close()


async def test_enospc_on_write_becomes_store_io_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await file_store(tmp_path)

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    try:
        with pytest.raises(StoreIOError) as info:
            await s.write(8192, bytes(4096))
        assert (info.value.op, info.value.offset, info.value.errno) == (StoreOp.WRITE, 8192, errno.ENOSPC)
        assert "No space left" in str(info.value)
        monkeypatch.undo()
        # The store is unharmed.
        await s.write(8192, b"\x01" * 512)
        assert await s.read(8192, 512) == b"\x01" * 512
    finally:
        await s.close()


async def test_eio_on_read_and_flush_become_store_io_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await file_store(tmp_path)

    def broken(*args: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", broken)
    monkeypatch.setattr(os, "preadv", broken)  # the page-cache fast path, too
    monkeypatch.setattr(os, "fdatasync", broken)
    try:
        with pytest.raises(StoreIOError) as info:
            await s.read(512, 512)
        assert (info.value.op, info.value.errno) == (StoreOp.READ, errno.EIO)
        with pytest.raises(StoreIOError) as info:
            await s.flush()
        assert (info.value.op, info.value.errno) == (StoreOp.FLUSH, errno.EIO)
    finally:
        monkeypatch.undo()
        await s.close()


async def test_short_writes_and_reads_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await file_store(tmp_path)
    real_pwrite, real_pread = os.pwrite, os.pread

    def short_pwrite(fd: int, data: Any, offset: int) -> int:
        return real_pwrite(fd, memoryview(data)[:1000], offset)

    def short_pread(fd: int, n: int, offset: int) -> bytes:
        return real_pread(fd, min(n, 777), offset)

    data = os.urandom(10_000)
    monkeypatch.setattr(os, "pwrite", short_pwrite)
    monkeypatch.setattr(os, "pread", short_pread)
    try:
        await s.write(0, data)
        assert await s.read(0, len(data)) == data
    finally:
        monkeypatch.undo()
        await s.close()


async def test_unmap_punches_a_hole_in_the_file(tmp_path: Path) -> None:
    s = await file_store(tmp_path)
    try:
        await s.write(0, b"\x09" * MiB)
        await s.flush()
        before = os.stat(s.path).st_blocks
        await s.unmap(0, MiB)
        assert os.stat(s.path).st_blocks < before
        assert os.stat(s.path).st_size == 4 * MiB  # KEEP_SIZE
    finally:
        await s.close()


async def test_store_without_punch_hole_refuses_unmap(tmp_path: Path) -> None:
    s = await file_store(tmp_path)
    s._supports_unmap = False  # as on a filesystem without FALLOC_FL_PUNCH_HOLE
    try:
        with pytest.raises(StoreIOError) as info:
            await s.unmap(0, 512)
        assert info.value.errno == errno.EOPNOTSUPP
    finally:
        await s.close()


async def test_resize_grows_the_file(tmp_path: Path) -> None:
    s = await file_store(tmp_path)
    try:
        await s.resize(16 * MiB)
        assert os.stat(s.path).st_size == 16 * MiB
    finally:
        await s.close()


async def test_close_waits_for_operations_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pwrite still running in the pool must finish before the descriptor is closed (else EBADF, or
    worse, a write into whatever file reuses the descriptor number)."""
    s = await file_store(tmp_path)
    loop = asyncio.get_running_loop()
    write_started, close_waiting = asyncio.Event(), asyncio.Event()
    release = threading.Event()
    real_pwrite = os.pwrite

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:
        loop.call_soon_threadsafe(write_started.set)
        release.wait(10)
        return real_pwrite(fd, data, offset)

    class SignallingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            loop.call_soon_threadsafe(close_waiting.set)
            return super().wait(timeout)

    s._idle = SignallingEvent()
    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    write = asyncio.create_task(s.write(0, b"\x66" * 512))
    await write_started.wait()
    closing = asyncio.create_task(s.close())
    await asyncio.wait_for(close_waiting.wait(), 10)
    assert not closing.done()
    release.set()
    await write
    await closing
    monkeypatch.undo()
    assert (tmp_path / "v.img").read_bytes()[:512] == b"\x66" * 512
    with pytest.raises(StoreClosed):
        await s.write(0, bytes(512))


async def test_io_path_is_chosen_by_filesystem(tmp_path: Path) -> None:
    """tmpfs does I/O inline on the loop; a disk filesystem reads inline only from the page cache."""
    from store.blockstore import IoPath

    disk = await file_store(tmp_path)
    try:
        assert disk.io_path in (IoPath.NOWAIT, IoPath.POOL)
    finally:
        await disk.close()
    path = Path("/dev/shm") / f"sparrow-test-{os.getpid()}.img"  # tmpfs on every Linux we run on
    mem = await FileBlockStore.open(path, block_size=512, size=1 << 20, create=True)
    try:
        assert mem.io_path is IoPath.MEMORY
        await mem.write(4096, b"m" * 512)
        assert await mem.read(4096, 512) == b"m" * 512
        assert await mem.read(0, 512) == bytes(512)
    finally:
        await mem.close()
        os.unlink(path)


async def test_write_inline_writes_a_run_with_one_pwritev_on_tmpfs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica applies a run of contiguous writes with one pwritev when the store writes inline;
    a store whose writes go to the pool writes nothing and says so (the caller awaits write())."""
    calls: list[int] = []
    real_pwritev = os.pwritev

    def counting_pwritev(fd: int, buffers: Any, offset: int) -> int:
        calls.append(len(buffers))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counting_pwritev)
    path = Path("/dev/shm") / f"sparrow-test-inline-{os.getpid()}.img"
    mem = await FileBlockStore.open(path, block_size=512, size=1 << 20, create=True)
    try:
        parts = [b"a" * 512, memoryview(b"b" * 1024), b"c" * 512]
        assert mem.write_inline(4096, parts)
        assert calls == [3]
        assert await mem.read(4096, 2048) == b"a" * 512 + b"b" * 1024 + b"c" * 512
        with pytest.raises(StoreRangeError):
            mem.write_inline((1 << 20) - 512, [b"x" * 512, b"y" * 512])
        assert calls == [3]
    finally:
        await mem.close()
        os.unlink(path)
    disk = await file_store(tmp_path)
    try:
        assert not disk.write_inline(0, [b"d" * 512, b"e" * 512])
        assert await disk.read(0, 1024) == bytes(1024) and calls == [3]
    finally:
        await disk.close()


async def test_uncached_read_falls_back_to_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await file_store(tmp_path)
    await s.write(0, b"z" * 512)

    def not_cached(*args: Any) -> Any:
        raise BlockingIOError(errno.EAGAIN, "not in page cache")

    monkeypatch.setattr(os, "preadv", not_cached)
    try:
        assert await s.read(0, 512) == b"z" * 512
    finally:
        monkeypatch.undo()
        await s.close()


async def test_cancelled_write_finishes_before_the_cancellation_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted command's pwrite may already run on a thread; the cancelled await must not return
    before it is done, or the write could land after the abort was reported."""
    s = await file_store(tmp_path)
    if s.io_path.value == "memory":  # pragma: no cover - tmp_path is a disk filesystem here
        pytest.fail("this test needs a store whose writes run on the pool")
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()
    real_pwrite = os.pwrite

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:
        loop.call_soon_threadsafe(started.set)
        release.wait(10)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    try:
        write = asyncio.create_task(s.write(0, b"\x5a" * 512))
        await started.wait()
        write.cancel()
        await asyncio.sleep(0)  # one loop turn: the cancellation reaches the write
        assert not write.done()  # still waiting for the thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await write
        assert (tmp_path / "v.img").read_bytes()[:512] == b"\x5a" * 512
    finally:
        release.set()
        monkeypatch.undo()
        await s.close()
