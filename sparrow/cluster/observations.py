"""What the master has heard from its nodes (docs/cluster.md, "ObservationStore").

The store keeps, per node, the latest :class:`~sparrow.cluster.messages.Hello` and
:class:`~sparrow.cluster.messages.Heartbeat` together with the master-local (monotonic) time each
arrived. It is pure data: the heartbeat server feeds it, the topology controller reads it, and
``now`` is always an argument.

Rules:

- A node is *alive* at ``now`` iff its last heartbeat arrived less than ``dead_after`` seconds
  before ``now``. A Hello alone does not make a node alive.
- A Hello with a new ``incarnation`` means the node process restarted: everything it reported
  before (its last heartbeat and so its volume observations) is forgotten. A Hello with the same
  incarnation (a reconnect) only refreshes the addresses and capacity.
- Expired nodes stay listed (state ``"dead"``) and their last observations stay readable: the
  controller needs a dead primary's last write position to judge its replicas.
- Two live nodes claiming PRIMARY for one volume is reported as a :class:`Conflict`; the store
  only reports, the published assignment settles it.
- Heartbeats are observations, never authority (docs/cluster.md, "Messages").
- A node's *claim* on a volume (:meth:`ObservationStore.primary_claim`) is the (incarnation,
  epoch) of the first incarnation of that node that reported the volume as PRIMARY at the highest
  epoch it reported. Claims outlive a new incarnation (a restart, or someone else using the id),
  which cannot take them over at the same epoch: the controller trusts a primary's report of its
  replicas only from the claiming incarnation (docs/cluster.md, "Failover"). A claim is dropped
  when a heartbeat of the node no longer reports the volume.

Before the master has been up for ``dead_after`` seconds, a node it has not heard from yet may
simply not have reconnected: :meth:`ObservationStore.dead` does not call such a node dead until
``started_at + dead_after`` (pass ``started_at`` when the master starts).
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from dataclasses import dataclass

from sparrow.cluster.messages import Heartbeat, Hello, Role, VolumeObservation

#: Default dead-after window (seconds), docs/cluster.md "Lease arithmetic".
DEFAULT_DEAD_AFTER = 8.0


class ObservationError(ValueError):
    """A message the store cannot record (wrong node, or a heartbeat before any Hello)."""


class NodeState(enum.StrEnum):
    """A node as the master sees it at some ``now``."""

    ALIVE = "alive"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as listed by :meth:`ObservationStore.nodes`.

    ``last_heartbeat_age`` is ``now`` minus the arrival of the last heartbeat, in seconds; None when
    the current incarnation has sent no heartbeat yet. Addresses and capacity are from the last Hello.
    """

    node_id: str
    state: NodeState
    incarnation: int
    last_heartbeat_age: float | None
    iscsi_portal: str
    replication: str
    http: str
    capacity_bytes: int
    free_bytes: int


@dataclass(frozen=True, slots=True)
class Conflict:
    """Several live nodes claim PRIMARY for ``volume_id``; ``epochs[i]`` is what ``node_ids[i]``
    reported. Node ids are sorted."""

    volume_id: str
    node_ids: tuple[str, ...]
    epochs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _NodeRecord:
    hello: Hello
    hello_at: float
    heartbeat: Heartbeat | None
    heartbeat_at: float | None
    volumes: dict[str, VolumeObservation]


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, not {now!r}")
    return float(now)


