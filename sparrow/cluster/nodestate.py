"""The node's durable cluster state (docs/cluster.md, "Adapter").

One record per volume the master has ever assigned to this node, holding the latest assignment the
node has *accepted* -- its epoch and the role it gives this node::

    DATA_DIR/cluster/<volume_id>.json   kind "cluster-volume", schema version 1
    DATA_DIR/node.json                  kind "cluster-node", schema version 1 (node id, incarnation)

Records use the ``store.metadata`` envelope (checksummed JSON, replaced atomically and fsynced), so
after a crash a record holds either the old role or the new one. The adapter persists a role
*before* acting on it, and the epoch it persists is the floor below which it rejects assignments;
:meth:`NodeState.persist` enforces that floor again (:class:`EpochRegression`), so no sequence of
calls can lower a persisted epoch.

A record that cannot be read is reported by :meth:`NodeState.load` and skipped; the others load.
Its volume stays *unreadable*: its epoch floor is unknown, so the node neither persists a new role
for it nor accepts an assignment for it until an operator repairs or removes the file (and restarts).

A volume this node no longer serves keeps its record (role NONE, or its last role) so the epoch
floor survives. The one exception is a volume the master has *deleted*: :meth:`NodeState.forget`
removes its record durably (unlink, then fsync of the directory), which the adapter's
``DestroyVolume`` does before the local volume's data is deleted, so a restart never reopens it.
Block data is never touched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from sparrow.cluster.epoch import Epoch
from sparrow.cluster.messages import (
    VOLUME_ID_PATTERN,
    Assignment,
    InvalidMessage,
    Role,
    check_node_id,
    check_uint,
    check_volume_id,
)
from store.blockstore import StoreError
from store.metadata import (
    CorruptRecord,
    RecordMissing,
    RecordWriteError,
    SchemaTooNew,
    fsync_dir,
    is_temp_file,
    read_record,
    write_record,
)

CLUSTER_DIR = "cluster"
VOLUME_ROLE_KIND = "cluster-volume"
VOLUME_ROLE_SCHEMA_VERSION = 1
NODE_RECORD_FILE = "node.json"
NODE_RECORD_KIND = "cluster-node"
NODE_RECORD_SCHEMA_VERSION = 1


class NodeStateError(StoreError):
    """Base of the errors :class:`NodeState` raises when asked to do something unsafe."""


class EpochRegression(NodeStateError):
    """A role whose epoch is lower than the persisted one (docs/cluster.md: rejected, never applied)."""

    def __init__(self, volume_id: str, persisted: int, offered: int) -> None:
        self.volume_id = volume_id
        self.persisted = persisted
        self.offered = offered
        super().__init__(f"volume {volume_id}: epoch {offered} is lower than the persisted epoch {persisted}")


class EpochConflict(NodeStateError):
    """A role at the persisted epoch that differs from the persisted role (one epoch, one assignment)."""

    def __init__(self, volume_id: str, epoch: int) -> None:
        self.volume_id = volume_id
        self.epoch = epoch
        super().__init__(f"volume {volume_id}: a different assignment is already persisted at epoch {epoch}")


class VolumeStateUnreadable(NodeStateError):
    """The volume's record could not be read at load, so its epoch floor is unknown."""

    def __init__(self, volume_id: str, reason: str) -> None:
        self.volume_id = volume_id
        self.reason = reason
        super().__init__(f"volume {volume_id}: persisted cluster state is unreadable ({reason})")


class NodeIdentityMismatch(NodeStateError):
    """The data directory belongs to another node id (its persisted roles are that node's)."""

    def __init__(self, recorded: str, given: str) -> None:
        self.recorded = recorded
        self.given = given
        super().__init__(f"data directory belongs to node {recorded!r}, not {given!r}")


