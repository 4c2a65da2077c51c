"""The master's control loop (docs/cluster.md, "TopologyController", "Publisher and AuthorityStore").

Every heartbeat interval (or sooner, when a primary's lease may be reassigned before that:
:meth:`ControlLoop.next_step_at`) the loop runs one :meth:`ControlLoop.step`:

1. read the authority (live volumes and the newest published assignment of each);
2. ``TopologyController.decide(desired, current, observations, leases, now)``;
3. for each ask that differs from the volume's current assignment, ``Publisher.publish(ask)`` --
   the only place an epoch is minted, committed before any node hears of it -- and remember when
   it was published (master clock), which the controller's convergence deadline counts from.

A resize (:meth:`ControlLoop.resize_volume`, from the API) is the one publish that does not come
from a decision: the new size and the volume's next epoch (same primary, same replicas) are
committed together by ``Publisher.resize``, so no Ack ever carries a new size under an epoch the
node already accepted (it would refuse it and fence); the node grows its store on the new epoch.

A primary that says hello from a new portal (a restart with another ``--iscsi``, or a second
process under its id) changes the portal the authority derives for the *same* epoch; nodes that
accepted that epoch refuse a same-epoch assignment that differs. So the loop keeps sending the
assignment as published, and once the primary heartbeats from there republishes the same
placement under the next epoch (reason "primary portal moved"); the nodes accept the new epoch and
the new portal.

The latest :class:`~sparrow.cluster.controller.Decision`'s status per volume is kept for the API,
and the current assignments are kept in memory for the heartbeat server's Acks
(:meth:`ControlLoop.assignments_for`).

Restart (:func:`restore`): the master has forgotten which leases it granted and when its
assignments were published. It therefore treats every node it knows as granted a full lease at its
start time (``MasterLeases.granted``, before the first decide; see ``sparrow.cluster.lease``),
counts convergence of the recorded assignments from its start time, and builds the
ObservationStore with ``started_at=now`` so that nodes that have not reconnected yet are not
declared dead. An unchanged cluster therefore yields no ask and no new epoch.

Steps are synchronous and take ``now`` (tests drive them directly). The asyncio layer uses
:meth:`ControlLoop.step_async`, which runs the same phases but does the blocking SQLite calls
(reads, and a publish's fsync) in a worker thread; the decision itself runs on the event loop,
which is the only thread touching the ObservationStore and MasterLeases.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from sparrow.cluster.authority import AuthorityError, AuthorityStore, VolumeRecord
from sparrow.cluster.controller import (
    AssignmentAsk,
    Decision,
    DesiredVolume,
    PublishedAssignment,
    TopologyController,
    VolumeStatus,
)
from sparrow.cluster.epochfloor import EpochFloor
from sparrow.cluster.lease import LeaseConfig, MasterLeases
from sparrow.cluster.messages import Assignment, DeletedVolume, VolumeChap
from sparrow.cluster.moves import OperatorMoves
from sparrow.cluster.nodeidentity import NodeKeys
from sparrow.cluster.observations import ObservationStore
from sparrow.cluster.pause import apply_pause, with_pause
from sparrow.cluster.publisher import Publisher

log = structlog.get_logger("sparrow.master.control")


@dataclass(frozen=True, slots=True)
class AuthoritySnapshot:
    """What the authority holds: live volumes and the assignment in force for each that has one."""

    volumes: tuple[VolumeRecord, ...]
    assignments: Mapping[str, Assignment]
    #: Nodes the operator is draining (authority v6; sparrow.cluster.moves).
    draining: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PublishFailure:
    """An ask the publisher refused (e.g. a node whose Hello is not recorded yet); retried next step."""

    ask: AssignmentAsk
    error: str


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step: the controller's decision, what was published, and what the publisher refused."""

    decision: Decision
    published: tuple[Assignment, ...]
    failed: tuple[PublishFailure, ...]


