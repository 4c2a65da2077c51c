"""TopologyController (docs/cluster.md, "TopologyController"), driven with an injected clock."""

from __future__ import annotations

import pathlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow.cluster import controller as controller_module
from sparrow.cluster import observations as observations_module
from sparrow.cluster.controller import (
    AssignmentAsk,
    DesiredVolume,
    PublishedAssignment,
    StatusKind,
    TopologyController,
    VolumeStatus,
)
from sparrow.cluster.lease import MasterLeases
from sparrow.cluster.messages import (
    Assignment,
    Health,
    Heartbeat,
    Hello,
    ReplicaState,
    Role,
    SyncState,
    VolumeObservation,
)
from sparrow.cluster.observations import ObservationStore

VOL_A = "a" * 32
VOL_B = "b" * 32
VOL_C = "c" * 32
MiB = 1 << 20
DEAD_AFTER = 8.0
LEASE = 5.0
MARGIN = 1.0


def hello(node_id: str, free: int = 100 * MiB, incarnation: int = 1) -> Hello:
    return Hello(node_id, incarnation, f"{node_id}:3260", f"{node_id}:7000", f"{node_id}:8080", 1 << 40, free)


def obs(
    epoch: int,
    role: Role,
    *,
    volume_id: str = VOL_A,
    health: Health = Health.OK,
    write_position: int = 0,
    replica_states: tuple[ReplicaState, ...] = (),
    converged: bool = True,
) -> VolumeObservation:
    return VolumeObservation(volume_id, epoch, role, health, write_position, replica_states, converged)


def desired(volume_id: str = VOL_A, size: int = 10 * MiB, replicas: int = 2) -> DesiredVolume:
    return DesiredVolume(
        volume_id=volume_id, name=f"vol-{volume_id[0]}", size=size, block_size=512, replicas=replicas
    )


def assignment(
    replicas: tuple[str, ...],
    epoch: int = 3,
    volume_id: str = VOL_A,
    size: int = 10 * MiB,
    in_sync: tuple[str, ...] | None = None,
) -> Assignment:
    """``in_sync`` None: every copy in sync (a volume whose copies all hold every write)."""
    primary = replicas[0] if replicas else None
    return Assignment(
        volume_id=volume_id,
        name=f"vol-{volume_id[0]}",
        size=size,
        block_size=512,
        epoch=epoch,
        primary=primary,
        primary_portal=None if primary is None else f"{primary}:3260",
        replicas=replicas,
        in_sync=replicas if in_sync is None else in_sync,
    )


class Cluster:
    """An ObservationStore and MasterLeases fed as a heartbeat server would feed them."""

    def __init__(self, started_at: float | None = None) -> None:
        self.store = ObservationStore(dead_after=DEAD_AFTER, started_at=started_at)
        self.leases = MasterLeases(margin=MARGIN)
        self.seq = 0

    def join(self, node_id: str, now: float, free: int = 100 * MiB) -> None:
        self.store.record(hello(node_id, free), node_id, now)
        self.beat(node_id, now)

    def beat(self, node_id: str, now: float, *observations: VolumeObservation) -> None:
        self.seq += 1
        self.store.record(Heartbeat(self.seq, observations), node_id, now)
        self.leases.granted(node_id, now, LEASE)


def decide(
    cluster: Cluster,
    want: list[DesiredVolume],
    current: dict[str, PublishedAssignment],
    now: float,
    controller: TopologyController | None = None,
) -> tuple[tuple[AssignmentAsk, ...], dict[str, VolumeStatus]]:
    ctl = controller or TopologyController(converge_deadline=30.0)
    decision = ctl.decide(want, current, cluster.store, cluster.leases, now)
    return decision.asks, dict(decision.status)


# -- placement ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "replicas", "expected"),
    [
        ({"n1": 100, "n2": 300, "n3": 200}, 1, ("n2",)),
        ({"n1": 100, "n2": 300, "n3": 200}, 2, ("n2", "n3")),
        ({"n1": 100, "n2": 300, "n3": 200}, 3, ("n2", "n3", "n1")),
        ({"n3": 200, "n1": 200, "n2": 200}, 3, ("n1", "n2", "n3")),  # ties by node id
        ({"n1": 5, "n2": 300, "n3": 10}, 2, ("n2", "n3")),  # n1 has no room for 10 MiB
    ],
)
def test_new_volume_placed_on_distinct_nodes_most_free_first(
    free: dict[str, int], replicas: int, expected: tuple[str, ...]
) -> None:
    cluster = Cluster()
    for node, mib in free.items():
        cluster.join(node, 0.0, free=mib * MiB)
    asks, status = decide(cluster, [desired(replicas=replicas)], {}, 1.0)
    assert asks == (AssignmentAsk(VOL_A, expected[0], expected, asks[0].reason, in_sync=expected),)
    assert status[VOL_A].kind is StatusKind.UNPLACED


@pytest.mark.parametrize(
    ("free", "dead", "replicas", "have"),
    [
        ({"n1": 100}, (), 2, 1),
        ({"n1": 100, "n2": 100}, ("n2",), 2, 1),  # a dead node does not count
        ({}, (), 1, 0),
        ({"n1": 100, "n2": 100}, (), 3, 2),
    ],
)
def test_not_enough_live_nodes(free: dict[str, int], dead: tuple[str, ...], replicas: int, have: int) -> None:
    cluster = Cluster()
    for node, mib in free.items():
        cluster.join(node, -20.0 if node in dead else 0.0, free=mib * MiB)
    asks, status = decide(cluster, [desired(replicas=replicas)], {}, 1.0)
    assert asks == ()
    assert status[VOL_A].reason == f"not enough live nodes (have {have}, need {replicas})"
    assert status[VOL_A].kind is StatusKind.NOT_ENOUGH_NODES


def test_a_node_without_room_does_not_count_and_the_status_says_so() -> None:
    cluster = Cluster()
    cluster.join("n1", 0.0, free=100 * MiB)
    cluster.join("n2", 0.0, free=9 * MiB)
    asks, status = decide(cluster, [desired(replicas=2)], {}, 1.0)
    assert asks == ()
    size = desired(replicas=2).size
    assert status[VOL_A].reason == f"not enough free space: 1 of 2 live nodes have {size} bytes free, need 2"
    assert status[VOL_A].kind is StatusKind.NOT_ENOUGH_NODES


