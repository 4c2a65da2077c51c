"""VolumeManager: the daemon's API for creating, opening, growing and deleting volumes.

Layout under the data directory::

    volumes/<name>.json   the volume record (kind "volume", schema version 1): the commit point
    volumes/<name>.img    the sparse data file (absent when the volume uses a user-given backing)

Create writes (and fsyncs) the data file first and the record last, so a crash leaves at worst an
orphan ``.img`` with no record: ``load_all`` reports it and does not load it, and a later create of
that name replaces it. Delete removes the record first (the volume is gone from then on) and the data
file after. Records are replaced atomically (``store.metadata``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles.os
import structlog

from store.backing import BackingPolicy, BackingRefused, is_below
from store.blockstore import FileBlockStore, StoreError, StoreOpenError, StoreRangeError
from store.metadata import (
    CorruptRecord,
    RecordWriteError,
    fsync_dir,
    is_temp_file,
    read_record_async,
    write_record_async,
)
from store.migrations.errors import SchemaTooOld

log = structlog.get_logger("sparrow.store")

VOLUME_KIND = "volume"
#: v2 (store/migrations/volume_v1_to_v2.py) added volume_id and an explicit physical_block_size.
VOLUME_SCHEMA_VERSION = 2
BLOCK_SIZES = (512, 4096)
#: Volume names end up in target IQNs, so they use only what an IQN allows (RFC 3721 / RFC 7143 4.2.7).
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
#: The 24-bit IEEE company id in our NAA designators. Not an IEEE assignment: the X (local) bit of the
#: first octet is set, which marks a locally assigned identifier.
SPARROW_COMPANY_ID = 0x0A5350


class InvalidVolume(StoreError):
    """A request the manager refuses: bad name, size, block size, CHAP, backing, or a shrink."""


class BackingNotAllowed(InvalidVolume):
    """A backing outside the operator's allowed prefixes (store.backing)."""


class VolumeExists(StoreError):
    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        super().__init__(f"volume {name!r} already exists{detail}")


