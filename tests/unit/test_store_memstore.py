"""MemoryBlockStore's test hooks (the shared contract is in test_store_blockstore.py)."""

from __future__ import annotations

import errno

import pytest

from store.blockstore import StoreIOError, StoreOp, StoreRangeError
from store.memstore import MemoryBlockStore


async def test_flush_count_counts_flushes() -> None:
    s = MemoryBlockStore(8192, 512)
    assert s.flush_count == 0
    await s.write(0, bytes(512))
    assert s.flush_count == 0
    await s.flush()
    await s.flush()
    assert s.flush_count == 2


async def test_fail_next_fails_one_call_of_that_op() -> None:
    s = MemoryBlockStore(8192, 512)
    s.fail_next(StoreOp.WRITE, errno.ENOSPC)
    await s.read(0, 512)  # other ops are unaffected
    with pytest.raises(StoreIOError) as info:
        await s.write(1024, b"\x01" * 512)
    assert (info.value.op, info.value.offset, info.value.errno) == (StoreOp.WRITE, 1024, errno.ENOSPC)
    assert await s.read(1024, 512) == bytes(512)  # nothing was written
    await s.write(1024, b"\x01" * 512)
    assert await s.read(1024, 512) == b"\x01" * 512


async def test_only_touched_blocks_are_mapped() -> None:
    s = MemoryBlockStore(1 << 20, 4096)
    await s.write(4096 + 100, b"x" * 5000)  # unaligned: touches blocks 1 and 2
    assert s.mapped_blocks == {1, 2}
    await s.unmap(4096, 4096)
    assert s.mapped_blocks == {2}
    assert await s.mapped_extent(0) == (False, 8192)
    assert await s.mapped_extent(8192) == (True, 4096)
    assert await s.mapped_extent(12288) == (False, (1 << 20) - 12288)


async def test_unsupported_unmap_and_bad_geometry() -> None:
    s = MemoryBlockStore(8192, 512, supports_unmap=False)
    assert not s.supports_unmap
    with pytest.raises(StoreIOError) as info:
        await s.unmap(0, 512)
    assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(StoreRangeError):
        MemoryBlockStore(1000, 512)
    with pytest.raises(StoreRangeError):
        MemoryBlockStore(8192, 500)