def test_one_decision_accounts_for_space_it_already_placed() -> None:
    cluster = Cluster()
    cluster.join("n1", 0.0, free=25 * MiB)
    cluster.join("n2", 0.0, free=20 * MiB)
    vols = [desired(VOL_A, size=10 * MiB, replicas=1), desired(VOL_B, size=10 * MiB, replicas=1)]
    vols.append(desired(VOL_C, size=10 * MiB, replicas=1))
    asks, status = decide(cluster, vols, {}, 1.0)
    # A -> n1 (25 left -> 15), B -> n2 (20 -> 10), C -> n1 (15 -> 5)
    assert [(a.volume_id, a.primary) for a in asks] == [(VOL_A, "n1"), (VOL_B, "n2"), (VOL_C, "n1")]
    cluster.join("n1", 0.0, free=15 * MiB)
    cluster.join("n2", 0.0, free=15 * MiB)
    asks, status = decide(cluster, [*vols, desired("d" * 32, size=10 * MiB, replicas=1)], {}, 1.0)
    assert [a.volume_id for a in asks] == [VOL_A, VOL_B]
    assert status[VOL_C].kind is StatusKind.NOT_ENOUGH_NODES


def test_deterministic_and_independent_of_desired_order() -> None:
    cluster = Cluster()
    for node in ("n1", "n2", "n3"):
        cluster.join(node, 0.0)
    vols = [desired(VOL_C, replicas=3), desired(VOL_A, replicas=1), desired(VOL_B, replicas=2)]
    first = TopologyController().decide(vols, {}, cluster.store, cluster.leases, 1.0)
    second = TopologyController().decide(list(reversed(vols)), {}, cluster.store, cluster.leases, 1.0)
    assert first == second
    assert [a.volume_id for a in first.asks] == [VOL_A, VOL_B, VOL_C]


def test_duplicate_desired_volume_rejected() -> None:
    with pytest.raises(ValueError):
        decide(Cluster(), [desired(), desired()], {}, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"replicas": 0}, {"replicas": 4}, {"size": 0}, {"size": 1000}, {"block_size": 1024}, {"name": "Bad"}],
)
def test_desired_volume_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "volume_id": VOL_A,
        "name": "v",
        "size": 4096,
        "block_size": 512,
        "replicas": 1,
    }
    with pytest.raises(ValueError):
        DesiredVolume(**{**base, **kwargs})  # type: ignore[arg-type]


# -- healthy and stuck ----------------------------------------------------------------------------


def converged_pair(
    cluster: Cluster, now: float, epoch: int = 3, converged: tuple[bool, bool] = (True, True)
) -> None:
    cluster.beat("n1", now, obs(epoch, Role.PRIMARY, converged=converged[0]))
    cluster.beat("n2", now, obs(epoch, Role.REPLICA, converged=converged[1]))


def test_healthy_assignment_needs_nothing() -> None:
    cluster = Cluster()
    cluster.join("n1", 0.0)
    cluster.join("n2", 0.0)
    cluster.join("n3", 0.0)
    converged_pair(cluster, 40.0)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    asks, status = decide(cluster, [desired()], current, 41.0)
    assert asks == ()
    assert status[VOL_A] == VolumeStatus(reason=None, since=None, kind=StatusKind.OK)


@pytest.mark.parametrize(
    ("now", "observed", "stuck"),
    [
        (29.9, "none", False),  # within the deadline nothing is stuck
        (30.0, "none", True),
        (30.0, "converged", False),
        (30.0, "old-epoch", True),
        (30.0, "replica-not-converged", True),
    ],
)
def test_stuck_detection(now: float, observed: str, stuck: bool) -> None:
    cluster = Cluster()
    cluster.join("n1", 0.0)
    cluster.join("n2", 0.0)
    if observed == "converged":
        converged_pair(cluster, now)
    elif observed == "old-epoch":
        converged_pair(cluster, now, epoch=2)
    elif observed == "replica-not-converged":
        converged_pair(cluster, now, converged=(True, False))
    else:
        cluster.beat("n1", now)
        cluster.beat("n2", now)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    asks, status = decide(cluster, [desired()], current, now)
    assert asks == ()
    if stuck:
        assert status[VOL_A].reason == "stuck: not converged after 30s"
        assert status[VOL_A].kind is StatusKind.STUCK
    else:
        assert status[VOL_A].reason is None


def test_since_is_when_the_condition_began() -> None:
    cluster = Cluster()
    cluster.join("n1", 0.0)
    cluster.join("n2", 0.0)
    ctl = TopologyController(converge_deadline=10.0)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    _, status = decide(cluster, [desired()], current, 5.0, ctl)
    assert status[VOL_A].since is None
    cluster.beat("n1", 11.0)
    cluster.beat("n2", 11.0)
    _, status = decide(cluster, [desired()], current, 11.0, ctl)
    assert status[VOL_A] == VolumeStatus("stuck: not converged after 10s", 11.0, StatusKind.STUCK)
    cluster.beat("n1", 15.0)
    cluster.beat("n2", 15.0)
    _, status = decide(cluster, [desired()], current, 15.0, ctl)
    assert status[VOL_A].since == 11.0
    converged_pair(cluster, 16.0)
    _, status = decide(cluster, [desired()], current, 16.0, ctl)
    assert status[VOL_A] == VolumeStatus(None, None, StatusKind.OK)


# -- dead primary ---------------------------------------------------------------------------------


def dead_primary_cluster(
    *,
    lease_at: float = 0.0,
    replica_obs: VolumeObservation | None = None,
    primary_obs: VolumeObservation | None = None,
) -> Cluster:
    """n1 primary (last heard at 0), n2 replica (alive), n3 spare; n1's lease granted at ``lease_at``."""
    cluster = Cluster()
    cluster.join("n1", 0.0)
    if primary_obs is not None:
        cluster.beat("n1", 0.0, primary_obs)
    cluster.leases.granted("n1", lease_at, LEASE)
    cluster.join("n2", 20.0)
    if replica_obs is not None:
        cluster.beat("n2", 20.0, replica_obs)
    cluster.join("n3", 20.0)
    return cluster


CURRENT = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
IN_SYNC_PRIMARY = obs(
    3, Role.PRIMARY, write_position=100, replica_states=(ReplicaState("n2", SyncState.IN_SYNC, 100),)
)
GOOD_REPLICA = obs(3, Role.REPLICA, write_position=100)


def test_dead_primary_waits_for_its_lease() -> None:
    # n1 is dead at 8 (last heartbeat at 0), but its last lease ran until 15 (+1 margin).
    cluster = dead_primary_cluster(lease_at=10.0, replica_obs=GOOD_REPLICA, primary_obs=IN_SYNC_PRIMARY)
    for now in (8.0, 12.0, 15.999):
        asks, status = decide(cluster, [desired()], CURRENT, now)
        assert asks == ()
        assert status[VOL_A].reason == "waiting for the old primary's lease to expire"
    asks, _ = decide(cluster, [desired()], CURRENT, 16.0)
    assert [(a.primary, a.replicas) for a in asks] == [("n2", ("n2",))]


