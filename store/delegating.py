"""A BlockStore that wraps another and hands it every call it does not change.

The wrappers below the LU (``store.dirtymap.MarkingStore``: mark before writing;
``sparrow.node.replicated_store.ReplicatedStore``: forward to the replicas) change writes, unmaps
and flushes; size, reads, extents, resize and close go to the store they wrap. This base holds that
delegation once, and resolves once, at construction, whether the wrapped store offers the inline
capabilities (``InlineIo``, ``InlineWrites``): an ``isinstance`` check against a runtime Protocol
walks the Protocol's attributes on every call (about 6 us on Python 3.11), too much per command.
"""

from __future__ import annotations

from store.blockstore import BlockStore, InlineIo, InlineWrites


class DelegatingStore:
    """``inner``'s BlockStore calls, and its inline read (None when ``inner`` cannot read inline).
    Subclasses override what they change; ``inline_io`` / ``inline_writes`` are ``inner`` when it
    offers that capability, else None."""

    def __init__(self, inner: BlockStore) -> None:
        self.inner = inner

    @property
    def inner(self) -> BlockStore:
        return self._inner

    @inner.setter
    def inner(self, inner: BlockStore) -> None:
        self._inner = inner
        self.block_size = inner.block_size
        self.inline_io: InlineIo | None = inner if isinstance(inner, InlineIo) else None
        self.inline_writes: InlineWrites | None = inner if isinstance(inner, InlineWrites) else None

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def supports_unmap(self) -> bool:
        return self.inner.supports_unmap

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        inline = self.inline_io
        return None if inline is None else inline.read_now(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.inner.write(offset, data)

    async def flush(self) -> None:
        await self.inner.flush()

    async def unmap(self, offset: int, length: int) -> None:
        await self.inner.unmap(offset, length)

    async def mapped_extent(self, offset: int) -> tuple[bool, int]:
        return await self.inner.mapped_extent(offset)

    async def resize(self, new_size: int) -> None:
        await self.inner.resize(new_size)

    async def close(self) -> None:
        await self.inner.close()
