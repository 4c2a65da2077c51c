"""The block store contract, and the file-backed implementation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import functools
import os
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from store.iopool import BATCHED, IoPool


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


@runtime_checkable
class InlineWrites(Protocol):
    """A store that can write a run of buffers at once on the calling thread when that is cheap
    (``FileBlockStore`` on tmpfs): ``write_inline`` writes them back to back and returns True, or
    writes nothing and returns False (the caller awaits ``write`` for each). A wrapper that must do
    something first (e.g. make a dirty bit durable) returns False until it can do it inline."""

    def write_inline(self, offset: int, buffers: Sequence[bytes | memoryview]) -> bool: ...


@runtime_checkable
class InlineIo(Protocol):
    """What a store offers the iSCSI fast path (docs/architecture.md, "The fast path"): a read or a
    write done at once, on the calling thread, when that cannot block (tmpfs, a page-cache hit).
    Each answers None / False, having done nothing, when it cannot; the caller then takes the
    general (awaited) path, which also reports every error. A write that must wait for replicas
    is not inline: the replicated store says no, and offers ``ForwardedWrites`` instead."""

    def read_now(self, offset: int, length: int) -> bytes | None: ...

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool: ...


@runtime_checkable
class ForwardedWrites(Protocol):
    """What a store that must wait for others before a write is answered (the replicated store)
    offers the iSCSI fast path: ``write_forward`` writes locally at once and queues the write to
    the others, returning a ticket (or None, having done nothing: the general path then awaits
    ``write``); ``written(ticket)`` is a future done when the write may be answered GOOD, or
    failed with a ``StoreError``."""

    def write_forward(self, offset: int, data: bytes | bytearray | memoryview) -> int | None: ...

    def written(self, index: int) -> asyncio.Future[None]: ...


# --------------------------------------------------------------------------------------------------
# Errors shared by the whole store package
# --------------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of every error the store package raises; ``str(e)`` is a one-line message."""


class StoreOp(enum.StrEnum):
    """The block-store operation an I/O error came from (the SCSI layer picks its sense key by it)."""

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    UNMAP = "unmap"
    MAPPED_EXTENT = "mapped_extent"
    RESIZE = "resize"


class StoreIOError(StoreError):
    """The disk refused an operation (EIO, ENOSPC, ...).

    The SCSI layer turns it into a CHECK CONDITION for this one command: MEDIUM ERROR with UNRECOVERED
    READ ERROR (11h/00h) for reads, MEDIUM ERROR with WRITE ERROR (0Ch/00h) for writes and flushes,
    and for ENOSPC (a thin volume out of space, SBC-3 thin provisioning) DATA PROTECT with SPACE
    ALLOCATION FAILED WRITE PROTECT (27h/07h). Nothing else is affected.
    """

    def __init__(self, op: StoreOp | str, offset: int, errno: int) -> None:
        self.op = StoreOp(op)
        self.offset = offset
        self.errno = errno
        self.strerror = os.strerror(errno)
        super().__init__(f"{self.op} at byte offset {offset} failed: [Errno {errno}] {self.strerror}")


class StoreClosed(StoreError):
    """An operation on a store that has been closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"block store {path} is closed")


class StoreUnavailable(StoreError):
    """The operation cannot complete now but may later (a replicated volume whose replicas did not
    acknowledge in time). The SCSI layer answers NOT READY, ASYMMETRIC ACCESS STATE TRANSITION
    (04h/0Ah), which initiators retry; the command is never answered GOOD."""


class StoreRangeError(StoreError):
    """An offset, length or size outside what the store holds (a caller bug: the LU checks LBAs first)."""


class StoreOpenError(StoreError):
    """The backing file or device could not be opened or is unusable."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot open block store {path}: {reason}")


# --------------------------------------------------------------------------------------------------
# FileBlockStore
# --------------------------------------------------------------------------------------------------

#: Threads doing blocking disk I/O for every store in the process. pread/pwrite/fdatasync release the
#: GIL, so a handful of threads keep several requests in the kernel at once; more threads than CPUs
#: only add contention (measured: 1 MiB reads from tmpfs run 2x slower with 8 threads on 2 CPUs).
R = TypeVar("R")

IO_THREADS = max(2, min(8, len(os.sched_getaffinity(0))))

