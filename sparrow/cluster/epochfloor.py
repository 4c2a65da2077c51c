"""Epochs never go back, even when the authority does (docs/operations.md, "Backup and restore").

An authority restored from a backup (``sparrow restore``) may be behind the nodes: they may have
accepted epochs it never recorded, minted after the backup was taken. Announcing its older
assignments would hand a node a lower epoch (it refuses it, and the volume is stuck), or hand a
node that never heard of those epochs an epoch number already used for another placement (two
different "epoch 5"s in one cluster). :class:`EpochFloor` (sans-IO, ``now`` passed in) keeps the
control loop from doing either:

1. **Hold after a restore.** A master started on a restored authority (``sparrow restore`` leaves
   ``DATA_DIR/restore.json``) sends no Ack at all for ``dead_after`` seconds (at least the lease
   and margin): no node is given a lease or a lower epoch (every primary fences when its lease
   lapses), no node closes a volume for want of an assignment (so each keeps reporting what it
   holds), and every live node has reported by the end (its heartbeat interval is shorter).
2. **Behind the nodes.** A volume for which a node reported an epoch at or above the authority's
   latest, above the one the authority had when the node reported it, is *behind* (remembered
   from every heartbeat before its Ack is built, and at every step) until an epoch above it is
   published: its assignment is left out of every
   Ack (a node closes a volume its Ack does not name) and the controller's asks for it are
   dropped. Once ``lease + margin`` has passed since it was found behind (so no node can still
   serve it under a lease from an Ack that named it), if a live node reports itself PRIMARY at
   that highest epoch ``E``, the floor ask is published: that node as primary (it holds every
   write acknowledged under ``E``), the other nodes reporting the volume at ``E``, then the
   recorded copies, up to the copies wanted; only the primary in sync (the controller adds the
   others back when the primary reports them in sync); under an epoch above ``E``
   (:attr:`FlooredAsk.epoch_floor`, which the Publisher honours). With no live node reporting
   PRIMARY at ``E`` the volume waits, status ``waiting_for_node``.

The newest epoch any node saw wins: a restore made while the node that saw it is down, followed by
writes under the restored placement, loses those writes when that node returns (forget the node
first, ``sparrow node forget``, if its copy is to be given up).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sparrow.cluster.controller import AssignmentAsk, Decision, StatusKind, VolumeStatus
from sparrow.cluster.messages import Assignment, Heartbeat, Role
from sparrow.cluster.observations import ObservationStore

RESTORE_MARKER = "restore.json"


@dataclass(frozen=True, slots=True)
class FlooredAsk(AssignmentAsk):
    """An ask whose epoch must be above ``epoch_floor`` (an epoch a node reported)."""

    epoch_floor: int = 0


@dataclass(frozen=True, slots=True)
class Reported:
    """The highest epoch nodes reported for a volume, who reported it, and who as PRIMARY."""

    epoch: int
    nodes: tuple[str, ...]
    primary: str | None

    def merge(self, node_id: str, epoch: int, role: Role) -> Reported:
        """This report with ``node_id``'s (a higher epoch replaces it)."""
        if epoch < self.epoch:
            return self
        if epoch > self.epoch:
            return Reported(epoch, (node_id,), node_id if role is Role.PRIMARY else None)
        nodes = self.nodes if node_id in self.nodes else (*self.nodes, node_id)
        return Reported(epoch, nodes, node_id if role is Role.PRIMARY else self.primary)


NOTHING = Reported(0, (), None)


