"""The master's control loop (sparrow.master.control) on the real cores and a tmp_path AuthorityStore.

No sockets, no sleeps: each step is driven with an explicit ``now``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from sparrow.cluster.authority import AuthorityStore, InvalidAuthorityRecord, VolumeRecord
from sparrow.cluster.controller import (
    AssignmentAsk,
    Decision,
    DesiredVolume,
    PublishedAssignment,
    StatusKind,
    TopologyController,
    VolumeStatus,
)
from sparrow.cluster.lease import LeaseConfig, MasterLeases
from sparrow.cluster.messages import DeletedVolume, Health, Heartbeat, Hello, Role, VolumeObservation
from sparrow.cluster.observations import ObservationStore
from sparrow.master.control import ControlLoop, differs, restore

MiB = 1 << 20
TIMING = LeaseConfig()  # heartbeat 1 s, lease 5 s, dead after 8 s, margin 1 s


def hello(node_id: str, *, incarnation: int = 1, free: int = 1024 * MiB, port: int = 3260) -> Hello:
    return Hello(
        node_id, incarnation, f"10.0.0.{ord(node_id[-1]) % 250}:{port}", "10.0.0.9:7000", "10.0.0.9:8080",
        1 << 40, free,
    )  # fmt: skip


def observation(volume_id: str, epoch: int, role: Role, *, converged: bool = True) -> VolumeObservation:
    return VolumeObservation(volume_id, epoch, role, Health.OK, 0, (), converged)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuthorityStore]:
    s = AuthorityStore.open_in(tmp_path)
    yield s
    s.close()


def add_volume(store: AuthorityStore, name: str = "vol1", replicas: int = 1) -> VolumeRecord:
    return store.add_volume(name, size=64 * MiB, block_size=512, replicas=replicas, created_at=1.0)


def report(
    control: ControlLoop, store: AuthorityStore, h: Hello, now: float, *obs: VolumeObservation
) -> None:
    """What the heartbeat server does for a Hello and one Heartbeat from a node."""
    control.observations.record(h, h.node_id, now)
    store.upsert_hello(h, seen_at=now)
    control.observations.record(Heartbeat(seq=1, observations=obs), h.node_id, now)


def test_a_new_volume_is_placed_once_with_epoch_1(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=100.0)
    report(control, store, hello("n1"), 100.0)
    vol = add_volume(store)

    first = control.step(101.0)
    assert [(a.volume_id, a.epoch, a.primary, a.replicas) for a in first.published] == [
        (vol.volume_id, 1, "n1", ("n1",))
    ]
    assert store.max_epoch(vol.volume_id) is not None
    assert control.assignments_for("n1") == first.published
    assert control.assignments_for("n2") == ()
    assert control.published_at(vol.volume_id) == 101.0

    # The node converges and keeps reporting; later steps find nothing to change (also past the
    # convergence deadline).
    for seq, now in enumerate((102.0, 103.0, 140.0, 150.0), start=2):
        control.observations.record(
            Heartbeat(seq=seq, observations=(observation(vol.volume_id, 1, Role.PRIMARY),)), "n1", now - 0.5
        )
        result = control.step(now)
        assert result.published == ()
        assert result.decision.asks == ()
    status = control.status(vol.volume_id)
    assert status is not None and status.reason is None and status.kind is StatusKind.OK
    max_epoch = store.max_epoch(vol.volume_id)
    assert max_epoch is not None and max_epoch.value == 1


def test_without_live_nodes_nothing_is_published_and_the_status_says_why(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    vol = add_volume(store, replicas=2)
    report(control, store, hello("n1"), 0.0)
    result = control.step(1.0)
    assert result.published == ()
    status = control.status(vol.volume_id)
    assert status is not None and status.kind is StatusKind.NOT_ENOUGH_NODES
    assert status.reason == "not enough live nodes (have 1, need 2)"
    assert store.max_epoch(vol.volume_id) is None


def test_the_next_step_comes_at_once_when_a_silent_primarys_lease_may_be_reassigned(
    store: AuthorityStore,
) -> None:
    """Failover time: the step that may replace a silent primary runs when its lease plus margin
    ends, not up to an interval later; a live primary's lease never moves the step."""
    control = restore(store, TIMING, now=100.0)
    report(control, store, hello("n1"), 100.0)
    add_volume(store)
    (assignment,) = control.step(100.0).published
    assert assignment.primary == "n1"
    control.leases.granted("n1", 100.5, TIMING.lease_seconds)  # the Ack of its last heartbeat
    safe_at = 100.5 + TIMING.lease_seconds + TIMING.margin  # 106.5
    assert control.next_step_at(101.0, 1.0) == 102.0  # alive: its lease ends far ahead
    assert control.next_step_at(105.9, 1.0) == safe_at
    assert control.next_step_at(safe_at, 1.0) == safe_at + 1.0  # the instant itself: a normal step
    # At that instant the silent primary may be replaced (by nobody here: no replica).
    assert control.leases.safe_to_reassign("n1", safe_at)