#: statfs(2) f_type of filesystems whose data lives in memory: I/O on them is a memory copy and never
#: waits on a device, so it may run on the event loop itself.
_MEMORY_FS_MAGIC = frozenset({0x01021994, 0x858458F6})  # tmpfs, ramfs


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def _fs_magic(fd: int) -> int | None:
    buf = _StatFs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


def on_memory_fs(fd: int) -> bool:
    """True if ``fd``'s file is on tmpfs or ramfs (its I/O is a memory copy: it may run inline)."""
    return _fs_magic(fd) in _MEMORY_FS_MAGIC


class IoPath(enum.Enum):
    """Where a store's reads and writes run (chosen once, at open).

    MEMORY: the file is on tmpfs/ramfs; reads and writes run inline on the event loop (a memory copy).
    NOWAIT: reads first try preadv2(RWF_NOWAIT) inline, which succeeds only when the data is in the
      page cache and fails with EAGAIN instead of waiting on the disk; then the thread pool. Writes and
      everything else run on the thread pool.
    POOL: everything runs on the thread pool.
    """

    MEMORY = "memory"
    NOWAIT = "nowait"
    POOL = "pool"


def _choose_io_path(fd: int) -> IoPath:
    if on_memory_fs(fd):
        return IoPath.MEMORY
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError:
        return IoPath.POOL
    return IoPath.NOWAIT


_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="sparrow-io")
#: Reads, writes, flushes on a disk (``_off_loop``): one loop wake-up per batch of completions
#: (store/iopool.py); ``_EXECUTOR`` keeps open and close.
_POOL = IoPool(IO_THREADS, "sparrow-iob")

