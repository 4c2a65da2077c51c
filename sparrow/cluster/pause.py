"""Pause and resume: the operator's wish turned into asks (docs/cluster.md, "Pause and resume").

Sans-IO. The authority records what the operator asked for (``VolumeRecord.paused``, schema v7)
and, per published epoch, whether that assignment pauses the volume (``Assignment.paused``). The
control loop calls :func:`apply_pause` on every decision, after the controller's rules, the
operator moves and the epoch floor:

1. **Every ask carries the wish.** Whatever an ask is for (a placement, a promotion, a replaced
   replica, a change of the in-sync set, a planned failover), it is published with ``paused`` set
   to the volume's wish: a paused volume that fails over stays paused on its new primary, and a
   volume paused before it was placed is placed paused.
2. **A change of the wish is an ask.** A volume whose current assignment has a primary, that no
   other rule asks for at this step, and whose assignment's ``paused`` differs from the wish, gets
   an ask for the same placement (primary, copies, in-sync set) with the wish: the Publisher mints
   the next epoch for it like for any other ask; nothing here mints or writes. (With another ask
   in the same step, rule 1 carries the change.) A volume without a primary keeps its status: its
   next placement carries the wish.
3. **Status.** A volume paused as asked, with nothing else to report, has status ``PAUSED``
   ("paused by the operator"); while a pause or a resume is being published, ``PAUSED`` ("pausing")
   or ``MOVING`` ("resuming"). Any other status (degraded, waiting for a lease ...) is kept: the
   pause is then one more fact about the volume, in ``paused``, not its only one.

What pause means for the data path (docs/replication.md, "Pause"): the primary refuses reads and
writes with NOT READY, so no write reaches any copy and the in-sync set stays as it is; resyncs and
checkpoints go on (they copy what is there). Failover is unchanged (rule 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from sparrow.cluster.controller import (
    AssignmentAsk,
    Decision,
    PublishedAssignment,
    StatusKind,
    VolumeStatus,
)

PAUSED_REASON = "paused by the operator"
PAUSING_REASON = "pausing: asked by the operator"
RESUMING_REASON = "resuming: asked by the operator"


def with_pause(ask: AssignmentAsk, wanted: Mapping[str, bool]) -> AssignmentAsk:
    """``ask`` carrying the volume's wish (rule 1); the same object when it already does."""
    paused = wanted.get(ask.volume_id, False)
    return ask if ask.paused == paused else dataclasses.replace(ask, paused=paused)


def apply_pause(
    decision: Decision,
    wanted: Mapping[str, bool],
    current: Mapping[str, PublishedAssignment],
    now: float,
    previous: Mapping[str, VolumeStatus] | None = None,
) -> Decision:
    """The decision with every ask carrying the wish, an ask for each volume whose wish changed,
    and the statuses of rule 3. ``wanted`` maps each live volume's id to the operator's wish;
    ``previous`` (the last step's statuses) keeps a status's ``since`` while its kind lasts."""

    def since(volume_id: str, kind: StatusKind) -> float:
        before = None if previous is None else previous.get(volume_id)
        if before is not None and before.kind is kind and before.since is not None:
            return before.since
        return now

    asks = [with_pause(ask, wanted) for ask in decision.asks]
    asked = {ask.volume_id for ask in asks}
    status = dict(decision.status)
    for volume_id, paused in sorted(wanted.items()):
        published = current.get(volume_id)
        if published is None or volume_id not in status:
            continue
        assignment = published.assignment
        if volume_id not in asked and assignment.primary is not None and assignment.paused != paused:
            asks.append(
                AssignmentAsk(
                    volume_id=volume_id,
                    primary=assignment.primary,
                    replicas=assignment.replicas,
                    reason=PAUSING_REASON if paused else RESUMING_REASON,
                    in_sync=assignment.in_sync,
                    paused=paused,
                )
            )
            kind = StatusKind.PAUSED if paused else StatusKind.MOVING
            reason = PAUSING_REASON if paused else RESUMING_REASON
            status[volume_id] = VolumeStatus(reason, since(volume_id, kind), kind)
        elif paused and assignment.paused and status[volume_id].kind is StatusKind.OK:
            kind = StatusKind.PAUSED
            status[volume_id] = VolumeStatus(PAUSED_REASON, since(volume_id, kind), kind)
    asks.sort(key=lambda ask: ask.volume_id)
    return Decision(tuple(asks), status)
