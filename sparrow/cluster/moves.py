"""Operator moves: planned failover, drain and rebuild (issue 8's verbs; docs/cluster.md,
"Operator moves").

Sans-IO, like the controller: every call takes ``now`` and the master's views, and the moves only
*ask*. :meth:`OperatorMoves.apply` runs in the control loop right after
``TopologyController.decide`` and adds asks for the volumes the controller left alone this step
(its own rules, a dead primary or a lagging replica, always go first; a move waits a step). The
asks are published like any other (``Publisher.publish`` mints the epoch), so a move is never a
second way to mint an epoch.

Rules (each an ask for the volume's whole placement):

- **Planned failover** (:meth:`OperatorMoves.request_failover`): the target must be an *eligible*
  replica (``TopologyController.eligible_replicas``: recorded in the in-sync set, alive, REPLICA
  at the epoch with health OK, and reported IN_SYNC by the serving primary); otherwise the request
  is refused with the reason (:class:`MoveRefused`). The ask makes the target primary; the old
  primary stays as the last copy, *outside* the in-sync set (it may hold writes it applied and
  never had acknowledged: catch-up brings it back); the other in-sync copies stay in sync only at
  the target's write position (the promotion rule of the controller). One epoch, no fence-first
  epoch in between: the old primary cannot acknowledge a write once the target has persisted the
  new epoch (the target refuses the old epoch's messages, and every write at the old epoch waits
  for the target's ACK), and the target serves only after it has persisted it. See
  docs/cluster.md for the reads the old primary may still answer meanwhile.
- **Drain** (persisted per node in the authority, ``nodes.draining``, schema v6): a draining node
  gets no new placement (``TopologyController.decide(draining=...)``). Each volume on it, one
  ask per step: a primary there is moved to the best eligible replica not draining (as a planned
  failover); a copy there that is in sync gets a new copy on a spare node first (outside the
  in-sync set: resync fills it), and is dropped only once at least ``replicas`` copies off the
  draining nodes are recorded in sync; a stale copy there is replaced at once (it holds nothing the
  others lack). No eligible replica or no spare node: the drain waits, the status says why. A
  copy a drain added and no longer needs (``undrain`` came first) is dropped while it is outside
  the in-sync set and the volume has more copies than wanted.
- **Rebuild** (:meth:`OperatorMoves.request_rebuild`): refused for the primary's copy and for the
  last in-sync replica. Phase RELEASE asks the placement without the copy; once the node no
  longer reports the volume (its adapter released it), phase READD asks it back as a new copy
  outside the in-sync set (resync copies it afresh; the controller adds it back when the primary
  reports it IN_SYNC). While a rebuild runs, the volume counts one copy fewer for the
  controller (:meth:`OperatorMoves.adjust`), so the controller does not top it up elsewhere.

Requests live in memory: a master restart forgets a failover or rebuild in progress (the
authority holds whatever was published; a rebuild stopped after RELEASE is topped up by the
controller, possibly on another node). Drain is durable (the authority).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from sparrow.cluster.controller import (
    AssignmentAsk,
    Decision,
    DesiredVolume,
    PublishedAssignment,
    StatusKind,
    TopologyController,
    VolumeStatus,
)
from sparrow.cluster.messages import Assignment, Role
from sparrow.cluster.observations import NodeState, ObservationStore


class MoveRefused(Exception):
    """A move that cannot be made now; the message is the one-line reason (HTTP 409)."""


class RebuildPhase(enum.Enum):
    #: Asking for the placement without the copy, then waiting for the node to release it.
    RELEASE = "release"
    #: Asking for the copy back, outside the in-sync set.
    READD = "readd"


@dataclass(frozen=True, slots=True)
class FailoverRequest:
    volume_id: str
    #: The epoch it was asked at: it is done once a later epoch names ``target`` primary.
    epoch: int
    target: str
    requested_at: float


@dataclass(frozen=True, slots=True)
class RebuildRequest:
    volume_id: str
    node: str
    epoch: int
    phase: RebuildPhase
    requested_at: float


# -- the rules (pure functions of the views) --------------------------------------------------------


def failover_target(
    controller: TopologyController,
    assignment: Assignment,
    observations: ObservationStore,
    now: float,
    to: str | None,
    draining: Collection[str] = (),
) -> str:
    """The replica a planned failover of ``assignment`` moves the primary to: ``to``, or the best
    eligible replica not draining. Raises :class:`MoveRefused` with the reason."""
    primary = assignment.primary
    if primary is None:
        raise MoveRefused(f"volume {assignment.name} has no primary")
    if not observations.alive(primary, now):
        raise MoveRefused(f"the primary {primary} is not alive (a dead primary fails over by itself)")
    eligible = controller.eligible_replicas(assignment, observations, now)
    if to is None:
        choices = [node for node in eligible if node not in draining]
        if not choices:
            raise MoveRefused(f"volume {assignment.name} has no in-sync replica to fail over to")
        return choices[0]
    if to == primary:
        raise MoveRefused(f"node {to} is already the primary of {assignment.name}")
    if to not in assignment.replicas:
        raise MoveRefused(f"node {to} holds no copy of {assignment.name}")
    if to not in assignment.in_sync:
        raise MoveRefused(f"the copy on {to} is not in sync (it may lack acknowledged writes)")
    if not observations.alive(to, now):
        raise MoveRefused(f"node {to} is not alive")
    if to in draining:
        raise MoveRefused(f"node {to} is draining")
    if to not in eligible:
        raise MoveRefused(
            f"the copy on {to} is not ready: it has not reported epoch {assignment.epoch} as an "
            "in-sync replica yet"
        )
    return to


def failover_ask(
    controller: TopologyController,
    assignment: Assignment,
    observations: ObservationStore,
    target: str,
    now: float,
    reason: str,
) -> AssignmentAsk:
    """``assignment`` with ``target`` primary; the old primary last, outside the in-sync set; the
    other in-sync copies kept at exactly the target's write position (see the module docstring)."""
    old = assignment.primary
    assert old is not None
    eligible = controller.eligible_replicas(assignment, observations, now)
    position = _position(target, assignment, observations)
    others = tuple(node for node in assignment.replicas if node not in (target, old))
    in_sync = tuple(
        node
        for node in others
        if node in assignment.in_sync
        and node in eligible
        and _position(node, assignment, observations) == position
    )
    return AssignmentAsk(
        volume_id=assignment.volume_id,
        primary=target,
        replicas=(target, *others, old),
        reason=reason,
        in_sync=(target, *in_sync),
    )