@dataclass(frozen=True, slots=True)
class VolumeRole:
    """The assignment this node has accepted for one volume, and the role it gives this node.

    ``epoch`` is the recorded int (:attr:`restored_epoch` for the :class:`Epoch`). The other fields
    are the assignment's (``sparrow.cluster.messages.Assignment``); they are validated the same way.
    """

    volume_id: str
    name: str
    epoch: int
    role: Role
    primary: str | None
    primary_portal: str | None
    replicas: tuple[str, ...]
    size: int
    block_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise InvalidMessage("role", f"expected a Role, got {self.role!r}")
        self.as_assignment()  # the assignment's own checks (ids, portal, size, primary first...)
        if self.role is Role.PRIMARY and self.primary is None:
            raise InvalidMessage("role", "primary role in an assignment without a primary")
        if self.role is Role.REPLICA and not self.replicas:
            raise InvalidMessage("role", "replica role in an assignment without replicas")

    @classmethod
    def from_assignment(cls, assignment: Assignment, node_id: str) -> Self:
        """The role ``assignment`` gives ``node_id``."""
        return cls(
            volume_id=assignment.volume_id,
            name=assignment.name,
            epoch=assignment.epoch,
            role=assignment.role_of(node_id),
            primary=assignment.primary,
            primary_portal=assignment.primary_portal,
            replicas=assignment.replicas,
            size=assignment.size,
            block_size=assignment.block_size,
        )

    def as_assignment(self) -> Assignment:
        """The assignment this role was accepted from."""
        return Assignment(
            volume_id=self.volume_id,
            name=self.name,
            size=self.size,
            block_size=self.block_size,
            epoch=self.epoch,
            primary=self.primary,
            primary_portal=self.primary_portal,
            replicas=self.replicas,
        )

    @property
    def restored_epoch(self) -> Epoch:
        """The persisted epoch as an :class:`Epoch` (decoding a recorded epoch, not minting)."""
        return Epoch.restore(self.epoch)

    def to_record(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id,
            "name": self.name,
            "epoch": self.epoch,
            "role": self.role.value,
            "primary": self.primary,
            "primary_portal": self.primary_portal,
            "replicas": list(self.replicas),
            "size": self.size,
            "block_size": self.block_size,
        }

    @classmethod
    def from_record(cls, body: Mapping[str, Any], path: str | os.PathLike[str]) -> Self:
        """Decode a record body; CorruptRecord for a missing, ill-typed or invalid field."""
        expected = {
            "volume_id",
            "name",
            "epoch",
            "role",
            "primary",
            "primary_portal",
            "replicas",
            "size",
            "block_size",
        }
        missing = sorted(expected - body.keys())
        if missing:
            raise CorruptRecord(path, f"missing field {missing[0]!r}")
        replicas = body["replicas"]
        if not isinstance(replicas, list):
            raise CorruptRecord(path, "field 'replicas' is not a list")
        try:
            role = Role(body["role"])
        except (ValueError, TypeError):
            raise CorruptRecord(path, f"field 'role' is not a role: {body['role']!r}") from None
        try:
            return cls(
                volume_id=body["volume_id"],
                name=body["name"],
                epoch=body["epoch"],
                role=role,
                primary=body["primary"],
                primary_portal=body["primary_portal"],
                replicas=tuple(replicas),
                size=body["size"],
                block_size=body["block_size"],
            )
        except InvalidMessage as e:
            raise CorruptRecord(path, f"invalid field {e.field}: {e.reason}") from None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """Who owns the data directory and the incarnation it last started as."""

    node_id: str
    incarnation: int

    def __post_init__(self) -> None:
        check_node_id("node_id", self.node_id)
        check_uint("incarnation", self.incarnation)

    def to_record(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "incarnation": self.incarnation}

    @classmethod
    def from_record(cls, body: Mapping[str, Any], path: str | os.PathLike[str]) -> Self:
        try:
            node_id = check_node_id("node_id", body.get("node_id"))
            incarnation = check_uint("incarnation", body.get("incarnation"))
        except InvalidMessage as e:
            raise CorruptRecord(path, f"invalid field {e.field}: {e.reason}") from None
        return cls(node_id, incarnation)


