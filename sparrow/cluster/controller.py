"""Topology decisions (docs/cluster.md, "TopologyController").

:meth:`TopologyController.decide` compares what the operator wants (:class:`DesiredVolume`) with
what the master has published (:class:`PublishedAssignment`) and what the nodes report
(:class:`~sparrow.cluster.observations.ObservationStore`), and returns a :class:`Decision`: the
assignments it *asks* the publisher for, and a status per volume. It only proposes: it never mints
an epoch (only ``sparrow/cluster/publisher.py`` does) and it performs no I/O. For equal inputs (and
an equal sequence of earlier calls, which only feeds :attr:`VolumeStatus.since`) it returns equal
decisions; volumes are visited in ``volume_id`` order whatever the order of ``desired``.

Rules, per desired volume:

1. **No assignment**: place ``replicas`` copies on distinct live nodes with ``free_bytes >= size``,
   most free bytes first (ties by node id); the first is the primary. Space taken by earlier
   placements in the same decision is subtracted. Too few such nodes: no ask, status
   ``"not enough live nodes (have X, need N)"`` (or ``"not enough free space: ..."`` when there
   are enough live nodes but too few with ``size`` bytes free: placement does not overcommit).
2. **Dead or silent primary**: a primary is replaced once it is dead (``dead_after``) or, with
   ``primary_silence`` set (the master passes ``lease + margin``), once it has been silent that
   long (:meth:`ObservationStore.silent`: no heartbeat from its current incarnation); in both cases
   nothing before ``leases.safe_to_reassign(old_primary, now, margin)`` (status ``"waiting for the
   old primary's lease to expire"``). The lease alone is what makes a replacement safe (a primary
   past it is fenced, docs/architecture.md "The fencing bound"); waiting for ``dead_after`` on top
   of it would only be downtime. Replicas keep ``dead_after`` (rule 3): a blip must not cost a
   copy, and a node silent that long is no candidate for a new copy (rules 1 and 3) nor for the
   new primary either. Then promote only an *eligible* replica
   (:meth:`TopologyController.eligible_replicas`): recorded in the assignment's in-sync set; alive;
   its observation has role REPLICA, the assignment's epoch and health OK; and, if the primary
   reported at this epoch, that report listed it IN_SYNC at a ``write_position`` at least the
   primary's. None eligible: no ask, status
   ``"no eligible replica"`` -- an empty copy is never promoted.
3. **Dead replica(s)**: replace each with a live node not already in the assignment (keeping the
   primary and the order of the survivors); none available: status ``"degraded: replica X dead"``.
   Fewer copies than desired (after a promotion, say) are topped up the same way.
4. **Convergence**: when every node of the assignment has not reported the assignment's epoch with
   ``converged=True`` within ``converge_deadline`` seconds of its publication: status
   ``"stuck: not converged after Ns"``.

A node awaiting the operator's approval (``pending``, docs/cluster.md "Node admission") is never
chosen: not for a new copy (rules 1 and 3) nor as a new primary (rule 2), whatever it reports.

A node the master has not heard from yet while it is still starting up (see
:meth:`ObservationStore.dead`) is neither alive nor dead: it is not replaced, and a volume whose
primary is in that state waits (``"waiting for node X to report"``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from sparrow.cluster.lease import MasterLeases
from sparrow.cluster.messages import (
    BLOCK_SIZES,
    VOLUME_NAME_PATTERN,
    Assignment,
    Health,
    Role,
    SyncState,
    VolumeObservation,
    check_node_id,
    check_volume_id,
)
from sparrow.cluster.observations import NodeState, ObservationStore

#: Default seconds an assignment may take to converge before its volume is reported stuck.
DEFAULT_CONVERGE_DEADLINE = 30.0
#: Copies a volume may have.
MIN_REPLICAS = 1
MAX_REPLICAS = 3


@dataclass(frozen=True, slots=True)
class DesiredVolume:
    """A volume the operator wants: ``replicas`` copies (1..3) of ``size`` bytes."""

    volume_id: str
    name: str
    size: int
    block_size: int
    replicas: int

    def __post_init__(self) -> None:
        check_volume_id("volume_id", self.volume_id)
        if not isinstance(self.name, str) or not VOLUME_NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"not a volume name: {self.name!r}")
        if type(self.block_size) is not int or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, not {self.block_size!r}")
        if type(self.size) is not int or self.size < 1 or self.size % self.block_size:
            raise ValueError(f"size must be a positive multiple of {self.block_size}, not {self.size!r}")
        if type(self.replicas) is not int or not MIN_REPLICAS <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be {MIN_REPLICAS}..{MAX_REPLICAS}, not {self.replicas!r}")


@dataclass(frozen=True, slots=True)
class PublishedAssignment:
    """The newest published assignment of a volume and when it was published (master clock)."""

    assignment: Assignment
    published_at: float


@dataclass(frozen=True, slots=True)
class AssignmentAsk:
    """A proposal for the publisher: make ``primary`` the primary and ``replicas`` (primary first)
    the copies of ``volume_id``, of which ``in_sync`` (a subsequence of ``replicas``, the primary
    first) hold every acknowledged write. The publisher mints the epoch and fills in name, size,
    block size and the portals. ``paused``: the assignment pauses the volume; the control loop
    sets it on every ask from the operator's wish (sparrow.cluster.pause), the rules here never do."""

    volume_id: str
    primary: str
    replicas: tuple[str, ...]
    reason: str
    in_sync: tuple[str, ...]
    paused: bool = False

    def __post_init__(self) -> None:
        check_volume_id("volume_id", self.volume_id)
        for node in self.replicas:
            check_node_id("replicas", node)
        if not self.replicas or self.replicas[0] != self.primary:
            raise ValueError("replicas must list the primary first")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError("a node appears twice in replicas")
        if tuple(node for node in self.replicas if node in self.in_sync) != self.in_sync:
            raise ValueError("in_sync must be a subsequence of replicas")
        if not self.in_sync or self.in_sync[0] != self.primary:
            raise ValueError("in_sync must list the primary first")


