"""Durable metadata records: a checksummed JSON envelope, replaced atomically.

On disk a record is ``{"kind": str, "schema_version": int, "crc32c": int, "body": {...}}`` where
``crc32c`` is CRC-32C (Castagnoli, RFC 3720 B.4) of the canonical JSON of ``body`` (sorted keys, no
whitespace, UTF-8). A record is replaced by writing a temporary file in the same directory, fsyncing
it, renaming it over the old one and fsyncing the directory: after a crash the path holds either the
old record or the new one, never a mix. Temporary files are named ``.<name>.tmp-<random>``; one left
behind by a crash is garbage (``is_temp_file``) and may be removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c

from store.blockstore import StoreError

TMP_MARKER = ".tmp-"


class CorruptRecord(StoreError):
    """A record that cannot be trusted: unreadable, not JSON, wrong kind, bad checksum, missing fields."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"corrupt record {self.path}: {reason}")


class SchemaTooNew(StoreError):
    """A record written by a newer Sparrow than this one (refuse rather than misread it)."""

    def __init__(self, path: str | os.PathLike[str], found: int, supported: int) -> None:
        self.path = os.fspath(path)
        self.found = found
        self.supported = supported
        super().__init__(
            f"record {self.path} has schema version {found}; this Sparrow reads up to {supported} "
            "(upgrade Sparrow)"
        )


class RecordMissing(StoreError):
    """No record at the path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        super().__init__(f"record {self.path} does not exist")


class RecordWriteError(StoreError):
    """A record could not be written durably (the previous record, if any, is intact)."""

    def __init__(self, path: str | os.PathLike[str], err: OSError) -> None:
        self.path = os.fspath(path)
        self.errno = err.errno
        super().__init__(f"cannot write record {self.path}: {err.strerror or err}")


@dataclass(frozen=True, slots=True)
class Record:
    kind: str
    schema_version: int
    body: dict[str, Any]


def canonical_json(body: dict[str, Any]) -> bytes:
    """The bytes the checksum covers."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(body: dict[str, Any]) -> int:
    return int(crc32c.crc32c(canonical_json(body)))


def is_temp_file(name: str) -> bool:
    """True for a temporary file ``write_record`` creates (garbage if it outlived its writer)."""
    return name.startswith(".") and TMP_MARKER in name


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync(2) a directory so a rename or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike[str], data: bytes, flags: int) -> None:
    """Open ``path`` write-only with ``flags`` (O_CREAT makes it 0600), write all of ``data`` and
    fsync it; OSError as it comes. Append (O_APPEND) or create anew (O_CREAT | O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(path: str | os.PathLike[str], kind: str, schema_version: int, body: dict[str, Any]) -> None:
    """Atomically replace the record at ``path``; durable when it returns. Raises RecordWriteError.

    The file is created mode 0600 (records may hold CHAP secrets).
    """
    target = Path(path)
    envelope = {"kind": kind, "schema_version": schema_version, "crc32c": checksum(body), "body": body}
    payload = (json.dumps(envelope, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()
    tmp = target.with_name(f".{target.name}{TMP_MARKER}{secrets.token_hex(4)}")
    try:
        write_durably(tmp, payload, os.O_CREAT | os.O_EXCL)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise RecordWriteError(target, e) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_record(path: str | os.PathLike[str], kind: str, max_version: int) -> Record:
    """Read and verify the record at ``path``.

    Raises RecordMissing, CorruptRecord, or SchemaTooNew when its schema_version > ``max_version``.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise RecordMissing(path) from e
    except OSError as e:
        raise CorruptRecord(path, f"cannot read: {e.strerror or e}") from e
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRecord(path, f"not JSON ({e})") from e
    if not isinstance(envelope, dict):
        raise CorruptRecord(path, "not a JSON object")
    for field, typ in (("kind", str), ("schema_version", int), ("crc32c", int), ("body", dict)):
        value = envelope.get(field)
        if value is None:
            raise CorruptRecord(path, f"missing field {field!r}")
        if not isinstance(value, typ) or isinstance(value, bool):
            raise CorruptRecord(path, f"field {field!r} is not a {typ.__name__}")
    if envelope["kind"] != kind:
        raise CorruptRecord(path, f"kind is {envelope['kind']!r}, expected {kind!r}")
    version: int = envelope["schema_version"]
    if version < 1:
        raise CorruptRecord(path, f"schema version {version} is invalid")
    if version > max_version:
        raise SchemaTooNew(path, version, max_version)
    body: dict[str, Any] = envelope["body"]
    if checksum(body) != envelope["crc32c"]:
        raise CorruptRecord(path, "checksum mismatch")
    return Record(kind, version, body)


async def write_record_async(
    path: str | os.PathLike[str], kind: str, schema_version: int, body: dict[str, Any]
) -> None:
    """``write_record`` off the event loop."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, functools.partial(write_record, path, kind, schema_version, body))


async def read_record_async(path: str | os.PathLike[str], kind: str, max_version: int) -> Record:
    """``read_record`` off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(read_record, path, kind, max_version))