# linux/fs.h
_BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(2) FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE; raises OSError."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _device_size(fd: int) -> int:
    try:
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("=Q", buf)[0])
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def _pwrite_rest(fd: int, view: memoryview, offset: int, done: int) -> None:
    """Finish a short write: bytes ``done`` .. ``len(view)`` of ``view`` at ``offset + done``.
    A write that makes no progress is a full device (ENOSPC)."""
    while done < len(view):
        wrote = os.pwrite(fd, view[done:], offset + done)
        if wrote <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += wrote


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _off_loop(fn: Callable[..., R], *args: Any) -> R:
    """Run ``fn(*args)`` on the I/O pool. If the awaiting task is cancelled (an aborted SCSI command),
    wait for the thread to finish before letting the cancellation through: a pwrite already running
    cannot be stopped, and it must not land after the abort has been reported to the initiator."""
    if BATCHED:
        future = _POOL.submit(fn, *args)
    else:
        future = asyncio.get_running_loop().run_in_executor(_EXECUTOR, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the caller is gone, the cancellation is what it sees
        raise


class FileBlockStore:
    """A volume kept in a sparse regular file or on a block device.

    Every blocking call runs on the module's I/O thread pool, never on the event loop. Writes go to the
    page cache (write-back); ``flush`` makes them durable with fdatasync(2). ``close`` waits for the
    operations still running in the pool before it closes the descriptor, so a late pwrite can never
    land in a file that reused the descriptor number.

    Reads beyond the end return zeros; writes beyond ``size`` raise ``StoreRangeError``.
    """

    __slots__ = (
        "_fd",
        "_file_size",
        "_idle",
        "_inflight",
        "_io_path",
        "_is_blockdev",
        "_lock",
        "_size",
        "_supports_unmap",
        "block_size",
        "path",
    )

    def __init__(
        self, path: str, fd: int, *, block_size: int, size: int, is_blockdev: bool, supports_unmap: bool
    ) -> None:
        """Use ``await FileBlockStore.open(...)``; this only wraps an open descriptor."""
        self.path = path
        self.block_size = block_size
        self._fd = fd
        self._size = size
        self._is_blockdev = is_blockdev
        self._supports_unmap = supports_unmap
        self._inflight = 0
        # _lock guards _fd and _inflight; _idle is set when close() waits and the last operation ends.
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._io_path = _choose_io_path(fd)

    # ---- opening -----------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        block_size: int,
        size: int | None = None,
        create: bool = False,
        grow: bool = True,
        nofollow: bool = False,
    ) -> FileBlockStore:
        """Open (or with ``create=True`` create, sparse, and fsync) the file or block device at ``path``.

        ``size`` is the volume size in bytes; None means the size of the existing file or device
        (rounded down to ``block_size``). An existing regular file smaller than ``size`` is grown
        (sparse), unless ``grow`` is False (a user-given backing, store.backing): then a regular
        file must hold exactly ``size`` bytes. A block device smaller than ``size`` is refused.
        ``nofollow``: ``path`` is a resolved path that was just checked; a symlink put there since
        is not followed (O_NOFOLLOW).
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            _EXECUTOR,
            functools.partial(cls._open_sync, os.fspath(path), block_size, size, create, grow, nofollow),
        )

    @classmethod
    def _open_sync(
        cls,
        path: str,
        block_size: int,
        size: int | None,
        create: bool,
        grow: bool = True,
        nofollow: bool = False,
    ) -> FileBlockStore:
        if block_size <= 0 or block_size & (block_size - 1):
            raise StoreOpenError(path, f"block size {block_size} is not a power of two")
        if size is not None and (size <= 0 or size % block_size):
            raise StoreOpenError(path, f"size {size} is not a positive multiple of {block_size}")
        if create:
            if size is None:
                raise StoreOpenError(path, "a size is required to create a store")
            return cls._create_sync(path, block_size, size)
        try:
            st = os.stat(path)
        except OSError as e:
            raise StoreOpenError(path, e.strerror or str(e)) from e
        is_blockdev = stat.S_ISBLK(st.st_mode)
        if not is_blockdev and not stat.S_ISREG(st.st_mode):
            raise StoreOpenError(path, "not a regular file or a block device")
        # O_EXCL on a block device: exclusive open, refused (EBUSY) while it is mounted or in use.
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if is_blockdev else 0)
        if nofollow:
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise StoreOpenError(path, e.strerror or str(e)) from e
        try:
            if is_blockdev:
                actual = _device_size(fd)
                if size is None:
                    size = actual - actual % block_size
                elif size > actual:
                    raise StoreOpenError(path, f"device holds {actual} bytes, volume needs {size}")
                supports_unmap = False  # BLKDISCARD does not promise zeros on read; stay safe
            else:
                actual = os.fstat(fd).st_size
                if size is None:
                    size = actual - actual % block_size
                elif actual != size and not grow:
                    raise StoreOpenError(
                        path,
                        f"the file holds {actual} bytes, the volume needs exactly {size} "
                        "(a backing file is never grown or cut)",
                    )
                elif actual < size:
                    os.ftruncate(fd, size)  # grows sparse; never shrinks
                supports_unmap = cls._probe_punch_hole(fd)
            if size <= 0:
                raise StoreOpenError(path, f"holds {actual} bytes, less than one {block_size}-byte block")
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise StoreOpenError(path, e.strerror or str(e)) from e
            raise
        return cls(
            path, fd, block_size=block_size, size=size, is_blockdev=is_blockdev, supports_unmap=supports_unmap
        )

    @classmethod
    def _create_sync(cls, path: str, block_size: int, size: int) -> FileBlockStore:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreOpenError(path, e.strerror or str(e)) from e
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
            supports_unmap = cls._probe_punch_hole(fd)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise StoreOpenError(path, e.strerror or str(e)) from e
        return cls(
            path, fd, block_size=block_size, size=size, is_blockdev=False, supports_unmap=supports_unmap
        )

    @staticmethod
    def _probe_punch_hole(fd: int) -> bool:
        """Punch a hole just past end of file (no data there, size kept) to learn if the fs supports it."""
        try:
            _punch_hole(fd, os.fstat(fd).st_size, 4096)
        except OSError:
            return False
        return True

    # ---- BlockStore --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def supports_unmap(self) -> bool:
        return self._supports_unmap

    @property
    def is_block_device(self) -> bool:
        return self._is_blockdev

    @property
    def io_path(self) -> IoPath:
        return self._io_path

    async def read(self, offset: int, length: int) -> bytes:
        if self._fd < 0:
            raise StoreClosed(self.path)
        if offset < 0 or length < 0:
            raise StoreRangeError(f"read of {length} bytes at offset {offset}")
        if self._io_path is IoPath.MEMORY:
            return self._read_sync(offset, length)
        if self._io_path is IoPath.NOWAIT and (cached := self._read_cached(offset, length)) is not None:
            return cached
        return await _off_loop(self._read_sync, offset, length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """``InlineIo``: the data if it can be read without waiting (tmpfs, or all of it in the page
        cache), else None. Never raises: an error is for the awaited ``read`` to report."""
        if self._fd < 0 or offset < 0 or length < 0:
            return None
        if self._io_path is IoPath.MEMORY:
            try:
                return self._read_sync(offset, length)
            except StoreError:
                return None
        if self._io_path is IoPath.NOWAIT:
            return self._read_cached(offset, length)
        return None

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """``InlineIo``: write at once on tmpfs (a memory copy); False, having written nothing,
        anywhere else or on any error (the awaited ``write`` then does it and reports)."""
        if self._io_path is not IoPath.MEMORY or self._fd < 0:
            return False
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if offset < 0 or offset + n > self._size:
            return False
        fd = self._enter()
        try:
            return os.pwrite(fd, data, offset) == n  # a short write: the awaited write finishes it
        except OSError:
            return False
        finally:
            self._exit()

    def _read_cached(self, offset: int, length: int) -> bytes | None:
        """The data if the page cache holds all of it, without waiting on the disk; else None."""
        fd = self._enter()
        try:
            buf = bytearray(length)
            if os.preadv(fd, [buf], offset, os.RWF_NOWAIT) != length:
                return None  # partly cached, or past end of file: the pool does the full read
            return bytes(buf)
        except OSError:
            return None  # EAGAIN (not cached) or any error: the pool read reports real errors
        finally:
            self._exit()

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._fd < 0:
            raise StoreClosed(self.path)
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if offset < 0 or offset + n > self._size:
            raise StoreRangeError(
                f"write of {n} bytes at offset {offset} is outside {self.path} ({self._size} bytes)"
            )
        if self._io_path is IoPath.MEMORY:
            self._write_sync(offset, data, n)
            return
        await _off_loop(self._write_sync, offset, data, n)

    def write_inline(self, offset: int, buffers: Sequence[bytes | memoryview]) -> bool:
        """Write ``buffers`` back to back at ``offset`` now, with one pwritev, if this store's writes
        run inline (tmpfs, ``IoPath.MEMORY``) and return True; else write nothing and return False
        (the caller awaits :meth:`write`). For a replica applying a run of contiguous writes."""
        if self._io_path is not IoPath.MEMORY:
            return False
        if self._fd < 0:
            raise StoreClosed(self.path)
        n = sum(len(b) for b in buffers)
        if offset < 0 or offset + n > self._size:
            raise StoreRangeError(
                f"write of {n} bytes at offset {offset} is outside {self.path} ({self._size} bytes)"
            )
        if len(buffers) == 1:
            self._write_sync(offset, buffers[0], n)
            return True
        fd = self._enter()
        try:
            done = os.pwritev(fd, buffers, offset)
            if done < n:  # short (on tmpfs only when it is full): the rest from one joined copy
                _pwrite_rest(fd, memoryview(b"".join(buffers)), offset, done)
        except OSError as e:
            raise StoreIOError(StoreOp.WRITE, offset, e.errno or errno.EIO) from e
        finally:
            self._exit()
        return True

    async def flush(self) -> None:
        if self._fd < 0:
            raise StoreClosed(self.path)
        await _off_loop(self._flush_sync)

    async def unmap(self, offset: int, length: int) -> None:
        if self._fd < 0:
            raise StoreClosed(self.path)
        if offset < 0 or length < 0 or offset + length > self._size:
            raise StoreRangeError(f"unmap of {length} bytes at offset {offset} is outside {self.path}")
        if not self._supports_unmap:
            raise StoreIOError(StoreOp.UNMAP, offset, errno.EOPNOTSUPP)
        if length:
            await _off_loop(self._unmap_sync, offset, length)

    async def mapped_extent(self, offset: int) -> tuple[bool, int]:
        """(mapped, bytes) of the extent that starts at ``offset``, found with lseek SEEK_DATA/SEEK_HOLE.

        Backs GET LBA STATUS (SBC-3 5.6). A block device reports everything mapped.
        """
        if self._fd < 0:
            raise StoreClosed(self.path)
        if offset < 0 or offset >= self._size:
            raise StoreRangeError(f"offset {offset} is outside {self.path} ({self._size} bytes)")
        if self._is_blockdev:
            return True, self._size - offset
        return await _off_loop(self._mapped_extent_sync, offset)

    async def resize(self, new_size: int) -> None:
        """Grow to ``new_size`` bytes (ftruncate; a block device only up to its own capacity)."""
        if self._fd < 0:
            raise StoreClosed(self.path)
        if new_size < self._size:
            raise StoreRangeError(f"cannot shrink {self.path} from {self._size} to {new_size} bytes")
        if new_size % self.block_size:
            raise StoreRangeError(f"new size {new_size} is not a multiple of {self.block_size}")
        if new_size == self._size:
            return
        await _off_loop(self._resize_sync, new_size)
        self._size = new_size

    async def close(self) -> None:
        """Wait for running operations, then close the descriptor. Idempotent."""
        if self._fd < 0:
            return
        await asyncio.get_running_loop().run_in_executor(_EXECUTOR, self._close_sync)

    # ---- the parts that run on the I/O threads -----------------------------------------------------

    def _enter(self) -> int:
        with self._lock:
            if self._fd < 0:
                raise StoreClosed(self.path)
            self._inflight += 1
            return self._fd

    def _exit(self) -> None:
        with self._lock:
            self._inflight -= 1
            if not self._inflight and self._fd < 0:
                self._idle.set()  # close() is waiting for us

    def _read_sync(self, offset: int, length: int) -> bytes:
        fd = self._enter()
        try:
            data = os.pread(fd, length, offset)
            if len(data) == length:
                return data
            buf = bytearray(data)
            while len(buf) < length:
                chunk = os.pread(fd, length - len(buf), offset + len(buf))
                if not chunk:  # end of file: the rest reads as zeros
                    buf += bytes(length - len(buf))
                    break
                buf += chunk
            return bytes(buf)
        except OSError as e:
            raise StoreIOError(StoreOp.READ, offset, e.errno or errno.EIO) from e
        finally:
            self._exit()

    def _write_sync(self, offset: int, data: bytes | bytearray | memoryview, n: int) -> None:
        fd = self._enter()
        try:
            done = os.pwrite(fd, data, offset)
            if done < n:
                _pwrite_rest(fd, memoryview(data).cast("B"), offset, done)
        except OSError as e:
            raise StoreIOError(StoreOp.WRITE, offset, e.errno or errno.EIO) from e
        finally:
            self._exit()

    def _flush_sync(self) -> None:
        fd = self._enter()
        try:
            os.fdatasync(fd)
        except OSError as e:
            raise StoreIOError(StoreOp.FLUSH, 0, e.errno or errno.EIO) from e
        finally:
            self._exit()

    def _unmap_sync(self, offset: int, length: int) -> None:
        fd = self._enter()
        try:
            _punch_hole(fd, offset, length)
        except OSError as e:
            raise StoreIOError(StoreOp.UNMAP, offset, e.errno or errno.EIO) from e
        finally:
            self._exit()

    def _mapped_extent_sync(self, offset: int) -> tuple[bool, int]:
        fd = self._enter()
        end = self._size
        try:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data from offset to end of file
                    return False, end - offset
                if e.errno == errno.EINVAL:  # no SEEK_DATA support: call it all mapped
                    return True, end - offset
                raise
            if data > offset:
                return False, min(data, end) - offset
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            return True, min(hole, end) - offset
        except OSError as e:
            raise StoreIOError(StoreOp.MAPPED_EXTENT, offset, e.errno or errno.EIO) from e
        finally:
            self._exit()

    def _resize_sync(self, new_size: int) -> None:
        fd = self._enter()
        try:
            if self._is_blockdev:
                capacity = _device_size(fd)
                if new_size > capacity:
                    raise StoreRangeError(
                        f"cannot grow {self.path} to {new_size} bytes: it is a block device of "
                        f"{capacity} bytes (grow the device first)"
                    )
            elif os.fstat(fd).st_size < new_size:
                os.ftruncate(fd, new_size)
        except OSError as e:
            raise StoreIOError(StoreOp.RESIZE, new_size, e.errno or errno.EIO) from e
        finally:
            self._exit()

    def _close_sync(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
            busy = self._inflight > 0
        if busy:
            self._idle.wait()
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"FileBlockStore({self.path!r}, size={self._size}, block_size={self.block_size})"
