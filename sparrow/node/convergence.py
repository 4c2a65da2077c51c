"""Convergence: the node carries out the adapter's actions, and fences before its lease lapses.

Two pieces, both on the event loop:

- :class:`NodeVolumes` is the node's volume layer (the adapter's ``LocalVolumes``): it opens a
  volume by its cluster ``volume_id`` (creating the local store with the master's id the first time,
  ``VolumeManager.create(..., volume_id=...)``), exports it as the target ``{base_iqn}:{name}``
  with LUN 0, sets the LU's asymmetric access state (SPC-4 5.15.2), points logins elsewhere with a
  redirect (RFC 7143 11.13.5) and unexports a released volume. It deletes data only for
  ``destroy_volume`` (the master deleted the volume): never a local volume that carries another
  volume id.
- :class:`Convergence` runs the plans of :class:`~sparrow.cluster.adapter.Adapter` one at a time,
  in the order they were made (``execute_plan``: a volume's ``PersistRole`` is durable before any
  other action for it), and keeps THE FENCE: one ``call_at`` timer at the lease's fence deadline
  (``LeaseClock.fence_deadline``: the expiry minus the node's fence margin), re-armed whenever an
  Ack moves it. When it fires and ``LeaseClock.valid(now)`` is false, the
  actions of ``Adapter.fence_all()`` are applied to the LUs at once, in the timer callback, without
  waiting behind a plan that is still running: every primary LU goes ``TRANSITIONING``, so reads
  and writes get CHECK CONDITION, NOT READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE
  TRANSITION (04/0A, SPC-4 5.15.2.4.6) and REPORT TARGET PORT GROUPS shows the state. The plan is
  also queued, so the adapter hears of it in order. :meth:`Convergence.destroy` queues the
  adapter's destroy plan and waits until it has run (its error, if it failed, is raised there).

Each assignment also carries the volume's export settings (ack v3): the target's CHAP, the
physical block size and the backing. :class:`NodeVolumes` keeps the latest settings per volume id
(:meth:`NodeVolumes.apply_settings`, called by :meth:`Convergence.on_ack` before the plan is queued):
a volume created here gets its physical block size, backing and CHAP (stored in its local record, so
a restarted node exports it with that CHAP before the first Ack), and an exported target whose CHAP
differs from the assignment's is re-registered with it at once (sessions already logged in stay;
new logins need the new credentials, RFC 7143 12.1.3). The physical block size and the backing of a
volume that exists are never changed by an assignment.

Besides its own assignments, every Ack carries the cluster's volume directory (every live volume
with its primary's portal). :class:`RemoteDirectory` keeps one
:class:`~frontend.target.RemoteTarget` in the registry for each volume the node holds no copy of, so
a login to it here is answered "target moved temporarily" with the primary's portal (RFC 7143
11.13.5) and SendTargets here lists that portal (RFC 7143 13.8). Volumes the node holds are left to
the adapter (a replica redirects through its ``Redirect`` action). The directory is applied on
every Ack and again after every plan has run (closing a released volume forgets its IQN entirely).

A plan made while the lease was valid may run after the lease lapsed (a PersistRole ahead of it
took a while): :class:`NodeVolumes` is handed to ``execute_plan`` through a guard that never makes
an LU serve while ``LeaseClock.valid(now)`` is false; it leaves the LU fenced and fences through
the adapter, so the adapter's model and the LUs agree. The next Ack with a valid lease serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiofiles.os
import structlog

from frontend.scsi.lu import AccessState, LogicalUnit, LuIdentity
from frontend.scsi.rangelock import RangeLock
from frontend.scsi.reservations import Reservations
from frontend.target import ChapConfig, ChapSecret, Portal, RemoteTarget, Target, TargetRegistry
from sparrow.cluster.adapter import (
    SERVING_STATES,
    Adapter,
    AdapterPlan,
    DestroyVolume,
    OpenVolume,
    SetAccess,
    execute_plan,
)
from sparrow.cluster.lease import LeaseClock
from sparrow.cluster.messages import (
    Ack,
    Assignment,
    DirectoryEntry,
    Role,
    VolumeChap,
    VolumeObservation,
    split_portal,
)
from sparrow.metrics import VolumeMetrics
from sparrow.node.diagnostics import NodeDiagnostics
from sparrow.node.replicated_store import Forwarding
from sparrow.node.sessions import NoSessions, SessionControl
from sparrow.supervision import TaskSupervisor
from store.blockstore import BlockStore, StoreError
from store.dirtymap import DirtyMap, MarkingStore, dirty_path
from store.metadata import RecordMissing, read_record_async
from store.volumes import (
    VOLUME_KIND,
    VOLUME_SCHEMA_VERSION,
    ChapCredentials,
    Volume,
    VolumeManager,
    VolumeMeta,
    VolumeNotFound,
    validate_name,
)

log = structlog.get_logger("sparrow.node")

#: Seconds past the fence deadline at which an early-firing fence timer is re-armed (loop clocks have
#: millisecond resolution; a timer may fire a hair before the float deadline).
REARM_SLACK = 0.001
#: The longest a pause waits for the commands already running on the volume's LU (a WRITE
#: awaiting its replicas is bounded by the replication timeout, well under this).
PAUSE_DRAIN_SECONDS = 30.0


class VolumeMismatch(StoreError):
    """The local volume and the assignment disagree in a way the node must not paper over (a name
    held by another volume id, a block size that differs, a size that would shrink)."""


# -- the volume layer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeSettings:
    """A volume's export settings as its latest assignment gives them (ack v3)."""

    physical_block_size: int | None = None
    chap: VolumeChap | None = None
    backing: str | None = None

    @classmethod
    def of(cls, assignment: Assignment) -> VolumeSettings:
        return cls(assignment.physical_block_size, assignment.chap, assignment.backing)