def check_rebuild(assignment: Assignment, node: str) -> None:
    """Raises :class:`MoveRefused` unless the copy on ``node`` may be thrown away and copied again."""
    if node not in assignment.replicas:
        raise MoveRefused(f"node {node} holds no copy of {assignment.name}")
    if node == assignment.primary:
        raise MoveRefused(
            f"node {node} is the primary of {assignment.name}: fail over first (sparrow volume failover)"
        )
    if node in assignment.in_sync and len(assignment.in_sync) <= 2:
        raise MoveRefused(
            f"the copy on {node} is the last in-sync replica of {assignment.name}: rebuilding it would "
            "leave the primary alone with the data"
        )


def _readded(rebuild: RebuildRequest, assignment: Assignment) -> bool:
    """Whether ``assignment`` is the published ask that added the rebuilt copy back (the rebuild's
    last step: resync copies it afresh from there)."""
    return (
        rebuild.phase is RebuildPhase.READD
        and rebuild.node in assignment.replicas
        and assignment.epoch > rebuild.epoch
    )


def _position(node: str, assignment: Assignment, observations: ObservationStore) -> int | None:
    obs = observations.observation(node, assignment.volume_id)
    return None if obs is None or obs.epoch != assignment.epoch else obs.write_position


def _released(node: str, assignment: Assignment, observations: ObservationStore, now: float) -> bool:
    """The node no longer holds the volume open: alive, and its latest heartbeat does not report it
    (or reports it with no role)."""
    if not observations.alive(node, now):
        return False
    obs = observations.observation(node, assignment.volume_id)
    return obs is None or obs.role is Role.NONE


