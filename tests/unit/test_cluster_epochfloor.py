"""sparrow.cluster.epochfloor through the ControlLoop (sans-IO, ``now`` passed in): an authority
behind the nodes (a restore) never announces an epoch at or below one a node reported, and mints
past it with the node that was primary there."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.controller import StatusKind
from sparrow.cluster.epochfloor import EpochFloor
from sparrow.cluster.messages import Heartbeat, Role
from sparrow.master.control import ControlLoop, restore
from store.migrations import AUTHORITY_FILE
from tests.unit.test_master_control import TIMING, add_volume, hello, observation, report, store

__all__ = ["store"]  # the fixture

SAFE = TIMING.lease_seconds + TIMING.margin


def placed(store: AuthorityStore, floor: EpochFloor | None = None) -> tuple[ControlLoop, str]:
    """A volume placed on n1 at epoch 1 by a first master; then a second master (the restored
    one) on the same authority, with ``floor``."""
    first = restore(store, TIMING, now=0.0)
    report(first, store, hello("n1"), 0.0)
    report(first, store, hello("n2"), 0.0)
    vol = add_volume(store, replicas=2)
    (published,) = first.step(1.0).published
    assert (published.epoch, published.primary) == (1, "n1")
    return restore(store, TIMING, now=100.0, epoch_floor=floor), vol.volume_id


def heartbeat(control: ControlLoop, node: str, now: float, volume_id: str, epoch: int, role: Role) -> None:
    beat = Heartbeat(seq=int(now * 10), observations=(observation(volume_id, epoch, role),))
    control.observations.record(beat, node, now)


def test_a_volume_a_node_reports_above_the_authority_is_held_then_minted_past_it(
    store: AuthorityStore, tmp_path: Path
) -> None:
    control, volume_id = placed(store, EpochFloor(TIMING.lease_seconds, TIMING.margin))
    report(control, store, hello("n2"), 100.0)
    heartbeat(control, "n2", 100.0, volume_id, 4, Role.PRIMARY)  # n2 became primary at 4 after the backup
    assert control.assignments_for("n2") == ()  # the Ack built now names no epoch 1
    heartbeat(control, "n2", 100.5, volume_id, 0, Role.NONE)  # it closed the volume: reports nothing
    report(control, store, hello("n1"), 100.5, observation(volume_id, 1, Role.PRIMARY))
    assert control.assignments_for("n1") == ()  # remembered: n1 is not handed epoch 1 either

    result = control.step(101.0)  # not yet: a lease granted from an earlier Ack may still run
    assert result.published == ()
    status = control.status(volume_id)
    assert status is not None and status.kind is StatusKind.WAITING_FOR_NODE
    assert "n2 reported epoch 4" in str(status.reason) and "leases to lapse" in str(status.reason)

    heartbeat(control, "n2", 101.0 + SAFE, volume_id, 4, Role.PRIMARY)
    (minted,) = control.step(101.0 + SAFE).published
    assert (minted.epoch, minted.primary, minted.replicas, minted.in_sync) == (5, "n2", ("n2", "n1"), ("n2",))
    query = "SELECT epoch, primary_node, replicas FROM assignments WHERE volume_id = ? ORDER BY epoch"
    rows = sqlite3.connect(tmp_path / AUTHORITY_FILE).execute(query, (volume_id,))
    # the epochs the nodes saw are recorded unplaced (the history stays contiguous), never announced
    assert [tuple(r) for r in rows][1:] == [
        (2, None, "[]"), (3, None, "[]"), (4, None, "[]"), (5, "n2", '["n2", "n1"]')
    ]  # fmt: skip
    control.step(102.0 + SAFE)
    assert control.assignments_for("n2") == (minted,)


def test_without_the_floor_the_restored_authority_would_announce_its_older_epoch(
    store: AuthorityStore,
) -> None:
    control, volume_id = placed(store, None)
    report(control, store, hello("n2"), 100.0)
    heartbeat(control, "n2", 100.0, volume_id, 4, Role.PRIMARY)
    assert [a.epoch for a in control.assignments_for("n2")] == [1]


def test_after_a_restore_no_ack_is_sent_until_the_hold_is_over(store: AuthorityStore) -> None:
    ended: list[bool] = []
    hold = EpochFloor(TIMING.lease_seconds, TIMING.margin, hold_until=100.0 + TIMING.dead_after,
                      on_hold_end=lambda: ended.append(True))  # fmt: skip
    control, volume_id = placed(store, hold)
    assert control.holding
    report(control, store, hello("n1"), 100.0, observation(volume_id, 1, Role.PRIMARY))
    assert control.step(101.0).published == ()
    status = control.status(volume_id)
    assert status is not None and "restored from a backup" in str(status.reason)
    assert not ended
    report(control, store, hello("n2"), 101.0, observation(volume_id, 3, Role.PRIMARY))
    (minted,) = control.step(100.0 + TIMING.dead_after).published  # no Ack since the start: at once
    assert (minted.epoch, minted.primary) == (4, "n2")
    assert ended == [True] and not control.holding


def test_with_no_live_primary_at_the_highest_epoch_the_volume_waits(store: AuthorityStore) -> None:
    control, volume_id = placed(store, EpochFloor(TIMING.lease_seconds, TIMING.margin))
    report(control, store, hello("n2"), 100.0, observation(volume_id, 3, Role.REPLICA))
    assert control.step(100.0 + SAFE).published == ()
    status = control.status(volume_id)
    assert status is not None and "waiting for its primary at epoch 3" in str(status.reason)
    assert control.assignments_for("n1") == ()