def chap_credentials(chap: VolumeChap | None) -> ChapCredentials | None:
    """The store's record of ``chap`` (what a volume created here keeps in its metadata)."""
    if chap is None:
        return None
    return ChapCredentials(chap.user, chap.secret, chap.mutual_user, chap.mutual_secret)


def target_chap(chap: ChapCredentials | VolumeChap | None) -> ChapConfig | None:
    """The target's CHAP settings (mutual only when both halves are set), as ``sparrow serve``."""
    if chap is None:
        return None
    mutual = None
    if chap.mutual_user and chap.mutual_secret:
        mutual = ChapSecret(chap.mutual_user, chap.mutual_secret)
    return ChapConfig(initiator=ChapSecret(chap.user, chap.secret), target=mutual)


@dataclass(frozen=True, slots=True)
class Exported:
    """One volume this node exports: its id, local name, target IQN and logical unit."""

    volume_id: str
    name: str
    iqn: str
    lu: LogicalUnit


class NodeVolumes:
    """The node's ``LocalVolumes``: volumes by cluster id, exported as targets in ``registry``.

    Every action is idempotent (the adapter's contract): opening an open volume only grows it if
    the assignment is larger; closing, fencing or redirecting a volume that is not open does nothing.
    """

    def __init__(
        self,
        manager: VolumeManager,
        registry: TargetRegistry,
        *,
        base_iqn: str,
        tpgt: int = 1,
        metrics: VolumeMetrics | None = None,
        sessions: SessionControl | None = None,
        forwarding: Forwarding | None = None,
        diagnostics: NodeDiagnostics | None = None,
    ) -> None:
        self.manager = manager
        #: Per-volume errors and unsupported SCSI commands, for the heartbeat (heartbeat v3).
        self.diagnostics = diagnostics if diagnostics is not None else NodeDiagnostics()
        #: Wraps each exported store so a primary forwards to its replicas (None: ``sparrow serve``).
        self.forwarding = forwarding
        self.registry = registry
        self.base_iqn = base_iqn
        self.tpgt = tpgt
        self.metrics = metrics
        self.sessions: SessionControl = sessions or NoSessions()
        self._exported: dict[str, Exported] = {}
        #: The export settings of the latest Ack, by volume id (absent: not heard of yet).
        self._settings: dict[str, VolumeSettings] = {}
        #: Local volumes (by name) whose record keeps another CHAP than the master's: saved by
        #: :meth:`save_settings` (the worker, after each plan).
        self._chap_to_save: dict[str, VolumeChap | None] = {}
        #: Cluster nodes only: each open volume's dirty map and the store that marks it before
        #: writing (store/dirtymap.py); whether the latest Ack lists this node's copy in sync.
        self._dirty: dict[str, DirtyMap] = {}
        self._marking: dict[str, MarkingStore] = {}
        self._in_sync_here: dict[str, bool] = {}
        if forwarding is not None:
            forwarding.lock_for = self.range_lock

    # ---- queries ------------------------------------------------------------------------------------

    def iqn_for(self, name: str) -> str:
        return f"{self.base_iqn}:{name}"

    def exported(self) -> Mapping[str, Exported]:
        """The exported volumes by volume id."""
        return dict(self._exported)

    def is_exported(self, volume_id: str) -> bool:
        """``volume_id in exported()`` without the copy (a replica asks it for every record)."""
        return volume_id in self._exported

    def lu(self, volume_id: str) -> LogicalUnit | None:
        entry = self._exported.get(volume_id)
        return None if entry is None else entry.lu

    def find(self, volume_id: str) -> Volume | None:
        """The local volume with cluster id ``volume_id`` (open in the manager), if any."""
        for volume in self.manager.list():
            if volume.meta.volume_id == volume_id:
                return volume
        return None

    def __iter__(self) -> Iterator[Exported]:
        return iter(list(self._exported.values()))

    def settings(self, volume_id: str) -> VolumeSettings | None:
        return self._settings.get(volume_id)

    def dirty_map(self, volume_id: str) -> DirtyMap | None:
        return self._dirty.get(volume_id)

    def marking_store(self, volume_id: str) -> MarkingStore | None:
        return self._marking.get(volume_id)

    def range_lock(self, volume_id: str) -> RangeLock | None:
        lu = self.lu(volume_id)
        return None if lu is None else lu.range_lock

    def note_in_sync(self, node_id: str, assignments: Iterable[Assignment]) -> None:
        """Remember whether each assignment lists this node's copy in sync: a copy created in
        sync (a new volume: every copy zeros) starts with a clean dirty map, any other all dirty."""
        for assignment in assignments:
            self._in_sync_here[assignment.volume_id] = node_id in assignment.in_sync

    def apply_settings(self, assignments: Iterable[Assignment]) -> None:
        """Remember each assignment's export settings; re-register an exported target whose CHAP
        differs (see the module docstring)."""
        for assignment in assignments:
            settings = VolumeSettings.of(assignment)
            self._settings[assignment.volume_id] = settings
            try:
                local = self.manager.get(assignment.name)
            except StoreError:
                local = None
            if (
                local is not None
                and local.meta.volume_id == assignment.volume_id
                and local.meta.chap != chap_credentials(settings.chap)
            ):
                self._chap_to_save[assignment.name] = settings.chap
            entry = self._exported.get(assignment.volume_id)
            if entry is None:
                continue
            target = self.registry.get(entry.iqn)
            wanted = target_chap(settings.chap)
            if target is not None and target.chap != wanted:
                self.registry.add(Target(entry.iqn, entry.name, entry.lu, wanted))
                log.info("target CHAP changed", volume=entry.name, chap=wanted is not None)

    @property
    def settings_pending(self) -> bool:
        """Whether a local record's CHAP is to be saved (:meth:`save_settings`)."""
        return bool(self._chap_to_save)

    async def save_settings(self) -> None:
        """Keep each local record's CHAP the master's (``volume update``), so a restarted node
        exports with the current CHAP before its first Ack. A failure is logged and retried after
        the next plan."""
        for name, chap in list(self._chap_to_save.items()):
            try:
                await self.manager.save_chap(name, chap_credentials(chap))
            except StoreError as e:
                log.warning("volume CHAP not saved in its record", volume=name, error=str(e))
                continue
            if self._chap_to_save.get(name) == chap:
                del self._chap_to_save[name]

    def apply_discovery_chap(self, chap: VolumeChap | None) -> None:
        """The cluster's discovery CHAP from an Ack: the next discovery login needs it (sessions
        already logged in are kept)."""
        wanted = target_chap(chap)
        if self.registry.discovery_chap != wanted:
            self.registry.discovery_chap = wanted
            log.info("discovery CHAP changed", chap=wanted is not None)

    # ---- LocalVolumes -------------------------------------------------------------------------------

    async def open_volume(self, action: OpenVolume) -> None:
        """Make the volume's LU exist: create the local store with the master's id if there is none
        (never truncating one), then export it fenced (``TRANSITIONING``, no redirect)."""
        volume = self.find(action.volume_id)
        created = False
        if volume is None:
            try:  # closed earlier (released by this node): its store and record are still on disk
                reopened = await self.manager.open_volume(action.name)
            except StoreError:
                reopened = None
            if reopened is not None and reopened.meta.volume_id == action.volume_id:
                volume = reopened
                log.info("volume reopened", volume=action.name, volume_id=action.volume_id)
        if volume is None:
            try:
                clash = self.manager.get(action.name)
            except StoreError:
                clash = None
            if clash is not None:
                raise VolumeMismatch(
                    f"volume {action.volume_id}: the name {action.name!r} is held locally by volume "
                    f"{clash.meta.volume_id}"
                )
            settings = self._settings.get(action.volume_id, VolumeSettings())
            volume = await self.manager.create(
                action.name,
                action.size,
                block_size=action.block_size,
                volume_id=action.volume_id,
                chap=chap_credentials(settings.chap),
                backing=settings.backing,
                physical_block_size=settings.physical_block_size,
            )
            created = True
            log.info("volume created", volume=action.name, volume_id=action.volume_id, size=action.size)
        meta = volume.meta
        if meta.block_size != action.block_size:
            raise VolumeMismatch(
                f"volume {action.volume_id}: local block size {meta.block_size}, assigned {action.block_size}"
            )
        if action.size < meta.size:
            raise VolumeMismatch(
                f"volume {action.volume_id}: assigned size {action.size} < local size {meta.size}"
            )
        grew = action.size > meta.size
        if grew:
            volume = await self.manager.resize(meta.name, action.size)
            log.info("volume grown", volume=meta.name, size=action.size)
        if self.forwarding is not None and action.volume_id not in self._dirty:
            await self._open_dirty(volume, created)
        entry = self._exported.get(action.volume_id)
        if entry is None:
            self._export(volume)
        elif grew:
            entry.lu.capacity_changed()
            if self.metrics is not None:
                self.metrics.volume_served(entry.name, volume.meta.size)

    async def close_volume(self, volume_id: str) -> None:
        """Unexport: fence the LU, forget the target (no new logins), close its sessions once their
        commands finished. The data and the volume record stay."""
        entry = self._exported.pop(volume_id, None)
        if entry is None:
            return
        entry.lu.access_state = AccessState.TRANSITIONING
        self.registry.remove(entry.iqn)
        await self.sessions.disconnect(entry.iqn, "volume released by this node")
        if self.metrics is not None:
            self.metrics.volume_removed(entry.name)
        if self.forwarding is not None:
            self.forwarding.forget(volume_id)
        await self._release_dirty(volume_id)
        with contextlib.suppress(StoreError):  # flush and close the store; data and record stay
            await self.manager.close_volume(entry.name)
        log.info("target unexported", volume=entry.name, volume_id=volume_id)

    async def set_access(self, volume_id: str, state: AccessState) -> None:
        self.apply_access(volume_id, state)

    async def destroy_volume(self, volume_id: str, name: str) -> None:
        """The master deleted the volume: unexport it (as :meth:`close_volume`), then delete the
        local volume ``name``, record and data (``VolumeManager.delete``; a user-given backing
        stays). A volume of that name that failed to load (its id unreadable) is deleted too: the
        master named it. No local volume of that name: nothing to do.

        Raises :class:`VolumeMismatch`, deleting nothing, when the local ``name`` carries another
        volume id or the volume id is held locally under another name (the adapter has forgotten
        the volume's role by then: the data stays, unassigned). A volume whose record cannot be read
        is taken to be the master's: a name reaches the master only through a create checked
        against the local disk (``sparrow serve``) or the adoption of a readable local volume.

        The delete itself is shielded from cancellation (a shutdown in the middle of it): a
        half-deleted volume would leave an orphan data file behind.
        """
        validate_name(name)
        present, recorded = await self._local_id(name)
        if recorded is not None and recorded != volume_id:
            raise VolumeMismatch(
                f"volume {volume_id}: the name {name!r} is held locally by volume {recorded}; not deleted"
            )
        entry = self._exported.get(volume_id)
        elsewhere = self.find(volume_id)
        for held in (
            None if entry is None else entry.name,
            None if elsewhere is None else elsewhere.meta.name,
        ):
            if held is not None and held != name:
                raise VolumeMismatch(
                    f"volume {volume_id} is held locally as {held!r}, not {name!r}; not deleted"
                )
        await self.close_volume(volume_id)
        self._settings.pop(volume_id, None)
        self.diagnostics.forget(volume_id)
        if not present:
            return
        with contextlib.suppress(OSError):
            await aiofiles.os.unlink(dirty_path(self.manager.volumes_dir, name))
        try:
            await asyncio.shield(self.manager.delete(name))
        except VolumeNotFound:
            return
        log.info("volume destroyed", volume=name, volume_id=volume_id, readable=recorded is not None)

    async def _local_id(self, name: str) -> tuple[bool, str | None]:
        """Whether a local volume ``name`` exists (open, closed, or what one that failed to load
        left on disk), and the volume id its record carries (None when there is none to read)."""
        try:
            return True, self.manager.get(name).meta.volume_id
        except VolumeNotFound:
            pass
        record = self.manager.volumes_dir / f"{name}.json"
        try:
            body = (await read_record_async(record, VOLUME_KIND, VOLUME_SCHEMA_VERSION)).body
            return True, VolumeMeta.from_record(body, record).volume_id
        except RecordMissing:
            return await aiofiles.os.path.exists(self.manager.volumes_dir / f"{name}.img"), None
        except StoreError:  # corrupt, too new or too old: offline, its id unreadable
            return True, None

    async def redirect(self, volume_id: str, portal: str | None) -> None:
        """Logins to the volume's target go to ``portal`` (``host:port``), or are served here (None).

        Redirected elsewhere (the volume is served by another node now, e.g. this primary was
        demoted by a planned failover): the sessions logged in here are closed, so their initiators
        log in again and follow the redirect instead of retrying a standby LU forever. The
        forwarding stands down first, so the writes it holds fail (retryably) at once rather than
        keep the disconnect waiting."""
        entry = self._exported.get(volume_id)
        if entry is None:
            return
        if portal is None:
            self.registry.redirect(entry.iqn, None)
            return
        host, port = split_portal(portal)
        self.registry.redirect(entry.iqn, Portal(host, port, self.tpgt))
        if self.sessions.session_count(entry.iqn):
            if self.forwarding is not None:
                self.forwarding.stand_down([volume_id])
            await self.sessions.disconnect(entry.iqn, f"volume served at {portal}")

    async def set_paused(self, volume_id: str, paused: bool) -> None:
        """Pause (or resume) the volume's LU: NOT READY to reads and writes (frontend.scsi.lu)."""
        entry = self._exported.get(volume_id)
        if entry is None:
            return
        if entry.lu.paused != paused:
            log.info("volume paused" if paused else "volume resumed", volume=entry.name, volume_id=volume_id)
        entry.lu.paused = paused
        if paused:
            # The commands already past the LU's checks complete before the epoch is applied
            # (and reported), so none lands after the pause's answer; bounded, since a store
            # that hangs must not stop this node's convergence.
            try:
                async with asyncio.timeout(PAUSE_DRAIN_SECONDS):
                    await entry.lu.drained()
            except TimeoutError:
                log.warning(
                    "paused with commands still running", volume=entry.name, seconds=PAUSE_DRAIN_SECONDS
                )

    def apply_access(self, volume_id: str, state: AccessState) -> bool:
        """Set the LU's access state now (synchronously); False if the volume is not open."""
        entry = self._exported.get(volume_id)
        if entry is None:
            return False
        if entry.lu.access_state != state:
            log.info("access state", volume=entry.name, state=state.name)
        entry.lu.access_state = state
        return True

    # ---- internals ----------------------------------------------------------------------------------

    async def _open_dirty(self, volume: Volume, created: bool) -> None:
        meta = volume.meta
        path = dirty_path(self.manager.volumes_dir, meta.name)
        clean = created and self._in_sync_here.get(meta.volume_id, False)
        loop = asyncio.get_running_loop()
        dirty = await loop.run_in_executor(
            None, functools.partial(DirtyMap.open, path, meta.volume_id, meta.size, missing_clean=clean)
        )
        self._dirty[meta.volume_id] = dirty
        self._marking[meta.volume_id] = MarkingStore(volume.store, dirty)

    async def _release_dirty(self, volume_id: str) -> None:
        """The copy leaves its assignment: every region dirty (a later re-add is a full copy)."""
        self._marking.pop(volume_id, None)
        dirty = self._dirty.pop(volume_id, None)
        if dirty is None:
            return
        try:
            await dirty.mark_all()
        except StoreError as e:
            log.warning("dirty map not marked at release", volume_id=volume_id, error=str(e))
        dirty.close()

    def _export(self, volume: Volume) -> None:
        meta = volume.meta
        marking = self._marking.get(meta.volume_id)
        local: BlockStore = volume.store if marking is None else marking
        store = (
            local
            if self.forwarding is None
            else self.forwarding.wrap(meta.volume_id, local, dirty=self._dirty.get(meta.volume_id))
        )
        lu = LogicalUnit(
            store,
            LuIdentity(volume=meta.name, serial=meta.serial, naa=bytes.fromhex(meta.naa)),
            reservations=Reservations(meta.reservations or None),
            on_reservations_changed=self._reservation_saver(meta.name),
            tpgt=self.tpgt,
            physical_block_size=meta.physical_block_size,
            unsupported=self.diagnostics.tally(meta.volume_id, meta.name),
        )
        lu.access_state = AccessState.TRANSITIONING  # fenced before any initiator can reach it
        iqn = self.iqn_for(meta.name)
        self._exported[meta.volume_id] = Exported(meta.volume_id, meta.name, iqn, lu)
        settings = self._settings.get(meta.volume_id)
        # Before the first Ack names the volume: the CHAP its local record keeps.
        chap = target_chap(meta.chap) if settings is None else target_chap(settings.chap)
        self.registry.add(Target(iqn, meta.name, lu, chap))
        if self.metrics is not None:
            self.metrics.volume_served(meta.name, meta.size)
        log.info("target exported", volume=meta.name, volume_id=meta.volume_id, iqn=iqn)

    def _reservation_saver(self, name: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
        async def save(record: dict[str, Any]) -> None:
            await self.manager.save_reservations(name, record)

        return save


# -- the directory of volumes served elsewhere --------------------------------------------------------


class RemoteDirectory:
    """The volumes this node holds no copy of, as :class:`~frontend.target.RemoteTarget` entries in
    ``registry`` (IQN ``{base_iqn}:{name}``, portal = the primary's, with this cluster's ``tpgt``).

    :meth:`update` is idempotent and compares with what the registry holds, so an entry another
    party removed (``NodeVolumes.close_volume`` forgets an IQN entirely) is put back. It never
    touches an IQN that has a local :class:`~frontend.target.Target`: that volume is the adapter's.
    """

    def __init__(self, registry: TargetRegistry, *, base_iqn: str, tpgt: int = 1) -> None:
        self.registry = registry
        self.base_iqn = base_iqn
        self.tpgt = tpgt
        #: What this directory put in the registry, by volume id.
        self._entries: dict[str, RemoteTarget] = {}

    def entries(self) -> Mapping[str, RemoteTarget]:
        """The remote entries this directory keeps, by volume id."""
        return dict(self._entries)

    def update(self, directory: Iterable[DirectoryEntry], held: Collection[str]) -> None:
        """Make the registry's remote entries match ``directory`` for every volume not in ``held``
        (the volume ids this node is assigned or exports). A volume without a primary, one that
        left the directory and one this node now holds lose their entry."""
        wanted: dict[str, RemoteTarget] = {}
        for entry in directory:
            if entry.volume_id in held or entry.primary_portal is None:
                continue
            iqn = f"{self.base_iqn}:{entry.name}"
            if self.registry.get(iqn) is not None:
                continue  # a local target of that name: the adapter decides where it is served
            host, port = split_portal(entry.primary_portal)
            wanted[entry.volume_id] = RemoteTarget(iqn, entry.name, Portal(host, port, self.tpgt))
        for volume_id, old in list(self._entries.items()):
            new = wanted.get(volume_id)
            if new is not None and new.iqn == old.iqn:
                continue
            del self._entries[volume_id]
            # Only our own entry, and never a local target (``remove`` would drop it too).
            if self.registry.get(old.iqn) is None and self.registry.remote(old.iqn) == old:
                self.registry.remove(old.iqn)
                log.info("remote target forgotten", volume=old.volume, iqn=old.iqn)
        for volume_id, remote in wanted.items():
            if self.registry.remote(remote.iqn) != remote:
                self.registry.add_remote(remote)
                log.info(
                    "remote target",
                    volume=remote.volume,
                    iqn=remote.iqn,
                    portal=remote.portal.redirect_address(),
                )
            self._entries[volume_id] = remote


# -- convergence and the fence ------------------------------------------------------------------------


class Cancellable(Protocol):
    def cancel(self) -> None: ...


#: ``schedule(when, callback)``: run ``callback`` at loop time ``when`` (``loop.call_at``).
Scheduler = Callable[[float, Callable[[], None]], Cancellable]


@dataclass(frozen=True, slots=True)
class Fence:
    """One fence: when it was applied, when it was due and when the lease expires (loop clock),
    what it fenced."""

    at: float
    deadline: float | None
    expired_at: float | None
    volume_ids: tuple[str, ...]
    reason: str

    @property
    def late(self) -> float | None:
        """Seconds between the fence deadline (expiry minus the fence margin) and the fence."""
        return None if self.deadline is None else self.at - self.deadline

    @property
    def before_expiry(self) -> float | None:
        """Seconds the fence landed before the lease expired (negative: after it)."""
        return None if self.expired_at is None else self.expired_at - self.at


class _Guarded:
    """``LocalVolumes`` for ``execute_plan`` that never makes an LU serve without a valid lease."""

    def __init__(self, owner: Convergence) -> None:
        self._owner = owner
        self._volumes = owner.volumes

    async def open_volume(self, action: OpenVolume) -> None:
        await self._volumes.open_volume(action)

    async def close_volume(self, volume_id: str) -> None:
        await self._volumes.close_volume(volume_id)

    async def set_access(self, volume_id: str, state: AccessState) -> None:
        if state in SERVING_STATES and not self._owner.lease_valid():
            # Planned under a lease that has lapsed since: stay fenced, and tell the adapter.
            self._volumes.apply_access(volume_id, AccessState.TRANSITIONING)
            self._owner.fence("lease lapsed before the plan ran")
            return
        self._volumes.apply_access(volume_id, state)

    async def redirect(self, volume_id: str, portal: str | None) -> None:
        await self._volumes.redirect(volume_id, portal)

    async def set_paused(self, volume_id: str, paused: bool) -> None:
        await self._volumes.set_paused(volume_id, paused)

    async def destroy_volume(self, volume_id: str, name: str) -> None:
        await self._volumes.destroy_volume(volume_id, name)


@dataclass(frozen=True, slots=True)
class _Queued:
    """A plan waiting for the worker, and the future of whoever waits for it to run (if anyone)."""

    plan: AdapterPlan
    done: asyncio.Future[None] | None = None


class Convergence:
    """Runs the adapter's plans in order on the event loop and keeps the fence timer.

    ``clock`` is the loop's monotonic clock (``loop.time``), the one ``LeaseClock`` is fed with;
    ``schedule`` is ``loop.call_at``. Both default to the running loop's. The worker and the fence
    timer run under ``supervisor`` (tasks ``node-convergence`` and ``fence-timer``).
    """

    def __init__(
        self,
        adapter: Adapter,
        volumes: NodeVolumes,
        lease: LeaseClock,
        *,
        clock: Callable[[], float] | None = None,
        schedule: Scheduler | None = None,
        supervisor: TaskSupervisor | None = None,
    ) -> None:
        self.adapter = adapter
        self.volumes = volumes
        self.lease = lease
        if clock is None or schedule is None:
            loop = asyncio.get_running_loop()
            clock = clock or loop.time
            schedule = schedule or (lambda when, callback: loop.call_at(when, callback))
        self._clock = clock
        self._schedule = schedule
        self.supervisor = supervisor if supervisor is not None else TaskSupervisor()
        self._on_timer_guarded = self.supervisor.guard("fence-timer", self._on_timer)
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._timer: Cancellable | None = None
        self._timer_at: float | None = None
        self._guarded = _Guarded(self)
        #: Remote entries for the volumes of the latest Ack's directory this node does not hold.
        self.directory = RemoteDirectory(volumes.registry, base_iqn=volumes.base_iqn, tpgt=volumes.tpgt)
        self._last_ack: Ack | None = None
        #: The latest Ack's stream keys: (volume id, replica) -> (the assignment's epoch, key).
        self._stream_keys: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._short_lease: float | None = None  # a lease already logged as too short to serve
        #: Every fence applied, oldest first (the daemon exports the count; tests read the times).
        self.fences: list[Fence] = []
        #: The error of the last plan that failed part way, if any (None once a plan succeeds).
        self.last_error: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the restart plan (persisted volumes opened, primaries fenced) and start the worker."""
        self._enqueue(self.adapter.startup())
        if self._worker is None:
            self._worker = self.supervisor.spawn(self._run(), name="node-convergence")

    async def close(self) -> None:
        """Stop the timer and the worker (a plan in progress is cancelled between two actions).

        Whoever waits in :meth:`destroy` for a plan that will not run now gets CancelledError.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item.done is not None and not item.done.done():
                item.done.cancel()
            self._queue.task_done()

    async def idle(self) -> None:
        """Wait until every queued plan has run."""
        await self._queue.join()

    # ---- inputs -------------------------------------------------------------------------------------

    def lease_valid(self) -> bool:
        return self.lease.valid(self._clock())

    def on_ack(self, ack: Ack) -> None:
        """An Ack was applied to the lease clock (``LeaseClock.acked``): plan its assignments under
        the lease as it stands now, destroy the copies of the volumes it says were deleted
        (``deleted``, after the plan that releases them), move the fence to the lease's new
        fence deadline, and point the volumes of the directory this node does not hold at their primaries."""
        now = self._clock()
        self._last_ack = ack
        epochs = {a.volume_id: a.epoch for a in ack.assignments}
        self._stream_keys = {(k.volume_id, k.replica): (epochs[k.volume_id], k.key) for k in ack.stream_keys}
        # Before the plan is queued: a volume newly assigned here loses its remote entry before
        # its LU is opened, so the adapter's "newly opened: no redirect" holds.
        self._update_directory()
        destroyed = self.adapter.destroyed
        self.volumes.apply_settings(a for a in ack.assignments if a.volume_id not in destroyed)
        self.volumes.apply_discovery_chap(ack.discovery_chap)
        self.volumes.note_in_sync(self.adapter.node_id, ack.assignments)
        if ack.lease_seconds <= self.lease.fence_margin and ack.lease_seconds != self._short_lease:
            log.error(
                "the master's lease is not longer than this node's fence margin: it cannot serve",
                lease_seconds=ack.lease_seconds,
                fence_margin=self.lease.fence_margin,
            )
        self._short_lease = ack.lease_seconds if ack.lease_seconds <= self.lease.fence_margin else None
        self._enqueue(self.adapter.plan(ack.assignments, self.lease.valid(now), now))
        for tombstone in ack.deleted:  # after the plan that releases them
            if tombstone.volume_id not in self.adapter.destroyed:
                log.info("volume deleted by the master", volume=tombstone.name, volume_id=tombstone.volume_id)
                self._enqueue(self.adapter.destroy(tombstone.volume_id, tombstone.name))
        self._arm()

    def _update_directory(self) -> None:
        ack = self._last_ack
        if ack is None:
            return
        node_id = self.adapter.node_id
        held = {a.volume_id for a in ack.assignments if a.role_of(node_id) is not Role.NONE}
        held.update(self.volumes.exported())
        held.update(self.adapter.destroyed)  # deleted by the master: no remote entry either
        self.directory.update(ack.directory, held)

    async def destroy(self, volume_id: str, name: str) -> None:
        """The master deleted the volume: queue the adapter's destroy plan (``Adapter.destroy``:
        closed if open, its record forgotten, its local data deleted) and wait until it has run.

        Raises the plan's error if it failed (also kept in :attr:`last_error`), e.g.
        :class:`VolumeMismatch` when the local volume of that name carries another volume id.
        Calling it again retries (every step is idempotent). If the waiter is cancelled, the plan
        still runs. The worker must be running (:meth:`start`); :meth:`close` cancels the wait.
        Raises ``InvalidMessage`` at once for a malformed volume id or name.
        """
        plan = self.adapter.destroy(volume_id, name)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(plan, done)
        await done

    def replication_targets(self, volume_id: str) -> tuple[tuple[str, str | None], ...]:
        """The replicas this node, as the volume's primary, must forward every write to and wait
        for: ``(node_id, replication portal)`` for each copy of the latest Ack's ``in_sync`` but
        this node, in its order. A portal is None while the master knows none: the primary must
        still wait for that copy (or have it dropped), never skip it. Empty unless this node has
        persisted the primary role at the epoch of that assignment (an Ack the adapter rejected,
        or one not yet applied, names no targets)."""
        ack = self._last_ack
        held = self.adapter.state.get(volume_id)
        if ack is None or held is None or held.role is not Role.PRIMARY:
            return ()
        for assignment in ack.assignments:
            if assignment.volume_id == volume_id:
                if assignment.epoch != held.epoch or assignment.primary != self.adapter.node_id:
                    return ()
                return tuple((node, assignment.replication_portal(node)) for node in assignment.in_sync[1:])
        return ()

    def stream_key(self, volume_id: str, epoch: int, replica: str) -> bytes | None:
        """The replication stream key of ``volume_id`` at ``epoch`` to ``replica`` that the latest
        Ack gave this node (ack v6; docs/replication.md, "Who may open a stream"): as the
        primary, one per replica; as a replica, its own. None when the latest Ack assigns the
        volume at another epoch or carries no such key (e.g. none since this process started).
        Two dict lookups: a replica asks it for every message it receives."""
        held = self._stream_keys.get((volume_id, replica))
        return held[1] if held is not None and held[0] == epoch else None

    def resync_targets(self, volume_id: str) -> tuple[tuple[str, str], ...]:
        """The copies this node, as the volume's primary, must resync: ``(node_id, replication
        portal)`` for each copy of the assignment outside ``in_sync`` whose portal is known (the
        same conditions as :meth:`replication_targets`)."""
        ack = self._last_ack
        if ack is None or not self._primary_here(volume_id):
            return ()
        for assignment in ack.assignments:
            if assignment.volume_id == volume_id:
                return tuple(
                    (node, portal)
                    for node in assignment.replicas[1:]
                    if node not in assignment.in_sync
                    and (portal := assignment.replication_portal(node)) is not None
                )
        return ()

    def _primary_here(self, volume_id: str) -> bool:
        ack = self._last_ack
        held = self.adapter.state.get(volume_id)
        if ack is None or held is None or held.role is not Role.PRIMARY:
            return False
        return any(
            a.volume_id == volume_id and a.epoch == held.epoch and a.primary == self.adapter.node_id
            for a in ack.assignments
        )

    def observations(self, now: float) -> tuple[VolumeObservation, ...]:
        """What the next heartbeat reports (the adapter's view: persisted epochs and roles; a
        primary's replicas as its forwarding sees them)."""
        forwarding = self.volumes.forwarding
        diagnostics = self.volumes.diagnostics
        return self.adapter.observations(
            now,
            replica_states={} if forwarding is None else forwarding.replica_states(now),
            errors=diagnostics.errors(),
            unsupported=diagnostics.unsupported(),
        )

    def _retarget(self) -> None:
        """Tell the forwarding the in-sync replicas of each volume this node has persisted as
        primary at the latest Ack's epoch (others are left as they are)."""
        forwarding, ack = self.volumes.forwarding, self._last_ack
        if forwarding is None or ack is None:
            return
        targets = {}
        for assignment in ack.assignments:
            held = self.adapter.state.get(assignment.volume_id)
            if (
                held is not None
                and held.role is Role.PRIMARY
                and held.epoch == assignment.epoch
                and assignment.primary == self.adapter.node_id
            ):
                targets[assignment.volume_id] = (
                    held.epoch,
                    self.replication_targets(assignment.volume_id),
                    self.resync_targets(assignment.volume_id),
                    len(assignment.in_sync) == len(assignment.replicas),
                )
        forwarding.retarget(targets)
        forwarding.stand_down(
            volume_id
            for volume_id in self.volumes.exported()
            if (held := self.adapter.state.get(volume_id)) is None or held.role is not Role.PRIMARY
        )

    # ---- the fence ----------------------------------------------------------------------------------

    @property
    def fence_at(self) -> float | None:
        """When the fence timer is armed to fire (loop clock), None when it is not armed."""
        return self._timer_at

    def _arm(self) -> None:
        deadline = self.lease.fence_deadline
        if deadline is None or deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._schedule(deadline, self._on_timer_guarded)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._clock()
        deadline = self.lease.fence_deadline
        if self.lease.valid(now):
            # Fired a hair early (clock resolution), or the lease moved without a re-arm: wait on.
            assert deadline is not None
            self._timer_at = max(deadline, now + REARM_SLACK)
            self._timer = self._schedule(self._timer_at, self._on_timer_guarded)
            return
        self.fence("lease about to expire")

    def fence(self, reason: str) -> Fence:
        """Fence every primary now: ``Adapter.fence_all()`` applied to the LUs at once, then queued
        so the adapter records it in order (re-applying it is harmless)."""
        now = self._clock()
        plan = self.adapter.fence_all()
        fenced: list[str] = []
        for action in plan.actions:
            if isinstance(action, SetAccess) and self.volumes.apply_access(action.volume_id, action.state):
                fenced.append(action.volume_id)
        self._enqueue(plan)
        record = Fence(now, self.lease.fence_deadline, self.lease.expires_at, tuple(fenced), reason)
        self.fences.append(record)
        late, early = record.late, record.before_expiry
        log.warning(
            "fenced",
            reason=reason,
            volumes=len(fenced),
            volume_ids=fenced,
            lease_expired_at=record.expired_at,
            fence_deadline=record.deadline,
            fenced_at=now,
            late_ms=None if late is None else round(late * 1000, 3),
            before_expiry_ms=None if early is None else round(early * 1000, 3),
        )
        return record

    # ---- the worker ---------------------------------------------------------------------------------

    def _enqueue(self, plan: AdapterPlan, done: asyncio.Future[None] | None = None) -> None:
        if plan.actions or self.volumes.settings_pending:
            # The adapter holds only plans with actions as outstanding; an empty one still runs
            # the worker, which saves the settings after it (NodeVolumes.save_settings).
            self._queue.put_nowait(_Queued(plan, done))
        elif done is not None:
            done.set_result(None)
        for rejection in plan.rejected:
            log.warning(
                "assignment rejected",
                volume_id=rejection.volume_id,
                offered=rejection.offered,
                held=rejection.held,
                reason=rejection.reason,
            )

    async def run_once(self) -> None:
        """Run the next queued plan (waits for one). The worker calls this in a loop."""
        item = await self._queue.get()
        plan, done = item.plan, item.done
        error: Exception | None = None
        failures: dict[str, BaseException] = {}
        try:
            await execute_plan(plan, self.adapter, self._guarded, failures)
        except asyncio.CancelledError:
            if done is not None and not done.done():
                done.cancel()
            raise
        except Exception as e:
            error = e
            text = f"{type(e).__name__}: {e}"
            # A broken volume is retried on every Ack: say so once, not once per heartbeat.
            report = log.error if text != self.last_error else log.debug
            report("plan failed", error=text, actions=len(plan.actions))
            self.last_error = text
            for action in plan.actions:  # a destroy that failed before forgetting is tried again
                if isinstance(action, DestroyVolume) and self.adapter.destroy_failed(action.volume_id):
                    log.warning("volume destroy to be retried", volume_id=action.volume_id, error=text)
        else:
            self.last_error = None
        finally:
            self.volumes.diagnostics.plan_ran({a.volume_id for a in plan.actions}, failures)
            self._update_directory()  # a volume closed by the plan is now served elsewhere
            self._retarget()  # after the plan persisted the assignment: forward under its epoch
            self._queue.task_done()
        await self.volumes.save_settings()  # after a failed plan too: another volume's CHAP
        if done is not None and not done.done():  # the waiter may have given up
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as e:  # a bug outside the plan (a plan's own error is last_error)
                self.supervisor.failed("node-convergence", e)
            else:
                self.supervisor.recovered("node-convergence")
