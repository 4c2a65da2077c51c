"""The block store contract, and the file-backed implementation."""

from __future__ import annotations

from typing import Protocol


class BlockStore(Protocol):
    """A volume's bytes. Offsets and lengths are in bytes, aligned to ``block_size``.

    Writes are buffered: data is durable only once ``flush`` has returned.
    """

    block_size: int

    @property
    def size(self) -> int: ...

    @property
    def supports_unmap(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    async def flush(self) -> None: ...

    async def unmap(self, offset: int, length: int) -> None: ...

    async def mapped_extent(self, offset: int) -> tuple[bool, int]: ...

    async def resize(self, new_size: int) -> None: ...

    async def close(self) -> None: ...