def _spare_nodes(
    volume: DesiredVolume,
    assignment: Assignment,
    observations: ObservationStore,
    draining: Collection[str],
    now: float,
    pending: Collection[str] = (),
) -> list[str]:
    """Live nodes not draining, approved (not ``pending``: docs/cluster.md, "Node admission") and
    not holding a copy, with room for the volume, most free first."""
    free = {
        v.node_id: v.free_bytes
        for v in observations.nodes(now)
        if v.state is NodeState.ALIVE and v.node_id not in draining and v.node_id not in pending
    }
    return TopologyController._candidates(volume.size, free, exclude=assignment.replicas)


@dataclass(frozen=True, slots=True)
class _Move:
    ask: AssignmentAsk | None
    reason: str


def drain_move(
    controller: TopologyController,
    volume: DesiredVolume,
    assignment: Assignment,
    observations: ObservationStore,
    draining: Collection[str],
    now: float,
    pending: Collection[str] = (),
) -> _Move | None:
    """The next step of moving ``volume`` off the draining nodes (None: it holds no copy there);
    a spare is never a ``pending`` node."""
    on = [node for node in assignment.replicas if node in draining]
    if not on:
        return _trim(volume, assignment)
    primary = assignment.primary
    if primary is not None and primary in draining:
        try:
            target = failover_target(controller, assignment, observations, now, None, draining)
        except MoveRefused as e:
            return _Move(None, f"draining {primary}: waiting to move the primary: {e}")
        reason = f"drain {primary}: move the primary to {target}"
        return _Move(failover_ask(controller, assignment, observations, target, now, reason), reason)
    if primary is None:
        return _Move(None, f"draining {on[0]}: the volume has no primary (an operator decides)")
    keep = [node for node in assignment.replicas if node not in draining]
    in_sync_kept = [node for node in keep if node in assignment.in_sync]
    stale = [node for node in on if node not in assignment.in_sync]
    spare = _spare_nodes(volume, assignment, observations, draining, now, pending)
    if stale:
        node = stale[0]
        if len(keep) >= volume.replicas:
            replicas = tuple(n for n in assignment.replicas if n != node)
            reason = f"drain {node}: drop its stale copy"
        elif spare:
            replicas = tuple(spare[0] if n == node else n for n in assignment.replicas)
            reason = f"drain {node}: replace its stale copy with {spare[0]}"
        else:
            return _Move(None, f"draining {node}: waiting for a spare node to take its copy")
        return _Move(_ask(assignment, replicas, assignment.in_sync, reason), reason)
    if len(keep) < volume.replicas:
        if not spare:
            return _Move(None, f"draining {on[0]}: waiting for a spare node to take its copy")
        replicas = (*assignment.replicas, spare[0])
        reason = f"drain {on[0]}: add a copy on {spare[0]} first"
        return _Move(_ask(assignment, replicas, assignment.in_sync, reason), reason)
    if len(in_sync_kept) >= volume.replicas:
        in_sync = tuple(n for n in assignment.in_sync if n in keep)
        reason = f"drain {', '.join(on)}: drop the copy ({len(in_sync_kept)} in-sync copies elsewhere)"
        return _Move(_ask(assignment, tuple(keep), in_sync, reason), reason)
    behind = ", ".join(node for node in keep if node not in assignment.in_sync)
    return _Move(None, f"draining {on[0]}: waiting for the copies on {behind} to be in sync")


def _trim(volume: DesiredVolume, assignment: Assignment) -> _Move | None:
    """A copy a drain added that is no longer needed (the drain was ended by ``undrain`` before it
    dropped the drained copy): with more copies than wanted, the newest copy outside the in-sync
    set goes. An in-sync copy is never dropped here."""
    if assignment.primary is None or len(assignment.replicas) <= volume.replicas:
        return None
    stale = [node for node in reversed(assignment.replicas) if node not in assignment.in_sync]
    if not stale:
        return None
    node = stale[0]
    reason = f"drop the extra copy on {node} ({len(assignment.replicas)} copies, {volume.replicas} wanted)"
    replicas = tuple(n for n in assignment.replicas if n != node)
    return _Move(_ask(assignment, replicas, assignment.in_sync, reason), reason)


