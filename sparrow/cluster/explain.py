"""Why a volume is in its state: ``sparrow volume explain NAME`` (docs/operations.md, "Why is my
volume not served").

Sans-IO, like the controller: :func:`explain` reads what the master already holds -- the volume's
record and published assignment (:class:`VolumeFacts`), the controller's status, the
:class:`~sparrow.cluster.observations.ObservationStore` (every node's last Hello and heartbeat,
including the heartbeat v3 diagnostics: each volume's convergence error and unsupported SCSI
commands, the volumes a node skipped at start) and the :class:`~sparrow.cluster.lease.MasterLeases`
-- at ``now`` (the master's monotonic clock), and returns an :class:`Explanation`: a headline
:class:`Reason` and :class:`Finding` s, each in words (what is the case, what to do) and as fields
(which node, since how long, the numbers). It decides nothing and changes nothing.

The headline follows the order in which a volume gets served: paused, placed (enough live nodes,
enough free space), a primary that is alive (else: its lease, then an eligible replica), that
primary converged on the current epoch (else: the node's error), not fenced. ``served`` is the
definition ``/healthz`` and ``?wait`` use (``sparrow.health.unserved``) and a ``served`` headline:
a primary silent for ``lease + margin`` is replaced then, while ``/healthz`` calls it alive until
``dead_after``. Findings after the
headline say what else is going on: a copy resyncing, stale, dead or stuck, a draining node, an
operator move.

**Pause** (sparrow.cluster.pause): a paused volume (``VolumeFacts(paused=Paused(...))``) has the
headline :attr:`Reason.PAUSED` and nothing else is looked at: it is not served on purpose.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sparrow.cluster.controller import StatusKind, TopologyController, VolumeStatus
from sparrow.cluster.lease import MasterLeases
from sparrow.cluster.messages import Assignment, Health, Role, SkippedVolume, SyncState, UnsupportedCommand
from sparrow.cluster.observations import NodeState, ObservationStore
from sparrow.health import unserved
from sparrow.sizes import format_size
from sparrow.termtext import printable


class Reason(enum.StrEnum):
    """What a finding is about; the headline's is the volume's ``reason`` (API and ``--json``)."""

    #: Served by its primary at the current epoch.
    SERVED = "served"
    #: Paused by an operator (``sparrow volume pause``).
    PAUSED = "paused"
    #: Recorded, not placed yet: the control loop places it at its next step.
    UNPLACED = "unplaced"
    #: Fewer live nodes than copies wanted.
    NOT_ENOUGH_NODES = "not_enough_nodes"
    #: Enough live nodes, too few with the volume's size free.
    NOT_ENOUGH_SPACE = "not_enough_space"
    #: The assignment names no primary.
    NO_PRIMARY = "no_primary"
    #: A freshly started master has not heard from the primary yet.
    WAITING_FOR_NODE = "waiting_for_node"
    #: The primary is dead or silent and its lease may still be running.
    WAITING_FOR_LEASE = "waiting_for_lease"
    #: The primary is dead or silent and no copy may take over.
    NO_ELIGIBLE_REPLICA = "no_eligible_replica"
    #: A replica is being made primary.
    PROMOTING = "promoting"
    #: The primary is applying the current epoch.
    TRANSITIONING = "transitioning"
    #: A node reports an error acting on the assignment, or has not converged by the deadline.
    STUCK = "stuck"
    #: The primary is at the epoch but does not serve (no valid lease, not open, state unreadable).
    FENCED = "fenced"
    #: A copy is being resynced.
    RESYNCING = "resyncing"
    #: Fewer copies in sync than wanted (a replica dead, stale or missing).
    DEGRADED = "degraded"
    #: A node holding a copy is being drained.
    DRAINING = "draining"
    #: An operator move (planned failover, rebuild, drain) acts or waits.
    MOVING = "moving"


#: JSON-able values of :attr:`Finding.facts`.
Fact = str | int | float | bool | None | list[Any] | dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing that is the case: ``text`` says it, ``action`` what an operator can do (None:
    nothing, it resolves itself); ``node`` is the node it is about, ``since`` when it began on the
    master's monotonic clock (None: unknown), ``facts`` the numbers."""

    reason: Reason
    text: str
    action: str | None = None
    node: str | None = None
    since: float | None = None
    facts: Mapping[str, Fact] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Paused:
    """A paused volume (``sparrow volume pause``, sparrow.cluster.pause). ``since``: when the epoch
    that paused it was published, on the master's monotonic clock (None: not yet published);
    who paused it is in the audit log."""

    since: float | None = None