def test_restore_grants_every_known_node_a_lease_before_deciding(store: AuthorityStore) -> None:
    store.upsert_hello(hello("n1"), seen_at=1.0)
    store.upsert_hello(hello("n2"), seen_at=1.0)
    control = restore(store, TIMING, now=500.0)
    for node in ("n1", "n2"):
        assert control.leases.expires_at(node) == 500.0 + TIMING.lease_seconds
        assert not control.leases.safe_to_reassign(node, 500.0 + TIMING.lease_seconds + TIMING.margin - 0.01)
        assert control.leases.safe_to_reassign(node, 500.0 + TIMING.lease_seconds + TIMING.margin)
    assert control.observations.started_at == 500.0
    assert control.observations.dead_after == TIMING.dead_after


def test_a_restarted_master_with_unchanged_observations_mints_nothing(store: AuthorityStore) -> None:
    first = restore(store, TIMING, now=10.0)
    report(first, store, hello("n1"), 10.0)
    vol = add_volume(store)
    (published,) = first.step(11.0).published
    assert published.epoch == 1

    # kill -9; a new master process on the same database, with a fresh monotonic clock.
    second = restore(store, TIMING, now=3.0)
    assert second.current(vol.volume_id) == published
    assert second.assignments_for("n1") == (published,)  # the first Ack after restart says epoch 1
    # Before the node has reported: it is not dead yet (started_at), so nothing happens.
    for now in (3.0, 4.0, 10.9):
        result = second.step(now)
        assert result.published == ()
        status = second.status(vol.volume_id)
        assert status is not None and status.kind is StatusKind.WAITING_FOR_NODE
    # The node reconnects, reporting what it had.
    report(second, store, hello("n1"), 5.0, observation(vol.volume_id, 1, Role.PRIMARY))
    for now in (5.5, 6.0, 40.0):
        second.observations.record(
            Heartbeat(seq=int(now) + 10, observations=(observation(vol.volume_id, 1, Role.PRIMARY),)),
            "n1",
            now,
        )
        result = second.step(now)
        assert result.published == ()
        assert result.decision.asks == ()
    max_epoch = store.max_epoch(vol.volume_id)
    assert max_epoch is not None and max_epoch.value == 1


def test_a_restarted_master_whose_primary_never_returns_still_mints_nothing(store: AuthorityStore) -> None:
    first = restore(store, TIMING, now=0.0)
    report(first, store, hello("n1"), 0.0)
    report(first, store, hello("n2"), 0.0)
    vol = add_volume(store)
    first.step(1.0)

    second = restore(store, TIMING, now=0.0)
    report(second, store, hello("n2"), 0.5)  # only the other node comes back
    seen = set()
    for tick in range(1, 40):
        now = float(tick)
        second.observations.record(Heartbeat(seq=tick + 1, observations=()), "n2", now)
        assert second.step(now).published == ()
        status = second.status(vol.volume_id)
        assert status is not None
        seen.add(status.kind)
    # Waited for the node to report (started_at), then (dead, and the lease granted at restart has
    # run out: lease + margin <= dead_after): a lone copy is never moved.
    assert seen == {StatusKind.WAITING_FOR_NODE, StatusKind.NO_ELIGIBLE_REPLICA}
    max_epoch = store.max_epoch(vol.volume_id)
    assert max_epoch is not None and max_epoch.value == 1


