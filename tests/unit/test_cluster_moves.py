"""Operator moves (sparrow.cluster.moves): planned failover, drain, rebuild; driven with `now`."""

from __future__ import annotations

import pytest

from sparrow.cluster.controller import (
    AssignmentAsk,
    Decision,
    PublishedAssignment,
    StatusKind,
    TopologyController,
    VolumeStatus,
)
from sparrow.cluster.messages import Assignment, Role, SyncState
from sparrow.cluster.moves import MoveRefused, OperatorMoves
from tests.unit.test_cluster_controller import (
    VOL_A,
    Cluster,
    assignment,
    desired,
    obs,
    primary_saying,
)

THREE = ("n1", "n2", "n3")
OK = VolumeStatus(None, None, StatusKind.OK)


def cluster_of(
    a: Assignment, *, spare: tuple[str, ...] = (), in_sync_report: tuple[str, ...] | None = None
) -> Cluster:
    """Every copy of ``a`` alive at 10 and reporting its epoch; the primary reports the copies of
    ``in_sync_report`` (default: ``a.in_sync``) IN_SYNC and the others SYNCING."""
    cluster = Cluster()
    for node in a.replicas:
        cluster.join(node, 0.0)
    for node in spare:
        cluster.join(node, 10.0)
    report = a.in_sync if in_sync_report is None else in_sync_report
    states = tuple((n, SyncState.IN_SYNC if n in report else SyncState.SYNCING, 0) for n in a.replicas[1:])
    cluster.beat(a.replicas[0], 10.0, primary_saying(*states, epoch=a.epoch))
    for node in a.replicas[1:]:
        cluster.beat(node, 10.0, obs(a.epoch, Role.REPLICA, write_position=100))
    return cluster


def step(
    moves: OperatorMoves,
    cluster: Cluster,
    a: Assignment,
    now: float = 10.0,
    *,
    replicas: int = 3,
    draining: frozenset[str] = frozenset(),
    decision: Decision | None = None,
) -> tuple[tuple[AssignmentAsk, ...], VolumeStatus]:
    want = moves.adjust([desired(replicas=replicas)])
    current = {VOL_A: PublishedAssignment(a, published_at=0.0)}
    base = decision if decision is not None else Decision((), {VOL_A: OK})
    out = moves.apply(base, want, current, cluster.store, draining, now)
    return out.asks, out.status[VOL_A]


# -- planned failover --------------------------------------------------------------------------------


def test_planned_failover_asks_the_target_as_primary_and_keeps_the_old_one_out_of_sync() -> None:
    a = assignment(THREE)
    cluster = cluster_of(a)
    moves = OperatorMoves(TopologyController())
    request = moves.request_failover(a, cluster.store, 10.0, "n3")
    assert request.target == "n3"
    asks, status = step(moves, cluster, a)
    reason = "planned failover to n3"
    assert asks == (AssignmentAsk(VOL_A, "n3", ("n3", "n2", "n1"), reason, in_sync=("n3", "n2")),)
    assert (status.kind, status.reason) == (StatusKind.MOVING, reason)
    # Published under the next epoch: the request is done, nothing more is asked.
    after = assignment(("n3", "n2", "n1"), epoch=4, in_sync=("n3", "n2"))
    assert step(moves, cluster, after)[0] == ()
    assert moves.pending(VOL_A) is None and VOL_A not in moves.refused


def test_planned_failover_without_a_target_picks_the_best_eligible_replica() -> None:
    a = assignment(THREE, in_sync=("n1", "n3"))
    cluster = cluster_of(a)
    moves = OperatorMoves(TopologyController())
    assert moves.request_failover(a, cluster.store, 10.0, None).target == "n3"


@pytest.mark.parametrize(
    ("to", "in_sync", "report", "message"),
    [
        ("n1", THREE, THREE, "already the primary"),
        ("n9", THREE, THREE, "holds no copy"),
        ("n2", ("n1", "n3"), ("n1", "n3"), "not in sync"),
        ("n2", THREE, ("n1", "n3"), "not ready"),  # recorded in sync, the primary says otherwise
        (None, ("n1",), ("n1",), "no in-sync replica"),
    ],
)
def test_planned_failover_is_refused_with_the_reason(
    to: str | None, in_sync: tuple[str, ...], report: tuple[str, ...], message: str
) -> None:
    a = assignment(THREE, in_sync=in_sync)
    cluster = cluster_of(a, in_sync_report=report)
    moves = OperatorMoves(TopologyController())
    with pytest.raises(MoveRefused, match=message):
        moves.request_failover(a, cluster.store, 10.0, to)
    assert moves.pending(VOL_A) is None