@dataclass(frozen=True, slots=True)
class VolumeFacts:
    """What the master holds about one live volume: its record (``size``, ``replicas`` wanted),
    its published assignment and when it was published (master clock), the controller's latest
    status, the draining nodes and whether it is paused."""

    volume_id: str
    name: str
    size: int
    replicas: int
    assignment: Assignment | None
    published_at: float | None
    status: VolumeStatus | None
    draining: frozenset[str] = frozenset()
    paused: Paused | None = None


@dataclass(frozen=True, slots=True)
class OnNode:
    """What ``node`` reported about the volume: a SCSI command its LU answered as unsupported,
    or a local copy of the volume's name it skipped at start."""

    node: str
    what: UnsupportedCommand | SkippedVolume


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a volume is in its state: ``findings[0]`` is the headline (``reason``)."""

    volume_id: str
    name: str
    served: bool
    findings: tuple[Finding, ...]
    #: Each ``what`` an :class:`UnsupportedCommand`.
    unsupported: tuple[OnNode, ...] = ()
    #: Each ``what`` a :class:`SkippedVolume` of the volume's name.
    skipped: tuple[OnNode, ...] = ()

    @property
    def reason(self) -> Reason:
        return self.findings[0].reason

    def json(self, now: float, wall_now: float) -> dict[str, Any]:
        """The API's form; ``since`` becomes an age (``since_seconds``) and a UTC time (``since``)
        by ``now`` (master monotonic) and ``wall_now`` (its wall clock)."""
        return {
            "volume": self.name,
            "volume_id": self.volume_id,
            "served": self.served,
            "reason": self.reason.value,
            "summary": self.findings[0].text,
            "findings": [_finding_json(f, now, wall_now) for f in self.findings],
            "unsupported_commands": [
                {
                    "node": u.node,
                    "opcode": u.what.opcode,
                    "service_action": u.what.service_action,
                    "count": u.what.count,
                    "last_initiator": u.what.last_initiator,
                }
                for u in self.unsupported
                if isinstance(u.what, UnsupportedCommand)
            ],
            "skipped_at_start": [
                {"node": s.node, "reason": s.what.reason}
                for s in self.skipped
                if isinstance(s.what, SkippedVolume)
            ],
        }


def _finding_json(finding: Finding, now: float, wall_now: float) -> dict[str, Any]:
    age = None if finding.since is None else max(0.0, now - finding.since)
    return {
        "reason": finding.reason.value,
        "text": finding.text,
        "action": finding.action,
        "node": finding.node,
        "since_seconds": None if age is None else round(age, 1),
        "since": None if age is None else _iso(wall_now - age),
        "facts": dict(finding.facts),
    }


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


# -- the analysis -------------------------------------------------------------------------------------


def explain(
    volume: VolumeFacts,
    observations: ObservationStore,
    leases: MasterLeases,
    controller: TopologyController,
    now: float,
) -> Explanation:
    """Why ``volume`` is in its state at ``now``; see the module docstring."""
    ctx = _Context(volume, observations, leases, controller, now)
    headline = ctx.headline()
    # /healthz's definition, and the headline's: a primary silent past its lease (replaced at
    # that instant) still counts as alive for /healthz until dead_after, but it no longer serves.
    served = (
        headline.reason is Reason.SERVED
        and unserved(volume.assignment, volume.status, observations, now) is None
    )
    others = [] if volume.paused is not None else ctx.copies(headline)
    findings = (headline, *[f for f in others if f.reason is not headline.reason or f.node != headline.node])
    return Explanation(
        volume.volume_id,
        volume.name,
        served,
        findings,
        _unsupported(volume, observations, now),
        _skipped(volume, observations, now),
    )


def _unsupported(volume: VolumeFacts, observations: ObservationStore, now: float) -> tuple[OnNode, ...]:
    """What the nodes holding a copy (by the current assignment) say its LU answered as
    unsupported: a node's report about a volume it does not hold is not taken as fact."""
    holders = () if volume.assignment is None else volume.assignment.replicas
    seen = (
        (view.node_id, observations.observation(view.node_id, volume.volume_id))
        for view in observations.nodes(now)
        if view.node_id in holders
    )
    return tuple(OnNode(node, u) for node, obs in seen if obs is not None for u in obs.unsupported)


