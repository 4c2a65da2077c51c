"""VolumeService: keeps the volumes on disk, their logical units and the exported targets in step.

The HTTP API and the daemon's startup call this, never VolumeManager and TargetRegistry directly:

- create = create the volume, build its LogicalUnit, register the target ``{base_iqn}:{name}``;
- resize = grow the volume, then tell the LU (a CAPACITY DATA HAS CHANGED unit attention, SBC-3 4.x);
- delete = unregister the target (no new logins), disconnect its sessions, then delete the volume.

Mutations are serialised by one lock, so a delete never races a create or a resize of the same name.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from frontend.scsi.lu import LogicalUnit, LuIdentity
from frontend.scsi.reservations import Reservations
from frontend.target import ChapConfig, ChapSecret, Portal, Target, TargetRegistry
from store.volumes import ChapCredentials, Volume, VolumeLoadError, VolumeManager, VolumeNotFound

log = structlog.get_logger("sparrow.service")

#: The LUN every volume is exported as (one volume per target).
LUN = 0


class SessionControl(Protocol):
    """What the service needs from the iSCSI listener (the daemon adapts IscsiServer to it)."""

    def session_count(self, iqn: str) -> int: ...

    async def disconnect(self, iqn: str, reason: str) -> None: ...


class NoSessions:
    """SessionControl when no listener runs (tests of the API layer)."""

    def session_count(self, iqn: str) -> int:
        return 0

    async def disconnect(self, iqn: str, reason: str) -> None:
        return None


class VolumeMetrics(Protocol):
    def volume_served(self, volume: str, size: int) -> None: ...

    def volume_removed(self, volume: str) -> None: ...

    def set_offline(self, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    """A request to create a volume. ``size`` may be None only with ``backing`` (a block device)."""

    name: str
    size: int | None
    block_size: int = 512
    chap: ChapCredentials | None = None
    backing: str | None = None
    physical_block_size: int | None = None


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """What the API shows about a served volume. Never holds a CHAP secret."""

    name: str
    uuid: str
    size: int
    block_size: int
    physical_block_size: int
    serial: str
    naa: str
    backing: str | None
    created_at: str
    iqn: str
    lun: int
    portals: tuple[Portal, ...]
    chap_user: str | None
    chap_mutual_user: str | None
    sessions: int

    def urls(self) -> list[str]:
        """libiscsi URLs, ``iscsi://HOST:PORT/IQN/LUN``, one per advertised portal."""
        out = []
        for p in self.portals:
            host = f"[{p.host}]" if ":" in p.host else p.host
            out.append(f"iscsi://{host}:{p.port}/{self.iqn}/{self.lun}")
        return out