class EchoController(TopologyController):
    """Asks for exactly the current assignment of every volume (and places nothing)."""

    def decide(
        self,
        desired: object,
        current: Mapping[str, PublishedAssignment],
        observations: ObservationStore,
        leases: MasterLeases,
        now: float,
        *,
        draining: object = (),
        pending: object = (),
    ) -> Decision:
        asks = tuple(
            AssignmentAsk(
                p.assignment.volume_id,
                p.assignment.primary or "",
                p.assignment.replicas,
                "echo",
                p.assignment.in_sync,
            )
            for p in current.values()
        )
        return Decision(asks=asks, status={a.volume_id: VolumeStatus(None, None) for a in asks})


def test_an_ask_equal_to_the_current_assignment_is_not_published(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    report(control, store, hello("n1"), 0.0)
    vol = add_volume(store)
    control.step(1.0)
    echo = restore(store, TIMING, now=2.0, controller=EchoController())
    result = echo.step(3.0)
    assert len(result.decision.asks) == 1
    assert result.published == ()
    max_epoch = store.max_epoch(vol.volume_id)
    assert max_epoch is not None and max_epoch.value == 1


def test_differs_compares_primary_copies_and_the_in_sync_set(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    report(control, store, hello("n1"), 0.0)
    report(control, store, hello("n2"), 0.0)
    vol = add_volume(store)
    (assignment,) = control.step(1.0).published
    primary = assignment.primary
    assert primary is not None
    other = "n2" if primary == "n1" else "n1"
    assert differs(AssignmentAsk(vol.volume_id, primary, (primary,), "x", (primary,)), None)
    assert not differs(AssignmentAsk(vol.volume_id, primary, (primary,), "x", (primary,)), assignment)
    assert differs(AssignmentAsk(vol.volume_id, other, (other,), "x", (other,)), assignment)
    assert differs(AssignmentAsk(vol.volume_id, primary, (primary, other), "x", (primary, other)), assignment)
    two = control.publish(AssignmentAsk(vol.volume_id, primary, (primary, other), "x", (primary, other)))
    assert two.in_sync == (primary, other) and two.replication_portals == ("10.0.0.9:7000",) * 2
    # Only the in-sync set changes: still worth an epoch (a replica dropped, or back in sync).
    assert differs(AssignmentAsk(vol.volume_id, primary, (primary, other), "x", (primary,)), two)


def test_a_node_unknown_to_the_authority_is_retried_not_fatal(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    h = hello("n1")
    # Observed (Hello arrived) but its upsert has not committed yet.
    control.observations.record(h, "n1", 0.0)
    control.observations.record(Heartbeat(seq=1, observations=()), "n1", 0.0)
    vol = add_volume(store)
    result = control.step(1.0)
    assert result.published == ()
    assert [f.ask.volume_id for f in result.failed] == [vol.volume_id]
    assert "n1" in result.failed[0].error
    store.upsert_hello(h, seen_at=1.0)
    (published,) = control.step(2.0).published
    assert published.epoch == 1 and published.primary == "n1"


def test_a_deleted_volume_leaves_the_acks_at_once_and_is_not_revived(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    report(control, store, hello("n1"), 0.0)
    vol = add_volume(store)
    control.step(1.0)
    stale = control.read_authority()  # read before the delete
    store.delete_volume(vol.volume_id, deleted_at=2.0)
    control.volume_deleted(vol.volume_id)
    assert control.assignments_for("n1") == ()
    control.apply_snapshot(stale, 2.5)
    assert control.assignments_for("n1") == ()
    assert control.step(3.0).published == ()
    assert control.status(vol.volume_id) is None


def test_desired_volumes_come_from_the_authority(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    a = add_volume(store, "a", replicas=2)
    control.step(0.0)
    assert control.desired() == (
        DesiredVolume(volume_id=a.volume_id, name="a", size=64 * MiB, block_size=512, replicas=2),
    )


async def test_step_async_publishes_like_step(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    report(control, store, hello("n1"), 0.0)
    vol = add_volume(store)
    times = iter([1.0, 1.25])
    result = await control.step_async(lambda: next(times))
    (published,) = result.published
    assert published.volume_id == vol.volume_id and published.epoch == 1
    assert control.published_at(vol.volume_id) == 1.25  # the clock after the commit


def test_a_resize_publishes_the_next_epoch_with_the_new_size(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=100.0)
    report(control, store, hello("n1"), 100.0)
    report(control, store, hello("n2"), 100.0)
    vol = add_volume(store, replicas=2)
    (first,) = control.step(101.0).published
    assert (first.epoch, first.size) == (1, 64 * MiB)

    # A refused resize writes nothing.
    with pytest.raises(InvalidAuthorityRecord, match="only grow"):
        control.resize(vol.volume_id, 32 * MiB, 102.0)
    with pytest.raises(InvalidAuthorityRecord, match="multiple of the block size"):
        control.resize(vol.volume_id, 64 * MiB + 100, 102.0)
    assert control.current(vol.volume_id) == first
    assert control.resize(vol.volume_id, 64 * MiB, 102.0) is None  # the same size: no new epoch

    resized = control.resize(vol.volume_id, 128 * MiB, 103.0)
    assert resized is not None
    assert (resized.epoch, resized.size, resized.primary, resized.replicas) == (
        2, 128 * MiB, first.primary, first.replicas,
    )  # fmt: skip
    assert control.assignments_for("n1") == (resized,) == control.assignments_for("n2")
    assert control.published_at(vol.volume_id) == 103.0
    # The authority agrees (a restarted master reads the same), and later steps mint nothing more.
    assert store.latest_assignment(vol.volume_id) == resized
    assert restore(store, TIMING, now=200.0).current(vol.volume_id) == resized
    for now in (104.0, 105.0):
        for node in ("n1", "n2"):
            role = Role.PRIMARY if node == first.primary else Role.REPLICA
            control.observations.record(
                Heartbeat(seq=int(now), observations=(observation(vol.volume_id, 2, role),)), node, now - 0.5
            )
        assert control.step(now).published == ()
    max_epoch = store.max_epoch(vol.volume_id)
    assert max_epoch is not None and max_epoch.value == 2


def test_resizing_a_volume_never_placed_waits_for_its_first_epoch(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=100.0)
    vol = add_volume(store)
    assert control.resize(vol.volume_id, 96 * MiB, 100.0) is None
    assert store.max_epoch(vol.volume_id) is None
    report(control, store, hello("n1"), 101.0)
    (first,) = control.step(101.0).published
    assert (first.epoch, first.size) == (1, 96 * MiB)


# -- tombstones: deleted volumes a node still reports -----------------------------------------------

UNKNOWN = "99" * 16  # a volume id the master never minted


def test_tombstones_are_for_deleted_reported_volumes_only_sorted_by_id(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    report(control, store, hello("n1"), 0.0)
    vols = [add_volume(store, f"vol{i}") for i in range(4)]
    control.step(1.0)
    live = vols[3]
    deleted = sorted(vols[:3], key=lambda v: v.volume_id, reverse=True)  # deleted out of id order
    for i, vol in enumerate(deleted):
        store.delete_volume(vol.volume_id, deleted_at=2.0 + i)
        control.volume_deleted(vol.volume_id, vol.name)
    expected = tuple(DeletedVolume(v.volume_id, v.name) for v in sorted(deleted, key=lambda v: v.volume_id))

    reported = [live.volume_id, UNKNOWN, *(v.volume_id for v in deleted), deleted[0].volume_id]
    assert control.tombstones_for(reported) == expected
    assert control.tombstones_for(iter(reported)) == expected  # a one-shot iterable (a generator)
    assert control.tombstones_for([deleted[1].volume_id, live.volume_id]) == (
        DeletedVolume(deleted[1].volume_id, deleted[1].name),
    )
    assert control.tombstones_for([live.volume_id, UNKNOWN]) == ()  # live or unknown: never
    assert control.tombstones_for([]) == ()
    # The tombstoned volumes are gone from every other view of the master.
    assert [v.volume_id for v in control.desired()] == [live.volume_id]
    assert {a.volume_id for a in control.assignments_for("n1")} == {live.volume_id}


def test_volume_deleted_records_the_name(store: AuthorityStore) -> None:
    control = restore(store, TIMING, now=0.0)
    a = add_volume(store, "a")
    b = add_volume(store, "b")
    control.step(1.0)
    control.volume_deleted(a.volume_id)  # no name given: the live record's
    control.volume_deleted(b.volume_id, "b")
    assert control.tombstones_for([a.volume_id, b.volume_id]) == tuple(
        sorted((DeletedVolume(a.volume_id, "a"), DeletedVolume(b.volume_id, "b")), key=lambda d: d.volume_id)
    )
    # A volume the loop never saw (deleted before any step read it): the given name is recorded.
    late = add_volume(store, "late")
    control.volume_deleted(late.volume_id, "late")
    assert control.tombstones_for([late.volume_id]) == (DeletedVolume(late.volume_id, "late"),)


def test_a_live_volume_is_never_tombstoned_even_when_its_name_was_deleted_before(
    store: AuthorityStore,
) -> None:
    control = restore(store, TIMING, now=0.0)
    report(control, store, hello("n1"), 0.0)
    old = add_volume(store, "vol1")
    control.step(1.0)
    store.delete_volume(old.volume_id, deleted_at=2.0)
    control.volume_deleted(old.volume_id, old.name)
    new = add_volume(store, "vol1")  # the name is free again; a new volume id
    control.volume_added(new)
    control.step(3.0)
    assert control.tombstones_for([new.volume_id]) == ()
    assert control.tombstones_for([old.volume_id, new.volume_id]) == (DeletedVolume(old.volume_id, "vol1"),)
    assert [a.volume_id for a in control.assignments_for("n1")] == [new.volume_id]
    # A restarted master agrees.
    again = restore(store, TIMING, now=10.0)
    assert again.tombstones_for([old.volume_id, new.volume_id]) == (DeletedVolume(old.volume_id, "vol1"),)


def test_a_restarted_master_loads_the_tombstones_of_the_authority(store: AuthorityStore) -> None:
    first = restore(store, TIMING, now=0.0)
    report(first, store, hello("n1"), 0.0)
    placed = add_volume(store, "placed")
    first.step(1.0)
    never_placed = add_volume(store, "never-placed")
    live = add_volume(store, "live")
    store.delete_volume(placed.volume_id, deleted_at=2.0)
    store.delete_volume(never_placed.volume_id, deleted_at=3.0)
    # No volume_deleted here: the master stopped right after the authority recorded the deletes.

    second = restore(store, TIMING, now=5.0)
    reported = [live.volume_id, placed.volume_id, never_placed.volume_id, UNKNOWN]
    assert second.tombstones_for(reported) == tuple(
        sorted(
            (
                DeletedVolume(placed.volume_id, "placed"),
                DeletedVolume(never_placed.volume_id, "never-placed"),
            ),
            key=lambda d: d.volume_id,
        )
    )
    # ... and none of them comes back into the master's view: a deleted volume is in no Ack.
    assert [v.volume_id for v in second.desired()] == [live.volume_id]
    assert second.current(placed.volume_id) is None
    assert second.assignments_for("n1") == ()
    second.step(6.0)
    assert placed.volume_id not in {a.volume_id for a in second.assignments_for("n1")}
    assert second.tombstones_for([placed.volume_id]) == (DeletedVolume(placed.volume_id, "placed"),)


def test_a_primary_back_at_a_new_portal_gets_a_new_epoch_never_a_changed_one(store: AuthorityStore) -> None:
    """Issue 7: a Hello under the primary's id from a new portal changed the portal of the published
    epoch; the node, which had accepted that epoch, refused it and stayed fenced for good."""
    control = restore(store, TIMING, now=100.0)
    report(control, store, hello("n1"), 100.0)
    vol = add_volume(store)
    (first,) = control.step(101.0).published
    assert first.primary_portal == "10.0.0.49:3260"
    report(
        control,
        store,
        hello("n1", incarnation=2, port=3299),
        102.0,
        observation(vol.volume_id, 1, Role.PRIMARY),
    )
    control.apply_snapshot(control.read_authority(), 102.5)
    # Until the new epoch: the assignment exactly as the node accepted it.
    assert control.assignments_for("n1") == (first,)
    (moved,) = control.step(103.0).published
    assert (moved.epoch, moved.primary, moved.replicas) == (2, "n1", ("n1",))
    assert moved.primary_portal == "10.0.0.49:3299"
    assert control.assignments_for("n1") == (moved,)
    assert control.step(104.0).published == ()  # settled: no further epoch