class VolumeNotFound(StoreError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no volume named {name!r}")


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """CHAP for one volume's target: the initiator proves ``user``/``secret``; with mutual CHAP the
    target proves ``mutual_user``/``mutual_secret`` back."""

    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None

    def validate(self) -> None:
        """RFC 7143 9.2.1: a secret used to authenticate initiators must not authenticate a target."""
        if not self.user or not self.secret:
            raise InvalidVolume("CHAP user and secret must not be empty")
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise InvalidVolume("mutual CHAP needs both a user and a secret")
        if self.mutual_user is not None and (not self.mutual_user or not self.mutual_secret):
            raise InvalidVolume("mutual CHAP user and secret must not be empty")
        if self.mutual_secret is not None and self.mutual_secret == self.secret:
            raise InvalidVolume("the mutual CHAP secret must differ from the initiator's secret")

    def to_record(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "secret": self.secret,
            "mutual_user": self.mutual_user,
            "mutual_secret": self.mutual_secret,
        }

    @classmethod
    def from_record(cls, rec: Any, path: Path) -> ChapCredentials:
        if not isinstance(rec, dict):
            raise CorruptRecord(path, "field 'chap' is not an object")
        user, secret = rec.get("user"), rec.get("secret")
        mutual_user, mutual_secret = rec.get("mutual_user"), rec.get("mutual_secret")
        if not isinstance(user, str) or not isinstance(secret, str):
            raise CorruptRecord(path, "chap.user and chap.secret must be strings")
        if not isinstance(mutual_user, str | None) or not isinstance(mutual_secret, str | None):
            raise CorruptRecord(path, "chap.mutual_user and chap.mutual_secret must be strings or null")
        return cls(user, secret, mutual_user, mutual_secret)


def serial_from_uuid(uuid_hex: str) -> str:
    """PRODUCT SERIAL NUMBER of the Unit Serial Number VPD page (SPC-4, page 80h): 16 upper-case
    hex digits of the uuid."""
    return uuid_hex[:16].upper()


def naa_from_uuid(uuid_hex: str) -> str:
    """NAA IEEE Registered Extended designator (NAA 6h) for the Device Identification VPD page
    (SPC-4, page 83h), as 32 hex digits.

    NAA (4 bits) = 6, IEEE company id (24 bits), then 100 bits of vendor specific identifier and
    extension taken from the uuid with its fixed version nibble removed.
    """
    bits = uuid_hex[:12] + uuid_hex[13:]  # drop the uuid4 version nibble
    return f"6{SPARROW_COMPANY_ID:06x}{bits[:25]}"


def validate_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidVolume(
            f"invalid volume name {name!r}: use 1-63 of a-z 0-9 . - starting with a letter or digit"
        )


def check_physical_block_size(block_size: int, physical: object) -> None:
    """A physical block is one or more logical blocks: 512 or 4096 bytes, never smaller than a block."""
    if physical is None:
        return
    if isinstance(physical, bool) or not isinstance(physical, int) or physical not in BLOCK_SIZES:
        raise InvalidVolume(f"physical block size must be 512 or 4096, not {physical!r}")
    if physical < block_size:
        raise InvalidVolume(f"physical block size {physical} is smaller than the block size {block_size}")


@dataclass(frozen=True, slots=True)
class VolumeMeta:
    name: str
    uuid: str
    size: int
    block_size: int
    serial: str
    naa: str
    backing: str | None
    created_at: float
    chap: ChapCredentials | None
    reservations: dict[str, Any] = field(default_factory=dict)
    #: Physical block size reported to initiators (READ CAPACITY 16 LBPPBE); None = block_size.
    physical_block_size: int | None = None
    #: The cluster-wide volume id (minted by the master; a single-node volume's is its uuid). Every
    #: node holding a copy derives the same serial and NAA from it, as multipath needs.
    volume_id: str = ""

    def __post_init__(self) -> None:
        if not self.volume_id:
            object.__setattr__(self, "volume_id", self.uuid)

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "size": self.size,
            "block_size": self.block_size,
            "serial": self.serial,
            "naa": self.naa,
            "backing": self.backing,
            "created_at": self.created_at,
            "chap": None if self.chap is None else self.chap.to_record(),
            "reservations": self.reservations,
            "physical_block_size": self.physical_block_size,
            "volume_id": self.volume_id,
        }

    @classmethod
    def from_record(cls, body: dict[str, Any], path: Path) -> VolumeMeta:
        """Decode a record body; CorruptRecord for a missing or ill-typed field."""

        def get(key: str, typ: type | tuple[type, ...]) -> Any:
            if key not in body:
                raise CorruptRecord(path, f"missing field {key!r}")
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, typ):
                raise CorruptRecord(path, f"field {key!r} has the wrong type")
            return value

        name = get("name", str)
        uuid_hex = get("uuid", str)
        size = get("size", int)
        block_size = get("block_size", int)
        chap_rec = get("chap", (dict, type(None)))
        meta = cls(
            name=name,
            uuid=uuid_hex,
            size=size,
            block_size=block_size,
            serial=get("serial", str),
            naa=get("naa", str),
            backing=get("backing", (str, type(None))),
            created_at=float(get("created_at", (int, float))),
            chap=None if chap_rec is None else ChapCredentials.from_record(chap_rec, path),
            reservations=get("reservations", dict),
            physical_block_size=get("physical_block_size", (int, type(None))),
            volume_id=get("volume_id", str),
        )
        if not NAME_PATTERN.fullmatch(name):
            raise CorruptRecord(path, f"invalid volume name {name!r}")
        if block_size not in BLOCK_SIZES or size <= 0 or size % block_size:
            raise CorruptRecord(path, f"invalid size {size} / block size {block_size}")
        try:
            check_physical_block_size(block_size, meta.physical_block_size)
        except InvalidVolume as e:
            raise CorruptRecord(path, str(e)) from None
        if not all(re.fullmatch(r"[0-9a-f]{32}", v) for v in (uuid_hex, meta.naa, meta.volume_id)):
            raise CorruptRecord(path, "invalid uuid or naa")
        return meta


@dataclass
class Volume:
    meta: VolumeMeta
    store: FileBlockStore


@dataclass(frozen=True, slots=True)
class VolumeLoadError:
    name: str
    path: str
    reason: str


