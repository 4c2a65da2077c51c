"""The persistent dirty-region bitmap of one copy of a volume (docs/replication.md, "Catch-up").

One bit per :data:`REGION_SIZE` (1 MiB) region of the volume: set means *this copy may differ from
the others in that region* (it wrote there, or it missed writes there). A resync copies the union of
the primary's and the syncing copy's set regions. The rules:

- **Set before writing.** A bit is made durable (written and ``fdatasync``'ed) *before* the first
  write to its region since it was last cleared (:meth:`DirtyMap.mark`); concurrent writers to new
  regions share one write and sync (a batch). A rewrite of a region already durably dirty costs a
  bit test and nothing else (:meth:`DirtyMap.covered`).
- **Clear lazily.** :meth:`DirtyMap.clear` changes memory only; the cleared bits reach the disk with
  the next persist (a later mark, :meth:`DirtyMap.sync`, or closing). A bit left set on disk only
  costs extra copying.
- **Doubt means dirty.** A file that is missing (where the copy should have one), unreadable,
  truncated, of another version or another volume, or whose checksum does not match, loads as
  *every region dirty* (a full copy), with a warning, never an error.

On disk (``<volumes dir>/<name>.dirty``, beside the volume's record), big-endian::

    magic "SPDIRTY1" (8) | version u16 (1) | reserved u16 (0) | region_size u32 | regions u64
    | volume_id 16 bytes | crc32c u32 (of everything before it and the bitmap) | bitmap

The bitmap is ``ceil(regions / 8)`` bytes, region ``r`` is bit ``r % 8`` (LSB first) of byte
``r // 8``. The file is rewritten in place: a torn write fails the checksum, which reads as all dirty.

:class:`DirtyBitmap` is the pure core (bits, codec); :class:`DirtyMap` adds the file, the durable
view and the batching (its I/O runs on the default executor, or on the loop when the file is on
tmpfs/ramfs: a memory copy, an ``fdatasync`` with nothing to wait for; the store's own rule,
``store.blockstore.IoPath.MEMORY``).
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import crc32c
import structlog

from store.blockstore import BlockStore, StoreError, on_memory_fs
from store.delegating import DelegatingStore
from store.metadata import fsync_dir

log = structlog.get_logger("store.dirtymap")

REGION_SIZE = 1 << 20
MAGIC = b"SPDIRTY1"
VERSION = 1
_HEAD = struct.Struct(">8sHHIQ16s")
_CRC = struct.Struct(">I")
HEADER_SIZE = _HEAD.size + _CRC.size
#: Regions of the largest volume a map describes (16 TiB / 1 MiB: a 2 MiB bitmap).
MAX_REGIONS = 1 << 24


class BitmapCorrupt(StoreError):
    """A dirty-map file that cannot be trusted (the caller then treats every region as dirty)."""


def regions_for(size: int, region_size: int = REGION_SIZE) -> int:
    """How many regions cover ``size`` bytes."""
    return max(1, -(-size // region_size))


def region_span(offset: int, length: int, region_size: int = REGION_SIZE) -> range:
    """The regions that bytes ``[offset, offset + length)`` touch (empty for length 0)."""
    if length <= 0:
        return range(0)
    return range(offset // region_size, (offset + length - 1) // region_size + 1)


class DirtyBitmap:
    """The bits (sans-IO): set, test, clear, iterate, encode and decode."""

    __slots__ = ("_bits", "region_size", "regions")

    def __init__(self, regions: int, region_size: int = REGION_SIZE, *, dirty: bool = False) -> None:
        if not 1 <= regions <= MAX_REGIONS:
            raise ValueError(f"{regions} regions (1 .. {MAX_REGIONS})")
        self.regions = regions
        self.region_size = region_size
        self._bits = bytearray(-(-regions // 8))
        if dirty:
            self.set_all()

    def __contains__(self, region: int) -> bool:
        return bool(self._bits[region >> 3] & (1 << (region & 7)))

    def add(self, region: int) -> bool:
        """Set ``region``; True if it was clear."""
        byte, bit = region >> 3, 1 << (region & 7)
        if self._bits[byte] & bit:
            return False
        self._bits[byte] |= bit
        return True

    def discard(self, region: int) -> None:
        self._bits[region >> 3] &= ~(1 << (region & 7)) & 0xFF

    def set_all(self) -> None:
        self._bits[:] = b"\xff" * len(self._bits)
        spare = len(self._bits) * 8 - self.regions
        if spare:
            self._bits[-1] = 0xFF >> spare

    def __iter__(self) -> Iterator[int]:
        for index, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield index * 8 + bit

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def grown(self, regions: int) -> DirtyBitmap:
        """This bitmap for ``regions`` regions (more): the new ones are dirty."""
        other = DirtyBitmap(regions, self.region_size)
        for region in range(self.regions, regions):
            other.add(region)
        for region in self:
            other.add(region)
        return other

    def copy(self) -> DirtyBitmap:
        other = DirtyBitmap(self.regions, self.region_size)
        other._bits[:] = self._bits
        return other

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    @classmethod
    def from_bytes(
        cls, data: bytes | memoryview, regions: int, region_size: int = REGION_SIZE
    ) -> DirtyBitmap:
        """The bitmap of ``regions`` regions from its bytes (raises ValueError on a wrong length or
        a bit set past the last region)."""
        bitmap = cls(regions, region_size)
        if len(data) != len(bitmap._bits):
            raise ValueError(f"{len(data)} bitmap bytes for {regions} regions")
        bitmap._bits[:] = data
        spare = len(bitmap._bits) * 8 - regions
        if spare and bitmap._bits[-1] >> (8 - spare):
            raise ValueError("bits set past the last region")
        return bitmap

    def encode(self, volume_id: str) -> bytes:
        head = _HEAD.pack(MAGIC, VERSION, 0, self.region_size, self.regions, bytes.fromhex(volume_id))
        body = bytes(self._bits)
        return head + _CRC.pack(crc32c.crc32c(head + body)) + body

    @classmethod
    def decode(cls, data: bytes, volume_id: str, regions: int, region_size: int = REGION_SIZE) -> DirtyBitmap:
        """Parse a file's bytes; raises :class:`BitmapCorrupt` unless it is a map of this volume,
        version, region size and region count with a matching checksum."""
        if len(data) < HEADER_SIZE:
            raise BitmapCorrupt(f"{len(data)} bytes, shorter than the header")
        magic, version, reserved, rsize, count, raw_id = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise BitmapCorrupt("not a dirty map (bad magic)")
        if version != VERSION or reserved:
            raise BitmapCorrupt(f"version {version}, expected {VERSION}")
        if raw_id.hex() != volume_id:
            raise BitmapCorrupt(f"the map of volume {raw_id.hex()}, not {volume_id}")
        if rsize != region_size or count != regions:
            raise BitmapCorrupt(f"{count} regions of {rsize} bytes, expected {regions} of {region_size}")
        (crc,) = _CRC.unpack_from(data, _HEAD.size)
        body = data[HEADER_SIZE:]
        if crc32c.crc32c(data[: _HEAD.size] + body) != crc:
            raise BitmapCorrupt("checksum mismatch")
        try:
            return cls.from_bytes(body, regions, region_size)
        except ValueError as e:
            raise BitmapCorrupt(str(e)) from None


def dirty_path(volumes_dir: Path, name: str) -> Path:
    return volumes_dir / f"{name}.dirty"


class DirtyMap:
    """The dirty map of one copy, persisted at ``path`` (see the module docstring).

    ``bits`` is what is true now (memory); ``durable`` the bits known to be set on disk: a write
    may go ahead once its regions are in ``durable``.
    """

    def __init__(self, path: Path, volume_id: str, bits: DirtyBitmap, *, durable: bool) -> None:
        self.path = path
        self.volume_id = volume_id
        self.bits = bits
        self.durable = bits.copy() if durable else DirtyBitmap(bits.regions, bits.region_size)
        self._fd: int | None = None
        #: Marks made (generation) and the generation the disk has reached.
        self._wanted = 0
        self._written = 0
        self._persisting: asyncio.Future[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._needs_write = not durable
        self.closed = False
        #: The file is on tmpfs/ramfs: a mark is written on the loop, at once (:meth:`mark_now`).
        self.inline = False

    # ---- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, volume_id: str, size: int, *, missing_clean: bool = False) -> DirtyMap:
        """Load the map at ``path`` for a volume of ``size`` bytes (blocking; at volume open).

        A missing file is *all dirty*, unless ``missing_clean`` (a new copy created in sync: all
        zeros like every other copy); any file that cannot be trusted is all dirty, with a warning.
        The file is (re)written at once in either case."""
        regions = regions_for(size)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            bits = DirtyBitmap(regions, dirty=not missing_clean)
            if not missing_clean:
                log.warning("dirty map missing: every region dirty", path=str(path), volume_id=volume_id)
        except OSError as e:
            log.warning("dirty map unreadable: every region dirty", path=str(path), error=str(e))
            bits = DirtyBitmap(regions, dirty=True)
        else:
            try:
                bits = DirtyBitmap.decode(data, volume_id, regions)
            except BitmapCorrupt as e:
                log.warning("dirty map not usable: every region dirty", path=str(path), reason=str(e))
                bits = DirtyBitmap(regions, dirty=True)
            else:
                dmap = cls(path, volume_id, bits, durable=True)
                dmap._open_fd()
                return dmap
        dmap = cls(path, volume_id, bits, durable=False)
        dmap._open_fd()
        dmap._write_now()
        fsync_dir(path.parent)
        return dmap

    def _open_fd(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.inline = on_memory_fs(self._fd)

    # ---- queries ------------------------------------------------------------------------------------

    @property
    def regions(self) -> int:
        return self.bits.regions

    def covered(self, offset: int, length: int) -> bool:
        """True if every region of the range is durably dirty: a write there needs no mark."""
        durable = self.durable
        first = offset // REGION_SIZE
        if length > 0 and (offset + length - 1) // REGION_SIZE == first:  # one region: most writes
            return first < durable.regions and first in durable
        span = region_span(offset, length)
        return span.stop <= durable.regions and all(r in durable for r in span)

    def dirty_regions(self) -> list[int]:
        return list(self.bits)

    # ---- changes ------------------------------------------------------------------------------------

    async def mark(self, offset: int, length: int) -> None:
        """Return once every region of ``[offset, offset + length)`` is durably dirty."""
        await self.mark_regions(region_span(offset, length))

    async def mark_regions(self, regions: Iterable[int]) -> None:
        new = False
        regions = list(regions)
        if regions and max(regions) >= self.bits.regions:  # the volume grew: new regions dirty
            grown = max(regions) + 1
            self.bits = self.bits.grown(grown)
            durable = DirtyBitmap(grown, self.bits.region_size)
            for region in self.durable:
                durable.add(region)
            self.durable = durable
        for region in regions:
            if region not in self.durable:
                self.bits.add(region)
                new = True
        if not new:
            return
        await self._persist()

    def mark_now(self, offset: int, length: int) -> bool:
        """:meth:`mark` at once, on the loop, when the map's writes run inline (:attr:`inline`) and
        no batch is being written: True once every region of the range is durably dirty; False,
        with nothing changed, when the caller must await :meth:`mark` instead (a map on a disk, a
        batch in flight, a range past the map). Raises StoreError if the map cannot be written."""
        if not self.inline or self._persisting is not None or self.closed:
            return False
        span = region_span(offset, length)
        if span.stop > self.bits.regions:
            return False
        new = False
        for region in span:
            if region not in self.durable:
                self.bits.add(region)
                new = True
        if new:
            self._persist_now()
        return True

    async def mark_all(self) -> None:
        """Every region dirty, durably (a copy released from its assignment)."""
        self.bits.set_all()
        await self._persist()

    def clear(self, regions: Iterable[int]) -> None:
        """These regions are in sync on every copy: clear them (persisted lazily)."""
        for region in regions:
            self.bits.discard(region)
            self.durable.discard(region)
        self._needs_write = True

    async def sync(self) -> None:
        """Write the map now if it changed (cleared bits reach the disk)."""
        if self._needs_write:
            await self._persist()

    def close(self) -> None:
        """Write pending clears (blocking) and close the file."""
        if self._fd is None:
            return
        if self._needs_write and not self.closed:
            try:
                self._write_now()
            except OSError as e:
                log.warning("dirty map not written at close", path=str(self.path), error=str(e))
        self.closed = True
        os.close(self._fd)
        self._fd = None

    # ---- persisting (batched) -----------------------------------------------------------------------

    async def _persist(self) -> None:
        if self.closed:
            raise StoreError(f"dirty map {self.path} is closed")
        if self.inline and self._persisting is None:
            self._persist_now()
            return
        self._wanted += 1
        target = self._wanted
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        if self._persisting is None:
            self._persisting = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._writer())
        await future

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._written < self._wanted and not self.closed:
                generation = self._wanted
                snapshot = self.bits.copy()
                data = snapshot.encode(self.volume_id)
                self._needs_write = False
                try:
                    await loop.run_in_executor(None, self._write_bytes, data)
                except OSError as e:
                    error = StoreError(f"dirty map {self.path} not written: {e}")
                    self._needs_write = True
                    for _, future in self._waiters:
                        if not future.done():
                            future.set_exception(error)
                    self._waiters = []
                    self._written = self._wanted
                    return
                for region in snapshot:
                    if region in self.bits:  # not cleared meanwhile
                        self.durable.add(region)
                self._written = generation
                keep = []
                for target, future in self._waiters:
                    if target <= generation:
                        if not future.done():
                            future.set_result(None)
                    else:
                        keep.append((target, future))
                self._waiters = keep
        finally:
            done, self._persisting = self._persisting, None
            if done is not None and not done.done():
                done.set_result(None)
            for _, future in self._waiters:
                if not future.done():
                    future.set_exception(StoreError(f"dirty map {self.path} is closed"))
            self._waiters = []

    def _persist_now(self) -> None:
        """Write the bits now, on the loop (:attr:`inline`, no batch in flight): then every set bit
        is durable."""
        try:
            self._write_bytes(self.bits.encode(self.volume_id))
        except OSError as e:
            self._needs_write = True
            raise StoreError(f"dirty map {self.path} not written: {e}") from e
        self.durable = self.bits.copy()
        self._needs_write = False
        self._wanted += 1
        self._written = self._wanted

    def _write_now(self) -> None:
        self._write_bytes(self.bits.encode(self.volume_id))
        for region in self.bits:
            self.durable.add(region)
        self._needs_write = False

    def _write_bytes(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise OSError("closed")
        os.pwrite(fd, data, 0)
        os.fdatasync(fd)


class MarkingStore(DelegatingStore):
    """A BlockStore that marks ``dirty`` before every write and unmap of ``inner`` (a rewrite of a
    durably dirty region goes straight through). ``InlineIo`` and ``InlineWrites`` too when ``inner``
    is: a read, and a write to a durably dirty region, at once; a write that needs a mark takes the
    general path."""

    def __init__(self, inner: BlockStore, dirty: DirtyMap) -> None:
        super().__init__(inner)
        self.dirty = dirty

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """``InlineIo``: into regions durably dirty, already or marked now (a map on tmpfs). A mark
        that cannot be written is declined like any other case (False, no data written): the
        awaited ``write`` marks again and reports the error (``InlineIo`` never raises)."""
        inline = self.inline_io
        if inline is None:
            return False
        dirty = self.dirty
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        if not dirty.covered(offset, length):
            try:
                if not dirty.mark_now(offset, length):
                    return False
            except StoreError:
                return False
        return inline.write_now(offset, data)

    def write_inline(self, offset: int, buffers: Sequence[bytes | memoryview]) -> bool:
        """``InlineWrites`` (a replica's run of contiguous writes): only into regions durably dirty,
        already or marked now (``DirtyMap.mark_now``: a map on tmpfs), so the mark is never
        skipped; False (nothing written) otherwise."""
        inline = self.inline_writes
        if inline is None:
            return False
        dirty = self.dirty
        length = sum(map(len, buffers))
        if not dirty.covered(offset, length) and not dirty.mark_now(offset, length):
            return False
        return inline.write_inline(offset, buffers)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        if not self.dirty.covered(offset, length):
            await self.dirty.mark(offset, length)
        await self.inner.write(offset, data)

    async def unmap(self, offset: int, length: int) -> None:
        if not self.dirty.covered(offset, length):
            await self.dirty.mark(offset, length)
        await self.inner.unmap(offset, length)