@dataclass(frozen=True, slots=True)
class LoadProblem:
    """A record :meth:`NodeState.load` could not use; its volume is unreadable until repaired."""

    volume_id: str
    path: str
    reason: str


class NodeState:
    """The persisted per-volume roles of this node, in memory and under ``DATA_DIR/cluster/``.

    Call :meth:`load` (or :meth:`load_async`) once at start. :attr:`roles` is the in-memory view of
    what is on disk: it changes only after a write has become durable. On the event loop use the
    ``*_async`` methods (the write runs in the default executor; writes are serialised).
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.directory = self.data_dir / CLUSTER_DIR
        self._roles: dict[str, VolumeRole] = {}
        self._unreadable: dict[str, str] = {}
        self._lock = asyncio.Lock()

    # ---- queries ------------------------------------------------------------------------------------

    @property
    def roles(self) -> Mapping[str, VolumeRole]:
        """Persisted roles by volume id (read-only view)."""
        return types.MappingProxyType(self._roles)

    @property
    def unreadable(self) -> Mapping[str, str]:
        """Volumes whose record could not be read at load, with the reason (read-only view)."""
        return types.MappingProxyType(self._unreadable)

    def get(self, volume_id: str) -> VolumeRole | None:
        return self._roles.get(volume_id)

    def path_of(self, volume_id: str) -> Path:
        return self.directory / f"{volume_id}.json"

    # ---- load ---------------------------------------------------------------------------------------

    def load(self) -> tuple[LoadProblem, ...]:
        """Read every record in the cluster directory (creating it if missing).

        A record that is unreadable, corrupt, too new, or names another volume than its file is
        returned as a :class:`LoadProblem` and skipped; the others load. Leftover temporary files
        (a crash mid-write) are removed. Files that are not ``<volume_id>.json`` are ignored.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        roles: dict[str, VolumeRole] = {}
        problems: list[LoadProblem] = []
        for entry in sorted(os.listdir(self.directory)):
            path = self.directory / entry
            if is_temp_file(entry):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            volume_id, dot, ext = entry.partition(".")
            if ext != "json" or not dot or not VOLUME_ID_PATTERN.fullmatch(volume_id):
                continue
            try:
                record = read_record(path, VOLUME_ROLE_KIND, VOLUME_ROLE_SCHEMA_VERSION)
                role = VolumeRole.from_record(record.body, path)
                if role.volume_id != volume_id:
                    raise CorruptRecord(path, f"record is for volume {role.volume_id}, file for {volume_id}")
            except (CorruptRecord, SchemaTooNew, RecordMissing) as e:
                problems.append(LoadProblem(volume_id, str(path), str(e)))
                continue
            roles[volume_id] = role
        self._roles = roles
        self._unreadable = {p.volume_id: p.reason for p in problems}
        return tuple(problems)

    async def load_async(self) -> tuple[LoadProblem, ...]:
        """:meth:`load` off the event loop."""
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(None, self.load)

    # ---- persist ------------------------------------------------------------------------------------

    def _needs_write(self, role: VolumeRole) -> bool:
        """Check ``role`` against the persisted one; False when it is already persisted."""
        reason = self._unreadable.get(role.volume_id)
        if reason is not None:
            raise VolumeStateUnreadable(role.volume_id, reason)
        current = self._roles.get(role.volume_id)
        if current is None:
            return True
        if role.epoch < current.epoch:
            raise EpochRegression(role.volume_id, current.epoch, role.epoch)
        if role.epoch == current.epoch:
            if role != current:
                raise EpochConflict(role.volume_id, role.epoch)
            return False
        return True

    def persist(self, role: VolumeRole) -> None:
        """Durably record ``role`` (atomic, fsynced); the in-memory view changes only afterwards.

        Raises :class:`EpochRegression` for a lower epoch than the persisted one,
        :class:`EpochConflict` for a different role at the same epoch, :class:`VolumeStateUnreadable`
        for a volume whose record did not load, and ``store.metadata.RecordWriteError`` when the
        write fails (the previous record is intact). Persisting the persisted role is a no-op.
        """
        if not self._needs_write(role):
            return
        self._write(role)
        self._roles[role.volume_id] = role

    async def persist_async(self, role: VolumeRole) -> None:
        """:meth:`persist` with the write off the event loop; concurrent calls are serialised."""
        async with self._lock:
            if not self._needs_write(role):
                return
            await asyncio.get_running_loop().run_in_executor(None, self._write, role)
            self._roles[role.volume_id] = role

    def _write(self, role: VolumeRole) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_record(
            self.path_of(role.volume_id), VOLUME_ROLE_KIND, VOLUME_ROLE_SCHEMA_VERSION, role.to_record()
        )

    # ---- forget -------------------------------------------------------------------------------------

    def forget(self, volume_id: str) -> None:
        """Durably remove the volume's record (the master deleted the volume): unlink it, then fsync
        the directory; only then is it dropped from :attr:`roles` and :attr:`unreadable`.

        Idempotent: with no record (on disk or in memory) it does nothing. Also removes an
        unreadable record. Raises ``InvalidMessage`` for a malformed volume id and
        ``store.metadata.RecordWriteError`` when the unlink or the fsync fails (the in-memory view
        keeps the volume; calling again retries).
        """
        check_volume_id("volume_id", volume_id)
        self._unlink(volume_id, volume_id in self._roles or volume_id in self._unreadable)
        self._roles.pop(volume_id, None)
        self._unreadable.pop(volume_id, None)

    async def forget_async(self, volume_id: str) -> None:
        """:meth:`forget` with the unlink and fsync off the event loop (serialised with writes)."""
        check_volume_id("volume_id", volume_id)
        async with self._lock:
            known = volume_id in self._roles or volume_id in self._unreadable
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._unlink, volume_id, known)
            self._roles.pop(volume_id, None)
            self._unreadable.pop(volume_id, None)

    def _unlink(self, volume_id: str, known: bool) -> None:
        """Remove the record file and fsync the directory. The fsync also runs when the file is
        already gone but the volume is still ``known`` in memory (an earlier fsync failed)."""
        path = self.path_of(volume_id)
        try:
            path.unlink()
        except FileNotFoundError:
            if not known:
                return
        except OSError as e:
            raise RecordWriteError(path, e) from e
        try:
            fsync_dir(self.directory)
        except OSError as e:
            raise RecordWriteError(self.directory, e) from e

    # ---- incarnation --------------------------------------------------------------------------------

    def begin_incarnation(self, node_id: str, clock_ns: int) -> NodeRecord:
        """Record that ``node_id`` starts a new process; returns its incarnation.

        The incarnation is ``max(clock_ns, previous + 1)`` (e.g. ``clock_ns = time.time_ns()``), so
        it grows across restarts even if the wall clock stepped back. Raises
        :class:`NodeIdentityMismatch` if the data directory was used by another node id (its
        persisted roles would be wrong for this one), ``CorruptRecord``/``SchemaTooNew`` for an
        unreadable record, ``RecordWriteError`` if the new record cannot be written.
        """
        check_node_id("node_id", node_id)
        path = self.data_dir / NODE_RECORD_FILE
        incarnation = clock_ns
        try:
            record = read_record(path, NODE_RECORD_KIND, NODE_RECORD_SCHEMA_VERSION)
        except RecordMissing:
            pass
        else:
            previous = NodeRecord.from_record(record.body, path)
            if previous.node_id != node_id:
                raise NodeIdentityMismatch(previous.node_id, node_id)
            incarnation = max(clock_ns, previous.incarnation + 1)
        current = NodeRecord(node_id, incarnation)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_record(path, NODE_RECORD_KIND, NODE_RECORD_SCHEMA_VERSION, current.to_record())
        return current

    async def begin_incarnation_async(self, node_id: str, clock_ns: int) -> NodeRecord:
        """:meth:`begin_incarnation` off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.begin_incarnation, node_id, clock_ns))