class EpochFloor:
    """See the module docstring. ``hold_until``: the end of the hold after a restore (master
    clock; None: no hold); ``on_hold_end`` runs once when it ends (removes the marker).

    What nodes reported above the authority is remembered (:meth:`note` at every Ack, and every
    step) until an epoch above it is published: a node closes a volume its Ack does not name and
    stops reporting it, which must not make the master forget that the node saw that epoch."""

    def __init__(
        self,
        lease_seconds: float,
        margin: float,
        *,
        hold_until: float | None = None,
        on_hold_end: Callable[[], None] | None = None,
    ) -> None:
        self.lease_seconds = lease_seconds
        self.margin = margin
        self.hold_until = hold_until
        self._on_hold_end = on_hold_end
        self._behind: dict[str, Reported] = {}
        self._since: dict[str, float] = {}

    @property
    def holding(self) -> bool:
        """During the hold after a restore the master sends no Ack at all (no lease, no
        assignment: a node closes what an Ack does not name, and would stop reporting it)."""
        return self.hold_until is not None

    def announced(self, volume_id: str) -> bool:
        """May an Ack carry the volume's assignment? Not during the hold, not while behind."""
        return self.hold_until is None and volume_id not in self._behind

    def note(self, node_id: str, heartbeat: Heartbeat | None, current: Mapping[str, Assignment]) -> None:
        """Remember what ``node_id``'s latest heartbeat reports above the authority (before its
        Ack is built)."""
        if heartbeat is None:
            return
        for obs in heartbeat.observations:
            recorded = current.get(obs.volume_id)
            if recorded is not None and obs.epoch > recorded.epoch:
                known = self._behind.get(obs.volume_id, NOTHING)
                self._behind[obs.volume_id] = known.merge(node_id, obs.epoch, obs.role)

    def step(
        self,
        decision: Decision,
        current: Mapping[str, Assignment],
        wanted: Mapping[str, int],
        observations: ObservationStore,
        now: float,
    ) -> tuple[Decision, tuple[AssignmentAsk, ...]]:
        """The decision with the asks for held or behind volumes taken out (their status says
        why), and the floor asks to publish whatever the current assignment is."""
        status = dict(decision.status)
        for view in observations.nodes(now):
            self.note(view.node_id, observations.heartbeat(view.node_id), current)
        if self.hold_until is not None:
            if now < self.hold_until:
                reason = (
                    f"authority restored from a backup: no assignment is announced for "
                    f"{self.hold_until - now:.1f}s more, until every node has reported its epochs"
                )
                held = VolumeStatus(reason, now, StatusKind.WAITING_FOR_NODE)
                return Decision((), dict.fromkeys(status, held)), ()
            started = self.hold_until - self.lease_seconds - self.margin  # no Ack since the start
            self.hold_until = None
            self._since = dict.fromkeys(self._behind, started)
            if self._on_hold_end is not None:
                self._on_hold_end()
        self._behind = {
            v: r for v, r in self._behind.items() if v in current and r.epoch >= current[v].epoch
        }
        self._since = {v: self._since.get(v, now) for v in self._behind}
        asks: list[AssignmentAsk] = []
        for volume_id, reported in sorted(self._behind.items()):
            recorded = current[volume_id]
            text = (
                f"the authority is behind the nodes: {reported.nodes[0]} reported epoch "
                f"{reported.epoch}, the authority's latest is {recorded.epoch}; announcing nothing "
                f"for the volume until an epoch above {reported.epoch} is minted"
            )
            safe = now >= self._since[volume_id] + self.lease_seconds + self.margin
            primary = reported.primary
            if primary is None or not observations.alive(primary, now) or not safe:
                waiting = "for the leases to lapse"
                if primary is None or not observations.alive(primary, now):
                    waiting = f"for its primary at epoch {reported.epoch} to report, alive"
                kind = StatusKind.WAITING_FOR_NODE
                status[volume_id] = VolumeStatus(f"{text} (waiting {waiting})", now, kind)
                continue
            copies = [primary]
            limit = max(1, wanted.get(volume_id, len(recorded.replicas)))
            for n in (*reported.nodes, *recorded.replicas):
                if n not in copies and len(copies) < limit:
                    copies.append(n)
            status[volume_id] = VolumeStatus(text, now, StatusKind.PROMOTING)
            asks.append(
                FlooredAsk(
                    volume_id,
                    primary,
                    tuple(copies),
                    f"epoch floor: {primary} was primary at epoch {reported.epoch}, above the "
                    f"authority's {recorded.epoch} (restored from a backup?)",
                    (primary,),
                    epoch_floor=reported.epoch,
                )
            )
        kept = tuple(ask for ask in decision.asks if ask.volume_id not in self._behind)
        return Decision(kept, status), tuple(asks)