def test_dead_primary_with_empty_replicas_is_not_promoted() -> None:
    """This issue's replicas hold no data: the replica reports nothing in sync -> no ask."""
    cluster = dead_primary_cluster(
        replica_obs=obs(3, Role.REPLICA, write_position=0), primary_obs=obs(3, Role.PRIMARY, write_position=0)
    )
    asks, status = decide(cluster, [desired()], CURRENT, 20.0)
    assert asks == ()
    assert status[VOL_A].reason == "no eligible replica"
    assert status[VOL_A].kind is StatusKind.NO_ELIGIBLE_REPLICA


def test_eligible_replica_promoted_when_every_condition_holds() -> None:
    cluster = dead_primary_cluster(replica_obs=GOOD_REPLICA, primary_obs=IN_SYNC_PRIMARY)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2", "n3")), published_at=0.0)}
    cluster.beat("n3", 20.0, obs(3, Role.REPLICA, write_position=50))  # alive but behind
    asks, status = decide(cluster, [desired(replicas=3)], current, 20.0)
    # n3 is behind n2: it may lack a write n2 applied, so it is not in sync under the new primary.
    assert asks == (AssignmentAsk(VOL_A, "n2", ("n2", "n3"), "promote n2: primary n1 dead", in_sync=("n2",)),)
    assert status[VOL_A].kind is StatusKind.PROMOTING


@pytest.mark.parametrize(
    ("replica_obs", "primary_obs"),
    [
        pytest.param(None, IN_SYNC_PRIMARY, id="replica-reports-nothing"),
        pytest.param(replace(GOOD_REPLICA, role=Role.NONE), IN_SYNC_PRIMARY, id="role-none"),
        pytest.param(replace(GOOD_REPLICA, role=Role.PRIMARY), IN_SYNC_PRIMARY, id="role-primary"),
        pytest.param(replace(GOOD_REPLICA, epoch=2), IN_SYNC_PRIMARY, id="replica-old-epoch"),
        pytest.param(replace(GOOD_REPLICA, epoch=4), IN_SYNC_PRIMARY, id="replica-other-epoch"),
        pytest.param(replace(GOOD_REPLICA, health=Health.DEGRADED), IN_SYNC_PRIMARY, id="degraded"),
        pytest.param(replace(GOOD_REPLICA, health=Health.FAILED), IN_SYNC_PRIMARY, id="failed"),
        pytest.param(replace(GOOD_REPLICA, write_position=99), IN_SYNC_PRIMARY, id="behind"),
        pytest.param(GOOD_REPLICA, replace(IN_SYNC_PRIMARY, replica_states=()), id="not-listed"),
        pytest.param(
            GOOD_REPLICA,
            replace(IN_SYNC_PRIMARY, replica_states=(ReplicaState("n2", SyncState.SYNCING, 100),)),
            id="syncing",
        ),
        pytest.param(
            GOOD_REPLICA,
            replace(IN_SYNC_PRIMARY, replica_states=(ReplicaState("n3", SyncState.IN_SYNC, 100),)),
            id="other-node-in-sync",
        ),
    ],
)
def test_ineligible_replica_never_promoted(
    replica_obs: VolumeObservation | None, primary_obs: VolumeObservation | None
) -> None:
    cluster = dead_primary_cluster(replica_obs=replica_obs, primary_obs=primary_obs)
    asks, status = decide(cluster, [desired()], CURRENT, 20.0)
    assert asks == ()
    assert status[VOL_A].reason == "no eligible replica"


@pytest.mark.parametrize(
    "primary_obs",
    [
        pytest.param(None, id="primary-reported-nothing"),
        pytest.param(replace(IN_SYNC_PRIMARY, epoch=2), id="old-epoch"),
    ],
)
def test_without_the_primarys_report_at_the_epoch_the_masters_in_sync_record_decides(
    primary_obs: VolumeObservation | None,
) -> None:
    """A primary killed just after an epoch was published (a copy added back, say) never reported
    at it. It acknowledged nothing at that epoch without every copy of ``in_sync``, so a copy the
    master recorded in sync is promoted; one outside the record is not."""
    cluster = dead_primary_cluster(replica_obs=GOOD_REPLICA, primary_obs=primary_obs)
    asks, status = decide(cluster, [desired()], CURRENT, 20.0)
    assert [(a.primary, a.replicas) for a in asks] == [("n2", ("n2",))]
    assert status[VOL_A].kind is StatusKind.PROMOTING
    outside = {VOL_A: PublishedAssignment(assignment(("n1", "n2"), in_sync=("n1",)), published_at=0.0)}
    asks, status = decide(cluster, [desired()], outside, 20.0)
    assert asks == ()
    assert status[VOL_A].reason == "no eligible replica"


def test_dead_replica_is_not_promoted_even_if_it_was_in_sync() -> None:
    cluster = dead_primary_cluster(replica_obs=GOOD_REPLICA, primary_obs=IN_SYNC_PRIMARY)
    asks, status = decide(cluster, [desired()], CURRENT, 28.0)  # n2 last heard at 20
    assert asks == ()
    assert status[VOL_A].reason == "no eligible replica"


def test_promotion_prefers_the_furthest_replica() -> None:
    primary_obs = replace(
        IN_SYNC_PRIMARY,
        replica_states=(
            ReplicaState("n2", SyncState.IN_SYNC, 100),
            ReplicaState("n3", SyncState.IN_SYNC, 120),
        ),
    )
    cluster = dead_primary_cluster(replica_obs=GOOD_REPLICA, primary_obs=primary_obs)
    cluster.beat("n3", 20.0, obs(3, Role.REPLICA, write_position=120))
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2", "n3")), published_at=0.0)}
    asks, _ = decide(cluster, [desired(replicas=3)], current, 20.0)
    assert [(a.primary, a.replicas) for a in asks] == [("n3", ("n3", "n2"))]


def test_a_forged_heartbeat_in_a_dead_primarys_name_vouches_for_nobody() -> None:
    """Issue 7: after a kill -9 of primary n1, one heartbeat under n1's id (a new incarnation)
    listing n3 and n4 IN_SYNC vouches for nobody: only the incarnation that served the volume at
    this epoch may narrow the choice, and without its report the master's own in-sync record
    decides. n4, which the assignment does not name, never qualifies; the promoted copy is one the
    master recorded in sync."""
    cluster = Cluster()
    for node in ("n1", "n2", "n3", "n4"):
        cluster.join(node, 0.0)
    honest = obs(
        3, Role.PRIMARY, write_position=100, replica_states=(ReplicaState("n2", SyncState.SYNCING, 0),)
    )
    cluster.beat("n1", 1.0, honest)
    for node in ("n2", "n3", "n4"):
        cluster.beat(node, 1.0, obs(3, Role.REPLICA, write_position=100))
    # n1 is killed; a liar says Hello as n1 (new incarnation) and one heartbeat, then goes quiet.
    forged = obs(
        3,
        Role.PRIMARY,
        write_position=100,
        replica_states=(
            ReplicaState("n3", SyncState.IN_SYNC, 100),
            ReplicaState("n4", SyncState.IN_SYNC, 100),
        ),
    )
    cluster.store.record(hello("n1", incarnation=2), "n1", 2.0)
    cluster.store.record(Heartbeat(99, (forged,)), "n1", 2.0)
    for node in ("n2", "n3", "n4"):
        cluster.beat(node, 11.0, obs(3, Role.REPLICA, write_position=100))
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2", "n3")), published_at=0.0)}
    assert TopologyController.primary_report(current[VOL_A].assignment, cluster.store) is None
    eligible = TopologyController().eligible_replicas(current[VOL_A].assignment, cluster.store, 11.0)
    assert eligible == ("n2", "n3")  # the master's record, in its order: not the liar's word
    asks, status = decide(cluster, [desired(replicas=3)], current, 11.0)
    (ask,) = asks
    assert ask.primary == "n2" and "n4" not in ask.in_sync
    assert status[VOL_A].kind is StatusKind.PROMOTING