def test_planned_failover_to_a_dead_or_draining_node_is_refused() -> None:
    a = assignment(THREE)
    cluster = cluster_of(a)
    moves = OperatorMoves(TopologyController())
    with pytest.raises(MoveRefused, match="draining"):
        moves.request_failover(a, cluster.store, 10.0, "n2", draining={"n2"})
    cluster.beat("n1", 19.0, primary_saying(("n2", SyncState.IN_SYNC, 0), ("n3", SyncState.IN_SYNC, 0)))
    with pytest.raises(MoveRefused, match="node n2 is not alive"):
        moves.request_failover(a, cluster.store, 19.0, "n2")  # silent since 10: dead at 19
    with pytest.raises(MoveRefused, match="the primary n1 is not alive"):
        moves.request_failover(a, cluster.store, 28.0, "n3")


def test_a_failover_waits_while_the_controller_asks_and_gives_up_when_the_target_falls_behind() -> None:
    a = assignment(THREE)
    cluster = cluster_of(a)
    moves = OperatorMoves(TopologyController())
    moves.request_failover(a, cluster.store, 10.0, "n2")
    theirs = AssignmentAsk(VOL_A, "n1", THREE, "replica n3 dropped", in_sync=("n1", "n2"))
    busy = Decision((theirs,), {VOL_A: VolumeStatus("replica n3 dropped", 10.0, StatusKind.DEGRADED)})
    asks, status = step(moves, cluster, a, decision=busy)
    assert asks == (theirs,) and status.kind is StatusKind.DEGRADED
    assert moves.pending(VOL_A) is not None
    # The primary now reports n2 behind: the failover is given up, with the reason.
    cluster.beat("n1", 10.5, primary_saying(("n2", SyncState.FAILED, 0), ("n3", SyncState.IN_SYNC, 0)))
    assert step(moves, cluster, a, 10.5)[0] == ()
    assert moves.pending(VOL_A) is None
    assert "not ready" in moves.refused[VOL_A]


def test_a_second_move_of_the_same_volume_is_refused_while_one_runs() -> None:
    a = assignment(THREE)
    cluster = cluster_of(a)
    moves = OperatorMoves(TopologyController())
    moves.request_failover(a, cluster.store, 10.0, "n2")
    with pytest.raises(MoveRefused, match="in progress"):
        moves.request_rebuild(a, "n3", 10.0)


# -- drain ---------------------------------------------------------------------------------------------


def test_a_draining_node_gets_no_new_copy() -> None:
    cluster = Cluster()
    for node in ("n1", "n2", "n3", "n4"):
        cluster.join(node, 0.0, free=(200 if node == "n1" else 100) << 20)
    ctl = TopologyController()
    decision = ctl.decide([desired(replicas=3)], {}, cluster.store, cluster.leases, 1.0, draining={"n1"})
    (ask,) = decision.asks
    assert "n1" not in ask.replicas and len(ask.replicas) == 3


def test_drain_moves_the_primary_to_an_in_sync_replica_first() -> None:
    a = assignment(THREE)
    cluster = cluster_of(a, spare=("n4",))
    moves = OperatorMoves(TopologyController())
    asks, status = step(moves, cluster, a, draining=frozenset({"n1"}))
    reason = "drain n1: move the primary to n2"
    assert asks == (AssignmentAsk(VOL_A, "n2", ("n2", "n3", "n1"), reason, in_sync=("n2", "n3")),)
    assert status == VolumeStatus(reason, 10.0, StatusKind.MOVING)
    assert moves.drain_status == {"n1": "moving 1 volume off it"}


def test_drain_of_an_in_sync_copy_adds_a_copy_waits_until_it_is_in_sync_then_drops_the_old_one() -> None:
    draining = frozenset({"n3"})
    a = assignment(THREE)
    cluster = cluster_of(a, spare=("n4",))
    moves = OperatorMoves(TopologyController())
    asks, _ = step(moves, cluster, a, draining=draining)
    add = "drain n3: add a copy on n4 first"
    assert asks == (AssignmentAsk(VOL_A, "n1", (*THREE, "n4"), add, in_sync=THREE),)
    # Published: n4 is a new copy outside the in-sync set; the drain waits for it.
    four = assignment((*THREE, "n4"), epoch=4, in_sync=THREE)
    cluster = cluster_of(four)
    asks, status = step(moves, cluster, four, draining=draining)
    assert asks == () and status.reason == "draining n3: waiting for the copies on n4 to be in sync"
    assert moves.drain_status == {"n3": status.reason}
    # The controller records n4 in sync (resync): now the drained copy goes.
    synced = assignment((*THREE, "n4"), epoch=5)
    cluster = cluster_of(synced)
    asks, _ = step(moves, cluster, synced, draining=draining)
    drop = "drain n3: drop the copy (3 in-sync copies elsewhere)"
    assert asks == (AssignmentAsk(VOL_A, "n1", ("n1", "n2", "n4"), drop, in_sync=("n1", "n2", "n4")),)
    done = assignment(("n1", "n2", "n4"), epoch=6)
    assert step(moves, cluster_of(done), done, draining=draining)[0] == ()
    assert moves.drain_status == {"n3": "drained: holds no copy"}