def _skipped(volume: VolumeFacts, observations: ObservationStore, now: float) -> tuple[OnNode, ...]:
    return tuple(
        OnNode(view.node_id, skipped)
        for view in observations.nodes(now)
        for skipped in _node_skipped(observations, view.node_id)
        if skipped.name == volume.name
    )


def _node_skipped(observations: ObservationStore, node: str) -> Sequence[SkippedVolume]:
    heartbeat = observations.heartbeat(node)
    return () if heartbeat is None else heartbeat.skipped


@dataclass(frozen=True, slots=True)
class _Context:
    volume: VolumeFacts
    observations: ObservationStore
    leases: MasterLeases
    controller: TopologyController
    now: float

    # -- the headline ---------------------------------------------------------------------------------

    def headline(self) -> Finding:
        volume = self.volume
        if volume.paused is not None:
            return Finding(
                Reason.PAUSED,
                f"volume {volume.name} is paused: it is not served on purpose (its initiators are "
                "told NOT READY and retry)",
                f"sparrow volume resume {volume.name}",
                since=volume.paused.since,
            )
        assignment = volume.assignment
        if assignment is None:
            return self.unplaced()
        primary = assignment.primary
        if primary is None:
            return Finding(
                Reason.NO_PRIMARY,
                f"the assignment at epoch {assignment.epoch} names no primary: the master does not "
                "place fresh copies, which would look like a volume that lost its data",
                "find the node that holds the data and bring it back; otherwise delete and recreate "
                "the volume",
                facts={"epoch": assignment.epoch},
            )
        obs = self.observations
        silence = self.controller.primary_silence
        if obs.dead(primary, self.now) or (silence is not None and obs.silent(primary, self.now, silence)):
            return self.primary_gone(assignment, primary)
        if not obs.alive(primary, self.now):
            return Finding(
                Reason.WAITING_FOR_NODE,
                f"the master started recently and has not heard from the primary {primary} yet",
                f"wait up to the dead-after time; if {primary} is down, start it",
                node=primary,
            )
        return self.primary_alive(assignment, primary)

    def unplaced(self) -> Finding:
        volume = self.volume
        status = volume.status
        if status is None or status.kind is not StatusKind.NOT_ENOUGH_NODES:
            return Finding(
                Reason.UNPLACED,
                f"volume {volume.name} is recorded and not placed yet: the control loop places it "
                "at its next step",
                None,
                since=None if status is None else status.since,
            )
        live = [
            v
            for v in self.observations.nodes(self.now)
            if v.state is NodeState.ALIVE and v.node_id not in volume.draining
        ]
        need = volume.replicas
        size = volume.size
        free = {v.node_id: v.free_bytes for v in live}
        roomy = sorted(node for node, room in free.items() if room >= size)
        facts: dict[str, Fact] = {
            "copies_needed": need,
            "size_bytes": size,
            "live_nodes": len(live),
            "nodes": [
                {"node": v.node_id, "free_bytes": v.free_bytes, "capacity_bytes": v.capacity_bytes}
                for v in live
            ],
            "draining": sorted(volume.draining),
        }
        copies = "1 copy" if need == 1 else f"{need} copies on distinct nodes"
        if len(live) >= need:
            short = ", ".join(
                f"{v.node_id} has {format_size(v.free_bytes)} free" for v in live if v.free_bytes < size
            )
            return Finding(
                Reason.NOT_ENOUGH_SPACE,
                f"not enough space: {copies} of {format_size(size)} needed, {len(roomy)} of "
                f"{len(live)} live nodes have that much free ({short})",
                "free space on a node, add a node, or delete the volume and create it smaller or "
                "with fewer replicas",
                since=status.since,
                facts={**facts, "nodes_with_room": roomy},
            )
        return Finding(
            Reason.NOT_ENOUGH_NODES,
            f"not enough live nodes: {copies} needed, {len(live)} live"
            + (f" (draining: {', '.join(sorted(volume.draining))})" if volume.draining else ""),
            "start more nodes (sparrow node), bring dead ones back"
            + (", or undrain a node (sparrow node undrain NODE)" if volume.draining else ""),
            since=status.since,
            facts=facts,
        )

    def primary_gone(self, assignment: Assignment, primary: str) -> Finding:
        obs = self.observations
        margin = self.controller.margin if self.controller.margin is not None else self.leases.margin
        status = self.volume.status
        gone = "dead" if obs.dead(primary, self.now) else "silent"
        age = self._heartbeat_age(primary)
        heard = "never heard from" if age is None else f"last heard from {_seconds(age)} ago"
        if not self.leases.safe_to_reassign(primary, self.now, margin):
            expires = self.leases.expires_at(primary)
            until = None if expires is None else expires + margin
            wait = "" if until is None else f" in {_seconds(max(0.0, until - self.now))}"
            return Finding(
                Reason.WAITING_FOR_LEASE,
                f"the primary {primary} is {gone} ({heard}); its lease may still let it serve, so "
                f"no other copy takes over before the lease and the margin have run out{wait}",
                f"nothing: wait; if {primary} comes back first it keeps serving",
                node=primary,
                since=None
                if status is None or status.kind is not StatusKind.WAITING_FOR_LEASE
                else status.since,
                facts={
                    "lease_expires_in_seconds": None if expires is None else round(expires - self.now, 3),
                    "reassign_in_seconds": None if until is None else round(until - self.now, 3),
                    "last_heartbeat_age": None if age is None else round(age, 3),
                },
            )
        if status is not None and status.kind is StatusKind.PROMOTING:
            return Finding(
                Reason.PROMOTING,
                f"the primary {primary} is {gone} ({heard}): {status.reason}; another copy is being made "
                "primary",
                None,
                node=primary,
                since=status.since,
            )
        copies = self.why_not_eligible(assignment)
        in_sync_elsewhere = [c for c in copies if c["node"] != primary]
        if not in_sync_elsewhere:
            what = f"the only copy is on {primary}"
        else:
            what = "; ".join(f"{c['node']}: {', '.join(c['why'])}" for c in in_sync_elsewhere)
        return Finding(
            Reason.NO_ELIGIBLE_REPLICA,
            f"the primary {primary} is {gone} ({heard}) and no other copy may take over: {what}",
            f"bring {primary} back (it holds every acknowledged write); Sparrow never serves a copy "
            "that may lack acknowledged writes",
            node=primary,
            since=None
            if status is None or status.kind is not StatusKind.NO_ELIGIBLE_REPLICA
            else status.since,
            facts={
                "epoch": assignment.epoch,
                "in_sync": list(assignment.in_sync),
                "last_heartbeat_age": None if age is None else round(age, 3),
                "copies": copies,
            },
        )

    def why_not_eligible(self, assignment: Assignment) -> list[dict[str, Any]]:
        """Each copy of ``assignment`` and why it may not take over from the primary (the rules of
        ``TopologyController.eligible_replicas``, and silence)."""
        obs = self.observations
        report = TopologyController.primary_report(assignment, obs)
        reported = {} if report is None else {r.node_id: r for r in report.replica_states}
        eligible = set(self.controller.eligible_replicas(assignment, obs, self.now))
        silence = self.controller.primary_silence
        out = []
        for node in assignment.replicas:
            why: list[str] = []
            if node == assignment.primary:
                why.append("the primary itself")
            else:
                why.extend(self._why_not(node, assignment, report, reported))
                if node in eligible and silence is not None and obs.silent(node, self.now, silence):
                    why.append(f"silent for over {_seconds(silence)}")
                if not why and node not in eligible:
                    why.append("not eligible")
            out.append({"node": node, "in_sync": node in assignment.in_sync, "why": why})
        return out

    def _why_not(
        self, node: str, assignment: Assignment, report: Any, reported: Mapping[str, Any]
    ) -> list[str]:
        obs = self.observations
        why = []
        if node not in assignment.in_sync:
            why.append(
                f"not in the in-sync set of epoch {assignment.epoch} (it may lack acknowledged writes)"
            )
        state = reported.get(node)
        if report is not None and (state is None or state.state is not SyncState.IN_SYNC):
            said = "did not mention it" if state is None else f"reported it {state.state.value}"
            why.append(f"the primary {said} in its last report")
        if not obs.alive(node, self.now):
            age = self._heartbeat_age(node)
            why.append("dead" if age is None else f"dead (last heartbeat {_seconds(age)} ago)")
        seen = obs.observation(node, assignment.volume_id)
        if seen is None:
            why.append("has not reported the volume")
        else:
            if seen.epoch != assignment.epoch or seen.role is not Role.REPLICA:
                why.append(f"reports epoch {seen.epoch} as {seen.role.value}, not epoch {assignment.epoch}")
            if seen.health is not Health.OK:
                why.append(f"health {seen.health.value}")
            if report is not None and seen.write_position < report.write_position:
                why.append(f"behind: at {seen.write_position} of {report.write_position}")
        return why

    def primary_alive(self, assignment: Assignment, primary: str) -> Finding:
        volume = self.volume
        status = volume.status
        seen = self.observations.observation(primary, volume.volume_id)
        published = volume.published_at
        if seen is not None and seen.error is not None:
            return self.stuck(assignment, primary)
        if (
            seen is None
            or seen.epoch != assignment.epoch
            or seen.role is not Role.PRIMARY
            or not seen.converged
        ):
            if status is not None and status.kind is StatusKind.STUCK:
                return self.stuck(assignment, primary)
            reports = (
                "has not reported the volume yet"
                if seen is None
                else f"reports epoch {seen.epoch} as {seen.role.value}"
                + ("" if seen.converged else ", not converged")
            )
            return Finding(
                Reason.TRANSITIONING,
                f"the primary {primary} is taking on epoch {assignment.epoch}: it {reports}",
                f"wait; past the converge deadline ({_seconds(self.controller.converge_deadline)}) "
                "the volume is reported stuck",
                node=primary,
                since=published,
                facts={"epoch": assignment.epoch},
            )
        if seen.health is not Health.OK:
            why = {
                Health.DEGRADED: "it holds no valid lease (it cannot reach the master, or its first "
                "lease after a restart has not come yet)",
                Health.OFFLINE: "the volume is not open there",
                Health.FAILED: "it cannot read its cluster state for the volume",
            }[seen.health]
            return Finding(
                Reason.FENCED,
                f"the primary {primary} is fenced: {why}",
                f"check {primary}'s connection to the master (sparrow node list: its last heartbeat) "
                "and its log",
                node=primary,
                facts={"health": seen.health.value, "epoch": assignment.epoch},
            )
        in_sync = len(assignment.in_sync)
        return Finding(
            Reason.SERVED,
            f"served by {primary} at epoch {assignment.epoch}; {in_sync} of {volume.replicas} "
            f"wanted {'copy' if volume.replicas == 1 else 'copies'} in sync",
            None,
            node=primary,
            since=published,
            facts={
                "epoch": assignment.epoch,
                "in_sync": list(assignment.in_sync),
                "replicas": list(assignment.replicas),
            },
        )

    def stuck(self, assignment: Assignment, node: str) -> Finding:
        seen = self.observations.observation(node, assignment.volume_id)
        error = None if seen is None else seen.error
        published = self.volume.published_at
        age = None if published is None else self.now - published
        waited = "" if age is None else f" for {_seconds(age)}"
        said = f": {error}" if error else " (it reports no error)"
        name = self.volume.name
        skipped = [v.reason for v in _node_skipped(self.observations, node) if v.name == name]
        if skipped:
            action = (
                f"{node} did not load its copy at start ({skipped[0]}): repair or restore that file "
                f"on {node} and restart it, or, if that copy is lost, sparrow volume delete {name}"
            )
        else:
            action = (
                f"fix what the error names on {node} (its log has the details); the node tries "
                "again at every heartbeat"
            )
        return Finding(
            Reason.STUCK,
            f"node {node} has not converged on epoch {assignment.epoch}{waited}{said}",
            action,
            node=node,
            since=published,
            facts={"epoch": assignment.epoch, "error": error},
        )

    # -- everything else ------------------------------------------------------------------------------

    def copies(self, headline: Finding) -> list[Finding]:
        """What else is going on with the volume's copies (after the headline)."""
        volume = self.volume
        assignment = volume.assignment
        status = volume.status
        out: list[Finding] = []
        if status is not None and status.kind is StatusKind.MOVING and status.reason:
            out.append(Finding(Reason.MOVING, status.reason, None, since=status.since))
        if assignment is None:
            return out
        obs = self.observations
        report = TopologyController.primary_report(assignment, obs)
        syncing = {
            r.node_id: r
            for r in (() if report is None else report.replica_states)
            if r.state is SyncState.SYNCING and r.node_id not in assignment.in_sync
        }
        for node in assignment.replicas:
            if node == assignment.primary:
                continue
            seen = obs.observation(node, volume.volume_id)
            resync = syncing.get(node)
            if seen is not None and seen.error is not None:
                out.append(self.stuck(assignment, node))
            elif obs.dead(node, self.now):
                out.append(
                    Finding(
                        Reason.DEGRADED,
                        f"the replica on {node} is dead: the master replaces it on a spare node if it "
                        "has one",
                        f"bring {node} back, or add a node",
                        node=node,
                    )
                )
            elif resync is not None:
                done, total = resync.resync_done, resync.resync_total
                percent = 100.0 if total == 0 else 100.0 * done / total
                out.append(
                    Finding(
                        Reason.RESYNCING,
                        f"the copy on {node} is being resynced: {format_size(done)} of "
                        f"{format_size(total)} copied ({percent:.0f}%)",
                        None,
                        node=node,
                        facts={"done_bytes": done, "total_bytes": total},
                    )
                )
            elif node not in assignment.in_sync and headline.reason is Reason.SERVED:
                out.append(
                    Finding(
                        Reason.DEGRADED,
                        f"the copy on {node} is stale (not in the in-sync set of epoch "
                        f"{assignment.epoch}); its resync has not started",
                        f"check that {node} can reach the primary's replication port",
                        node=node,
                    )
                )
            if node in volume.draining:
                out.append(self._draining(node))
        if assignment.primary is not None and assignment.primary in volume.draining:
            out.append(self._draining(assignment.primary))
        missing = volume.replicas - len(assignment.replicas)
        if missing > 0 and headline.reason is Reason.SERVED:
            out.append(
                Finding(
                    Reason.DEGRADED,
                    f"{len(assignment.replicas)} of {volume.replicas} copies placed: no spare node "
                    f"with {format_size(volume.size)} free",
                    "add a node or free space",
                    facts={"copies": len(assignment.replicas), "wanted": volume.replicas},
                )
            )
        return out

    def _draining(self, node: str) -> Finding:
        return Finding(
            Reason.DRAINING,
            f"node {node} is being drained: its copy is moved off it",
            f"nothing (sparrow node undrain {node} to stop)",
            node=node,
        )

    def _heartbeat_age(self, node: str) -> float | None:
        for view in self.observations.nodes(self.now):
            if view.node_id == node:
                return view.last_heartbeat_age
        return None