class ObservationStore:
    """Latest Hello and Heartbeat per node, with their arrival times on the master's clock."""

    def __init__(self, dead_after: float = DEFAULT_DEAD_AFTER, *, started_at: float | None = None) -> None:
        if (
            isinstance(dead_after, bool)
            or not isinstance(dead_after, int | float)
            or not math.isfinite(dead_after)
            or dead_after <= 0
        ):
            raise ValueError(f"dead_after must be a positive number of seconds, not {dead_after!r}")
        self.dead_after = float(dead_after)
        self.started_at = None if started_at is None else _check_now(started_at)
        self._nodes: dict[str, _NodeRecord] = {}
        #: Per node: volume id -> (incarnation, epoch) of its claim.
        self._claims: dict[str, dict[str, tuple[int, int]]] = {}

    # -- feeding ----------------------------------------------------------------------------------

    def record(self, message: Hello | Heartbeat, node_id: str, now: float) -> None:
        """Record ``message`` from ``node_id``, arrived at ``now`` (master clock).

        Raises :class:`ObservationError` for a Hello whose ``node_id`` differs from ``node_id`` or
        a Heartbeat from a node that has not said Hello.
        """
        now = _check_now(now)
        if isinstance(message, Hello):
            if message.node_id != node_id:
                raise ObservationError(f"Hello from {message.node_id!r} recorded for node {node_id!r}")
            previous = self._nodes.get(node_id)
            if previous is not None and previous.hello.incarnation == message.incarnation:
                self._nodes[node_id] = _NodeRecord(
                    message, now, previous.heartbeat, previous.heartbeat_at, previous.volumes
                )
            else:
                # New node or a restarted process: what the old incarnation said is void.
                self._nodes[node_id] = _NodeRecord(message, now, None, None, {})
            return
        if isinstance(message, Heartbeat):
            record = self._nodes.get(node_id)
            if record is None:
                raise ObservationError(f"Heartbeat from {node_id!r} before any Hello")
            volumes = {obs.volume_id: obs for obs in message.observations}
            self._nodes[node_id] = _NodeRecord(record.hello, record.hello_at, message, now, volumes)
            old = self._claims.get(node_id, {})
            claims: dict[str, tuple[int, int]] = {}
            for obs in message.observations:
                claim = old.get(obs.volume_id)
                if obs.role is Role.PRIMARY and (claim is None or claim[1] < obs.epoch):
                    claim = (record.hello.incarnation, obs.epoch)
                if claim is not None:
                    claims[obs.volume_id] = claim
            self._claims[node_id] = claims
            return
        raise TypeError(f"cannot record a {type(message).__name__}")

    def forget(self, node_id: str) -> bool:
        """Drop everything recorded for ``node_id`` (False: nothing was). A later Hello records it
        as a new node."""
        return self._nodes.pop(node_id, None) is not None

    # -- reading ----------------------------------------------------------------------------------

    def known(self, node_id: str) -> bool:
        """True once ``node_id`` has said Hello."""
        return node_id in self._nodes

    def alive(self, node_id: str, now: float) -> bool:
        """True iff the node's last heartbeat arrived less than ``dead_after`` seconds ago."""
        record = self._nodes.get(node_id)
        if record is None or record.heartbeat_at is None:
            return False
        return now - record.heartbeat_at < self.dead_after

    def silent(self, node_id: str, now: float, seconds: float) -> bool:
        """True when ``node_id`` said Hello and its current incarnation has sent no heartbeat for at
        least ``seconds`` (or none at all). A node never heard from is not silent: during a
        master's startup it may just not have reconnected (:meth:`dead` covers that case)."""
        record = self._nodes.get(node_id)
        if record is None:
            return False
        return record.heartbeat_at is None or now - record.heartbeat_at >= seconds

    def dead(self, node_id: str, now: float) -> bool:
        """True when ``node_id`` is not alive and the master has had time to hear from it.

        A node that said Hello and is not alive is dead. A node never heard from is dead once
        ``started_at + dead_after`` has passed (at once when ``started_at`` is None); before that it
        may just not have reconnected to a freshly started master.
        """
        if self.alive(node_id, now):
            return False
        if node_id in self._nodes or self.started_at is None:
            return True
        return now - self.started_at >= self.dead_after

    def hello(self, node_id: str) -> Hello | None:
        """The last Hello from ``node_id``."""
        record = self._nodes.get(node_id)
        return None if record is None else record.hello

    def heartbeat(self, node_id: str) -> Heartbeat | None:
        """The last Heartbeat from the node's current incarnation."""
        record = self._nodes.get(node_id)
        return None if record is None else record.heartbeat

    def primary_claim(self, node_id: str, volume_id: str) -> tuple[int, int] | None:
        """(incarnation, epoch) of ``node_id``'s claim on ``volume_id`` (see the module docstring)."""
        return self._claims.get(node_id, {}).get(volume_id)

    def observation(self, node_id: str, volume_id: str) -> VolumeObservation | None:
        """What ``node_id`` last reported for ``volume_id`` (also when the node is now dead)."""
        record = self._nodes.get(node_id)
        return None if record is None else record.volumes.get(volume_id)

    def nodes(self, now: float) -> tuple[NodeView, ...]:
        """Every node that ever said Hello (dead ones included), sorted by node id."""
        views = []
        for node_id in sorted(self._nodes):
            record = self._nodes[node_id]
            hello = record.hello
            age = None if record.heartbeat_at is None else now - record.heartbeat_at
            views.append(
                NodeView(
                    node_id=node_id,
                    state=NodeState.ALIVE if self.alive(node_id, now) else NodeState.DEAD,
                    incarnation=hello.incarnation,
                    last_heartbeat_age=age,
                    iscsi_portal=hello.iscsi_portal,
                    replication=hello.replication,
                    http=hello.http,
                    capacity_bytes=hello.capacity_bytes,
                    free_bytes=hello.free_bytes,
                )
            )
        return tuple(views)

    def conflicts(self, now: float) -> tuple[Conflict, ...]:
        """Volumes that two or more live nodes claim as PRIMARY, sorted by volume id."""
        claims: defaultdict[str, list[tuple[str, int]]] = defaultdict(list)
        for node_id in sorted(self._nodes):
            if not self.alive(node_id, now):
                continue
            for obs in self._nodes[node_id].volumes.values():
                if obs.role is Role.PRIMARY:
                    claims[obs.volume_id].append((node_id, obs.epoch))
        return tuple(
            Conflict(
                volume_id=volume_id,
                node_ids=tuple(node for node, _ in claimants),
                epochs=tuple(epoch for _, epoch in claimants),
            )
            for volume_id, claimants in sorted(claims.items())
            if len(claimants) > 1
        )
