"""sparrow.node.convergence: the adapter's plans on real local volumes, and the fence timer.

The clock and the timer are fakes (``clock``/``schedule`` arguments): the tests move time by hand
and fire the timer themselves, so nothing sleeps. The volumes are real (VolumeManager on tmp_path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from frontend.scsi.lu import AccessState
from frontend.scsi.types import Nexus, ScsiRequest
from frontend.target import ChapConfig, ChapSecret, Portal, RemoteTarget, Target, TargetRegistry
from sparrow.cluster import nodestate
from sparrow.cluster.adapter import Adapter, AdapterPlan, OpenVolume
from sparrow.cluster.channel import ClusterSecret
from sparrow.cluster.lease import LeaseClock
from sparrow.cluster.messages import (
    Ack,
    Assignment,
    DeletedVolume,
    DirectoryEntry,
    Role,
    StreamKey,
    UnsupportedCommand,
    VolumeChap,
)
from sparrow.cluster.nodestate import NodeState
from sparrow.node.convergence import Convergence, NodeVolumes, RemoteDirectory, VolumeMismatch
from sparrow.node.replicated_store import Forwarding
from sparrow.node.replication import node_lookup
from sparrow.replication.protocol import VolumeView
from store.backing import BackingPolicy
from store.dirtymap import DirtyBitmap
from store.metadata import RecordWriteError
from store.volumes import VolumeManager, VolumeNotFound

ME = "n1"
VOL = "ab" * 16
OTHER = "cd" * 16
NAME = "vol-a"
SIZE = 1 << 20
LEASE = 5.0
IQN = f"iqn.2026-11.io.sparrow:{NAME}"
ACTIVE, FENCED, STANDBY = AccessState.ACTIVE_OPTIMIZED, AccessState.TRANSITIONING, AccessState.STANDBY


def assign(epoch: int = 1, primary: str | None = ME, replicas: tuple[str, ...] | None = None) -> Assignment:
    if replicas is None:
        replicas = () if primary is None else (primary,)
    portal = {"n1": "10.0.0.1:3260", "n2": "10.0.0.2:3260"}.get(primary or "")
    return Assignment(VOL, NAME, SIZE, 512, epoch, primary, portal, replicas)


@dataclass
class Handle:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Timers:
    now: float = 100.0
    handles: list[Handle] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def schedule(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(when, callback)
        self.handles.append(handle)
        return handle

    @property
    def armed(self) -> list[Handle]:
        return [h for h in self.handles if not h.cancelled]

    def advance(self, to: float) -> None:
        """Move the clock to ``to`` and run the timers due by then (as the loop would)."""
        self.now = to
        for handle in list(self.handles):
            if not handle.cancelled and handle.when <= to:
                self.handles.remove(handle)
                handle.callback()


@dataclass
class Node:
    data_dir: Path
    timers: Timers
    manager: VolumeManager
    registry: TargetRegistry
    volumes: NodeVolumes
    state: NodeState
    adapter: Adapter
    lease: LeaseClock
    conv: Convergence
    seq: int = 0

    def heartbeat(self) -> int:
        """A heartbeat sent now (what the heartbeat client does); returns its seq."""
        self.seq += 1
        self.lease.sent(self.seq, self.timers.now)
        return self.seq

    async def ack(
        self,
        *assignments: Assignment,
        seq: int | None = None,
        run: bool = True,
        directory: tuple[DirectoryEntry, ...] = (),
        deleted: tuple[DeletedVolume, ...] = (),
        stream_keys: tuple[StreamKey, ...] = (),
    ) -> None:
        """The Ack for ``seq`` (default: a heartbeat sent now) arrives, and its plan runs."""
        seq = self.heartbeat() if seq is None else seq
        assert self.lease.acked(seq, LEASE) is not None
        self.conv.on_ack(Ack(seq, LEASE, tuple(assignments), directory, deleted, stream_keys))
        if run:
            await self.conv.idle()

    def access(self) -> AccessState | None:
        target = self.registry.get(IQN)
        return None if target is None else target.lu.access_state


async def start_node(data_dir: Path, timers: Timers, *, fence_margin: float = 0.0) -> Node:
    state = NodeState(data_dir)
    state.load()
    manager = VolumeManager(data_dir)
    await manager.load_all()
    registry = TargetRegistry()
    volumes = NodeVolumes(manager, registry, base_iqn="iqn.2026-11.io.sparrow")
    adapter = Adapter(ME, state)
    lease = LeaseClock(fence_margin=fence_margin)
    conv = Convergence(adapter, volumes, lease, clock=timers.clock, schedule=timers.schedule)
    conv.start()
    await conv.idle()
    return Node(data_dir, timers, manager, registry, volumes, state, adapter, lease, conv)


async def stop_node(node: Node) -> None:
    await node.conv.close()
    await node.manager.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = await start_node(tmp_path, Timers())
    yield n
    await stop_node(n)


# ---- serving ------------------------------------------------------------------------------------


async def test_a_primary_assignment_is_persisted_created_with_the_masters_id_and_served(node: Node) -> None:
    await node.ack(assign())
    assert node.access() is ACTIVE
    volume = node.manager.get(NAME)
    assert (volume.meta.volume_id, volume.meta.size) == (VOL, SIZE)
    persisted = NodeState(node.data_dir)
    persisted.load()
    role = persisted.get(VOL)
    assert role is not None and (role.epoch, role.role) == (1, Role.PRIMARY)
    [obs] = node.conv.observations(node.timers.now)
    assert (obs.volume_id, obs.epoch, obs.role, obs.converged) == (VOL, 1, Role.PRIMARY, True)


async def test_a_primary_acked_without_a_valid_lease_is_exported_fenced(node: Node) -> None:
    seq = node.heartbeat()
    node.timers.now += LEASE + 1  # the Ack arrives after the lease it grants has run out
    await node.ack(assign(), seq=seq)
    assert node.access() is FENCED


async def test_a_replica_stands_by_and_redirects_logins_to_the_primary(node: Node) -> None:
    await node.ack(assign(primary="n2", replicas=("n2", ME)))
    assert node.access() is STANDBY
    remote = node.registry.remote(IQN)
    assert remote is not None and remote.portal == Portal("10.0.0.2", 3260, 1)


async def test_node_lookup_gives_a_replica_stream_the_persisted_role_and_the_local_store(node: Node) -> None:
    """What a replica stream checks each record against (sparrow/node/replication.py): the
    persisted role, epoch, primary and size, whether the volume is open here, the stream key."""
    key = b"k" * 32
    lookup, store_for = node_lookup(node.state, node.volumes, lambda vid, epoch: key if epoch == 1 else None)
    assert lookup(VOL) is None and store_for(VOL) is None
    await node.ack(assign(primary="n2", replicas=("n2", ME)))
    assert node.volumes.is_exported(VOL) and VOL in node.volumes.exported()
    assert lookup(VOL) == VolumeView(VOL, 1, Role.REPLICA, "n2", SIZE, 512, True, key)
    assert store_for(VOL) is not None
    assert not node.volumes.is_exported("0" * 32)


async def test_a_released_volume_is_unexported_but_its_data_stays(node: Node) -> None:
    await node.ack(assign())
    target = node.registry.get(IQN)
    assert target is not None
    await target.lu.store.write(0, b"\x5a" * 512)
    await node.ack()  # an Ack that no longer names the volume
    assert node.registry.get(IQN) is None
    assert target.lu.access_state is FENCED  # sessions still open meanwhile are refused I/O
    with pytest.raises(VolumeNotFound):  # its store is flushed and closed ...
        node.manager.get(NAME)
    image = node.data_dir / "volumes" / f"{NAME}.img"  # ... and its data stays on disk
    assert image.read_bytes()[:512] == b"\x5a" * 512
    await node.ack(assign())  # assigned again: the same data, served again
    target = node.registry.get(IQN)
    assert target is not None and target.lu.access_state is ACTIVE
    assert await target.lu.store.read(0, 512) == b"\x5a" * 512


async def test_a_grown_assignment_grows_the_local_volume(node: Node) -> None:
    await node.ack(assign())
    bigger = Assignment(VOL, NAME, 2 * SIZE, 512, 2, ME, "10.0.0.1:3260", (ME,))
    await node.ack(bigger)
    assert node.manager.get(NAME).meta.size == 2 * SIZE
    target = node.registry.get(IQN)
    assert target is not None and target.lu.capacity == 2 * SIZE // 512


async def test_a_name_held_by_another_volume_id_is_refused_not_reused(node: Node) -> None:
    await node.manager.create(NAME, SIZE, volume_id=OTHER)
    await node.ack(assign())
    assert node.registry.get(IQN) is None
    assert node.conv.last_error is not None and "VolumeMismatch" in node.conv.last_error
    with pytest.raises(VolumeMismatch):
        await node.volumes.open_volume(OpenVolume(VOL, NAME, SIZE, 512))
    assert node.manager.get(NAME).meta.volume_id == OTHER


# ---- the fence ----------------------------------------------------------------------------------


async def test_the_fence_is_armed_at_the_lease_expiry_counted_from_the_send(node: Node) -> None:
    seq = node.heartbeat()  # sent at 100.0
    node.timers.now = 100.3  # the Ack arrives later; the lease still counts from the send
    await node.ack(assign(), seq=seq)
    assert [h.when for h in node.timers.armed] == [100.0 + LEASE]
    assert node.conv.fence_at == 100.0 + LEASE


async def test_when_the_lease_lapses_every_primary_is_fenced_at_once(node: Node) -> None:
    await node.ack(assign())
    assert node.access() is ACTIVE
    node.timers.advance(100.0 + LEASE)
    # Applied in the timer callback itself: no await has happened since.
    assert node.access() is FENCED
    [fence] = node.conv.fences
    assert fence.volume_ids == (VOL,) and fence.late == 0.0
    await node.conv.idle()
    assert node.adapter.access_state(VOL) is FENCED
    [obs] = node.conv.observations(node.timers.now)
    assert (obs.epoch, obs.role) == (1, Role.PRIMARY)  # still the primary, by the assignment


MARGIN = 0.5


@pytest.fixture
async def margined(tmp_path: Path) -> AsyncIterator[Node]:
    n = await start_node(tmp_path, Timers(), fence_margin=MARGIN)
    yield n
    await stop_node(n)


async def test_with_a_fence_margin_the_fence_lands_that_long_before_the_lease_expires(margined: Node) -> None:
    node = margined
    seq = node.heartbeat()  # sent at 100.0
    node.timers.now = 100.3
    await node.ack(assign(), seq=seq)
    assert node.conv.fence_at == 100.0 + LEASE - MARGIN == node.lease.fence_deadline
    node.timers.advance(100.0 + LEASE - MARGIN - 0.001)
    assert node.access() is ACTIVE
    node.timers.advance(100.0 + LEASE - MARGIN)
    assert node.access() is FENCED
    [fence] = node.conv.fences
    assert (fence.deadline, fence.expired_at) == (100.0 + LEASE - MARGIN, 100.0 + LEASE)
    assert fence.late == 0.0 and fence.before_expiry == MARGIN


async def test_a_plan_that_runs_inside_the_fence_margin_never_serves(margined: Node) -> None:
    """The plan guard asks the same question as the timer: past the fence deadline, even with the
    lease itself still running, the LU stays fenced."""
    node = margined
    await node.ack(assign(), run=False)  # planned at 100.0 with a valid lease: serve
    node.timers.now = 100.0 + LEASE - MARGIN / 2  # runs before the expiry, after the deadline
    await node.conv.idle()
    assert node.access() is FENCED
    assert [f.reason for f in node.conv.fences] == ["lease lapsed before the plan ran"]


async def test_a_lease_within_the_fence_margin_never_serves_and_is_logged_once(tmp_path: Path) -> None:
    node = await start_node(tmp_path, Timers(), fence_margin=LEASE)
    try:
        with structlog.testing.capture_logs() as logs:
            await node.ack(assign())
            await node.ack(assign())
        assert node.access() is FENCED
        short = [e for e in logs if "fence margin" in e["event"]]
        assert [(e["lease_seconds"], e["fence_margin"]) for e in short] == [(LEASE, LEASE)]
    finally:
        await stop_node(node)


async def test_the_fence_does_not_wait_behind_a_running_plan(node: Node) -> None:
    await node.ack(assign())
    await node.ack(assign(), run=False)  # queued, not run yet
    node.timers.advance(node.timers.now + LEASE)
    assert node.access() is FENCED
    await node.conv.idle()
    assert node.access() is FENCED


async def test_a_renewal_moves_the_fence(node: Node) -> None:
    await node.ack(assign())
    first = node.timers.armed
    node.timers.now = 101.0
    await node.ack(assign())
    assert all(h.cancelled for h in first)
    assert [h.when for h in node.timers.armed] == [101.0 + LEASE]
    node.timers.advance(100.0 + LEASE)  # the first lease's end: nothing happens
    assert node.access() is ACTIVE and not node.conv.fences
    node.timers.advance(101.0 + LEASE)
    assert node.access() is FENCED


async def test_a_timer_that_fires_early_is_rearmed_not_obeyed(node: Node) -> None:
    await node.ack(assign())
    [handle] = node.timers.armed
    node.timers.handles.remove(handle)
    node.timers.now = handle.when - 0.0004  # the loop's millisecond clock fired a hair early
    handle.callback()
    assert node.access() is ACTIVE and not node.conv.fences
    [again] = node.timers.armed
    assert again.when >= handle.when
    node.timers.advance(again.when)
    assert node.access() is FENCED


async def test_service_comes_back_with_the_next_ack(node: Node) -> None:
    await node.ack(assign())
    node.timers.advance(100.0 + LEASE)
    assert node.access() is FENCED
    node.timers.now = 110.0
    await node.ack(assign())
    assert node.access() is ACTIVE
    assert [h.when for h in node.timers.armed] == [110.0 + LEASE]


async def test_a_plan_made_under_a_lease_that_lapsed_before_it_ran_never_serves(node: Node) -> None:
    await node.ack(assign(), run=False)  # planned with a valid lease: persist, open, serve
    node.timers.now = 100.0 + LEASE + 1  # ... but it runs only after the lease ran out
    await node.conv.idle()
    assert node.access() is FENCED
    assert node.adapter.access_state(VOL) is FENCED  # the adapter's model agrees with the LU
    assert [f.reason for f in node.conv.fences] == ["lease lapsed before the plan ran"]
    node.timers.now = 120.0
    await node.ack(assign())
    assert node.access() is ACTIVE


async def test_a_restarted_node_reopens_its_primary_fenced_until_an_ack_confirms_it(tmp_path: Path) -> None:
    first = await start_node(tmp_path, Timers())
    await first.ack(assign())
    assert first.access() is ACTIVE
    await stop_node(first)

    timers = Timers(now=500.0)
    second = await start_node(tmp_path, timers)
    try:
        assert second.access() is FENCED  # exported (initiators can log in) but fenced
        [obs] = second.conv.observations(timers.now)
        assert (obs.epoch, obs.role) == (1, Role.PRIMARY)
        assert not timers.armed  # no lease, nothing to expire
        await second.ack(assign())
        assert second.access() is ACTIVE
    finally:
        await stop_node(second)


# ---- export settings (ack v3): CHAP, physical block size, backing --------------------------------

MUTUAL = VolumeChap("host-a", "initiator-secret", "target-a", "target-secret")


def with_settings(assignment: Assignment, **settings: object) -> Assignment:
    return dataclasses.replace(assignment, **settings)  # type: ignore[arg-type]


def target_chap(node: Node) -> ChapConfig | None:
    target = node.registry.get(IQN)
    assert target is not None
    return target.chap


async def test_a_volume_created_here_gets_the_assignments_settings(node: Node, tmp_path: Path) -> None:
    backing = tmp_path.parent / f"{tmp_path.name}-backing.img"
    backing.write_bytes(b"")
    os.truncate(backing, SIZE)  # a backing file holds exactly the volume's size
    node.manager.backing_policy = BackingPolicy.of([str(backing)])
    await node.ack(with_settings(assign(), chap=MUTUAL, physical_block_size=4096, backing=str(backing)))
    assert node.access() is ACTIVE
    meta = node.manager.get(NAME).meta
    assert meta.physical_block_size == 4096
    assert meta.backing is not None and Path(meta.backing) == backing
    assert meta.chap is not None and (meta.chap.user, meta.chap.mutual_user) == ("host-a", "target-a")
    assert target_chap(node) == ChapConfig(
        initiator=ChapSecret("host-a", "initiator-secret"), target=ChapSecret("target-a", "target-secret")
    )
    lu = node.registry.get(IQN)
    assert lu is not None and lu.lu._lbppbe == 3  # 8 logical blocks per physical block (SBC-3 5.16.2)


async def test_a_node_refuses_a_backing_outside_its_own_allowed_prefixes(node: Node, tmp_path: Path) -> None:
    """Whatever the master published, the node opens only what its operator allowed, and never
    grows a backing file: the volume stays unexported and the file as it was."""
    allowed = tmp_path.parent / f"{tmp_path.name}-allowed"
    allowed.mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.img"
    outside.write_bytes(b"\x33" * 4096)
    (allowed / "link.img").symlink_to(outside)
    small = allowed / "small.img"
    small.write_bytes(b"\x44" * 4096)  # smaller than SIZE: would be grown on main
    node.manager.backing_policy = BackingPolicy.of([str(allowed)])
    for path in (outside, allowed / "link.img", small):
        await node.ack(with_settings(assign(), backing=str(path)))
        assert node.access() is None, path  # not exported
        with pytest.raises(VolumeNotFound):
            node.manager.get(NAME)
    assert outside.read_bytes() == b"\x33" * 4096
    assert small.read_bytes() == b"\x44" * 4096


async def test_a_chap_change_re_registers_the_target_without_a_new_epoch(node: Node) -> None:
    await node.ack(assign())
    assert target_chap(node) is None
    await node.ack(with_settings(assign(), chap=VolumeChap("u", "s")))
    assert target_chap(node) == ChapConfig(initiator=ChapSecret("u", "s"))
    assert node.access() is ACTIVE  # same epoch, same role: not a new assignment
    await node.ack(assign())
    assert target_chap(node) is None


async def test_a_restarted_node_exports_with_the_chap_its_record_keeps(tmp_path: Path) -> None:
    first = await start_node(tmp_path, Timers())
    await first.ack(with_settings(assign(), chap=VolumeChap("u", "s")))
    await stop_node(first)
    second = await start_node(tmp_path, Timers(now=500.0))
    try:
        assert second.access() is FENCED
        assert target_chap(second) == ChapConfig(initiator=ChapSecret("u", "s"))  # before any Ack
    finally:
        await stop_node(second)


# ---- the directory: volumes served elsewhere ----------------------------------------------------

OTHER_NAME = "vol-b"
OTHER_IQN = f"iqn.2026-11.io.sparrow:{OTHER_NAME}"
AT_N2 = Portal("10.0.0.2", 3260, 1)
AT_N3 = Portal("10.0.0.3", 3261, 1)


def entry(
    volume_id: str = OTHER, name: str = OTHER_NAME, portal: str | None = "10.0.0.2:3260"
) -> DirectoryEntry:
    return DirectoryEntry(volume_id, name, portal)


async def test_a_volume_held_elsewhere_is_a_remote_target_at_its_primary(node: Node) -> None:
    await node.ack(directory=(entry(),))
    assert node.registry.get(OTHER_IQN) is None  # nothing local
    assert node.registry.resolve(OTHER_IQN) == RemoteTarget(OTHER_IQN, OTHER_NAME, AT_N2)
    assert list(node.registry) == [RemoteTarget(OTHER_IQN, OTHER_NAME, AT_N2)]  # SendTargets lists it
    assert node.conv.directory.entries() == {OTHER: RemoteTarget(OTHER_IQN, OTHER_NAME, AT_N2)}
    assert node.manager.list() == []  # no local copy is created for it


async def test_a_remote_target_follows_the_primary_and_goes_with_it(node: Node) -> None:
    await node.ack(directory=(entry(),))
    await node.ack(directory=(entry(portal="10.0.0.3:3261"),))  # the primary moved
    assert node.registry.remote(OTHER_IQN) == RemoteTarget(OTHER_IQN, OTHER_NAME, AT_N3)
    await node.ack(directory=(entry(portal=None),))  # no primary: nowhere to send a login
    assert node.registry.resolve(OTHER_IQN) is None and len(node.registry) == 0
    await node.ack(directory=(entry(),))
    assert node.registry.remote(OTHER_IQN) is not None
    await node.ack()  # the volume left the directory (deleted)
    assert node.registry.resolve(OTHER_IQN) is None and node.conv.directory.entries() == {}


async def test_a_volume_this_node_serves_is_left_to_the_adapter(node: Node) -> None:
    await node.ack(assign(), directory=(entry(VOL, NAME, "10.0.0.1:3260"), entry()))
    resolved = node.registry.resolve(IQN)
    assert isinstance(resolved, Target) and resolved.lu.access_state is ACTIVE
    assert node.registry.remote(IQN) is None
    assert set(node.conv.directory.entries()) == {OTHER}


async def test_a_replica_keeps_the_adapters_redirect(node: Node) -> None:
    await node.ack(assign(primary="n2", replicas=("n2", ME)), directory=(entry(VOL, NAME, "10.0.0.2:3260"),))
    assert node.access() is STANDBY  # the local copy stays
    assert node.registry.remote(IQN) == RemoteTarget(IQN, NAME, AT_N2)
    assert node.conv.directory.entries() == {}  # the adapter's entry, not the directory's


async def test_a_remote_volume_assigned_here_as_primary_is_served_here(node: Node) -> None:
    await node.ack(directory=(entry(VOL, NAME, "10.0.0.2:3260"),))
    assert node.registry.remote(IQN) == RemoteTarget(IQN, NAME, AT_N2)
    await node.ack(assign(epoch=2), directory=(entry(VOL, NAME, "10.0.0.1:3260"),))
    resolved = node.registry.resolve(IQN)  # not a redirect (to itself, or to the old primary)
    assert isinstance(resolved, Target) and resolved.lu.access_state is ACTIVE


async def test_a_primary_assignment_removes_the_remote_entry_before_the_volume_opens(node: Node) -> None:
    await node.ack(directory=(entry(VOL, NAME, "10.0.0.2:3260"),))
    await node.ack(assign(epoch=2), directory=(entry(VOL, NAME, "10.0.0.1:3260"),), run=False)
    assert node.registry.resolve(IQN) is None  # at once, in on_ack
    await node.conv.idle()
    assert node.access() is ACTIVE


async def test_a_released_volume_becomes_a_remote_target_once_it_is_closed(node: Node) -> None:
    await node.ack(assign())
    await node.ack(directory=(entry(VOL, NAME, "10.0.0.2:3260"),), run=False)
    assert node.registry.remote(IQN) is None  # still exported here until the plan closes it
    await node.conv.idle()
    assert node.registry.get(IQN) is None
    assert node.registry.resolve(IQN) == RemoteTarget(IQN, NAME, AT_N2)


async def test_a_local_target_of_the_same_name_is_never_touched(node: Node) -> None:
    await node.ack(assign())
    await node.ack(assign(), directory=(entry(OTHER, NAME, "10.0.0.2:3260"),))  # another id, same name
    resolved = node.registry.resolve(IQN)
    assert isinstance(resolved, Target) and resolved.lu.access_state is ACTIVE
    assert node.conv.directory.entries() == {}


def test_remote_directory_leaves_entries_it_did_not_put_alone() -> None:
    registry = TargetRegistry()
    directory = RemoteDirectory(registry, base_iqn="iqn.2026-11.io.sparrow", tpgt=3)
    directory.update((entry(),), held=())
    assert registry.remote(OTHER_IQN) == RemoteTarget(OTHER_IQN, OTHER_NAME, Portal("10.0.0.2", 3260, 3))
    foreign = RemoteTarget(OTHER_IQN, OTHER_NAME, AT_N3)
    registry.add_remote(foreign)  # replaced by someone else since
    directory.update((), held=())
    assert registry.remote(OTHER_IQN) == foreign
    directory.update((entry(),), held=(OTHER,))  # held here: no entry
    assert directory.entries() == {}


# ---- destroy: the master deleted the volume ------------------------------------------------------


def files(node: Node) -> set[str]:
    return set(os.listdir(node.data_dir / "volumes"))


def persisted(node: Node) -> set[str]:
    state = NodeState(node.data_dir)
    assert state.load() == ()
    return set(state.roles)


async def test_destroy_unexports_and_deletes_the_data_and_the_record(node: Node) -> None:
    await node.ack(assign())
    target = node.registry.get(IQN)
    assert target is not None
    await target.lu.store.write(0, b"\x5a" * 512)
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"} and persisted(node) == {VOL}
    await node.conv.destroy(VOL, NAME)
    assert node.registry.resolve(IQN) is None
    assert target.lu.access_state is FENCED  # sessions still open meanwhile are refused I/O
    with pytest.raises(VolumeNotFound):
        node.manager.get(NAME)
    assert files(node) == set() and persisted(node) == set()
    assert node.state.get(VOL) is None and node.conv.last_error is None
    assert node.conv.observations(node.timers.now) == ()
    assert node.volumes.settings(VOL) is None


async def test_an_ack_after_the_destroy_does_not_recreate_the_volume(node: Node) -> None:
    await node.ack(assign())
    await node.conv.destroy(VOL, NAME)
    await node.ack(assign(), directory=(entry(VOL, NAME, "10.0.0.1:3260"),))  # in flight meanwhile
    await node.ack(assign(epoch=2))
    assert node.registry.resolve(IQN) is None  # neither served nor redirected (to itself)
    assert files(node) == set() and persisted(node) == set()
    assert node.conv.observations(node.timers.now) == ()


async def test_destroy_deletes_a_released_volume(node: Node) -> None:
    await node.ack(assign())
    await node.ack()  # released: closed, data and record kept
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"}
    await node.conv.destroy(VOL, NAME)
    assert files(node) == set() and persisted(node) == set()


async def test_destroy_deletes_a_volume_that_failed_to_load(tmp_path: Path) -> None:
    first = await start_node(tmp_path, Timers())
    await first.ack(assign())
    await stop_node(first)
    (tmp_path / "volumes" / f"{NAME}.json").write_bytes(b"garbage")  # its id is unreadable now
    second = await start_node(tmp_path, Timers(now=500.0))
    try:
        with pytest.raises(VolumeNotFound):
            second.manager.get(NAME)  # offline
        await second.conv.destroy(VOL, NAME)  # the master named it
        assert files(second) == set() and persisted(second) == set()
        assert second.conv.last_error is None
    finally:
        await stop_node(second)


async def test_destroy_leaves_a_user_given_backing_alone(node: Node, tmp_path: Path) -> None:
    backing = tmp_path.parent / f"{tmp_path.name}-backing.img"
    backing.write_bytes(b"\x11" * SIZE)
    await node.ack(with_settings(assign(), backing=str(backing)))
    await node.conv.destroy(VOL, NAME)
    assert files(node) == set() and persisted(node) == set()
    assert backing.read_bytes() == b"\x11" * SIZE


async def test_destroy_refuses_a_local_volume_of_another_id_and_tells_the_waiter(node: Node) -> None:
    await node.manager.create(NAME, SIZE, volume_id=OTHER)
    with pytest.raises(VolumeMismatch, match=OTHER):
        await node.conv.destroy(VOL, NAME)
    assert node.conv.last_error is not None and "VolumeMismatch" in node.conv.last_error
    assert node.manager.get(NAME).meta.volume_id == OTHER  # untouched
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"}
    # Closed, not only when it is open: a released volume of the other id is not deleted either.
    await node.manager.close_volume(NAME)
    with pytest.raises(VolumeMismatch):
        await node.conv.destroy(VOL, NAME)
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"}
    # Once the clash is gone, the same call succeeds (every step is idempotent).
    await node.manager.delete(NAME)
    await node.conv.destroy(VOL, NAME)
    assert node.conv.last_error is None


async def test_destroy_of_a_volume_that_is_not_here_is_a_no_op(node: Node) -> None:
    await node.manager.create("vol-b", SIZE, volume_id=OTHER)
    await node.conv.destroy(VOL, NAME)
    await node.conv.destroy(VOL, NAME)
    assert node.conv.last_error is None
    assert files(node) == {"vol-b.json", "vol-b.img"}


async def test_destroy_removes_the_remote_entry_of_the_volume(node: Node) -> None:
    await node.ack(directory=(entry(),))
    assert node.registry.remote(OTHER_IQN) is not None
    await node.conv.destroy(OTHER, OTHER_NAME)  # nothing local: only the directory changes
    assert node.registry.resolve(OTHER_IQN) is None and node.conv.directory.entries() == {}
    await node.ack(directory=(entry(),))  # the next Ack still lists it (in flight meanwhile)
    assert node.registry.resolve(OTHER_IQN) is None


def break_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every directory fsync of the node state fails (EIO) until ``monkeypatch.undo()``."""

    def broken(path: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(nodestate, "fsync_dir", broken)


async def test_a_failed_forget_is_raised_to_the_waiter_and_the_data_stays(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    await node.ack(assign())
    break_fsync(monkeypatch)
    with pytest.raises(RecordWriteError):
        await node.conv.destroy(VOL, NAME)
    monkeypatch.undo()
    assert node.conv.last_error is not None and "RecordWriteError" in node.conv.last_error
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"}  # never deleted before the record went
    assert node.registry.get(IQN) is None  # but no longer served
    await node.conv.destroy(VOL, NAME)  # the retry finishes it
    assert files(node) == set() and persisted(node) == set()


# ---- tombstones (ack v4): the master says a reported volume was deleted ----------------------------

TOMBSTONE = DeletedVolume(VOL, NAME)


class DestroySpy:
    """Counts the adapter's destroy plans (``Convergence.on_ack`` asks for one per new tombstone)."""

    def __init__(self, adapter: Adapter) -> None:
        self.calls: list[tuple[str, str]] = []
        self._destroy = adapter.destroy

    def __call__(self, volume_id: str, name: str) -> AdapterPlan:
        self.calls.append((volume_id, name))
        return self._destroy(volume_id, name)


async def test_an_ack_with_a_tombstone_destroys_the_volume_it_created(node: Node) -> None:
    await node.ack(assign())
    target = node.registry.get(IQN)
    assert target is not None and target.lu.access_state is ACTIVE
    await target.lu.store.write(0, b"\x5a" * 512)
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"} and persisted(node) == {VOL}
    [obs] = node.conv.observations(node.timers.now)
    assert obs.volume_id == VOL  # what the heartbeat reported, so the master sends the tombstone

    await node.ack(deleted=(TOMBSTONE,))  # the master no longer assigns it, and says why
    assert VOL in node.adapter.destroyed
    assert node.registry.resolve(IQN) is None  # unregistered: no login, no redirect
    assert target.lu.access_state is FENCED  # sessions still open meanwhile are refused I/O
    assert node.volumes.exported() == {}
    with pytest.raises(VolumeNotFound):
        node.manager.get(NAME)
    assert files(node) == set() and persisted(node) == set()
    assert node.state.get(VOL) is None
    assert node.conv.last_error is None
    assert node.conv.observations(node.timers.now) == ()  # no longer reported
    # An assignment for it still in flight is refused, never recreates it.
    await node.ack(assign(epoch=2))
    assert node.registry.resolve(IQN) is None and files(node) == set() and persisted(node) == set()


async def test_a_tombstone_destroys_a_volume_released_by_the_same_ack(node: Node) -> None:
    await node.ack(assign(primary="n2", replicas=("n2", ME)))  # a replica here
    assert node.access() is STANDBY
    await node.ack(deleted=(TOMBSTONE,), run=False)
    await node.conv.idle()
    assert node.conv.last_error is None
    assert node.registry.resolve(IQN) is None  # neither the LU nor the replica's redirect stays
    assert files(node) == set() and persisted(node) == set()


async def test_the_same_tombstone_again_queues_nothing_new(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    await node.ack(assign())
    spy = DestroySpy(node.adapter)
    monkeypatch.setattr(node.adapter, "destroy", spy)
    await node.ack(deleted=(TOMBSTONE,))
    assert spy.calls == [(VOL, NAME)]
    assert files(node) == set()
    # A volume of that name and id appears again (e.g. restored by hand): the tombstone, repeated by
    # an Ack the node had already sent its heartbeat for, does not destroy it a second time.
    await node.manager.create(NAME, SIZE, volume_id=VOL)
    await node.ack(deleted=(TOMBSTONE,), run=False)
    assert spy.calls == [(VOL, NAME)]
    await node.conv.idle()
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"}
    assert node.conv.last_error is None


async def test_a_tombstone_for_a_volume_never_held_here_is_harmless(node: Node) -> None:
    await node.ack(assign())
    await node.manager.create(OTHER_NAME, SIZE, volume_id="ef" * 16)  # an unrelated local volume
    before = files(node)
    await node.ack(assign(), deleted=(DeletedVolume(OTHER, "vol-c"),))
    assert node.conv.last_error is None
    assert OTHER in node.adapter.destroyed
    assert files(node) == before  # nothing deleted
    assert node.access() is ACTIVE  # the volume it holds is served on
    [obs] = node.conv.observations(node.timers.now)
    assert (obs.volume_id, obs.role) == (VOL, Role.PRIMARY)


async def test_a_tombstone_naming_a_local_volume_of_another_id_deletes_nothing(node: Node) -> None:
    await node.manager.create(OTHER_NAME, SIZE, volume_id="ef" * 16)
    await node.ack(deleted=(DeletedVolume(OTHER, OTHER_NAME),))
    assert node.conv.last_error is not None and "VolumeMismatch" in node.conv.last_error
    assert node.manager.get(OTHER_NAME).meta.volume_id == "ef" * 16
    assert files(node) == {f"{OTHER_NAME}.json", f"{OTHER_NAME}.img"}


async def test_a_tombstone_whose_destroy_failed_is_retried_by_the_next_one(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    await node.ack(assign())
    break_fsync(monkeypatch)
    await node.ack(deleted=(TOMBSTONE,))  # the forget fails (its fsync): the role and the data stay
    monkeypatch.undo()
    assert node.conv.last_error is not None and "RecordWriteError" in node.conv.last_error
    assert files(node) == {f"{NAME}.json", f"{NAME}.img"} and node.state.get(VOL) is not None
    # No longer a tombstone: the volume is reported again, so the master sends its tombstone again.
    assert VOL not in node.adapter.destroyed
    assert [o.volume_id for o in node.conv.observations(node.timers.now)] == [VOL]
    await node.ack(deleted=(TOMBSTONE,))
    assert files(node) == set() and persisted(node) == set() and VOL in node.adapter.destroyed


# -- the in-sync set: where a primary forwards ------------------------------------------------------


async def test_a_primary_learns_its_in_sync_replicas_and_where_they_listen(node: Node) -> None:
    three = dataclasses.replace(
        assign(epoch=2, replicas=(ME, "n2", "n3")),
        in_sync=(ME, "n3"),
        replication_portals=("10.0.0.1:3291", "10.0.0.2:3291", None),
    )
    assert node.conv.replication_targets(VOL) == ()
    await node.ack(three)
    # n2 is out of the set (stale): not a target; n3 is, though its address is not known yet.
    assert node.conv.replication_targets(VOL) == (("n3", None),)
    moved = dataclasses.replace(
        three, replication_portals=("10.0.0.1:3291", "10.0.0.2:3291", "10.0.0.3:3291")
    )
    await node.ack(moved)  # same epoch, a portal learnt: no new epoch needed
    assert node.conv.replication_targets(VOL) == (("n3", "10.0.0.3:3291"),)
    await node.ack(dataclasses.replace(moved, epoch=3, in_sync=(ME, "n2", "n3")))
    assert node.conv.replication_targets(VOL) == (("n2", "10.0.0.2:3291"), ("n3", "10.0.0.3:3291"))


async def test_a_replica_or_an_unapplied_ack_names_no_targets(node: Node) -> None:
    replica = dataclasses.replace(assign(epoch=1, primary="n2", replicas=("n2", ME)), in_sync=("n2", ME))
    await node.ack(replica)
    assert node.conv.replication_targets(VOL) == ()
    primary = dataclasses.replace(assign(epoch=2, replicas=(ME, "n2")), in_sync=(ME, "n2"))
    await node.ack(primary, run=False)  # not persisted yet
    assert node.conv.replication_targets(VOL) == ()
    await node.conv.idle()
    assert node.conv.replication_targets(VOL) == (("n2", None),)


async def test_the_stream_keys_of_the_latest_ack_are_kept_for_its_epoch_only(node: Node) -> None:
    """docs/replication.md, "Who may open a stream": in memory, from the latest Ack alone."""
    primary = assign(epoch=2, replicas=(ME, "n2", "n3"))
    keys = (StreamKey(VOL, "n2", b"\x02" * 32), StreamKey(VOL, "n3", b"\x03" * 32))
    assert node.conv.stream_key(VOL, 2, "n2") is None  # no Ack yet (a restarted node)
    await node.ack(primary, stream_keys=keys)
    assert node.conv.stream_key(VOL, 2, "n2") == b"\x02" * 32
    assert node.conv.stream_key(VOL, 2, "n3") == b"\x03" * 32
    assert node.conv.stream_key(VOL, 1, "n2") is None  # another epoch
    assert node.conv.stream_key(VOL, 2, ME) is None
    await node.ack(dataclasses.replace(primary, epoch=3), stream_keys=keys[:1])
    assert node.conv.stream_key(VOL, 2, "n2") is None and node.conv.stream_key(VOL, 3, "n3") is None
    assert node.conv.stream_key(VOL, 3, "n2") == b"\x02" * 32
    await node.ack(dataclasses.replace(primary, epoch=3))  # an Ack without keys forgets them
    assert node.conv.stream_key(VOL, 3, "n2") is None


# ---- dirty maps: which copies start dirty (docs/replication.md, "Catch-up") -----------------------


async def start_cluster_node(data_dir: Path, timers: Timers) -> tuple[Node, Forwarding]:
    """A node whose volumes are wrapped for forwarding (``sparrow node``): it keeps dirty maps."""
    state = NodeState(data_dir)
    state.load()
    manager = VolumeManager(data_dir)
    await manager.load_all()
    registry = TargetRegistry()
    secret = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")
    forwarding = Forwarding(ME, secret, clock=timers.clock)
    volumes = NodeVolumes(manager, registry, base_iqn="iqn.2026-11.io.sparrow", forwarding=forwarding)
    adapter = Adapter(ME, state)
    lease = LeaseClock(fence_margin=0.0)
    conv = Convergence(adapter, volumes, lease, clock=timers.clock, schedule=timers.schedule)
    conv.start()
    await conv.idle()
    return Node(data_dir, timers, manager, registry, volumes, state, adapter, lease, conv), forwarding


def on_disk(node: Node) -> list[int]:
    path = node.data_dir / "volumes" / f"{NAME}.dirty"
    return list(DirtyBitmap.decode(path.read_bytes(), VOL, 1))


async def test_a_copy_created_in_sync_starts_clean_and_a_released_one_all_dirty(tmp_path: Path) -> None:
    node, forwarding = await start_cluster_node(tmp_path, Timers())
    try:
        both = (ME, "n2")
        await node.ack(dataclasses.replace(assign(replicas=both), in_sync=both))
        assert on_disk(node) == []  # a new volume: every copy zeros
        dirty = node.volumes.dirty_map(VOL)
        assert dirty is not None
        target = node.registry.get(IQN)
        assert target is not None
        await node.ack()  # released: a later re-add must be a full copy
        assert on_disk(node) == [0]
        assert node.volumes.dirty_map(VOL) is None and dirty.closed
    finally:
        await forwarding.close()
        await stop_node(node)


async def test_a_copy_created_outside_the_in_sync_set_starts_all_dirty(tmp_path: Path) -> None:
    node, forwarding = await start_cluster_node(tmp_path, Timers())
    try:
        replacement = dataclasses.replace(assign(primary="n2", replicas=("n2", ME)), in_sync=("n2",))
        await node.ack(replacement)
        assert on_disk(node) == [0]
        # The replica's store marks before it writes.
        marking = node.volumes.marking_store(VOL)
        assert marking is not None and marking.dirty is node.volumes.dirty_map(VOL)
    finally:
        await forwarding.close()
        await stop_node(node)


# ---- diagnostics (heartbeat v3) -------------------------------------------------------------------


async def test_a_volume_that_cannot_converge_reports_its_error_until_a_plan_succeeds(node: Node) -> None:
    await node.manager.create(NAME, SIZE, volume_id=OTHER)
    await node.ack(assign())
    [obs] = node.conv.observations(node.timers.now)
    assert obs.volume_id == VOL and not obs.converged
    assert obs.error is not None and obs.error.startswith("VolumeMismatch: ") and OTHER in obs.error
    await node.manager.delete(NAME)  # the operator clears the clash
    await node.ack(assign())
    [obs] = node.conv.observations(node.timers.now)
    assert obs.converged and obs.error is None


async def test_the_commands_a_volume_answered_as_unsupported_are_reported_with_it(node: Node) -> None:
    await node.ack(assign())
    target = node.registry.get(IQN)
    assert target is not None
    nexus = Nexus("iqn.2026-01.test:host", 1, IQN, 1)
    await target.lu.execute(ScsiRequest(nexus, 0, bytes([0xC7]) + bytes(15), b"", 0))
    [obs] = node.conv.observations(node.timers.now)
    assert obs.unsupported == (UnsupportedCommand(0xC7, None, 1, "iqn.2026-01.test:host"),)


# ---- pause --------------------------------------------------------------------------------------


async def test_a_pause_is_applied_once_the_writes_already_running_completed(node: Node) -> None:
    # A WRITE is in its store I/O (a primary's: awaiting its replicas) when the paused epoch
    # arrives. The node reports the epoch applied only after that WRITE completed: the master's
    # answer to the pause (?wait) then means no write lands any more.
    await node.ack(assign())
    target = node.registry.get(IQN)
    assert isinstance(target, Target)
    lu = target.lu
    entered, release = asyncio.Event(), asyncio.Event()
    real = lu.store

    class SlowStore:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
            entered.set()
            await release.wait()
            await real.write(offset, data)

    lu.store = SlowStore()  # type: ignore[assignment]
    nexus = Nexus("iqn.2026-01.test:host", 1, IQN, 1)
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]).ljust(16, b"\0")  # WRITE(10), LBA 0, 1 block
    running = asyncio.create_task(lu.execute(ScsiRequest(nexus, 0, cdb, b"\x5a" * 512, 512)))
    await asyncio.wait_for(entered.wait(), 5)
    await node.ack(dataclasses.replace(assign(epoch=2), paused=True), run=False)
    applied = asyncio.create_task(node.conv.idle())
    done, _ = await asyncio.wait({applied}, timeout=0.3)
    assert not done and lu.paused  # paused at once (new commands refused), not yet applied
    [obs] = node.conv.observations(node.timers.now)
    assert not (obs.epoch == 2 and obs.converged)
    release.set()
    assert (await asyncio.wait_for(running, 5)).status == 0  # GOOD: it passed the checks first
    await asyncio.wait_for(applied, 5)
    [obs] = node.conv.observations(node.timers.now)
    assert (obs.epoch, obs.converged) == (2, True)