def differs(ask: AssignmentAsk, current: Assignment | None) -> bool:
    """True when publishing ``ask`` would change the volume's assignment (primary, copies, the
    in-sync set or the pause)."""
    return (
        current is None
        or ask.primary != current.primary
        or tuple(ask.replicas) != current.replicas
        or tuple(ask.in_sync) != current.in_sync
        or ask.paused != current.paused
    )


class ControlLoop:
    """Holds the master's view between steps; see the module docstring.

    ``on_published`` is called (on the caller's thread) with every assignment once it is committed.
    """

    def __init__(
        self,
        store: AuthorityStore,
        *,
        observations: ObservationStore,
        leases: MasterLeases,
        controller: TopologyController,
        publisher: Publisher,
        on_published: Callable[[Assignment], None] | None = None,
        epoch_floor: EpochFloor | None = None,
    ) -> None:
        self.store = store
        #: Epochs never go back after a restore (sparrow.cluster.epochfloor); None: not checked.
        self.epoch_floor = epoch_floor
        self.observations = observations
        self.leases = leases
        self.controller = controller
        self.publisher = publisher
        self._on_published = on_published
        self._volumes: dict[str, VolumeRecord] = {}
        self._current: dict[str, PublishedAssignment] = {}
        self._status: dict[str, VolumeStatus] = {}
        #: Volumes deleted through the API: a snapshot read before the delete must not revive them.
        self._deleted: set[str] = set()
        #: Every deleted volume's name by id (from the authority at restore, then each delete): the
        #: tombstones sent to a node that still reports a copy (``tombstones_for``).
        self._tombstones: dict[str, str] = {}
        #: Volumes whose primary's portal changed under a published epoch: republished next step.
        self._moved: dict[str, AssignmentAsk] = {}
        self.steps = 0
        #: Operator moves in progress (planned failover, rebuild) and the drain rule.
        self.moves = OperatorMoves(controller)
        self.draining: frozenset[str] = frozenset()
        #: Node identities and approvals (sparrow.cluster.nodeidentity): a pending node is never
        #: chosen (the master's daemon sets its own; the default approves every binding).
        self.node_keys = NodeKeys()
        #: The discovery CHAP every Ack carries (the authority's cluster setting; None: none).
        self.discovery_chap: VolumeChap | None = None

    # -- phases -----------------------------------------------------------------------------------

    def read_authority(self) -> AuthoritySnapshot:
        """Blocking: the live volumes and their current assignments, from SQLite."""
        draining = frozenset(n.node_id for n in self.store.nodes() if n.draining)
        return AuthoritySnapshot(self.store.volumes(), self.store.latest_assignments(), draining)

    def apply_snapshot(self, snapshot: AuthoritySnapshot, now: float) -> None:
        """Adopt ``snapshot`` as the master's view. An assignment seen for the first time (e.g.
        after a restart) counts as published at ``now``."""
        self._volumes = {v.volume_id: v for v in snapshot.volumes if v.volume_id not in self._deleted}
        current: dict[str, PublishedAssignment] = {}
        moved: dict[str, AssignmentAsk] = {}
        for volume_id, assignment in snapshot.assignments.items():
            if volume_id not in self._volumes:
                continue
            known = self._current.get(volume_id)
            if known is not None and known.assignment.epoch == assignment.epoch:
                published_at = known.published_at
                old, new = known.assignment.primary_portal, assignment.primary_portal
                if assignment.primary is not None and old != new:
                    # Keep sending the epoch as the nodes accepted it; a new epoch carries the move.
                    moved[volume_id] = AssignmentAsk(
                        volume_id,
                        assignment.primary,
                        assignment.replicas,
                        f"primary portal moved: {assignment.primary} from {old} to {new}",
                        assignment.in_sync,
                        assignment.paused,
                    )
                    assignment = known.assignment
            else:
                published_at = now
            current[volume_id] = PublishedAssignment(assignment, published_at)
        self._current = current
        self._moved = moved
        self._status = {k: v for k, v in self._status.items() if k in self._volumes}
        self.draining = snapshot.draining

    def desired(self) -> tuple[DesiredVolume, ...]:
        return tuple(
            DesiredVolume(
                volume_id=v.volume_id, name=v.name, size=v.size, block_size=v.block_size, replicas=v.replicas
            )
            for v in self._volumes.values()
        )

    def paused(self) -> tuple[VolumeRecord, ...]:
        """The live volumes the operator paused (their wish; sparrow.cluster.pause publishes it)."""
        return tuple(v for v in self._volumes.values() if v.paused)

    def decide(self, now: float) -> tuple[Decision, tuple[AssignmentAsk, ...]]:
        """Ask the controller; keep its status per volume; return the decision and the asks that
        would change something (the only ones worth an epoch)."""
        desired = self.moves.adjust(self.desired())
        pending = self.node_keys.pending()
        decision = self.controller.decide(
            desired,
            self._current,
            self.observations,
            self.leases,
            now,
            draining=self.draining,
            pending=pending,
        )
        self.moves.unapproved = pending
        decision = self.moves.apply(decision, desired, self._current, self.observations, self.draining, now)
        floor: tuple[AssignmentAsk, ...] = ()
        if self.epoch_floor is not None:
            current = {v: p.assignment for v, p in self._current.items()}
            wanted = {v.volume_id: v.replicas for v in self._volumes.values()}
            decision, floor = self.epoch_floor.step(decision, current, wanted, self.observations, now)
        pauses = {v.volume_id: v.paused for v in self._volumes.values()}
        decision = apply_pause(decision, pauses, self._current, now, self._status)
        floor = tuple(with_pause(ask, pauses) for ask in floor)
        self._status = dict(decision.status)
        self.steps += 1
        to_publish = tuple(ask for ask in decision.asks if differs(ask, self.current(ask.volume_id)))
        asked = {ask.volume_id for ask in decision.asks}
        to_publish += tuple(
            ask
            for volume_id, ask in sorted(self._moved.items())
            if volume_id not in asked
            and self.observations.alive(ask.primary, now)
            and self._announced(volume_id)
        )
        to_publish += floor
        return decision, to_publish

    def publish(self, ask: AssignmentAsk) -> Assignment:
        """Blocking: mint and commit the next epoch for ``ask`` (raises the publisher's errors)."""
        return self.publisher.publish(ask)

    def published(self, assignment: Assignment, reason: str, now: float) -> None:
        """Record a committed assignment as the volume's current one, published at ``now``."""
        if assignment.volume_id in self._deleted:
            return
        self._current[assignment.volume_id] = PublishedAssignment(assignment, now)
        log.info(
            "published assignment",
            volume=assignment.name,
            volume_id=assignment.volume_id,
            epoch=assignment.epoch,
            primary=assignment.primary,
            replicas=list(assignment.replicas),
            in_sync=list(assignment.in_sync),
            reason=reason,
        )
        if self._on_published is not None:
            self._on_published(assignment)

    # -- whole steps ------------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """One synchronous step at ``now`` (reads, decides, publishes)."""
        self.apply_snapshot(self.read_authority(), now)
        decision, asks = self.decide(now)
        published: list[Assignment] = []
        failed: list[PublishFailure] = []
        for ask in asks:
            try:
                assignment = self.publish(ask)
            except AuthorityError as e:
                failed.append(self._refused(ask, e))
                continue
            self.published(assignment, ask.reason, now)
            published.append(assignment)
        return StepResult(decision, tuple(published), tuple(failed))

    async def step_async(self, clock: Callable[[], float]) -> StepResult:
        """The same step with the blocking SQLite calls in a worker thread; ``clock`` is read after
        the snapshot arrives and again after each publish commits."""
        snapshot = await asyncio.to_thread(self.read_authority)
        now = clock()
        self.apply_snapshot(snapshot, now)
        decision, asks = self.decide(now)
        published: list[Assignment] = []
        failed: list[PublishFailure] = []
        for ask in asks:
            try:
                assignment = await asyncio.to_thread(self.publish, ask)
            except AuthorityError as e:
                failed.append(self._refused(ask, e))
                continue
            self.published(assignment, ask.reason, clock())
            published.append(assignment)
        return StepResult(decision, tuple(published), tuple(failed))

    @staticmethod
    def _refused(ask: AssignmentAsk, error: AuthorityError) -> PublishFailure:
        log.warning("publish refused", volume_id=ask.volume_id, reason=ask.reason, error=str(error))
        return PublishFailure(ask, str(error))

    def next_step_at(self, now: float, interval: float) -> float:
        """When the next step should run: ``interval`` after ``now``, or sooner, at the instant a
        current primary's lease may be reassigned (``expires_at + margin``, the instant
        ``safe_to_reassign`` turns true) when that falls before. A live primary's lease always ends
        more than an interval ahead, so this only moves the step of a primary gone silent: it is
        replaced at that instant, not up to an interval later."""
        margin = self.controller.margin if self.controller.margin is not None else self.leases.margin
        at = now + interval
        for published in self._current.values():
            primary = published.assignment.primary
            expires = None if primary is None else self.leases.expires_at(primary)
            if expires is not None and now < expires + margin < at:
                at = expires + margin
        return at

    # -- reading (event loop) ---------------------------------------------------------------------

    def current(self, volume_id: str) -> Assignment | None:
        """The assignment in force for ``volume_id`` as the master knows it (None: never assigned)."""
        published = self._current.get(volume_id)
        return None if published is None else published.assignment

    def published_at(self, volume_id: str) -> float | None:
        published = self._current.get(volume_id)
        return None if published is None else published.published_at

    def status(self, volume_id: str) -> VolumeStatus | None:
        """The latest decision's status for the volume (None before its first decision)."""
        return self._status.get(volume_id)

    def statuses(self) -> Mapping[str, VolumeStatus]:
        return dict(self._status)

    def assignments_for(self, node_id: str) -> tuple[Assignment, ...]:
        """The current assignments naming ``node_id`` (primary or replica), by volume id: what its
        next Ack carries."""
        if self.epoch_floor is not None:
            current = {v: p.assignment for v, p in self._current.items()}
            self.epoch_floor.note(node_id, self.observations.heartbeat(node_id), current)
        return tuple(
            p.assignment
            for volume_id, p in sorted(self._current.items())
            if (node_id == p.assignment.primary or node_id in p.assignment.replicas)
            and self._announced(volume_id)
        )

    @property
    def holding(self) -> bool:
        """True while a restored master sends no Ack (sparrow.cluster.epochfloor)."""
        return self.epoch_floor is not None and self.epoch_floor.holding

    def _announced(self, volume_id: str) -> bool:
        return self.epoch_floor is None or self.epoch_floor.announced(volume_id)

    # -- changes from the API ---------------------------------------------------------------------

    def volume_added(self, volume: VolumeRecord) -> None:
        """A volume was just recorded; the next step places it."""
        self._volumes[volume.volume_id] = volume

    def volume_changed(self, volume: VolumeRecord) -> None:
        """A live volume's record was just changed (its pause wish, its CHAP): adopt it now. The
        pause wish is published by the next step (sparrow.cluster.pause); an export setting is
        carried at once by the current assignment (the same epoch: not a reason for a new one),
        so the next Acks have it."""
        if volume.volume_id in self._deleted:
            return
        self._volumes[volume.volume_id] = volume
        published = self._current.get(volume.volume_id)
        if published is not None and published.assignment.chap != volume.chap:
            assignment = dataclasses.replace(published.assignment, chap=volume.chap)
            self._current[volume.volume_id] = PublishedAssignment(assignment, published.published_at)

    def resize_volume(self, volume_id: str, size: int) -> tuple[VolumeRecord, Assignment | None]:
        """Blocking: grow the volume and publish its placement under the next epoch, in one
        transaction (``Publisher.resize``; raises its errors). Follow with :meth:`resized`."""
        return self.publisher.resize(volume_id, size)

    def resized(self, volume: VolumeRecord, assignment: Assignment | None, now: float) -> None:
        """Adopt a committed resize: the record, and the new epoch (if one was published) as the
        volume's current assignment, so the next Acks carry the new size."""
        if volume.volume_id in self._deleted:
            return
        self._volumes[volume.volume_id] = volume
        if assignment is not None:
            self.published(assignment, f"resized to {volume.size} bytes", now)

    def resize(self, volume_id: str, size: int, now: float) -> Assignment | None:
        """``resize_volume`` then ``resized`` on the caller's thread (tests, tools)."""
        volume, assignment = self.resize_volume(volume_id, size)
        self.resized(volume, assignment, now)
        return assignment

    def load_tombstones(self) -> None:
        """Blocking: the deleted volumes of the authority (a master restart forgets nothing)."""
        for volume in self.store.volumes(include_deleted=True):
            if volume.deleted_at is not None:
                self._tombstones[volume.volume_id] = volume.name

    def tombstones_for(self, reported: Iterable[str]) -> tuple[DeletedVolume, ...]:
        """Tombstones for the deleted volumes among ``reported`` (the volume ids of a heartbeat's
        observations), sorted by volume id. Only volumes the authority marked deleted: a master
        that does not know a volume id never tells a node to destroy it."""
        ids = sorted({v for v in reported if v in self._tombstones})
        return tuple(DeletedVolume(v, self._tombstones[v]) for v in ids)

    def volume_deleted(self, volume_id: str, name: str | None = None) -> None:
        """A volume was just marked deleted: stop handing out its assignment at once, and tell the
        nodes that still report a copy (``tombstones_for``)."""
        self._deleted.add(volume_id)
        known = self._volumes.get(volume_id)
        if name is None and known is not None:
            name = known.name
        if name is not None:
            self._tombstones[volume_id] = name
        self._volumes.pop(volume_id, None)
        self._current.pop(volume_id, None)
        self._status.pop(volume_id, None)