def _ask(
    assignment: Assignment, replicas: tuple[str, ...], in_sync: Iterable[str], reason: str
) -> AssignmentAsk:
    assert assignment.primary is not None
    keep = set(in_sync)
    return AssignmentAsk(
        volume_id=assignment.volume_id,
        primary=assignment.primary,
        replicas=replicas,
        reason=reason,
        in_sync=tuple(n for n in replicas if n in keep),
    )


# -- the requests ----------------------------------------------------------------------------------


class OperatorMoves:
    """The operator's requests in progress, and the rule that turns them into asks."""

    def __init__(self, controller: TopologyController) -> None:
        self.controller = controller
        self._failovers: dict[str, FailoverRequest] = {}
        self._rebuilds: dict[str, RebuildRequest] = {}
        #: Why the last request of a volume was given up (read by the API; cleared by a new one).
        self.refused: dict[str, str] = {}
        #: Per draining node, what its drain is doing or waiting for (``apply`` sets it).
        self.drain_status: dict[str, str] = {}
        #: Nodes awaiting the operator's approval: never a drain's spare (the control loop sets it).
        self.unapproved: frozenset[str] = frozenset()

    def request_failover(
        self,
        assignment: Assignment,
        observations: ObservationStore,
        now: float,
        to: str | None,
        draining: Collection[str] = (),
    ) -> FailoverRequest:
        """Check the failover now (raises :class:`MoveRefused`) and queue it for the next step."""
        self._busy(assignment)
        target = failover_target(self.controller, assignment, observations, now, to, draining)
        request = FailoverRequest(assignment.volume_id, assignment.epoch, target, now)
        self.refused.pop(assignment.volume_id, None)
        self._failovers[assignment.volume_id] = request
        return request

    def request_rebuild(self, assignment: Assignment, node: str, now: float) -> RebuildRequest:
        """Check the rebuild now (raises :class:`MoveRefused`) and queue it for the next step."""
        self._busy(assignment)
        check_rebuild(assignment, node)
        request = RebuildRequest(assignment.volume_id, node, assignment.epoch, RebuildPhase.RELEASE, now)
        self.refused.pop(assignment.volume_id, None)
        self._rebuilds[assignment.volume_id] = request
        return request

    def _busy(self, assignment: Assignment) -> None:
        failover = self._failovers.get(assignment.volume_id)
        if failover is not None and assignment.epoch > failover.epoch:
            del self._failovers[assignment.volume_id]  # published (``apply`` would say so next step)
        if assignment.volume_id in self._failovers:
            raise MoveRefused(f"a failover of {assignment.name} is in progress")
        rebuild = self._rebuilds.get(assignment.volume_id)
        if rebuild is not None and _readded(rebuild, assignment):
            del self._rebuilds[assignment.volume_id]  # published (``apply`` would say so next step)
        elif rebuild is not None:
            raise MoveRefused(f"a rebuild of the copy on {rebuild.node} of {assignment.name} is in progress")

    def pending(self, volume_id: str) -> FailoverRequest | RebuildRequest | None:
        return self._failovers.get(volume_id) or self._rebuilds.get(volume_id)

    def adjust(self, desired: Iterable[DesiredVolume]) -> tuple[DesiredVolume, ...]:
        """``desired`` as the controller should see it: a volume whose copy is being rebuilt wants
        one copy fewer until it is asked back (so it is not topped up elsewhere)."""
        return tuple(
            dataclasses.replace(v, replicas=v.replicas - 1)
            if v.volume_id in self._rebuilds and v.replicas > 1
            else v
            for v in desired
        )

    def apply(
        self,
        decision: Decision,
        desired: Iterable[DesiredVolume],
        current: Mapping[str, PublishedAssignment],
        observations: ObservationStore,
        draining: Collection[str],
        now: float,
    ) -> Decision:
        """``decision`` plus the moves' asks for the volumes it asks nothing for (see the module
        docstring); the status of a volume a move acts on or waits for names the move."""
        asked = {ask.volume_id for ask in decision.asks}
        asks = list(decision.asks)
        status = dict(decision.status)
        volumes = {v.volume_id: v for v in desired}
        for volume_id in [v for v in [*self._failovers, *self._rebuilds] if v not in volumes]:
            self._failovers.pop(volume_id, None)  # deleted meanwhile
            self._rebuilds.pop(volume_id, None)
        waits: dict[str, str] = {}
        holding = dict.fromkeys(draining, 0)
        for volume_id in sorted(volumes):
            published = current.get(volume_id)
            if published is None:
                continue
            for node in published.assignment.replicas:
                if node in holding:
                    holding[node] += 1
            move = self._next(volumes[volume_id], published.assignment, observations, draining, now)
            if move is None:
                continue
            for node in published.assignment.replicas:
                if node in draining and move.ask is None:
                    waits.setdefault(node, move.reason)
            if volume_id in asked:
                continue  # the controller's own rule first; the move waits a step
            if move.ask is not None:
                asks.append(move.ask)
            if status.get(volume_id, _OK).kind in (StatusKind.OK, StatusKind.DEGRADED):
                status[volume_id] = VolumeStatus(move.reason, now, StatusKind.MOVING)
        self.drain_status = {
            node: "drained: holds no copy"
            if not count
            else waits.get(node, f"moving {count} volume{'s' if count > 1 else ''} off it")
            for node, count in holding.items()
        }
        return Decision(tuple(sorted(asks, key=lambda a: a.volume_id)), status)

    def _next(
        self,
        volume: DesiredVolume,
        assignment: Assignment,
        observations: ObservationStore,
        draining: Collection[str],
        now: float,
    ) -> _Move | None:
        volume_id = volume.volume_id
        failover = self._failovers.get(volume_id)
        if failover is not None:
            if assignment.epoch > failover.epoch:
                del self._failovers[volume_id]
                if assignment.primary != failover.target:
                    self.refused[volume_id] = (
                        f"the placement changed under the failover (epoch {assignment.epoch}, primary "
                        f"{assignment.primary})"
                    )
                return None
            try:
                target = failover_target(
                    self.controller, assignment, observations, now, failover.target, draining
                )
            except MoveRefused as e:
                del self._failovers[volume_id]
                self.refused[volume_id] = str(e)
                return None
            reason = f"planned failover to {target}"
            return _Move(failover_ask(self.controller, assignment, observations, target, now, reason), reason)
        rebuild = self._rebuilds.get(volume_id)
        if rebuild is not None:
            return self._rebuild(rebuild, assignment, observations, now)
        return drain_move(self.controller, volume, assignment, observations, draining, now, self.unapproved)

    def _rebuild(
        self, rebuild: RebuildRequest, assignment: Assignment, observations: ObservationStore, now: float
    ) -> _Move | None:
        node = rebuild.node
        if rebuild.phase is RebuildPhase.RELEASE:
            if node in assignment.replicas:
                if assignment.epoch > rebuild.epoch:  # someone else placed it: start over from here
                    self._rebuilds[assignment.volume_id] = dataclasses.replace(
                        rebuild, epoch=assignment.epoch
                    )
                replicas = tuple(n for n in assignment.replicas if n != node)
                reason = f"rebuild the copy on {node}: release it"
                return _Move(_ask(assignment, replicas, assignment.in_sync, reason), reason)
            if not _released(node, assignment, observations, now):
                return _Move(None, f"rebuild the copy on {node}: waiting for {node} to release it")
            self._rebuilds[assignment.volume_id] = dataclasses.replace(
                rebuild, phase=RebuildPhase.READD, epoch=assignment.epoch
            )
            reason = f"rebuild the copy on {node}: add it back as a new copy"
            replicas = (*assignment.replicas, node)
            return _Move(_ask(assignment, replicas, assignment.in_sync, reason), reason)
        if _readded(rebuild, assignment):
            del self._rebuilds[assignment.volume_id]  # asked back: resync copies it afresh
            return None
        reason = f"rebuild the copy on {node}: add it back as a new copy"
        replicas = (*(n for n in assignment.replicas if n != node), node)
        return _Move(_ask(assignment, replicas, assignment.in_sync, reason), reason)


_OK = VolumeStatus(None, None, StatusKind.OK)