class StatusKind(enum.Enum):
    """Why a volume is not simply fine; :attr:`VolumeStatus.reason` is the human text."""

    OK = "ok"
    UNPLACED = "unplaced"
    NOT_ENOUGH_NODES = "not_enough_nodes"
    NO_PRIMARY = "no_primary"
    WAITING_FOR_NODE = "waiting_for_node"
    WAITING_FOR_LEASE = "waiting_for_lease"
    NO_ELIGIBLE_REPLICA = "no_eligible_replica"
    PROMOTING = "promoting"
    DEGRADED = "degraded"
    #: A caught-up copy is being recorded back in the in-sync set.
    RESYNCED = "resynced"
    #: An operator move (planned failover, drain, rebuild: sparrow.cluster.moves) acts or waits.
    MOVING = "moving"
    #: The operator paused the volume (sparrow.cluster.pause): asked for, not a fault.
    PAUSED = "paused"
    STUCK = "stuck"


@dataclass(frozen=True, slots=True)
class VolumeStatus:
    """A volume's condition. ``reason`` is None when all is well; ``since`` is the ``now`` of the
    first consecutive :meth:`~TopologyController.decide` call that reported the same ``kind``
    (None when all is well). When an ask is made, the status names the problem it addresses."""

    reason: str | None
    since: float | None
    kind: StatusKind = StatusKind.OK


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`TopologyController.decide` proposes: asks sorted by volume id, and a status for
    every desired volume."""

    asks: tuple[AssignmentAsk, ...]
    status: Mapping[str, VolumeStatus]


@dataclass(frozen=True, slots=True)
class _Verdict:
    kind: StatusKind
    reason: str | None
    ask: AssignmentAsk | None = None


_OK = _Verdict(StatusKind.OK, None)


def _check_seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number of seconds, not {value!r}")
    return float(value)


class TopologyController:
    """Decides placements, promotions and replacements; see the module docstring for the rules.

    ``margin`` is passed to ``MasterLeases.safe_to_reassign`` (None: the leases' own margin).
    ``primary_silence`` (seconds; None: only a dead primary is replaced) lets a primary silent that
    long be replaced before it is dead, still never before its lease has run out (rule 2).
    The only state kept between calls is when each volume's current status kind began.
    """

    def __init__(
        self,
        *,
        converge_deadline: float = DEFAULT_CONVERGE_DEADLINE,
        margin: float | None = None,
        primary_silence: float | None = None,
    ) -> None:
        self.converge_deadline = _check_seconds("converge_deadline", converge_deadline)
        self.margin = None if margin is None else _check_seconds("margin", margin)
        self.primary_silence = (
            None if primary_silence is None else _check_seconds("primary_silence", primary_silence)
        )
        self._since: dict[str, tuple[StatusKind, float]] = {}

    def decide(
        self,
        desired: Iterable[DesiredVolume],
        current: Mapping[str, PublishedAssignment],
        observations: ObservationStore,
        leases: MasterLeases,
        now: float,
        *,
        draining: Collection[str] = (),
        pending: Collection[str] = (),
    ) -> Decision:
        """Propose assignments for ``desired`` given the newest published ones in ``current``.
        ``draining`` nodes get no new copy (sparrow.cluster.moves moves the copies off them);
        ``pending`` nodes (not approved: ``NodeKeys.pending``) are never chosen for anything."""
        volumes = sorted(desired, key=lambda v: v.volume_id)
        if len({v.volume_id for v in volumes}) != len(volumes):
            raise ValueError("a volume appears twice in desired")
        # Free bytes per live node that takes new copies, debited as this decision places copies.
        # A node silent for primary_silence (one that would be replaced as a primary) is no place
        # for a new copy: a primary just replaced for its silence would come straight back as one.
        free = {
            view.node_id: view.free_bytes
            for view in observations.nodes(now)
            if view.state is NodeState.ALIVE
            and view.node_id not in draining
            and view.node_id not in pending
            and (
                self.primary_silence is None
                or not observations.silent(view.node_id, now, self.primary_silence)
            )
        }
        # Live nodes held back only for want of approval: named in a "not enough" status.
        awaiting = sorted(
            view.node_id
            for view in observations.nodes(now)
            if view.state is NodeState.ALIVE and view.node_id in pending
        )
        asks: list[AssignmentAsk] = []
        status: dict[str, VolumeStatus] = {}
        for volume in volumes:
            published = current.get(volume.volume_id)
            if published is None:
                verdict = self._place(volume, free, awaiting)
            else:
                verdict = self._maintain(volume, published, observations, leases, free, now, pending)
            if verdict.ask is not None:
                asks.append(verdict.ask)
            status[volume.volume_id] = self._status(volume.volume_id, verdict, now)
        for volume_id in [v for v in self._since if v not in status]:
            del self._since[volume_id]
        return Decision(asks=tuple(asks), status=status)

    # -- rules ------------------------------------------------------------------------------------

    @staticmethod
    def _candidates(size: int, free: Mapping[str, int], exclude: Iterable[str] = ()) -> list[str]:
        """Live nodes with room for ``size`` bytes, most free first, ties by node id."""
        excluded = set(exclude)
        return sorted(
            (node for node, room in free.items() if room >= size and node not in excluded),
            key=lambda node: (-free[node], node),
        )

    def _place(self, volume: DesiredVolume, free: dict[str, int], awaiting: list[str]) -> _Verdict:
        candidates = self._candidates(volume.size, free)
        if len(candidates) < volume.replicas:
            if len(free) >= volume.replicas:  # enough nodes, not enough room on them
                reason = (
                    f"not enough free space: {len(candidates)} of {len(free)} live nodes have "
                    f"{volume.size} bytes free, need {volume.replicas}"
                )
            else:
                reason = f"not enough live nodes (have {len(candidates)}, need {volume.replicas})"
            if awaiting:
                reason += f"; awaiting approval: {', '.join(awaiting)} (sparrow node approve)"
            return _Verdict(StatusKind.NOT_ENOUGH_NODES, reason)
        chosen = tuple(candidates[: volume.replicas])
        for node in chosen:
            free[node] -= volume.size
        copies = "1 copy" if volume.replicas == 1 else f"{volume.replicas} copies"
        ask = AssignmentAsk(
            volume_id=volume.volume_id,
            primary=chosen[0],
            replicas=chosen,
            reason=f"place {copies} on {', '.join(chosen)}",
            in_sync=chosen,  # a new volume's copies are all zeros: nothing to copy
        )
        return _Verdict(StatusKind.UNPLACED, "not placed yet", ask)

    def _maintain(
        self,
        volume: DesiredVolume,
        published: PublishedAssignment,
        observations: ObservationStore,
        leases: MasterLeases,
        free: dict[str, int],
        now: float,
        pending: Collection[str] = (),
    ) -> _Verdict:
        assignment = published.assignment
        primary = assignment.primary
        if primary is None:
            # The data may live on nodes this assignment no longer names: placing fresh empty
            # copies could look like a volume that lost its data. An operator decides.
            return _Verdict(StatusKind.NO_PRIMARY, "assignment names no primary")
        if observations.dead(primary, now) or (
            self.primary_silence is not None and observations.silent(primary, now, self.primary_silence)
        ):
            return self._dead_primary(volume, assignment, primary, observations, leases, free, now, pending)
        if not observations.alive(primary, now):
            return _Verdict(StatusKind.WAITING_FOR_NODE, f"waiting for node {primary} to report")
        verdict = self._repair_replicas(volume, assignment, observations, free, now)
        if verdict is not None:
            return verdict
        verdict = self._in_sync_changes(assignment, observations, now)
        if verdict is not None:
            return verdict
        return self._convergence(assignment, published.published_at, observations, now)

    def _dead_primary(
        self,
        volume: DesiredVolume,
        assignment: Assignment,
        primary: str,
        observations: ObservationStore,
        leases: MasterLeases,
        free: dict[str, int],
        now: float,
        pending: Collection[str] = (),
    ) -> _Verdict:
        if not leases.safe_to_reassign(primary, now, self.margin):
            return _Verdict(StatusKind.WAITING_FOR_LEASE, "waiting for the old primary's lease to expire")
        eligible = self.eligible_replicas(assignment, observations, now)
        # The new primary must be heard from: one silent as long as the old primary was would not
        # hear of its promotion either (it may stay in the in-sync set, as it is by the rules).
        heard = [
            node
            for node in eligible
            if node not in pending
            and (self.primary_silence is None or not observations.silent(node, now, self.primary_silence))
        ]
        if not heard:
            return _Verdict(StatusKind.NO_ELIGIBLE_REPLICA, "no eligible replica")
        chosen = heard[0]
        survivors = tuple(
            node
            for node in assignment.replicas
            if node not in (primary, chosen) and not observations.dead(node, now)
        )
        # A survivor stays in sync only if it is eligible too and applied exactly as far as the
        # new primary: the same prefix of the one ordered stream. One behind may lack a write the
        # new primary applied (unacknowledged, but now readable): it must catch up first.
        position = self._write_position(chosen, assignment, observations)
        in_sync = tuple(
            node
            for node in survivors
            if node in eligible and self._write_position(node, assignment, observations) == position
        )
        gone = "dead" if observations.dead(primary, now) else "silent past its lease"
        ask = AssignmentAsk(
            volume_id=assignment.volume_id,
            primary=chosen,
            replicas=(chosen, *survivors),
            reason=f"promote {chosen}: primary {primary} {gone}",
            in_sync=(chosen, *in_sync),
        )
        return _Verdict(StatusKind.PROMOTING, f"primary {primary} {gone}", ask)

    def eligible_replicas(
        self, assignment: Assignment, observations: ObservationStore, now: float
    ) -> tuple[str, ...]:
        """Replicas of ``assignment`` that may take over from its primary, best first.

        A replica is eligible only if the assignment records it in sync (``assignment.in_sync``:
        it held every acknowledged write when the epoch was published, and the primary
        acknowledges no write at this epoch without its ACK); it is alive; its own observation says
        role REPLICA, the assignment's epoch and health OK. The primary's report narrows the choice
        when there is one that counts (:meth:`primary_report`: at this epoch, from the incarnation
        that first served the volume as primary at it): then the replica must also be listed
        IN_SYNC there, at a ``write_position`` at least the primary's. Without such a report (the
        primary died just after the publish, or only a later incarnation under its id spoke: a
        restart or a forged Hello, which vouches for nobody) the master's record alone decides.
        Only the nodes ``assignment.replicas`` names are considered. Best is the highest write
        position, then the order of ``assignment.replicas``.
        """
        primary = assignment.primary
        if primary is None:
            return ()
        primary_obs = self.primary_report(assignment, observations)
        if primary_obs is None:
            # The primary never reported at this epoch (it died just after the publish, or only a
            # later incarnation spoke): the master's own record is enough. The primary acknowledged
            # no write at this epoch without the ACK of every copy in ``assignment.in_sync``, and a
            # copy entered that set only holding every write acknowledged before.
            in_sync = set(assignment.in_sync)
            position = 0
        else:
            in_sync = {r.node_id for r in primary_obs.replica_states if r.state is SyncState.IN_SYNC}
            position = primary_obs.write_position
        ranked: list[tuple[int, int, str]] = []
        for index, node in enumerate(assignment.replicas):
            if (
                node == primary
                or node not in assignment.in_sync
                or node not in in_sync
                or not observations.alive(node, now)
            ):
                continue
            obs = observations.observation(node, assignment.volume_id)
            if (
                obs is None
                or obs.role is not Role.REPLICA
                or obs.epoch != assignment.epoch
                or obs.health is not Health.OK
                or obs.write_position < position
            ):
                continue
            ranked.append((-obs.write_position, index, node))
        return tuple(node for _, _, node in sorted(ranked))

    @staticmethod
    def primary_report(assignment: Assignment, observations: ObservationStore) -> VolumeObservation | None:
        """The primary's last observation of the volume, if it counts: it is at the assignment's
        epoch and comes from the incarnation that first claimed the volume as primary at that
        epoch (``ObservationStore.primary_claim``). None otherwise (no primary, not reported yet,
        an older epoch, or a later incarnation under the primary's id)."""
        primary = assignment.primary
        if primary is None:
            return None
        obs = observations.observation(primary, assignment.volume_id)
        if obs is None or obs.epoch != assignment.epoch or obs.role is not Role.PRIMARY:
            return None
        hello = observations.hello(primary)
        claim = observations.primary_claim(primary, assignment.volume_id)
        if hello is None or claim != (hello.incarnation, assignment.epoch):
            return None
        return obs

    @staticmethod
    def _write_position(node: str, assignment: Assignment, observations: ObservationStore) -> int | None:
        obs = observations.observation(node, assignment.volume_id)
        return None if obs is None or obs.epoch != assignment.epoch else obs.write_position

    def _in_sync_changes(
        self, assignment: Assignment, observations: ObservationStore, now: float
    ) -> _Verdict | None:
        """The in-sync set as the primary's report (:meth:`primary_report`) says it should be.

        Dropped: a copy of ``assignment.in_sync`` the primary reports in any state but IN_SYNC
        (it did not acknowledge in time, refused, or its connection broke); the primary holds its
        writes until the new epoch is published. Added back: a copy outside the set the primary
        reports IN_SYNC at least at the primary's own write position (caught up), that is alive
        and reports the epoch as REPLICA with health OK. A copy the primary does not mention is
        left as it is. None when nothing changes."""
        report = self.primary_report(assignment, observations)
        if report is None:
            return None
        states = {r.node_id: r for r in report.replica_states}
        dropped = [
            node
            for node in assignment.in_sync[1:]
            if node in states and states[node].state is not SyncState.IN_SYNC
        ]
        added = []
        for node in assignment.replicas[1:]:
            state = states.get(node)
            if node in assignment.in_sync or state is None or state.state is not SyncState.IN_SYNC:
                continue
            obs = observations.observation(node, assignment.volume_id)
            if (
                state.write_position >= report.write_position
                and observations.alive(node, now)
                and obs is not None
                and obs.epoch == assignment.epoch
                and obs.role is Role.REPLICA
                and obs.health is Health.OK
            ):
                added.append(node)
        if not dropped and not added:
            return None
        keep = (set(assignment.in_sync) - set(dropped)) | set(added)
        in_sync = tuple(node for node in assignment.replicas if node in keep)
        assert assignment.primary is not None  # primary_report found one
        if dropped:
            word = "replicas" if len(dropped) > 1 else "replica"
            reason = f"{word} {', '.join(dropped)} dropped from the in-sync set"
            if added:
                reason += f"; {', '.join(added)} back in sync"
            kind = StatusKind.DEGRADED
        else:
            reason = (
                f"{'replicas' if len(added) > 1 else 'replica'} {', '.join(added)} back in the in-sync set"
            )
            kind = StatusKind.RESYNCED
        ask = AssignmentAsk(
            volume_id=assignment.volume_id,
            primary=assignment.primary,
            replicas=assignment.replicas,
            reason=reason,
            in_sync=in_sync,
        )
        return _Verdict(kind, reason, ask)

    def _repair_replicas(
        self,
        volume: DesiredVolume,
        assignment: Assignment,
        observations: ObservationStore,
        free: dict[str, int],
        now: float,
    ) -> _Verdict | None:
        """Replace dead replicas and top up missing copies; None when nothing is missing."""
        dead = [node for node in assignment.replicas[1:] if observations.dead(node, now)]
        members = [node for node in assignment.replicas if node not in dead]
        wanted = max(volume.replicas, len(assignment.replicas)) if dead else volume.replicas
        missing = wanted - len(members)
        if missing <= 0:
            return None
        added = self._candidates(volume.size, free, exclude=assignment.replicas)[:missing]
        for node in added:
            free[node] -= volume.size
        if dead:
            reason = f"degraded: replica{'s' if len(dead) > 1 else ''} {', '.join(dead)} dead"
        else:
            reason = f"degraded: {len(members)} of {volume.replicas} copies"
        if not added:
            return _Verdict(StatusKind.DEGRADED, reason)
        replicas = (*members, *added)
        what = f"replace dead {', '.join(dead)}" if dead else "add copies"
        # The dead leave the in-sync set, and so does a copy the serving primary reports behind
        # (the rule of _in_sync_changes, applied in the same epoch); a new copy starts outside
        # it (it is filled by a resync).
        report = self.primary_report(assignment, observations)
        behind = (
            set()
            if report is None
            else {r.node_id for r in report.replica_states if r.state is not SyncState.IN_SYNC}
        )
        in_sync = tuple(
            node
            for node in assignment.in_sync
            if node in members and (node == assignment.primary or node not in behind)
        )
        ask = AssignmentAsk(
            volume_id=assignment.volume_id,
            primary=members[0],
            replicas=replicas,
            reason=f"{what} with {', '.join(added)}",
            in_sync=in_sync,
        )
        return _Verdict(StatusKind.DEGRADED, reason, ask)

    def _convergence(
        self, assignment: Assignment, published_at: float, observations: ObservationStore, now: float
    ) -> _Verdict:
        if now - published_at < self.converge_deadline:
            return _OK
        for node in assignment.replicas:
            obs = observations.observation(node, assignment.volume_id)
            if obs is None or obs.epoch != assignment.epoch or not obs.converged:
                return _Verdict(StatusKind.STUCK, f"stuck: not converged after {self.converge_deadline:g}s")
        return _OK

    # -- status bookkeeping -----------------------------------------------------------------------

    def _status(self, volume_id: str, verdict: _Verdict, now: float) -> VolumeStatus:
        if verdict.kind is StatusKind.OK:
            self._since.pop(volume_id, None)
            return VolumeStatus(reason=None, since=None, kind=StatusKind.OK)
        previous = self._since.get(volume_id)
        if previous is None or previous[0] is not verdict.kind:
            previous = (verdict.kind, now)
            self._since[volume_id] = previous
        return VolumeStatus(reason=verdict.reason, since=previous[1], kind=verdict.kind)
