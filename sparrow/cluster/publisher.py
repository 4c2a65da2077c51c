"""Publisher: the one place that mints epochs (docs/cluster.md, "Publisher and AuthorityStore").

``publish(ask)`` runs one ``BEGIN IMMEDIATE`` transaction on the AuthorityStore: it reads the
highest epoch ever recorded for the volume, makes the next one (``+ 1``; the first is 1), appends
the assignment row and commits. Only after COMMIT has returned (``synchronous=FULL``: the row is on
disk) is the Assignment returned, so no node can hear of an epoch the master could forget in a
crash. A ``kill -9`` before COMMIT loses the whole publish (nobody heard of it); after, it is kept.
After a restart the next publish continues from the recorded maximum, so an epoch is never reused.

Every ask carries the in-sync set (``in_sync``), recorded with the row: it changes only through a
published assignment, under a new epoch, never in place. ``resize(volume_id, size)`` grows a
volume and republishes its placement (and in-sync set) under the next epoch in the same
transaction (a resize is a reason for a new epoch: the node grows its store on it).

The publisher mints whatever it is asked: whether an assignment is worth publishing is the
TopologyController's decision. It checks only that the ask is well-formed and names things the
store knows (a live volume, nodes that have said hello).

``on_mint(assignment, reason)`` (the master's audit log, sparrow.master.audit) is called inside
the transaction, before COMMIT: if it raises, the transaction rolls back and no epoch is minted,
so no epoch is ever announced that the audit trail does not hold. ``reason`` is the ask's
``reason`` when it has one. An ask's ``paused`` is recorded with the row and carried by the
assignment (sparrow.cluster.pause); a resize keeps the placement's. An ask with an
``epoch_floor`` (sparrow.cluster.epochfloor: an epoch a node reported above the authority's, after
a restore) gets an epoch above it: the epochs in between are recorded unplaced (no primary, no
copies) in the same transaction, and never announced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from sparrow.cluster.authority import (
    AuthorityStore,
    InvalidAuthorityRecord,
    UnknownNode,
    UnknownVolume,
    VolumeRecord,
    assignment_of,
)
from sparrow.cluster.epoch import Epoch
from sparrow.cluster.messages import Assignment, InvalidMessage, check_node_id


class AssignmentAsk(Protocol):
    """What the TopologyController asks for (any object with these attributes, e.g. its frozen
    ``AssignmentAsk`` dataclass): the node ids holding the volume, primary first, and those of
    them in sync (a subsequence of ``replicas``, the primary first)."""

    @property
    def volume_id(self) -> str: ...

    @property
    def primary(self) -> str | None: ...

    @property
    def replicas(self) -> tuple[str, ...]: ...

    @property
    def in_sync(self) -> tuple[str, ...]: ...


class InvalidAsk(InvalidAuthorityRecord):
    """An ask the publisher refuses (malformed replicas, primary not first ...); nothing written."""


class Publisher:
    """Mints epochs durably. ``wall_clock`` stamps ``created_at`` (wall-clock seconds)."""

    def __init__(
        self,
        store: AuthorityStore,
        *,
        wall_clock: Callable[[], float] = time.time,
        on_mint: Callable[[Assignment, str], None] | None = None,
    ) -> None:
        self._store = store
        self._wall_clock = wall_clock
        self._on_mint = on_mint

    def publish(self, ask: AssignmentAsk) -> Assignment:
        """Record ``ask`` under the volume's next epoch; returns it once it is committed.

        Raises UnknownVolume (unknown or deleted), UnknownNode (a node that never said hello),
        InvalidAsk; in every case nothing was written.
        """
        replicas = tuple(ask.replicas)
        primary = ask.primary
        in_sync = tuple(ask.in_sync)
        paused = getattr(ask, "paused", False) is True  # sparrow.cluster.pause sets it on every ask
        _check_ask(primary, replicas, in_sync)
        with self._store.write_transaction() as txn:
            volume = txn.volume(ask.volume_id)
            if volume is None or volume.deleted_at is not None:
                raise UnknownVolume(ask.volume_id)
            portal = None
            for node_id in replicas:
                node = txn.node(node_id)
                if node is None:
                    raise UnknownNode(node_id)
                if node_id == primary:
                    portal = node.addresses.iscsi_portal
            previous = txn.max_epoch(volume.volume_id)
            last = 0 if previous is None else previous.value
            floor = getattr(ask, "epoch_floor", 0)  # an epoch a node reported (cluster.epochfloor)
            floor = floor if isinstance(floor, int) else 0
            for skipped in range(last + 1, floor + 1):
                # Epochs the nodes saw and this authority lost (a restore): recorded unplaced, in
                # this transaction, so the history stays contiguous; never announced.
                txn.record_assignment(volume.volume_id, Epoch(skipped), None, (), self._wall_clock(), ())
            epoch = Epoch(max(last, floor) + 1)
            # Built before COMMIT so a message that could not be sent is never recorded.
            assignment = assignment_of(
                volume,
                epoch,
                primary,
                portal,
                replicas,
                in_sync=in_sync,
                replication_portals=txn.replication_portals(replicas),
                paused=paused,
            )
            txn.record_assignment(
                volume.volume_id, epoch, primary, replicas, self._wall_clock(), in_sync, paused
            )
            if self._on_mint is not None:
                reason = getattr(ask, "reason", None)
                self._on_mint(assignment, reason if isinstance(reason, str) else "")
        return assignment

    def resize(self, volume_id: str, size: int) -> tuple[VolumeRecord, Assignment | None]:
        """Grow the volume to ``size`` and, in the same transaction, publish its current placement
        (same primary, same replicas) under the next epoch with the new size: the node grows its
        store when it accepts the new epoch. Doing both in one transaction means no reader ever
        sees the new size under an already published epoch (the node would refuse a same-epoch
        assignment that differs from the one it accepted, and fence).

        Returns the updated record and the new assignment (None when the size did not change or
        the volume was never assigned: its first assignment will carry the new size). Raises
        UnknownVolume, InvalidAuthorityRecord (a shrink, a size that is not a multiple of the
        block size); nothing is written then.
        """
        with self._store.write_transaction() as txn:
            before = txn.volume(volume_id)
            volume = txn.grow_volume(volume_id, size)
            placement = txn.latest_placement(volume_id)
            if before is None or before.size == volume.size or placement is None:
                return volume, None
            primary, replicas, in_sync, paused = placement
            portal = None
            if primary is not None:
                node = txn.node(primary)
                if node is None:
                    raise UnknownNode(primary)
                portal = node.addresses.iscsi_portal
            previous = txn.max_epoch(volume_id)
            assert previous is not None  # there is a placement, so there is an epoch
            epoch = Epoch(previous.value + 1)
            assignment = assignment_of(
                volume,
                epoch,
                primary,
                portal,
                replicas,
                in_sync=in_sync,
                replication_portals=txn.replication_portals(replicas),
                paused=paused,
            )
            txn.record_assignment(volume_id, epoch, primary, replicas, self._wall_clock(), in_sync, paused)
            if self._on_mint is not None:
                self._on_mint(assignment, f"resized to {volume.size} bytes")
        return volume, assignment


def _check_ask(primary: str | None, replicas: tuple[str, ...], in_sync: tuple[str, ...]) -> None:
    try:
        for index, node_id in enumerate(replicas):
            check_node_id(f"replicas[{index}]", node_id)
    except InvalidMessage as e:
        raise InvalidAsk(str(e)) from None
    if len(set(replicas)) != len(replicas):
        raise InvalidAsk("replicas: a node appears twice")
    if primary is not None and (not replicas or replicas[0] != primary):
        raise InvalidAsk(f"replicas must list the primary {primary!r} first")
    position = {node: i for i, node in enumerate(replicas)}
    if any(node not in position for node in in_sync):
        raise InvalidAsk("in_sync: names a node that holds no copy")
    indices = [position[node] for node in in_sync]
    if indices != sorted(set(indices)):
        raise InvalidAsk("in_sync: must list copies once each, in the order of replicas")
    if primary is None and in_sync:
        raise InvalidAsk("in_sync: must be empty without a primary")
    if primary is not None and (not in_sync or in_sync[0] != primary):
        raise InvalidAsk(f"in_sync must list the primary {primary!r} first")