def default_controller(timing: LeaseConfig) -> TopologyController:
    """The controller at ``timing``: a silent primary is replaced once silent for ``lease +
    margin`` and past its lease, not at ``dead_after`` (docs/cluster.md, "Failover")."""
    return TopologyController(margin=timing.margin, primary_silence=timing.lease_seconds + timing.margin)


def restore(
    store: AuthorityStore,
    timing: LeaseConfig,
    now: float,
    *,
    controller: TopologyController | None = None,
    publisher: Publisher | None = None,
    on_published: Callable[[Assignment], None] | None = None,
    epoch_floor: EpochFloor | None = None,
) -> ControlLoop:
    """Build the master's state at (re)start ``now`` from the authority store (blocking reads).

    Every node the authority knows is treated as holding a lease granted at ``now`` (the master
    cannot know what it granted before it stopped), the ObservationStore starts at ``now``, and the
    recorded assignments are adopted as published at ``now``. No decision is made here.
    """
    observations = ObservationStore(timing.dead_after, started_at=now)
    leases = MasterLeases(timing.margin)
    for node in store.nodes():
        leases.granted(node.node_id, now, timing.lease_seconds)
    loop = ControlLoop(
        store,
        observations=observations,
        leases=leases,
        controller=controller if controller is not None else default_controller(timing),
        publisher=publisher if publisher is not None else Publisher(store),
        on_published=on_published,
        epoch_floor=epoch_floor,
    )
    loop.apply_snapshot(loop.read_authority(), now)
    loop.load_tombstones()
    loop.discovery_chap = store.discovery_chap()[1]
    return loop