def test_drain_without_a_spare_node_waits_and_says_why() -> None:
    a = assignment(THREE)
    moves = OperatorMoves(TopologyController())
    asks, status = step(moves, cluster_of(a), a, draining=frozenset({"n3"}))
    assert asks == ()
    assert status.reason == "draining n3: waiting for a spare node to take its copy"
    assert moves.drain_status == {"n3": status.reason}


def test_drain_replaces_a_stale_copy_at_once() -> None:
    a = assignment(THREE, in_sync=("n1", "n2"))
    moves = OperatorMoves(TopologyController())
    asks, _ = step(moves, cluster_of(a, spare=("n4",)), a, draining=frozenset({"n3"}))
    reason = "drain n3: replace its stale copy with n4"
    assert asks == (AssignmentAsk(VOL_A, "n1", ("n1", "n2", "n4"), reason, in_sync=("n1", "n2")),)


def test_after_an_undrain_the_copy_the_drain_added_goes_while_it_is_stale() -> None:
    four = assignment((*THREE, "n4"), epoch=4, in_sync=THREE)
    moves = OperatorMoves(TopologyController())
    asks, status = step(moves, cluster_of(four), four)  # n3 no longer draining
    reason = "drop the extra copy on n4 (4 copies, 3 wanted)"
    assert asks == (AssignmentAsk(VOL_A, "n1", THREE, reason, in_sync=THREE),)
    assert status.kind is StatusKind.MOVING
    synced = assignment((*THREE, "n4"), epoch=5)  # every copy in sync: none is dropped
    assert step(moves, cluster_of(synced), synced)[0] == ()


# -- rebuild -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "in_sync", "message"),
    [
        ("n1", THREE, "is the primary"),
        ("n2", ("n1", "n2"), "last in-sync replica"),
        ("n9", THREE, "holds no copy"),
    ],
)
def test_rebuild_is_refused(node: str, in_sync: tuple[str, ...], message: str) -> None:
    a = assignment(THREE, in_sync=in_sync)
    with pytest.raises(MoveRefused, match=message):
        OperatorMoves(TopologyController()).request_rebuild(a, node, 10.0)


def test_rebuild_releases_the_copy_waits_for_the_node_then_adds_it_back_outside_the_in_sync_set() -> None:
    a = assignment(THREE)
    cluster = cluster_of(a)
    moves = OperatorMoves(TopologyController())
    moves.request_rebuild(a, "n3", 10.0)
    # While it runs, the controller sees one copy fewer (it does not top the volume up elsewhere).
    assert [v.replicas for v in moves.adjust([desired(replicas=3)])] == [2]
    asks, _ = step(moves, cluster, a)
    release = "rebuild the copy on n3: release it"
    assert asks == (AssignmentAsk(VOL_A, "n1", ("n1", "n2"), release, in_sync=("n1", "n2")),)
    released = assignment(("n1", "n2"), epoch=4)
    cluster.beat("n1", 10.2, primary_saying(("n2", SyncState.IN_SYNC, 0), epoch=4))
    cluster.beat("n2", 10.2, obs(4, Role.REPLICA))
    asks, status = step(moves, cluster, released, 10.2, replicas=2)
    assert asks == () and status.reason == "rebuild the copy on n3: waiting for n3 to release it"
    cluster.beat("n3", 10.3)  # its heartbeat no longer reports the volume: released
    asks, _ = step(moves, cluster, released, 10.3, replicas=2)
    readd = "rebuild the copy on n3: add it back as a new copy"
    assert asks == (AssignmentAsk(VOL_A, "n1", THREE, readd, in_sync=("n1", "n2")),)
    back = assignment(THREE, epoch=5, in_sync=("n1", "n2"))
    assert step(moves, cluster, back, 10.4)[0] == ()
    assert moves.pending(VOL_A) is None
    assert [v.replicas for v in moves.adjust([desired(replicas=3)])] == [3]


def test_an_ask_right_after_the_rebuilt_copy_is_published_back_gets_the_reason_for_that_ask() -> None:
    """The add-back is published but the controller has not stepped since: the rebuild is over
    (resync copies the copy afresh), so a new ask is judged on its own, not refused as busy."""
    a = assignment(THREE)
    cluster = cluster_of(a)
    moves = OperatorMoves(TopologyController())
    moves.request_rebuild(a, "n3", 10.0)
    step(moves, cluster, a)
    released = assignment(("n1", "n2"), epoch=4)
    cluster.beat("n3", 10.3)
    step(moves, cluster, released, 10.3, replicas=2)
    assert moves.pending(VOL_A) is not None
    back = assignment(THREE, epoch=5, in_sync=("n1", "n2"))
    with pytest.raises(MoveRefused, match="the copy on n2 is the last in-sync replica"):
        moves.request_rebuild(back, "n2", 10.4)
    assert moves.pending(VOL_A) is None
    # Before the add-back is published, the rebuild is still what holds the volume.
    moves.request_rebuild(a, "n3", 10.5)
    with pytest.raises(MoveRefused, match=r"a rebuild of the copy on n3 of .* is in progress"):
        moves.request_rebuild(a, "n2", 10.5)
