"""MemoryBlockStore: the BlockStore contract held in memory, for unit tests of the layers above."""

from __future__ import annotations

import errno

from store.blockstore import StoreClosed, StoreIOError, StoreOp, StoreRangeError


class MemoryBlockStore:
    """A sparse in-memory volume: a dict of the blocks ever written (absent blocks read as zeros).

    Behaves like ``FileBlockStore`` (reads past the end pad with zeros, writes past ``size`` raise
    ``StoreRangeError``, unmap of a partial block zeroes those bytes and keeps the block mapped).
    ``flush_count`` counts ``flush`` calls; ``fail_next(op)`` makes the next call of ``op`` raise
    ``StoreIOError`` so tests can drive the SCSI layer's error paths.
    """

    def __init__(self, size: int, block_size: int = 512, *, supports_unmap: bool = True) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise StoreRangeError(f"block size {block_size} is not a power of two")
        if size <= 0 or size % block_size:
            raise StoreRangeError(f"size {size} is not a positive multiple of {block_size}")
        self.block_size = block_size
        self._size = size
        self._supports_unmap = supports_unmap
        self._blocks: dict[int, bytearray] = {}
        self._failures: dict[StoreOp, int] = {}
        self._closed = False
        self.flush_count = 0

    # ---- test hooks --------------------------------------------------------------------------------

    def fail_next(self, op: StoreOp | str, err: int = errno.EIO) -> None:
        """Make the next ``op`` call raise ``StoreIOError(op, offset, err)``."""
        self._failures[StoreOp(op)] = err

    @property
    def mapped_blocks(self) -> frozenset[int]:
        """Indexes of the blocks that hold data (written and not unmapped)."""
        return frozenset(self._blocks)

    def _check(self, op: StoreOp, offset: int) -> None:
        if self._closed:
            raise StoreClosed("<memory>")
        err = self._failures.pop(op, None)
        if err is not None:
            raise StoreIOError(op, offset, err)

    # ---- BlockStore --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def supports_unmap(self) -> bool:
        return self._supports_unmap

    def read_now(self, offset: int, length: int) -> bytes | None:
        """``InlineIo``; None while a failure is armed, so that the awaited call raises it."""
        if self._closed or self._failures or offset < 0 or length < 0:
            return None
        return self._read(offset, length)

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """``InlineIo``; False while a failure is armed, so that the awaited call raises it."""
        view = memoryview(data).cast("B")
        if self._closed or self._failures or offset < 0 or offset + view.nbytes > self._size:
            return False
        self._write(offset, view)
        return True

    async def read(self, offset: int, length: int) -> bytes:
        self._check(StoreOp.READ, offset)
        if offset < 0 or length < 0:
            raise StoreRangeError(f"read of {length} bytes at offset {offset}")
        return self._read(offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        bs = self.block_size
        pos, end = offset, min(offset + length, self._size)
        while pos < end:
            index, within = divmod(pos, bs)
            take = min(bs - within, end - pos)
            block = self._blocks.get(index)
            if block is not None:
                out[pos - offset : pos - offset + take] = block[within : within + take]
            pos += take
        return bytes(out)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(StoreOp.WRITE, offset)
        view = memoryview(data).cast("B")
        n = view.nbytes
        if offset < 0 or offset + n > self._size:
            raise StoreRangeError(f"write of {n} bytes at offset {offset} is outside {self._size} bytes")
        self._write(offset, view)

    def _write(self, offset: int, view: memoryview) -> None:
        bs = self.block_size
        pos, end = offset, offset + view.nbytes
        while pos < end:
            index, within = divmod(pos, bs)
            take = min(bs - within, end - pos)
            block = self._blocks.get(index)
            if block is None:
                block = self._blocks[index] = bytearray(bs)
            block[within : within + take] = view[pos - offset : pos - offset + take]
            pos += take

    async def flush(self) -> None:
        self._check(StoreOp.FLUSH, 0)
        self.flush_count += 1

    async def unmap(self, offset: int, length: int) -> None:
        self._check(StoreOp.UNMAP, offset)
        if offset < 0 or length < 0 or offset + length > self._size:
            raise StoreRangeError(f"unmap of {length} bytes at offset {offset} is outside {self._size} bytes")
        if not self._supports_unmap:
            raise StoreIOError(StoreOp.UNMAP, offset, errno.EOPNOTSUPP)
        bs = self.block_size
        pos, end = offset, offset + length
        while pos < end:
            index, within = divmod(pos, bs)
            take = min(bs - within, end - pos)
            if take == bs:
                self._blocks.pop(index, None)
            elif (block := self._blocks.get(index)) is not None:
                block[within : within + take] = bytes(take)
            pos += take

    async def mapped_extent(self, offset: int) -> tuple[bool, int]:
        self._check(StoreOp.MAPPED_EXTENT, offset)
        if offset < 0 or offset >= self._size:
            raise StoreRangeError(f"offset {offset} is outside {self._size} bytes")
        bs = self.block_size
        first = offset // bs
        last = self._size // bs  # one past the final block
        if first in self._blocks:
            index = first + 1
            while index < last and index in self._blocks:
                index += 1
        else:
            index = min((i for i in self._blocks if i > first), default=last)
        return first in self._blocks, min(index * bs, self._size) - offset

    async def resize(self, new_size: int) -> None:
        self._check(StoreOp.RESIZE, new_size)
        if new_size < self._size or new_size % self.block_size:
            raise StoreRangeError(f"cannot resize from {self._size} to {new_size} bytes (grow only, aligned)")
        self._size = new_size

    async def close(self) -> None:
        self._closed = True