def test_the_incarnation_that_served_the_epoch_still_vouches_after_its_death() -> None:
    cluster = Cluster()
    for node in ("n1", "n2"):
        cluster.join(node, 0.0)
    cluster.beat("n1", 1.0, obs(3, Role.PRIMARY, replica_states=(ReplicaState("n2", SyncState.IN_SYNC, 0),)))
    cluster.beat("n2", 11.0, obs(3, Role.REPLICA))
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    assert TopologyController().eligible_replicas(current[VOL_A].assignment, cluster.store, 11.0) == ("n2",)


def test_primary_unknown_during_master_startup_waits() -> None:
    cluster = Cluster(started_at=100.0)
    cluster.join("n2", 101.0)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    asks, status = decide(cluster, [desired()], current, 102.0)
    assert asks == ()
    assert status[VOL_A].reason == "waiting for node n1 to report"
    _, status = decide(cluster, [desired()], current, 108.0)
    assert status[VOL_A].kind is StatusKind.NO_ELIGIBLE_REPLICA


def silent_primary_cluster() -> Cluster:
    """n1 primary of VOL_A, last heard (and granted a lease) at 0; n2 an in-sync replica and n3 a
    spare, both heartbeating until 7.5: at 6 n1 is silent for lease + margin, not yet dead (8)."""
    cluster = Cluster()
    for node in ("n1", "n2", "n3"):
        cluster.join(node, 0.0)
    cluster.beat("n1", 0.0, IN_SYNC_PRIMARY)
    for t in (0.0, 2.5, 5.0, 7.5):
        cluster.beat("n2", t, GOOD_REPLICA)
        cluster.beat("n3", t)
    return cluster


SILENCE = LEASE + MARGIN


def test_a_silent_primary_is_replaced_once_its_lease_is_over_not_once_it_is_dead() -> None:
    """Issue 8's failover time: a primary silent for lease + margin is past its lease (fenced)
    and is replaced then, not at dead_after."""
    cluster = silent_primary_cluster()
    ctl = TopologyController(primary_silence=SILENCE)
    asks, _ = decide(cluster, [desired()], CURRENT, 5.999, ctl)
    assert asks == ()
    asks, status = decide(cluster, [desired()], CURRENT, 6.0, ctl)
    assert asks == (
        AssignmentAsk(VOL_A, "n2", ("n2",), "promote n2: primary n1 silent past its lease", in_sync=("n2",)),
    )
    assert status[VOL_A].kind is StatusKind.PROMOTING
    assert cluster.store.alive("n1", 6.0)  # not dead yet: dead_after would have waited until 8
    # Without primary_silence the old rule holds: nothing until n1 is dead.
    asks, _ = decide(cluster, [desired()], CURRENT, 6.0, TopologyController())
    assert asks == ()


def test_a_primary_replaced_for_its_silence_is_not_brought_back_as_a_new_copy() -> None:
    """After the promotion the volume lacks a copy; the silent old primary is still alive by
    dead_after but must not be chosen for it (it went silent: it is the node that failed)."""
    cluster = silent_primary_cluster()
    ctl = TopologyController(primary_silence=SILENCE)
    (ask,) = decide(cluster, [desired()], CURRENT, 6.0, ctl)[0]
    promoted = {VOL_A: PublishedAssignment(assignment(ask.replicas, epoch=4), published_at=6.0)}
    cluster.beat("n2", 6.25, replace(GOOD_REPLICA, epoch=4, role=Role.PRIMARY))
    cluster.beat("n3", 6.25)
    asks, _ = decide(cluster, [desired()], promoted, 6.25, ctl)
    # n1 and n3 have the same free space: by node id n1 would come first, were it not silent.
    assert [(a.replicas, a.reason) for a in asks] == [(("n2", "n3"), "add copies with n3")]


def test_a_replica_as_silent_as_the_primary_is_not_promoted() -> None:
    """Two failures: n2 and n3 were both in sync, n2 went silent with the primary; n3 is promoted,
    and n2 (not dead yet) stays in the in-sync set as the rules have it."""
    cluster = Cluster()
    for node in ("n1", "n2", "n3"):
        cluster.join(node, 0.0)
    both = replace(
        IN_SYNC_PRIMARY,
        replica_states=(
            ReplicaState("n2", SyncState.IN_SYNC, 100),
            ReplicaState("n3", SyncState.IN_SYNC, 100),
        ),
    )
    cluster.beat("n1", 0.0, both)
    cluster.beat("n2", 0.0, GOOD_REPLICA)
    for t in (2.5, 5.0):
        cluster.beat("n3", t, GOOD_REPLICA)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2", "n3")), published_at=0.0)}
    ctl = TopologyController(primary_silence=SILENCE)
    asks, _ = decide(cluster, [desired(replicas=3)], current, 6.0, ctl)
    assert [(a.primary, a.replicas, a.in_sync) for a in asks] == [("n3", ("n3", "n2"), ("n3", "n2"))]
    cluster.beat("n3", 7.5, GOOD_REPLICA)
    cluster.store.record(Heartbeat(998, ()), "n3", 7.9)  # n3 now reports nothing: not eligible
    asks, status = decide(cluster, [desired(replicas=3)], current, 7.9, ctl)
    assert asks == () and status[VOL_A].kind is StatusKind.NO_ELIGIBLE_REPLICA  # n2 is silent


def test_a_silent_primary_still_waits_for_its_lease() -> None:
    """Silence is not enough: a lease the master granted later (an Ack in flight) is waited for."""
    cluster = silent_primary_cluster()
    cluster.leases.granted("n1", 3.0, LEASE)  # runs until 8, safe at 9
    ctl = TopologyController(primary_silence=SILENCE)
    for now in (6.0, 7.5):
        asks, status = decide(cluster, [desired()], CURRENT, now, ctl)
        assert asks == ()
        assert status[VOL_A].kind is StatusKind.WAITING_FOR_LEASE
    cluster.beat("n2", 9.0, GOOD_REPLICA)
    asks, _ = decide(cluster, [desired()], CURRENT, 9.0, ctl)
    assert [a.primary for a in asks] == ["n2"]