# -- the CLI's text -----------------------------------------------------------------------------------


def render(body: Mapping[str, Any]) -> str:
    """The human form of an explanation's JSON (:meth:`Explanation.json`), for the CLI."""
    name = body["volume"]
    state = "served" if body["served"] else "NOT served"
    lines = [f"volume {name}: {state} ({body['reason']})"]
    for finding in body["findings"]:
        since = ""
        if finding.get("since") is not None:
            since = f" (since {finding['since']}, {finding['since_seconds']:g} s ago)"
        lines.append(f"  {finding['reason']}: {finding['text']}{since}")
        if finding.get("action"):
            lines.append(f"    what to do: {finding['action']}")
    skipped = body.get("skipped_at_start") or []
    if skipped:
        lines.append("  skipped at start:")
        lines.extend(f"    on {s['node']}: {s['reason']}" for s in skipped)
    unsupported = body.get("unsupported_commands") or []
    if unsupported:
        lines.append(
            "  SCSI commands answered as unsupported (opcode, service action, count, last initiator):"
        )
        for u in unsupported:
            sa = "-" if u["service_action"] is None else f"0x{u['service_action']:02x}"
            lines.append(f"    on {u['node']}: 0x{u['opcode']:02x} {sa} x{u['count']} {u['last_initiator']}")
    # What nodes reported is in these lines: no control character reaches the terminal raw, and
    # none (a newline) can forge a line of its own (sparrow.termtext).
    return "\n".join(printable(line) for line in lines)