class VolumeService:
    def __init__(
        self,
        manager: VolumeManager,
        registry: TargetRegistry,
        *,
        base_iqn: str,
        portals: Sequence[Portal] = (),
        tpgt: int = 1,
        metrics: VolumeMetrics | None = None,
        sessions: SessionControl | None = None,
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.base_iqn = base_iqn
        self.portals: tuple[Portal, ...] = tuple(portals)
        self.tpgt = tpgt
        self.metrics = metrics
        self.sessions: SessionControl = sessions or NoSessions()
        self.offline: list[VolumeLoadError] = []
        self._lus: dict[str, LogicalUnit] = {}
        self._lock = asyncio.Lock()

    def iqn_for(self, name: str) -> str:
        return f"{self.base_iqn}:{name}"

    # --- startup ---------------------------------------------------------------------------------

    async def open_all(self) -> list[VolumeLoadError]:
        """Load every volume in the data directory and export it. Returns the volumes left offline."""
        async with self._lock:
            self.offline = list(await self.manager.load_all())  # the manager logs each one
            for volume in self.manager.list():
                try:
                    self._export(volume)
                except Exception as e:  # e.g. an unreadable reservations record: serve the others
                    path = str(self.manager.data_dir / "volumes" / f"{volume.meta.name}.json")
                    err = VolumeLoadError(volume.meta.name, path, f"cannot export: {e}")
                    log.error("volume offline", volume=err.name, path=err.path, reason=err.reason)
                    self.offline.append(err)
            self._report_offline()
            return list(self.offline)

    # --- queries ---------------------------------------------------------------------------------

    def volumes(self) -> list[VolumeInfo]:
        """The exported volumes, by name."""
        return [self._info(v) for v in self.manager.list() if v.meta.name in self._lus]

    def get(self, name: str) -> VolumeInfo:
        return self._info(self.manager.get(name))

    def names(self) -> list[str]:
        return sorted(name for name in self._lus)

    # --- mutations -------------------------------------------------------------------------------

    async def create(self, spec: VolumeSpec) -> VolumeInfo:
        async with self._lock:
            volume = await self.manager.create(
                spec.name,
                spec.size,
                block_size=spec.block_size,
                chap=spec.chap,
                backing=spec.backing,
                physical_block_size=spec.physical_block_size,
            )
            self._export(volume)
            log.info("target exported", volume=spec.name, iqn=self.iqn_for(spec.name))
            return self._info(volume)

    async def resize(self, name: str, new_size: int) -> VolumeInfo:
        """Grow ``name`` to ``new_size`` bytes. The manager refuses a shrink (InvalidVolume); the same
        size is a no-op."""
        async with self._lock:
            old_size = self.manager.get(name).meta.size
            volume = await self.manager.resize(name, new_size)
            if volume.meta.size == old_size:
                return self._info(volume)
            lu = self._lus.get(name)
            if lu is not None:
                lu.capacity_changed()
            if self.metrics is not None:
                self.metrics.volume_served(name, volume.meta.size)
            return self._info(volume)

    async def delete(self, name: str) -> None:
        """Delete ``name``. An offline volume (one that failed to load) can be deleted too: the
        manager removes what it left on disk."""
        async with self._lock:
            iqn = self.iqn_for(name)
            try:
                volume: Volume | None = self.manager.get(name)
            except VolumeNotFound:
                volume = None
            if volume is not None:
                self.registry.remove(iqn)  # no new logins from here on
                await self.sessions.disconnect(iqn, "volume deleted")
                self._lus.pop(name, None)
            try:
                await self.manager.delete(name)
            except BaseException:
                if volume is not None and any(v.meta.name == name for v in self.manager.list()):
                    self._export(volume)  # the manager still holds it: keep serving it
                raise
            self.offline = [e for e in self.offline if e.name != name]
            self._report_offline()
            if self.metrics is not None:
                self.metrics.volume_removed(name)
            log.info("target removed", volume=name, iqn=iqn)

    # --- shutdown --------------------------------------------------------------------------------

    async def flush_all(self) -> list[tuple[str, Exception]]:
        """fdatasync every volume. Returns the (volume, error) pairs that failed (all are tried)."""
        failed: list[tuple[str, Exception]] = []
        for volume in self.manager.list():
            try:
                await volume.store.flush()
            except Exception as e:
                failed.append((volume.meta.name, e))
        return failed

    async def close(self) -> None:
        for target in list(self.registry):
            self.registry.remove(target.iqn)
        self._lus.clear()
        await self.manager.close()

    # --- internals -------------------------------------------------------------------------------

    def _export(self, volume: Volume) -> None:
        meta = volume.meta
        lu = LogicalUnit(
            volume.store,
            LuIdentity(volume=meta.name, serial=meta.serial, naa=bytes.fromhex(meta.naa)),
            # The store keeps {} until the LU first saves a record; Reservations wants None for "none".
            reservations=Reservations(meta.reservations or None),
            on_reservations_changed=self._reservation_saver(meta.name),
            tpgt=self.tpgt,
            physical_block_size=meta.physical_block_size,
        )
        self._lus[meta.name] = lu
        self.registry.add(Target(self.iqn_for(meta.name), meta.name, lu, chap_config(meta.chap)))
        if self.metrics is not None:
            self.metrics.volume_served(meta.name, meta.size)

    def _reservation_saver(self, name: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
        async def save(record: dict[str, Any]) -> None:
            await self.manager.save_reservations(name, record)

        return save

    def _report_offline(self) -> None:
        if self.metrics is not None:
            self.metrics.set_offline(len(self.offline))

    def _info(self, volume: Volume) -> VolumeInfo:
        meta = volume.meta
        iqn = self.iqn_for(meta.name)
        chap = meta.chap
        return VolumeInfo(
            name=meta.name,
            uuid=str(meta.uuid),
            size=meta.size,
            block_size=meta.block_size,
            physical_block_size=meta.physical_block_size or meta.block_size,
            serial=meta.serial,
            naa=meta.naa,
            backing=str(meta.backing) if meta.backing is not None else None,
            created_at=_timestamp(meta.created_at),
            iqn=iqn,
            lun=LUN,
            portals=self.portals,
            chap_user=chap.user if chap is not None else None,
            chap_mutual_user=chap.mutual_user if chap is not None else None,
            sessions=self.sessions.session_count(iqn),
        )


def chap_config(chap: ChapCredentials | None) -> ChapConfig | None:
    """The target's CHAP settings from the stored credentials (mutual only when both halves are set)."""
    if chap is None:
        return None
    mutual = None
    if chap.mutual_user and chap.mutual_secret:
        mutual = ChapSecret(chap.mutual_user, chap.mutual_secret)
    return ChapConfig(initiator=ChapSecret(chap.user, chap.secret), target=mutual)


def _timestamp(value: object) -> str:
    """created_at as ISO-8601 UTC, whether stored as a datetime, epoch seconds or already a string."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, tz=dt.UTC).isoformat()
    return str(value)