def test_a_silent_replica_is_replaced_only_once_dead() -> None:
    """Replicas keep dead_after: a blip of a replica must not cost a copy."""
    cluster = Cluster()
    for node in ("n1", "n2", "n3"):
        cluster.join(node, 0.0)
    for t in (2.5, 5.0, 7.5):
        cluster.beat("n1", t)
        cluster.beat("n3", t)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    ctl = TopologyController(primary_silence=SILENCE)
    asks, _ = decide(cluster, [desired()], current, 7.5, ctl)  # n2 silent 7.5 s, alive
    assert asks == ()
    asks, _ = decide(cluster, [desired()], current, 8.0, ctl)
    assert [(a.replicas, a.reason) for a in asks] == [(("n1", "n3"), "replace dead n2 with n3")]


def test_a_primary_not_heard_from_since_the_master_started_is_not_silent() -> None:
    cluster = Cluster(started_at=100.0)
    cluster.join("n2", 101.0)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    ctl = TopologyController(primary_silence=SILENCE)
    _, status = decide(cluster, [desired()], current, 107.0, ctl)
    assert status[VOL_A].reason == "waiting for node n1 to report"


def test_assignment_without_primary_is_left_to_the_operator() -> None:
    cluster = Cluster()
    cluster.join("n1", 0.0)
    current = {VOL_A: PublishedAssignment(assignment(()), published_at=0.0)}
    asks, status = decide(cluster, [desired(replicas=1)], current, 1.0)
    assert asks == ()
    assert status[VOL_A].kind is StatusKind.NO_PRIMARY


# -- dead replica ---------------------------------------------------------------------------------


def test_dead_replica_replaced_by_a_live_node_keeping_the_primary() -> None:
    cluster = Cluster()
    cluster.join("n2", -10.0)  # dead at now=0
    cluster.join("n1", 0.0)
    cluster.join("n3", 0.0, free=50 * MiB)
    cluster.join("n4", 0.0, free=80 * MiB)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2", "n3")), published_at=-20.0)}
    asks, status = decide(cluster, [desired(replicas=3)], current, 0.0)
    # n2 leaves the in-sync set; n4 starts outside it (a resync fills it later).
    assert asks == (
        AssignmentAsk(VOL_A, "n1", ("n1", "n3", "n4"), "replace dead n2 with n4", in_sync=("n1", "n3")),
    )
    assert status[VOL_A].reason == "degraded: replica n2 dead"


def test_dead_replica_without_spare_is_degraded() -> None:
    cluster = Cluster()
    cluster.join("n2", -10.0)
    cluster.join("n1", 0.0)
    cluster.join("n3", 0.0, free=1 * MiB)  # no room for 10 MiB
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    asks, status = decide(cluster, [desired()], current, 0.0)
    assert asks == ()
    assert status[VOL_A] == VolumeStatus("degraded: replica n2 dead", 0.0, StatusKind.DEGRADED)


def test_missing_copies_are_topped_up() -> None:
    cluster = Cluster()
    cluster.join("n1", 0.0)
    cluster.join("n2", 0.0)
    current = {VOL_A: PublishedAssignment(assignment(("n1",)), published_at=0.0)}
    asks, status = decide(cluster, [desired(replicas=2)], current, 1.0)
    assert asks == (AssignmentAsk(VOL_A, "n1", ("n1", "n2"), "add copies with n2", in_sync=("n1",)),)
    assert status[VOL_A].reason == "degraded: 1 of 2 copies"


# -- properties -----------------------------------------------------------------------------------

NODES = ("n0", "n1", "n2", "n3", "n4")
VOLUMES = (VOL_A, VOL_B, VOL_C)
# At now=100 a node last heard at <= 92 is dead; a lease granted at <= 94 is safe (5 s + 1 s margin).
BEAT_TIMES = st.one_of(st.sampled_from([80.0, 92.0, 92.5, 100.0]), st.floats(80.0, 100.0))
GRANT_TIMES = st.one_of(st.sampled_from([80.0, 94.0, 94.5, 100.0]), st.floats(80.0, 100.0))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Cluster, list[DesiredVolume], dict[str, PublishedAssignment], float]:
    now = 100.0
    cluster = Cluster(started_at=draw(st.sampled_from([None, 95.0, 50.0])))
    known = draw(st.one_of(st.just(list(NODES)), st.lists(st.sampled_from(NODES), unique=True)))
    for node in known:
        cluster.store.record(hello(node, free=draw(st.integers(0, 40)) * MiB), node, 0.0)
    want = [
        desired(volume, size=draw(st.integers(1, 20)) * MiB, replicas=draw(st.integers(1, 3)))
        for volume in draw(st.lists(st.sampled_from(VOLUMES), unique=True))
    ]
    current: dict[str, PublishedAssignment] = {}
    for volume in want:
        if draw(st.booleans()):
            members = tuple(draw(st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True)))
            current[volume.volume_id] = PublishedAssignment(
                assignment(members, epoch=3, volume_id=volume.volume_id, size=volume.size),
                published_at=draw(st.floats(0, now)),
            )
    for node in known:
        for _ in range(draw(st.integers(0, 2))):  # the last heartbeat wins
            observations = []
            for volume in want:
                if not draw(st.booleans()):
                    continue
                published = current.get(volume.volume_id)
                if published is not None and draw(st.booleans()):
                    # what a node that follows its assignment would say (so promotions do happen)
                    members = published.assignment.replicas
                    role = published.assignment.role_of(node)
                    in_sync = tuple(ReplicaState(m, SyncState.IN_SYNC, 2) for m in members[1:])
                    observations.append(
                        obs(
                            3,
                            role,
                            volume_id=volume.volume_id,
                            write_position=2,
                            replica_states=in_sync if role is Role.PRIMARY else (),
                        )
                    )
                    continue
                states = tuple(
                    ReplicaState(other, draw(st.sampled_from(SyncState)), draw(st.integers(0, 3)))
                    for other in draw(st.lists(st.sampled_from(NODES), unique=True, max_size=3))
                    if other != node
                )
                observations.append(
                    obs(
                        draw(st.integers(2, 4)),
                        draw(st.sampled_from(Role)),
                        volume_id=volume.volume_id,
                        health=draw(st.sampled_from(Health)),
                        write_position=draw(st.integers(0, 3)),
                        replica_states=states,
                        converged=draw(st.booleans()),
                    )
                )
            cluster.seq += 1
            cluster.store.record(Heartbeat(cluster.seq, tuple(observations)), node, draw(BEAT_TIMES))
    for node in draw(st.lists(st.sampled_from(NODES), unique=True)):
        cluster.leases.granted(node, draw(GRANT_TIMES), LEASE)
    return cluster, want, current, now


