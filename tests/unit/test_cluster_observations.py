"""ObservationStore (docs/cluster.md, "ObservationStore"): liveness, incarnations, conflicts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparrow.cluster.messages import (
    Health,
    Heartbeat,
    Hello,
    ReplicaState,
    Role,
    SyncState,
    VolumeObservation,
)
from sparrow.cluster.observations import (
    Conflict,
    NodeState,
    NodeView,
    ObservationError,
    ObservationStore,
)

VOL_A = "a" * 32
VOL_B = "b" * 32


def hello(node_id: str, incarnation: int = 1, free: int = 1000, capacity: int = 2000) -> Hello:
    return Hello(
        node_id=node_id,
        incarnation=incarnation,
        iscsi_portal=f"{node_id}:3260",
        replication=f"{node_id}:7000",
        http=f"{node_id}:8080",
        capacity_bytes=capacity,
        free_bytes=free,
    )


def obs(
    volume_id: str = VOL_A,
    epoch: int = 1,
    role: Role = Role.PRIMARY,
    write_position: int = 0,
    replica_states: tuple[ReplicaState, ...] = (),
    converged: bool = True,
) -> VolumeObservation:
    return VolumeObservation(
        volume_id=volume_id,
        epoch=epoch,
        role=role,
        health=Health.OK,
        write_position=write_position,
        replica_states=replica_states,
        converged=converged,
    )


def beat(seq: int, *observations: VolumeObservation) -> Heartbeat:
    return Heartbeat(seq=seq, observations=observations)


def test_hello_alone_is_not_alive_but_is_listed_as_dead() -> None:
    store = ObservationStore(dead_after=8.0)
    store.record(hello("n1"), "n1", now=100.0)
    assert store.known("n1")
    assert not store.alive("n1", 100.0)
    (view,) = store.nodes(100.0)
    assert view.state is NodeState.DEAD
    assert view.last_heartbeat_age is None


@pytest.mark.parametrize(
    ("age", "alive"),
    [(0.0, True), (7.999, True), (8.0, False), (8.001, False), (1000.0, False)],
)
def test_alive_iff_last_heartbeat_younger_than_dead_after(age: float, alive: bool) -> None:
    store = ObservationStore(dead_after=8.0)
    store.record(hello("n1"), "n1", now=0.0)
    store.record(beat(1), "n1", now=50.0)
    assert store.alive("n1", 50.0 + age) is alive
    assert store.dead("n1", 50.0 + age) is not alive


@pytest.mark.parametrize(("age", "silent"), [(0.0, False), (5.999, False), (6.0, True), (100.0, True)])
def test_silent_iff_no_heartbeat_for_that_long(age: float, silent: bool) -> None:
    store = ObservationStore(dead_after=8.0)
    store.record(hello("n1"), "n1", now=0.0)
    store.record(beat(1), "n1", now=50.0)
    assert store.silent("n1", 50.0 + age, 6.0) is silent


def test_silence_of_known_and_unknown_nodes() -> None:
    store = ObservationStore(dead_after=8.0, started_at=0.0)
    assert not store.silent("ghost", 100.0, 6.0)  # never heard from: maybe not reconnected yet
    store.record(hello("n1"), "n1", now=1.0)
    assert store.silent("n1", 1.0, 6.0)  # said Hello, no heartbeat from this incarnation
    store.record(beat(1), "n1", now=2.0)
    store.record(hello("n1", incarnation=2), "n1", now=3.0)  # restarted: the old beats are void
    assert store.silent("n1", 3.0, 6.0)


def test_unknown_node_is_not_alive() -> None:
    store = ObservationStore()
    assert not store.alive("ghost", 0.0)
    assert store.observation("ghost", VOL_A) is None
    assert store.hello("ghost") is None
    assert store.heartbeat("ghost") is None


def test_unknown_node_dead_only_after_startup_grace() -> None:
    store = ObservationStore(dead_after=8.0, started_at=10.0)
    assert not store.dead("ghost", 10.0)
    assert not store.dead("ghost", 17.9)
    assert store.dead("ghost", 18.0)
    # A node that said Hello but sent no heartbeat is dead at once: it is known and silent.
    store.record(hello("n1"), "n1", now=11.0)
    assert store.dead("n1", 11.0)
    # Without started_at an unknown node is dead immediately.
    assert ObservationStore().dead("ghost", 0.0)


def test_nodes_lists_alive_and_expired_with_ages_and_hello_fields() -> None:
    store = ObservationStore(dead_after=8.0)
    store.record(hello("n2", incarnation=7, free=5, capacity=10), "n2", now=0.0)
    store.record(hello("n1", incarnation=3), "n1", now=0.0)
    store.record(beat(1), "n1", now=1.0)
    store.record(beat(1), "n2", now=5.0)
    assert store.nodes(10.0) == (
        NodeView("n1", NodeState.DEAD, 3, 9.0, "n1:3260", "n1:7000", "n1:8080", 2000, 1000),
        NodeView("n2", NodeState.ALIVE, 7, 5.0, "n2:3260", "n2:7000", "n2:8080", 10, 5),
    )
    # States compare as the documented strings.
    assert [v.state for v in store.nodes(10.0)] == ["dead", "alive"]


def test_heartbeat_keeps_latest_observations_per_node() -> None:
    store = ObservationStore()
    store.record(hello("n1"), "n1", now=0.0)
    store.record(beat(1, obs(VOL_A, write_position=5), obs(VOL_B)), "n1", now=1.0)
    store.record(beat(2, obs(VOL_A, write_position=9)), "n1", now=2.0)
    assert store.observation("n1", VOL_A) == obs(VOL_A, write_position=9)
    assert store.observation("n1", VOL_B) is None  # the latest heartbeat no longer reports it
    heartbeat = store.heartbeat("n1")
    assert heartbeat is not None and heartbeat.seq == 2


def test_dead_node_observations_stay_readable() -> None:
    store = ObservationStore(dead_after=8.0)
    store.record(hello("n1"), "n1", now=0.0)
    store.record(beat(1, obs(write_position=42)), "n1", now=1.0)
    assert not store.alive("n1", 100.0)
    observed = store.observation("n1", VOL_A)
    assert observed is not None and observed.write_position == 42


def test_new_incarnation_resets_observations_and_liveness() -> None:
    store = ObservationStore()
    store.record(hello("n1", incarnation=1), "n1", now=0.0)
    store.record(beat(1, obs()), "n1", now=1.0)
    store.record(hello("n1", incarnation=2), "n1", now=2.0)
    assert store.observation("n1", VOL_A) is None
    assert store.heartbeat("n1") is None
    assert not store.alive("n1", 2.0)
    (view,) = store.nodes(2.0)
    assert view.incarnation == 2 and view.last_heartbeat_age is None


def test_same_incarnation_hello_keeps_observations_and_refreshes_capacity() -> None:
    store = ObservationStore()
    store.record(hello("n1", incarnation=1, free=100), "n1", now=0.0)
    store.record(beat(1, obs()), "n1", now=1.0)
    store.record(hello("n1", incarnation=1, free=50), "n1", now=2.0)
    assert store.observation("n1", VOL_A) == obs()
    assert store.alive("n1", 2.0)
    assert store.nodes(2.0)[0].free_bytes == 50


def test_heartbeat_before_hello_is_rejected() -> None:
    store = ObservationStore()
    with pytest.raises(ObservationError):
        store.record(beat(1), "n1", now=0.0)


def test_hello_for_another_node_is_rejected() -> None:
    store = ObservationStore()
    with pytest.raises(ObservationError):
        store.record(hello("n2"), "n1", now=0.0)
    assert not store.known("n1") and not store.known("n2")


@pytest.mark.parametrize("dead_after", [0, -1.0, float("inf"), float("nan"), True])
def test_bad_dead_after_rejected(dead_after: float) -> None:
    with pytest.raises(ValueError):
        ObservationStore(dead_after=dead_after)


def test_conflict_when_two_live_nodes_claim_primary() -> None:
    store = ObservationStore(dead_after=8.0)
    for node in ("n3", "n1", "n2"):
        store.record(hello(node), node, now=0.0)
    store.record(beat(1, obs(VOL_A, epoch=4), obs(VOL_B, epoch=1)), "n3", now=1.0)
    store.record(beat(1, obs(VOL_A, epoch=3), obs(VOL_B, epoch=1, role=Role.REPLICA)), "n1", now=1.0)
    store.record(beat(1, obs(VOL_B, epoch=1, role=Role.NONE)), "n2", now=1.0)
    assert store.conflicts(2.0) == (Conflict(VOL_A, ("n1", "n3"), (3, 4)),)


def test_dead_claimant_is_no_conflict() -> None:
    store = ObservationStore(dead_after=8.0)
    store.record(hello("n1"), "n1", now=0.0)
    store.record(hello("n2"), "n2", now=0.0)
    store.record(beat(1, obs(epoch=3)), "n1", now=0.0)
    store.record(beat(1, obs(epoch=4)), "n2", now=5.0)
    assert len(store.conflicts(7.0)) == 1
    assert store.conflicts(8.0) == ()  # n1's claim expired with n1


def test_restart_clears_a_stale_primary_claim() -> None:
    store = ObservationStore()
    store.record(hello("n1"), "n1", now=0.0)
    store.record(hello("n2"), "n2", now=0.0)
    store.record(beat(1, obs(epoch=3)), "n1", now=0.0)
    store.record(beat(1, obs(epoch=4)), "n2", now=0.0)
    store.record(hello("n1", incarnation=2), "n1", now=1.0)
    store.record(beat(1), "n1", now=1.0)
    assert store.conflicts(1.0) == ()


@given(
    claims=st.dictionaries(
        st.sampled_from(["n1", "n2", "n3", "n4"]),
        st.tuples(st.sets(st.sampled_from([VOL_A, VOL_B])), st.floats(0, 20)),
    ),
    now=st.floats(0, 30),
)
def test_conflicts_match_a_direct_count(claims: dict[str, tuple[set[str], float]], now: float) -> None:
    store = ObservationStore(dead_after=8.0)
    for node, (volumes, at) in claims.items():
        store.record(hello(node), node, now=0.0)
        store.record(beat(1, *(obs(v) for v in sorted(volumes))), node, now=at)
    expected = []
    for volume in (VOL_A, VOL_B):
        owners = sorted(n for n, (vols, at) in claims.items() if volume in vols and now - at < 8.0)
        if len(owners) > 1:
            expected.append(Conflict(volume, tuple(owners), tuple(1 for _ in owners)))
    assert store.conflicts(now) == tuple(expected)


def test_replica_states_are_kept_verbatim() -> None:
    store = ObservationStore()
    store.record(hello("n1"), "n1", now=0.0)
    states = (ReplicaState("n2", SyncState.IN_SYNC, 10),)
    store.record(beat(1, obs(replica_states=states)), "n1", now=0.0)
    observed = store.observation("n1", VOL_A)
    assert observed is not None and observed.replica_states == states