class VolumeManager:
    """Owns the volumes of one data directory (lock the directory first: ``store.lock.DataDirLock``).

    Mutations (create, resize, delete, save_reservations) are serialized; each is durable before it
    returns. A ``Volume`` object stays the same across resize and save_reservations (its ``meta`` is
    replaced), so holders of it see the new metadata.
    """

    def __init__(self, data_dir: Path, *, backing_policy: BackingPolicy | None = None) -> None:
        self.data_dir = Path(data_dir)
        #: Which backing files and devices a new volume may use (default: none).
        self.backing_policy = backing_policy if backing_policy is not None else BackingPolicy()
        self.volumes_dir = self.data_dir / "volumes"
        self._volumes: dict[str, Volume] = {}
        self._lock = asyncio.Lock()

    def _record_path(self, name: str) -> Path:
        return self.volumes_dir / f"{name}.json"

    def _image_path(self, name: str) -> Path:
        return self.volumes_dir / f"{name}.img"

    # ---- loading -----------------------------------------------------------------------------------

    async def load_all(self) -> builtins.list[VolumeLoadError]:
        """Open every volume with a record. The ones that fail, and orphan data files, are returned
        (and logged) and left alone; leftover temporary files are removed."""
        await aiofiles.os.makedirs(self.volumes_dir, exist_ok=True)
        errors: list[VolumeLoadError] = []
        names: list[str] = sorted(await aiofiles.os.listdir(self.volumes_dir))
        records = {n[: -len(".json")] for n in names if n.endswith(".json") and not is_temp_file(n)}
        for entry in names:
            path = self.volumes_dir / entry
            if is_temp_file(entry):
                log.info("removing leftover temporary file", path=str(path))
                with contextlib.suppress(OSError):
                    await aiofiles.os.unlink(path)
            elif entry.endswith(".img") and entry[: -len(".img")] not in records:
                errors.append(
                    VolumeLoadError(
                        entry[: -len(".img")],
                        str(path),
                        "orphan data file without a volume record (left by an interrupted create or "
                        "delete); not loaded",
                    )
                )
            elif entry.endswith(".json"):
                name = entry[: -len(".json")]
                if name in self._volumes:
                    continue
                try:
                    self._volumes[name] = await self._load(name, path)
                except StoreError as e:
                    errors.append(VolumeLoadError(name, str(path), str(e)))
        for err in errors:
            log.warning("volume not loaded", volume=err.name, path=err.path, reason=err.reason)
        return errors

    async def _load(self, name: str, path: Path) -> Volume:
        record = await read_record_async(path, VOLUME_KIND, VOLUME_SCHEMA_VERSION)
        if record.schema_version < VOLUME_SCHEMA_VERSION:  # never read an old record silently
            raise SchemaTooOld(path, record.schema_version, VOLUME_SCHEMA_VERSION, self.data_dir)
        meta = VolumeMeta.from_record(record.body, path)
        if meta.name != name:
            raise CorruptRecord(path, f"record names volume {meta.name!r}, file is named {name!r}")
        data = meta.backing if meta.backing is not None else self._image_path(name)
        store = await FileBlockStore.open(
            data, block_size=meta.block_size, size=meta.size, grow=meta.backing is None
        )
        return Volume(meta, store)

    # ---- queries -----------------------------------------------------------------------------------

    def list(self) -> builtins.list[Volume]:
        return [self._volumes[name] for name in sorted(self._volumes)]

    def get(self, name: str) -> Volume:
        try:
            return self._volumes[name]
        except KeyError:
            raise VolumeNotFound(name) from None

    # ---- mutations ---------------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        size: int | None,
        *,
        block_size: int = 512,
        chap: ChapCredentials | None = None,
        backing: str | None = None,
        physical_block_size: int | None = None,
        volume_id: str | None = None,
    ) -> Volume:
        """Create a volume: a new sparse file in the data directory, or an existing file or block
        device (``backing``, never deleted by us). ``size`` None means the backing's own size."""
        validate_name(name)
        if block_size not in BLOCK_SIZES:
            raise InvalidVolume(f"block size must be 512 or 4096, not {block_size}")
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % block_size
        ):
            raise InvalidVolume(f"size {size} is not a positive multiple of the block size {block_size}")
        check_physical_block_size(block_size, physical_block_size)
        if size is None and backing is None:
            raise InvalidVolume("a size is required unless the volume uses a backing file or device")
        if chap is not None:
            chap.validate()
        async with self._lock:
            record_path = self._record_path(name)
            if name in self._volumes:
                raise VolumeExists(name)
            await aiofiles.os.makedirs(self.volumes_dir, exist_ok=True)
            if await aiofiles.os.path.exists(record_path):
                raise VolumeExists(name, " on disk but could not be loaded; delete it first")
            if backing is not None:
                backing, real = self._check_backing(backing)
                try:
                    store = await FileBlockStore.open(
                        real, block_size=block_size, size=size, grow=False, nofollow=True
                    )
                except StoreOpenError as e:
                    raise InvalidVolume(str(e)) from e
            else:
                assert size is not None
                image = self._image_path(name)
                if await aiofiles.os.path.exists(image):
                    log.warning("replacing orphan data file", volume=name, path=str(image))
                    await aiofiles.os.unlink(image)
                store = await FileBlockStore.open(image, block_size=block_size, size=size, create=True)
            if volume_id is not None and not re.fullmatch(r"[0-9a-f]{32}", volume_id):
                raise InvalidVolume(f"volume id {volume_id!r} is not 32 lowercase hex digits")
            uuid_hex = volume_id or uuid.uuid4().hex
            meta = VolumeMeta(
                name=name,
                uuid=uuid_hex,
                size=store.size,
                block_size=block_size,
                serial=serial_from_uuid(uuid_hex),
                naa=naa_from_uuid(uuid_hex),
                backing=backing,
                created_at=time.time(),
                chap=chap,
                physical_block_size=physical_block_size,
            )
            try:
                await self._save(meta)
            except BaseException:
                await store.close()
                if backing is None:
                    with contextlib.suppress(OSError):
                        await aiofiles.os.unlink(self._image_path(name))
                raise
            volume = self._volumes[name] = Volume(meta, store)
            log.info("volume created", volume=name, size=meta.size, block_size=block_size, backing=backing)
            return volume

    async def probe_backing(self, backing: str, *, block_size: int, size: int | None) -> int:
        """What :meth:`create` would check of a backing file or device, without creating anything:
        not inside the data directory, not used by another volume, openable at ``size`` (None: its
        own size). Returns the size a volume on it gets. Raises InvalidVolume with the reason."""
        if block_size not in BLOCK_SIZES:
            raise InvalidVolume(f"block size must be 512 or 4096, not {block_size}")
        _, real = self._check_backing(backing)
        try:
            store = await FileBlockStore.open(
                real, block_size=block_size, size=size, grow=False, nofollow=True
            )
        except StoreOpenError as e:
            raise InvalidVolume(str(e)) from e
        try:
            return store.size
        finally:
            await store.close()

    def _check_backing(self, backing: str) -> tuple[str, str]:
        """An allowed backing (store.backing), not inside the data directory and not used by
        another volume: the path to record (as given, normalized: a /dev/disk/by-id/ name stays
        stable across reboots) and the resolved path to open now. Raises BackingNotAllowed,
        InvalidVolume."""
        try:
            real = self.backing_policy.resolve(backing)
        except BackingRefused as e:
            raise BackingNotAllowed(str(e)) from None
        path = os.path.normpath(backing)
        if is_below(real, os.path.realpath(self.data_dir)):
            raise InvalidVolume(f"backing {backing} is inside the data directory")
        for volume in self._volumes.values():
            if volume.meta.backing is not None and os.path.realpath(volume.meta.backing) == real:
                raise InvalidVolume(f"backing {backing} is already used by volume {volume.meta.name!r}")
        return path, real

    async def resize(self, name: str, new_size: int) -> Volume:
        """Grow a volume (data first, then the record). Shrinking is refused."""
        async with self._lock:
            volume = self.get(name)
            meta = volume.meta
            if isinstance(new_size, bool) or not isinstance(new_size, int) or new_size % meta.block_size:
                raise InvalidVolume(
                    f"new size {new_size} is not a multiple of the block size {meta.block_size}"
                )
            if new_size < meta.size:
                raise InvalidVolume(f"cannot shrink volume {name!r} from {meta.size} to {new_size} bytes")
            if new_size == meta.size:
                return volume
            if meta.backing is not None:
                raise InvalidVolume(
                    f"volume {name!r} is backed by {meta.backing}: a user-given backing is never grown"
                )
            try:
                await volume.store.resize(new_size)
            except StoreRangeError as e:
                raise InvalidVolume(str(e)) from e
            new_meta = dataclasses.replace(meta, size=new_size)
            await self._save(new_meta)
            volume.meta = new_meta
            log.info("volume resized", volume=name, size=new_size)
            return volume

    async def save_reservations(self, name: str, record: dict[str, Any]) -> None:
        """Persist the SCSI layer's reservation record (SPC-4 5.12.4, APTPL); durable on return."""
        async with self._lock:
            volume = self.get(name)
            new_meta = dataclasses.replace(volume.meta, reservations=dict(record))
            await self._save(new_meta)
            volume.meta = new_meta

    async def save_chap(self, name: str, chap: ChapCredentials | None) -> None:
        """Replace the CHAP the volume's record keeps (what a restarted node exports with before
        the master's first word); durable on return."""
        async with self._lock:
            volume = self.get(name)
            new_meta = dataclasses.replace(volume.meta, chap=chap)
            await self._save(new_meta)
            volume.meta = new_meta

    async def delete(self, name: str) -> None:
        """Remove a volume: its record, then its data file (a user-given backing is left alone).

        Also removes what a volume that failed to load left on disk (record and/or data file)."""
        validate_name(name)
        async with self._lock:
            record_path, image = self._record_path(name), self._image_path(name)
            volume = self._volumes.get(name)
            if volume is None:
                found = [p for p in (record_path, image) if await aiofiles.os.path.exists(p)]
                if not found:
                    raise VolumeNotFound(name)
                for p in found:
                    await self._unlink(p)
                await self._fsync_volumes_dir()
                log.info("removed files of unloaded volume", volume=name, paths=[str(p) for p in found])
                return
            await self._unlink(record_path)
            await self._fsync_volumes_dir()
            del self._volumes[name]
            await volume.store.close()
            if volume.meta.backing is None:
                try:
                    await aiofiles.os.unlink(image)
                except OSError as e:
                    log.warning("could not remove data file", volume=name, path=str(image), error=str(e))
            log.info("volume deleted", volume=name)

    async def close_volume(self, name: str) -> None:
        """Stop using one volume: flush and close its store, keep its record and data. A node does
        this when the master no longer assigns it the volume; ``open_volume`` brings it back."""
        async with self._lock:
            volume = self._volumes.pop(name, None)
            if volume is None:
                raise VolumeNotFound(name)
            try:
                await volume.store.flush()
            finally:
                await volume.store.close()
            log.info("volume closed", volume=name)

    async def open_volume(self, name: str) -> Volume:
        """Open a volume that is on disk but not open (closed with ``close_volume``)."""
        validate_name(name)
        async with self._lock:
            if name in self._volumes:
                return self._volumes[name]
            path = self._record_path(name)
            if not await aiofiles.os.path.exists(path):
                raise VolumeNotFound(name)
            volume = self._volumes[name] = await self._load(name, path)
            return volume

    async def close(self) -> None:
        """Close every store (after waiting for the operations in flight)."""
        async with self._lock:
            volumes, self._volumes = self._volumes, {}
            for volume in volumes.values():
                await volume.store.close()

    # ---- helpers -----------------------------------------------------------------------------------

    async def _save(self, meta: VolumeMeta) -> None:
        await write_record_async(
            self._record_path(meta.name), VOLUME_KIND, VOLUME_SCHEMA_VERSION, meta.to_record()
        )

    async def _unlink(self, path: Path) -> None:
        try:
            await aiofiles.os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise RecordWriteError(path, e) from e

    async def _fsync_volumes_dir(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, fsync_dir, self.volumes_dir)
        except OSError as e:
            raise RecordWriteError(self.volumes_dir, e) from e