@settings(max_examples=300)
@given(scenario=scenarios())
def test_asks_are_always_safe(
    scenario: tuple[Cluster, list[DesiredVolume], dict[str, PublishedAssignment], float],
) -> None:
    cluster, want, current, now = scenario
    store = cluster.store
    decision = TopologyController().decide(want, current, store, cluster.leases, now)
    sizes = {v.volume_id: v.size for v in want}
    free = {view.node_id: view.free_bytes for view in store.nodes(now)}
    assert set(decision.status) == set(sizes)
    for ask in decision.asks:
        # never two copies on one node (AssignmentAsk also refuses it), never a dead node
        assert len(set(ask.replicas)) == len(ask.replicas)
        assert ask.replicas[0] == ask.primary
        assert not any(store.dead(node, now) for node in ask.replicas)
        assert store.alive(ask.primary, now)
        published = current.get(ask.volume_id)
        old_members = () if published is None else published.assignment.replicas
        for node in ask.replicas:
            if node not in old_members:  # a new copy lands on a live node with room
                assert store.alive(node, now) and free[node] >= sizes[ask.volume_id]
        if published is None:
            continue
        old_primary = published.assignment.primary
        if ask.primary != old_primary:
            # never move a primary before its lease is safe, and only to a replica that was in sync
            assert old_primary is not None and store.dead(old_primary, now)
            assert cluster.leases.safe_to_reassign(old_primary, now, MARGIN)
            assert ask.primary in old_members
            replica = store.observation(ask.primary, ask.volume_id)
            assert replica is not None
            assert replica.role is Role.REPLICA and replica.health is Health.OK
            assert replica.epoch == published.assignment.epoch
            assert ask.primary in published.assignment.in_sync
            # The report of the primary that served the epoch, if it made one, must agree.
            primary = TopologyController.primary_report(published.assignment, store)
            if primary is not None:
                assert replica.write_position >= primary.write_position
                vouched_for = {r.node_id for r in primary.replica_states if r.state is SyncState.IN_SYNC}
                assert ask.primary in vouched_for
        # A copy joins the in-sync set only on the word of the primary that serves the epoch.
        old_in_sync = set() if published is None else set(published.assignment.in_sync)
        report = None if published is None else TopologyController.primary_report(published.assignment, store)
        vouched = (
            set()
            if report is None
            else {r.node_id for r in report.replica_states if r.state is SyncState.IN_SYNC}
        )
        if published is not None:
            assert set(ask.in_sync) - {ask.primary} <= old_in_sync | vouched


def test_core_modules_never_construct_an_epoch() -> None:
    for module in (controller_module, observations_module):
        source = pathlib.Path(str(module.__file__)).read_text()
        assert "Epoch" + "(" not in source  # spelled apart so this file passes the tree scan too


@st.composite
def dead_primary_scenarios(draw: st.DrawFn) -> tuple[Cluster, PublishedAssignment, float]:
    """n0 was primary of VOL_A at epoch 3 and is now dead; each replica's and the primary's last
    reports vary one field at a time around "everything in order"."""
    now = 100.0
    cluster = Cluster()
    replicas = tuple(draw(st.lists(st.sampled_from(NODES[1:]), min_size=1, max_size=2, unique=True)))
    recorded = tuple(node for node in replicas if draw(st.integers(0, 3)) > 0)
    published = PublishedAssignment(
        assignment(("n0", *replicas), in_sync=("n0", *recorded)), published_at=0.0
    )
    primary_position = draw(st.integers(0, 3))
    states = tuple(
        ReplicaState(
            node, draw(st.sampled_from([SyncState.IN_SYNC, SyncState.IN_SYNC, SyncState.SYNCING])), 0
        )
        for node in replicas
        if draw(st.integers(0, 4)) > 0
    )
    cluster.store.record(hello("n0"), "n0", 0.0)
    primary_epoch = draw(st.sampled_from([3, 3, 2]))
    cluster.store.record(
        Heartbeat(
            1, (obs(primary_epoch, Role.PRIMARY, write_position=primary_position, replica_states=states),)
        ),
        "n0",
        draw(st.sampled_from([50.0, 92.0])),
    )
    cluster.leases.granted("n0", draw(GRANT_TIMES), LEASE)
    for node in NODES[1:]:
        cluster.store.record(hello(node), node, 0.0)
        report = obs(
            draw(st.sampled_from([3, 3, 3, 4])),
            draw(st.sampled_from([Role.REPLICA, Role.REPLICA, Role.NONE, Role.PRIMARY])),
            health=draw(st.sampled_from([Health.OK, Health.OK, Health.DEGRADED])),
            write_position=primary_position + draw(st.integers(-1, 2))
            if primary_position
            else draw(st.integers(0, 2)),
        )
        cluster.store.record(Heartbeat(1, (report,)), node, draw(st.sampled_from([100.0, 99.0, 92.0])))
    return cluster, published, now


@settings(max_examples=300)
@given(scenario=dead_primary_scenarios())
def test_promotion_happens_exactly_when_a_replica_is_eligible(
    scenario: tuple[Cluster, PublishedAssignment, float],
) -> None:
    cluster, published, now = scenario
    store = cluster.store
    assert store.dead("n0", now)
    # The dead primary's report counts only at the epoch (and from the incarnation that served
    # it); without one, the master's own in-sync record decides.
    primary = TopologyController.primary_report(published.assignment, store)

    def eligible(node: str) -> bool:
        report = store.observation(node, VOL_A)
        return (
            store.alive(node, now)
            and report is not None
            and (report.role, report.epoch, report.health) == (Role.REPLICA, 3, Health.OK)
            and node in published.assignment.in_sync
            and (
                primary is None
                or (
                    report.write_position >= primary.write_position
                    and node in {r.node_id for r in primary.replica_states if r.state is SyncState.IN_SYNC}
                )
            )
        )

    want = [desired(replicas=len(published.assignment.replicas))]
    decision = TopologyController().decide(want, {VOL_A: published}, store, cluster.leases, now)
    candidates = [node for node in published.assignment.replicas[1:] if eligible(node)]
    if not cluster.leases.safe_to_reassign("n0", now):
        assert decision.asks == ()
        assert decision.status[VOL_A].kind is StatusKind.WAITING_FOR_LEASE
    elif not candidates:
        assert decision.asks == ()
        assert decision.status[VOL_A].kind is StatusKind.NO_ELIGIBLE_REPLICA
    else:
        (ask,) = decision.asks
        assert ask.primary in candidates
        assert "n0" not in ask.replicas
        assert not any(store.dead(node, now) for node in ask.replicas)


# -- the in-sync set ------------------------------------------------------------------------------


def in_sync_cluster(primary_obs: VolumeObservation, *replica_obs: tuple[str, VolumeObservation]) -> Cluster:
    """n1 primary, n2 and n3 replicas, all alive at 10."""
    cluster = Cluster()
    for node in ("n1", "n2", "n3"):
        cluster.join(node, 0.0)
    cluster.beat("n1", 10.0, primary_obs)
    reported = dict(replica_obs)
    for node in ("n2", "n3"):
        cluster.beat(node, 10.0, reported.get(node, obs(3, Role.REPLICA, write_position=100)))
    return cluster


def primary_saying(*states: tuple[str, SyncState, int], epoch: int = 3) -> VolumeObservation:
    return obs(
        epoch,
        Role.PRIMARY,
        write_position=100,
        replica_states=tuple(ReplicaState(node, state, position) for node, state, position in states),
    )


THREE = ("n1", "n2", "n3")


@pytest.mark.parametrize("state", [SyncState.SYNCING, SyncState.FAILED])
def test_a_replica_the_primary_reports_lagging_is_dropped_under_a_new_epoch(state: SyncState) -> None:
    cluster = in_sync_cluster(primary_saying(("n2", state, 40), ("n3", SyncState.IN_SYNC, 100)))
    current = {VOL_A: PublishedAssignment(assignment(THREE), published_at=0.0)}
    asks, status = decide(cluster, [desired(replicas=3)], current, 10.0)
    reason = "replica n2 dropped from the in-sync set"
    assert asks == (AssignmentAsk(VOL_A, "n1", THREE, reason, in_sync=("n1", "n3")),)
    assert (status[VOL_A].kind, status[VOL_A].reason) == (StatusKind.DEGRADED, reason)
    # Once published (a new epoch), the primary's report of the old epoch no longer counts.
    dropped = {
        VOL_A: PublishedAssignment(assignment(THREE, epoch=4, in_sync=("n1", "n3")), published_at=10.0)
    }
    asks, status = decide(cluster, [desired(replicas=3)], dropped, 11.0)
    assert asks == () and status[VOL_A].kind is StatusKind.OK


def test_a_copy_the_primary_does_not_mention_stays_as_recorded() -> None:
    cluster = in_sync_cluster(primary_saying())
    current = {VOL_A: PublishedAssignment(assignment(THREE), published_at=0.0)}
    assert decide(cluster, [desired(replicas=3)], current, 10.0)[0] == ()


@pytest.mark.parametrize(
    "report",
    [
        pytest.param(primary_saying(("n2", SyncState.SYNCING, 0), epoch=2), id="older-epoch"),
        pytest.param(
            replace(primary_saying(("n2", SyncState.SYNCING, 0)), role=Role.REPLICA), id="not-as-primary"
        ),
    ],
)
def test_a_report_not_about_the_current_epoch_as_primary_drops_nobody(report: VolumeObservation) -> None:
    cluster = in_sync_cluster(report)
    current = {VOL_A: PublishedAssignment(assignment(THREE), published_at=0.0)}
    assert decide(cluster, [desired(replicas=3)], current, 10.0)[0] == ()


def test_a_forged_report_from_an_incarnation_that_does_not_serve_the_epoch_is_ignored() -> None:
    """A Hello under the primary's id with a new incarnation (a restart, or a forger) cannot drop
    a replica, nor add one back: only the incarnation that claimed the epoch as primary counts."""
    cluster = in_sync_cluster(primary_saying(("n2", SyncState.IN_SYNC, 100)))
    cluster.store.record(hello("n1", incarnation=2), "n1", 11.0)
    cluster.seq += 1
    forged = primary_saying(("n2", SyncState.FAILED, 0), ("n3", SyncState.IN_SYNC, 100))
    cluster.store.record(Heartbeat(cluster.seq, (forged,)), "n1", 11.0)
    for node in ("n2", "n3"):
        cluster.beat(node, 11.0, obs(3, Role.REPLICA, write_position=100))
    current = {VOL_A: PublishedAssignment(assignment(THREE, in_sync=("n1", "n2")), published_at=0.0)}
    ctl = TopologyController()
    assert ctl.primary_report(current[VOL_A].assignment, cluster.store) is None
    assert decide(cluster, [desired(replicas=3)], current, 11.0, ctl)[0] == ()


@pytest.mark.parametrize("liar", ["n3", "n4"])
def test_a_member_that_is_not_the_primary_cannot_report_on_another_nodes_copy(liar: str) -> None:
    """docs/cluster.md, "What a member can still say": a replica (n3), or a member holding no
    copy (n4), claims to be the volume's primary at the current epoch and reports n2 failed and
    itself in sync: nothing moves (only the assignment's primary reports on its replicas)."""
    cluster = in_sync_cluster(primary_saying(("n2", SyncState.IN_SYNC, 100)))
    cluster.join("n4", 0.0)
    lie = primary_saying(("n2", SyncState.FAILED, 0), (liar, SyncState.IN_SYNC, 100))
    cluster.beat(liar, 11.0, lie)
    current = {VOL_A: PublishedAssignment(assignment(THREE, in_sync=("n1", "n2")), published_at=0.0)}
    assert decide(cluster, [desired(replicas=3)], current, 11.0)[0] == ()


def test_only_a_replica_recorded_in_sync_is_promoted() -> None:
    """n2 looks perfect (the primary's last report says IN_SYNC at its position), but the
    assignment records it out of the in-sync set: it may lack an acknowledged write."""
    cluster = dead_primary_cluster(replica_obs=GOOD_REPLICA, primary_obs=IN_SYNC_PRIMARY)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2"), in_sync=("n1",)), published_at=0.0)}
    ctl = TopologyController()
    assert ctl.eligible_replicas(current[VOL_A].assignment, cluster.store, 20.0) == ()
    asks, status = decide(cluster, [desired()], current, 20.0, ctl)
    assert asks == () and status[VOL_A].kind is StatusKind.NO_ELIGIBLE_REPLICA
    # Recorded in sync, the same n2 is promoted.
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2")), published_at=0.0)}
    asks, _ = decide(cluster, [desired()], current, 20.0)
    assert [(a.primary, a.in_sync) for a in asks] == [("n2", ("n2",))]


def test_a_promotion_keeps_in_sync_the_survivors_at_the_new_primarys_position() -> None:
    primary_obs = replace(
        IN_SYNC_PRIMARY,
        replica_states=(
            ReplicaState("n2", SyncState.IN_SYNC, 100),
            ReplicaState("n3", SyncState.IN_SYNC, 100),
        ),
    )
    cluster = dead_primary_cluster(replica_obs=GOOD_REPLICA, primary_obs=primary_obs)
    cluster.beat("n3", 20.0, obs(3, Role.REPLICA, write_position=100))
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2", "n3")), published_at=0.0)}
    asks, _ = decide(cluster, [desired(replicas=3)], current, 20.0)
    assert asks == (
        AssignmentAsk(VOL_A, "n2", ("n2", "n3"), "promote n2: primary n1 dead", in_sync=("n2", "n3")),
    )


def test_a_caught_up_replica_is_added_back_under_a_new_epoch() -> None:
    cluster = in_sync_cluster(primary_saying(("n2", SyncState.IN_SYNC, 100), ("n3", SyncState.SYNCING, 60)))
    current = {VOL_A: PublishedAssignment(assignment(THREE, in_sync=("n1",)), published_at=0.0)}
    asks, status = decide(cluster, [desired(replicas=3)], current, 10.0)
    reason = "replica n2 back in the in-sync set"
    assert asks == (AssignmentAsk(VOL_A, "n1", THREE, reason, in_sync=("n1", "n2")),)
    assert (status[VOL_A].kind, status[VOL_A].reason) == (StatusKind.RESYNCED, reason)


def test_a_drop_and_a_return_in_one_ask() -> None:
    cluster = in_sync_cluster(primary_saying(("n2", SyncState.FAILED, 0), ("n3", SyncState.IN_SYNC, 100)))
    current = {VOL_A: PublishedAssignment(assignment(THREE, in_sync=("n1", "n2")), published_at=0.0)}
    asks, _ = decide(cluster, [desired(replicas=3)], current, 10.0)
    reason = "replica n2 dropped from the in-sync set; n3 back in sync"
    assert asks == (AssignmentAsk(VOL_A, "n1", THREE, reason, in_sync=("n1", "n3")),)


@pytest.mark.parametrize(
    ("position", "replica"),
    [
        pytest.param(99, obs(3, Role.REPLICA, write_position=100), id="primary-reports-it-behind"),
        pytest.param(100, obs(2, Role.REPLICA, write_position=100), id="replica-at-an-older-epoch"),
        pytest.param(100, obs(3, Role.NONE, write_position=100), id="replica-role-none"),
        pytest.param(100, obs(3, Role.REPLICA, health=Health.DEGRADED), id="replica-degraded"),
    ],
)
def test_a_replica_is_not_added_back_unless_every_condition_holds(
    position: int, replica: VolumeObservation
) -> None:
    cluster = in_sync_cluster(primary_saying(("n2", SyncState.IN_SYNC, position)), ("n2", replica))
    current = {VOL_A: PublishedAssignment(assignment(THREE, in_sync=("n1", "n3")), published_at=0.0)}
    assert decide(cluster, [desired(replicas=3)], current, 10.0)[0] == ()


def test_a_dead_replica_is_not_added_back() -> None:
    cluster = in_sync_cluster(primary_saying(("n2", SyncState.IN_SYNC, 100)))
    for node in ("n1", "n3"):
        cluster.beat(
            node,
            15.0,
            primary_saying(("n2", SyncState.IN_SYNC, 100)) if node == "n1" else obs(3, Role.REPLICA),
        )
    current = {
        VOL_A: PublishedAssignment(assignment(("n1", "n2", "n3"), in_sync=("n1", "n3")), published_at=0.0)
    }
    ctl = TopologyController()
    assert ctl._in_sync_changes(current[VOL_A].assignment, cluster.store, 18.5) is None  # n2 heard at 10


def test_a_replacement_also_drops_a_copy_the_primary_reports_behind() -> None:
    """n2 is dead and replaced; in the same step the primary reports n3 behind: the one new epoch
    records neither in sync."""
    cluster = Cluster()
    for node in ("n1", "n2", "n3", "n4"):
        cluster.join(node, 0.0)
    for node in ("n1", "n3", "n4"):
        cluster.beat(
            node,
            10.0,
            primary_saying(("n3", SyncState.SYNCING, 10)) if node == "n1" else obs(3, Role.REPLICA),
        )
    current = {VOL_A: PublishedAssignment(assignment(THREE), published_at=0.0)}
    asks, _ = decide(cluster, [desired(replicas=3)], current, 10.0)
    assert asks == (
        AssignmentAsk(VOL_A, "n1", ("n1", "n3", "n4"), "replace dead n2 with n4", in_sync=("n1",)),
    )


# -- admission (docs/cluster.md, "Node admission") -----------------------------------------------


def test_a_pending_node_is_never_chosen_for_a_copy_a_replacement_or_a_promotion() -> None:
    """A node awaiting approval that reports itself alive, with the most room and even as an
    in-sync replica, is no placement target, no replacement for a dead replica and no new primary;
    approved (out of ``pending``) it is all three."""
    cluster = Cluster()
    for node in ("n1", "n2"):
        cluster.join(node, 0.0)
    cluster.join("rogue", 0.0, free=1000 * MiB)  # the most room: first choice if it counted
    ctl = TopologyController(converge_deadline=30.0, margin=MARGIN)

    # Placement: three copies wanted, two approved nodes: not placed on the pending one.
    decision = ctl.decide([desired(replicas=3)], {}, cluster.store, cluster.leases, 0.0, pending={"rogue"})
    assert decision.asks == ()
    assert decision.status[VOL_A].kind is StatusKind.NOT_ENOUGH_NODES
    assert decision.status[VOL_A].reason == (
        "not enough live nodes (have 2, need 3); awaiting approval: rogue (sparrow node approve)"
    )
    (ask,) = ctl.decide([desired(replicas=2)], {}, cluster.store, cluster.leases, 0.0, pending={"rogue"}).asks
    assert "rogue" not in ask.replicas
    (ask,) = ctl.decide([desired(replicas=3)], {}, cluster.store, cluster.leases, 0.0).asks
    assert ask.primary == "rogue"  # approved, it is the first choice

    # Replacement: n2 dies; the only spare is pending: degraded, nothing asked.
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2"), epoch=3), 0.0)}
    now = DEAD_AFTER + 1
    cluster.beat("n1", now, obs(3, Role.PRIMARY))
    cluster.beat("rogue", now)
    want = [desired(replicas=2)]
    decision = ctl.decide(want, current, cluster.store, cluster.leases, now, pending={"rogue"})
    assert decision.asks == () and decision.status[VOL_A].kind is StatusKind.DEGRADED
    (ask,) = ctl.decide([desired(replicas=2)], current, cluster.store, cluster.leases, now).asks
    assert ask.replicas == ("n1", "rogue")

    # Promotion: the primary dies; a pending node listed in the in-sync set (its key was rebound
    # to none and a new one proved since) is not promoted.
    cluster = Cluster()
    for node in ("n1", "n2"):
        cluster.join(node, 0.0)
    current = {VOL_A: PublishedAssignment(assignment(("n1", "n2"), epoch=3), 0.0)}
    cluster.beat("n2", now, obs(3, Role.REPLICA))
    decision = ctl.decide(want, current, cluster.store, cluster.leases, now, pending={"n2"})
    assert decision.asks == () and decision.status[VOL_A].kind is StatusKind.NO_ELIGIBLE_REPLICA
    (ask,) = ctl.decide([desired(replicas=2)], current, cluster.store, cluster.leases, now).asks
    assert ask.primary == "n2"
