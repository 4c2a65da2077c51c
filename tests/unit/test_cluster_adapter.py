"""sparrow.cluster.adapter: assignments to ordered local actions, fencing, convergence."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.scsi.lu import AccessState
from sparrow.cluster import nodestate
from sparrow.cluster.adapter import (
    Action,
    Adapter,
    AdapterPlan,
    CloseVolume,
    DestroyVolume,
    OpenVolume,
    PersistRole,
    Redirect,
    Rejection,
    SetAccess,
    SetPaused,
    execute_plan,
)
from sparrow.cluster.lease import LeaseClock
from sparrow.cluster.messages import Assignment, Health, InvalidMessage, Role
from sparrow.cluster.nodestate import NodeState, VolumeRole
from store.metadata import RecordWriteError

ME = "n1"
PORTALS = {"n1": "10.0.0.1:3260", "n2": "10.0.0.2:3260", "n3": "10.0.0.3:3260"}
VOL_A = "a" * 32
VOL_B = "b" * 32
VOL_C = "c" * 32
SIZE = 1 << 20

ACTIVE = AccessState.ACTIVE_OPTIMIZED
FENCED = AccessState.TRANSITIONING
STANDBY = AccessState.STANDBY


def assign(
    volume_id: str,
    epoch: int,
    primary: str | None = ME,
    replicas: tuple[str, ...] | None = None,
    size: int = SIZE,
    name: str | None = None,
) -> Assignment:
    if replicas is None:
        replicas = () if primary is None else (primary,)
    return Assignment(
        volume_id=volume_id,
        name=name or f"vol-{volume_id[0]}",
        size=size,
        block_size=512,
        epoch=epoch,
        primary=primary,
        primary_portal=None if primary is None else PORTALS[primary],
        replicas=replicas,
    )


def replica_of(volume_id: str, epoch: int, primary: str = "n2") -> Assignment:
    return assign(volume_id, epoch, primary, (primary, ME))


@dataclass
class Lu:
    spec: OpenVolume
    access: AccessState = FENCED
    redirect: str | None = None
    paused: bool = False


@dataclass
class FakeVolumes:
    """The daemon side, with the action semantics the adapter documents."""

    luns: dict[str, Lu] = field(default_factory=dict)
    log: list[Action] = field(default_factory=list)
    fail_on: type | None = None

    def run(self, action: Action) -> None:
        if self.fail_on is not None and isinstance(action, self.fail_on):
            raise OSError(5, "injected")
        self.log.append(action)
        lu = self.luns.get(action.volume_id)
        if isinstance(action, OpenVolume):
            if lu is None:
                self.luns[action.volume_id] = Lu(action)
            else:
                lu.spec = action
        elif isinstance(action, (CloseVolume, DestroyVolume)):
            self.luns.pop(action.volume_id, None)
        elif isinstance(action, SetAccess):
            if lu is not None:
                lu.access = action.state
        elif isinstance(action, Redirect) and lu is not None:
            lu.redirect = action.portal
        elif isinstance(action, SetPaused) and lu is not None:
            lu.paused = action.paused

    # LocalVolumes protocol, for execute_plan
    async def open_volume(self, action: OpenVolume) -> None:
        self.run(action)

    async def close_volume(self, volume_id: str) -> None:
        self.run(CloseVolume(volume_id))

    async def set_access(self, volume_id: str, state: AccessState) -> None:
        self.run(SetAccess(volume_id, state))

    async def redirect(self, volume_id: str, portal: str | None) -> None:
        self.run(Redirect(volume_id, portal))

    async def set_paused(self, volume_id: str, paused: bool) -> None:
        self.run(SetPaused(volume_id, paused))

    async def destroy_volume(self, volume_id: str, name: str) -> None:
        self.run(DestroyVolume(volume_id, name))


def check_depends_on_persisted(state: NodeState, action: Action) -> None:
    """An action other than PersistRole must follow from the role persisted when it runs."""
    held = state.get(action.volume_id)
    if isinstance(action, OpenVolume):
        assert held is not None and held.role in (Role.PRIMARY, Role.REPLICA), action
        assert (held.name, held.size, held.block_size) == (action.name, action.size, action.block_size)
    elif isinstance(action, SetAccess) and action.state is ACTIVE:
        assert held is not None and held.role is Role.PRIMARY, action
    elif isinstance(action, SetAccess) and action.state is STANDBY:
        assert held is not None and held.role is Role.REPLICA, action
    elif isinstance(action, Redirect) and action.portal is not None:
        assert held is not None and held.role is Role.REPLICA, action
        assert held.primary_portal == action.portal


class Node:
    """One node process: its durable state, its adapter and its LUs; runs plans synchronously."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.state = NodeState(data_dir)
        self.problems = self.state.load()
        self.adapter = Adapter(ME, self.state)
        self.volumes = FakeVolumes()
        self.now = 0.0

    def run(self, plan: AdapterPlan) -> AdapterPlan:
        done = 0
        try:
            for action in plan.actions:
                if isinstance(action, PersistRole):
                    self.state.persist(action.role)
                elif isinstance(action, DestroyVolume):
                    self.state.forget(action.volume_id)  # the record first, as execute_plan
                    self.volumes.run(action)
                else:
                    check_depends_on_persisted(self.state, action)
                    self.volumes.run(action)
                done += 1
        finally:
            self.adapter.applied(plan, done)
        return plan

    def ack(self, assignments: Sequence[Assignment], lease_valid: bool = True) -> AdapterPlan:
        self.now += 1.0
        return self.run(self.adapter.plan(assignments, lease_valid, self.now))

    def access(self, volume_id: str) -> AccessState | None:
        lu = self.volumes.luns.get(volume_id)
        return None if lu is None else lu.access

    def observation(self, volume_id: str) -> Any:
        found = [o for o in self.adapter.observations(self.now) if o.volume_id == volume_id]
        return found[0] if found else None


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def kinds(plan: AdapterPlan) -> list[str]:
    return [type(a).__name__ for a in plan.actions]


# ---- primary ------------------------------------------------------------------------------------


def test_new_primary_with_a_lease_persists_opens_and_serves(node: Node) -> None:
    plan = node.ack([assign(VOL_A, 1)])
    assert plan.actions == (
        PersistRole(VolumeRole.from_assignment(assign(VOL_A, 1), ME)),
        OpenVolume(VOL_A, "vol-a", SIZE, 512),
        SetAccess(VOL_A, ACTIVE),
    )
    assert plan.rejected == ()
    assert plan.planned_at == node.now
    assert node.access(VOL_A) is ACTIVE
    assert node.state.get(VOL_A) == VolumeRole.from_assignment(assign(VOL_A, 1), ME)
    assert node.adapter.converged(VOL_A)


def test_primary_without_a_lease_is_opened_fenced(node: Node) -> None:
    plan = node.ack([assign(VOL_A, 1)], lease_valid=False)
    assert kinds(plan) == ["PersistRole", "OpenVolume"]  # a new LU starts TRANSITIONING
    assert node.access(VOL_A) is FENCED
    plan = node.ack([assign(VOL_A, 1)], lease_valid=True)
    assert plan.actions == (SetAccess(VOL_A, ACTIVE),)


def test_a_fenced_primary_reports_degraded_health_while_converged(node: Node) -> None:
    """Converged only says the LU matches the plan; health says whether the primary serves."""
    node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)], lease_valid=False)
    fenced = node.observation(VOL_A)
    assert fenced.converged and fenced.health is Health.DEGRADED
    assert node.observation(VOL_B).health is Health.OK  # a standby replica is healthy
    node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)], lease_valid=True)
    serving = node.observation(VOL_A)
    assert serving.converged and serving.health is Health.OK


def test_the_same_ack_twice_plans_nothing(node: Node) -> None:
    node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)])
    plan = node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)])
    assert plan.actions == () and plan.rejected == ()


# ---- epochs -------------------------------------------------------------------------------------


def test_a_lower_epoch_is_rejected_and_the_persisted_state_is_unchanged(node: Node) -> None:
    node.ack([assign(VOL_A, 5)])
    on_disk = node.state.path_of(VOL_A).read_bytes()
    plan = node.ack([replica_of(VOL_A, 4)])
    assert [(r.volume_id, r.offered, r.held) for r in plan.rejected] == [(VOL_A, 4, 5)]
    assert "lower" in plan.rejected[0].reason
    assert not any(isinstance(a, PersistRole) for a in plan.actions)
    assert node.state.get(VOL_A) == VolumeRole.from_assignment(assign(VOL_A, 5), ME)
    assert node.state.path_of(VOL_A).read_bytes() == on_disk
    # The stale Ack confirms nothing: the primary is fenced, not demoted.
    assert plan.actions == (SetAccess(VOL_A, FENCED),)
    assert node.access(VOL_A) is FENCED


def test_a_lower_epoch_than_a_planned_one_is_rejected(node: Node) -> None:
    pending = node.adapter.plan([assign(VOL_A, 6)], True, 1.0)  # not yet executed
    plan = node.adapter.plan([replica_of(VOL_A, 5)], True, 2.0)
    assert [(r.offered, r.held) for r in plan.rejected] == [(5, 6)]
    node.run(pending)
    node.run(plan)
    assert node.state.get(VOL_A) == VolumeRole.from_assignment(assign(VOL_A, 6), ME)


def test_a_different_assignment_at_the_same_epoch_is_rejected(node: Node) -> None:
    node.ack([assign(VOL_A, 5)])
    plan = node.ack([replica_of(VOL_A, 5)])
    assert len(plan.rejected) == 1 and "already accepted" in plan.rejected[0].reason
    assert node.state.get(VOL_A) == VolumeRole.from_assignment(assign(VOL_A, 5), ME)


def test_a_higher_epoch_is_persisted_before_it_is_acted_on(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    plan = node.ack([replica_of(VOL_A, 2)])
    assert plan.actions == (
        PersistRole(VolumeRole.from_assignment(replica_of(VOL_A, 2), ME)),
        SetAccess(VOL_A, STANDBY),  # stop serving first...
        Redirect(VOL_A, PORTALS["n2"]),  # ...then point logins at the new primary
    )


def test_promotion_clears_the_redirect_before_serving(node: Node) -> None:
    node.ack([replica_of(VOL_A, 1)])
    plan = node.ack([assign(VOL_A, 2, ME, (ME, "n2"))])
    assert kinds(plan) == ["PersistRole", "Redirect", "SetAccess"]
    assert plan.actions[1] == Redirect(VOL_A, None)
    assert plan.actions[2] == SetAccess(VOL_A, ACTIVE)
    assert node.volumes.luns[VOL_A].redirect is None


def test_a_failed_persist_stops_the_plan(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RecordWriteError("x", OSError(28, "No space left on device"))

    monkeypatch.setattr(nodestate, "write_record", broken)
    with pytest.raises(RecordWriteError):
        node.ack([assign(VOL_A, 1)])
    assert node.volumes.log == []  # nothing acted on the unpersisted role
    assert node.state.get(VOL_A) is None
    assert not node.adapter.converged(VOL_A)
    monkeypatch.undo()
    plan = node.ack([assign(VOL_A, 1)])  # the next Ack retries from the persist
    assert kinds(plan) == ["PersistRole", "OpenVolume", "SetAccess"]
    assert node.adapter.converged(VOL_A)


def test_applied_refuses_a_persist_that_did_not_happen(node: Node) -> None:
    plan = node.adapter.plan([assign(VOL_A, 1)], True, 1.0)
    with pytest.raises(ValueError, match="not persisted"):
        node.adapter.applied(plan)
    assert node.adapter.outstanding == 0
    assert not node.adapter.is_open(VOL_A)


def test_duplicate_volumes_are_refused(node: Node) -> None:
    with pytest.raises(ValueError, match="twice"):
        node.adapter.plan([assign(VOL_A, 1), assign(VOL_A, 2)], True, 1.0)


def test_invalid_node_id(tmp_path: Path) -> None:
    with pytest.raises(InvalidMessage):
        Adapter("Not A Node", NodeState(tmp_path))


# ---- leases -------------------------------------------------------------------------------------


def test_fencing_follows_the_lease_clock(node: Node) -> None:
    clock = LeaseClock()
    clock.sent(1, now=10.0)
    clock.acked(1, lease_seconds=5.0)
    node.run(node.adapter.plan([assign(VOL_A, 1), replica_of(VOL_B, 1)], clock.valid(11.0), 11.0))
    assert node.access(VOL_A) is ACTIVE and node.access(VOL_B) is STANDBY

    assert not clock.valid(15.0)  # the lease lapses: fence every primary, leave replicas alone
    fence = node.run(node.adapter.fence_all())
    assert fence.actions == (SetAccess(VOL_A, FENCED),)
    assert node.access(VOL_A) is FENCED and node.access(VOL_B) is STANDBY
    assert not node.adapter.lease_valid
    assert node.observation(VOL_A).converged  # fenced is what it should be without a lease

    clock.sent(2, now=16.0)
    clock.acked(2, lease_seconds=5.0)
    assert clock.valid(16.5)
    regained = node.run(node.adapter.lease_regained())
    assert regained.actions == (SetAccess(VOL_A, ACTIVE),)
    assert node.access(VOL_A) is ACTIVE


def test_a_plan_without_a_lease_fences_a_serving_primary(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    plan = node.ack([assign(VOL_A, 1)], lease_valid=False)
    assert plan.actions == (SetAccess(VOL_A, FENCED),)


def test_fence_all_also_fences_a_pending_activation(node: Node) -> None:
    activate = node.adapter.plan([assign(VOL_A, 1)], True, 1.0)
    fence = node.adapter.fence_all()  # the lease lapses before the plan ran
    assert SetAccess(VOL_A, FENCED) in fence.actions
    node.run(activate)
    node.run(fence)
    assert node.access(VOL_A) is FENCED


def test_plans_start_from_what_outstanding_plans_will_leave(node: Node) -> None:
    first = node.adapter.plan([assign(VOL_A, 1)], True, 1.0)
    second = node.adapter.plan([replica_of(VOL_A, 2)], True, 2.0)
    # Planned as if `first` had run: the LU will be open and ACTIVE, so it must be stood down.
    assert kinds(second) == ["PersistRole", "SetAccess", "Redirect"]
    assert node.adapter.outstanding == 2
    node.run(first)
    node.run(second)
    assert node.adapter.outstanding == 0
    assert node.access(VOL_A) is STANDBY
    assert node.adapter.converged(VOL_A)


def test_lease_regained_does_not_unfence_a_rejected_volume(node: Node) -> None:
    node.ack([assign(VOL_A, 5)])
    node.ack([assign(VOL_A, 4)])  # stale: rejected, fenced
    node.run(node.adapter.fence_all())
    assert node.run(node.adapter.lease_regained()).actions == ()
    assert node.access(VOL_A) is FENCED


# ---- restart ------------------------------------------------------------------------------------


def test_a_restarted_node_serves_nothing_as_primary_until_an_ack(tmp_path: Path) -> None:
    before = Node(tmp_path)
    before.ack([assign(VOL_A, 3), replica_of(VOL_B, 4)])
    assert before.access(VOL_A) is ACTIVE

    after = Node(tmp_path)  # a new process: same data dir, no LUs, no lease
    assert after.problems == ()
    startup = after.run(after.adapter.startup())
    assert not any(isinstance(a, PersistRole) for a in startup.actions)
    assert after.access(VOL_A) is FENCED
    assert after.access(VOL_B) is STANDBY and after.volumes.luns[VOL_B].redirect == PORTALS["n2"]
    # Before the master has confirmed anything: a lease alone does not unfence.
    assert after.run(after.adapter.lease_regained()).actions == ()
    # The observation reports what is persisted, so the master can confirm it.
    obs = after.observation(VOL_A)
    assert (obs.epoch, obs.role) == (3, Role.PRIMARY)
    # An Ack without a valid lease keeps it fenced; with one, it serves (no new persist needed).
    assert after.ack([assign(VOL_A, 3), replica_of(VOL_B, 4)], lease_valid=False).actions == ()
    assert after.access(VOL_A) is FENCED
    plan = after.ack([assign(VOL_A, 3), replica_of(VOL_B, 4)], lease_valid=True)
    assert plan.actions == (SetAccess(VOL_A, ACTIVE),)


def test_a_restarted_node_still_rejects_lower_epochs(tmp_path: Path) -> None:
    Node(tmp_path).ack([assign(VOL_A, 7)])
    after = Node(tmp_path)
    plan = after.ack([assign(VOL_A, 6)])
    assert [(r.offered, r.held) for r in plan.rejected] == [(6, 7)]
    assert not any(isinstance(a, SetAccess) and a.state is ACTIVE for a in plan.actions)
    assert after.access(VOL_A) is FENCED  # opened for the held role, fenced


def test_a_corrupt_record_rejects_its_volume_and_reports_it(tmp_path: Path) -> None:
    Node(tmp_path).ack([assign(VOL_A, 2), assign(VOL_B, 3)])
    (tmp_path / "cluster" / f"{VOL_B}.json").write_bytes(b"garbage")
    after = Node(tmp_path)
    assert [p.volume_id for p in after.problems] == [VOL_B]
    plan = after.ack([assign(VOL_A, 2), assign(VOL_B, 9)])
    assert [r.volume_id for r in plan.rejected] == [VOL_B]
    assert all(a.volume_id == VOL_A for a in plan.actions)
    obs = after.observation(VOL_B)
    assert (obs.epoch, obs.role, obs.health, obs.converged) == (0, Role.NONE, Health.FAILED, False)


# ---- replicas and removal -----------------------------------------------------------------------


def test_replica_stands_by_and_redirects_to_the_primary(node: Node) -> None:
    plan = node.ack([replica_of(VOL_A, 1)])
    assert plan.actions[1:] == (
        OpenVolume(VOL_A, "vol-a", SIZE, 512),
        SetAccess(VOL_A, STANDBY),
        Redirect(VOL_A, PORTALS["n2"]),
    )
    plan = node.ack([replica_of(VOL_A, 2, primary="n3")])
    assert kinds(plan) == ["PersistRole", "Redirect"]
    assert node.volumes.luns[VOL_A].redirect == PORTALS["n3"]


def test_replica_of_a_volume_without_primary_has_no_redirect(node: Node) -> None:
    plan = node.ack([assign(VOL_A, 1, primary=None, replicas=(ME, "n2"))])
    assert kinds(plan) == ["PersistRole", "OpenVolume", "SetAccess"]
    assert node.access(VOL_A) is STANDBY and node.volumes.luns[VOL_A].redirect is None


def test_a_volume_missing_from_the_ack_is_closed_and_its_record_kept(node: Node) -> None:
    node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)])
    plan = node.ack([replica_of(VOL_B, 1)])
    assert plan.actions == (CloseVolume(VOL_A),)
    assert VOL_A not in node.volumes.luns
    assert node.state.path_of(VOL_A).exists()  # the epoch floor survives
    assert node.observation(VOL_A) is None  # released and closed: no longer reported
    # Back at the same epoch: reopened without a new persist.
    plan = node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)])
    assert kinds(plan) == ["OpenVolume", "SetAccess"]


def test_an_assignment_without_this_node_persists_none_then_closes(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    moved = assign(VOL_A, 2, "n2", ("n2", "n3"))
    plan = node.ack([moved])
    assert plan.actions == (PersistRole(VolumeRole.from_assignment(moved, ME)), CloseVolume(VOL_A))
    assert node.state.get(VOL_A) is not None and node.state.get(VOL_A).role is Role.NONE  # type: ignore[union-attr]
    assert node.observation(VOL_A) is None


def test_close_is_planned_before_others_open(node: Node) -> None:
    node.ack([assign(VOL_B, 1)])
    plan = node.ack([assign(VOL_A, 1)])
    assert kinds(plan)[0] == "CloseVolume" and plan.actions[0].volume_id == VOL_B


# ---- convergence --------------------------------------------------------------------------------


def test_convergence_is_reported_only_once_everything_ran(node: Node) -> None:
    plan = node.adapter.plan([assign(VOL_A, 1)], True, 1.0)
    assert not node.adapter.converged(VOL_A)
    node.state.persist(plan.actions[0].role)  # type: ignore[union-attr]
    node.volumes.run(plan.actions[1])
    node.adapter.applied(plan, 2)  # partial: persisted and opened, not yet serving
    obs = node.observation(VOL_A)
    assert (obs.epoch, obs.role, obs.converged) == (1, Role.PRIMARY, False)
    assert node.adapter.outstanding == 0
    rest = node.adapter.plan([assign(VOL_A, 1)], True, 2.0)
    assert rest.actions == (SetAccess(VOL_A, ACTIVE),)
    node.run(rest)
    assert node.observation(VOL_A).converged


def test_observations_carry_positions_and_health(node: Node) -> None:
    node.ack([assign(VOL_A, 3), replica_of(VOL_B, 2)])
    pending = node.adapter.plan([assign(VOL_A, 3), replica_of(VOL_B, 2), assign(VOL_C, 1)], True, 9.0)
    assert pending.actions  # VOL_C not yet persisted nor opened
    observed = node.adapter.observations(9.0, {VOL_A: 4096}, {VOL_B: Health.DEGRADED})
    by_id = {o.volume_id: o for o in observed}
    assert set(by_id) == {VOL_A, VOL_B}  # VOL_C holds nothing yet
    assert (by_id[VOL_A].write_position, by_id[VOL_A].health, by_id[VOL_A].converged) == (
        4096,
        Health.OK,
        True,
    )
    assert (by_id[VOL_B].role, by_id[VOL_B].health, by_id[VOL_B].write_position) == (
        Role.REPLICA,
        Health.DEGRADED,
        0,
    )
    node.run(pending)
    assert node.observation(VOL_C).converged


def test_observation_of_a_closing_volume_is_not_converged(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    plan = node.adapter.plan([], True, 5.0)
    assert plan.actions == (CloseVolume(VOL_A),)
    obs = node.observation(VOL_A)
    assert obs is not None and not obs.converged
    node.run(plan)
    assert node.observation(VOL_A) is None


# ---- destroy (the master deleted the volume) ----------------------------------------------------


def test_destroying_an_open_volume_closes_it_then_destroys_it(node: Node) -> None:
    node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)])
    plan = node.adapter.destroy(VOL_A, "vol-a")
    assert plan.actions == (CloseVolume(VOL_A), DestroyVolume(VOL_A, "vol-a"))
    assert plan.rejected == ()
    node.run(plan)
    assert node.volumes.log[-2:] == [CloseVolume(VOL_A), DestroyVolume(VOL_A, "vol-a")]
    assert set(node.volumes.luns) == {VOL_B}
    assert not node.adapter.is_open(VOL_A)
    assert node.state.get(VOL_A) is None and not node.state.path_of(VOL_A).exists()
    assert node.adapter.converged(VOL_A)  # destroyed: closed and forgotten
    assert [o.volume_id for o in node.adapter.observations(node.now)] == [VOL_B]
    reloaded = NodeState(node.data_dir)
    assert reloaded.load() == () and set(reloaded.roles) == {VOL_B}


def test_destroying_a_volume_that_is_not_open_only_destroys_it(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    node.ack([])  # released: closed, its record kept
    assert not node.adapter.is_open(VOL_A) and node.state.get(VOL_A) is not None
    plan = node.adapter.destroy(VOL_A, "vol-a")
    assert plan.actions == (DestroyVolume(VOL_A, "vol-a"),)
    node.run(plan)
    assert node.state.get(VOL_A) is None
    # A volume the adapter never heard of: the same (idempotent) action, and again after that.
    assert node.adapter.destroy(VOL_B, "vol-b").actions == (DestroyVolume(VOL_B, "vol-b"),)
    again = node.adapter.destroy(VOL_A, "vol-a")
    assert again.actions == (DestroyVolume(VOL_A, "vol-a"),)


def test_destroy_closes_a_volume_an_outstanding_plan_will_open(node: Node) -> None:
    pending = node.adapter.plan([assign(VOL_A, 1)], True, 1.0)  # not yet executed
    plan = node.adapter.destroy(VOL_A, "vol-a")
    assert plan.actions == (CloseVolume(VOL_A), DestroyVolume(VOL_A, "vol-a"))
    node.run(pending)
    assert node.volumes.luns[VOL_A].access is ACTIVE
    node.run(plan)
    assert node.volumes.luns == {} and node.state.get(VOL_A) is None
    assert node.adapter.outstanding == 0


def test_a_destroyed_volume_leaves_the_observations_at_once(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    plan = node.adapter.destroy(VOL_A, "vol-a")  # not run yet: still open, record still there
    assert node.adapter.destroyed == frozenset({VOL_A})
    assert node.adapter.is_open(VOL_A) and node.state.get(VOL_A) is not None
    assert node.observation(VOL_A) is None
    node.run(plan)
    assert node.observation(VOL_A) is None


def test_an_unreadable_destroyed_volume_is_not_reported_and_its_record_goes(tmp_path: Path) -> None:
    Node(tmp_path).ack([assign(VOL_A, 2)])
    (tmp_path / "cluster" / f"{VOL_A}.json").write_bytes(b"garbage")
    node = Node(tmp_path)
    assert node.observation(VOL_A) is not None  # FAILED, until ...
    node.run(node.adapter.destroy(VOL_A, "vol-a"))
    assert node.observation(VOL_A) is None
    assert dict(node.state.unreadable) == {} and not node.state.path_of(VOL_A).exists()


def test_a_later_assignment_of_a_destroyed_volume_is_rejected_never_opened(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    plan = node.adapter.destroy(VOL_A, "vol-a")
    # An Ack already in flight when the master deleted the volume arrives before the plan ran.
    late = node.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)], lease_valid=True)
    assert late.rejected == (Rejection(VOL_A, 1, 1, "volume destroyed"),)
    assert all(a.volume_id == VOL_B for a in late.actions)
    node.run(plan)
    # ... and one after it, even at a higher epoch.
    later = node.ack([assign(VOL_A, 7), replica_of(VOL_B, 1)])
    assert later.rejected == (Rejection(VOL_A, 7, None, "volume destroyed"),)
    assert later.actions == ()
    assert VOL_A not in node.volumes.luns and node.state.get(VOL_A) is None
    after_destroy = node.volumes.log[node.volumes.log.index(DestroyVolume(VOL_A, "vol-a")) :]
    assert not any(isinstance(a, OpenVolume) and a.volume_id == VOL_A for a in after_destroy)
    assert node.adapter.lease_regained().actions == ()
    assert node.adapter.fence_all().for_volume(VOL_A) == ()


def test_fence_all_fences_a_destroyed_volume_still_serving(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    plan = node.adapter.destroy(VOL_A, "vol-a")
    fence = node.adapter.fence_all()
    assert fence.actions == (SetAccess(VOL_A, FENCED),)  # applied to the LU at once by the executor
    node.run(plan)
    node.run(fence)  # after the destroy: a no-op on a volume that is gone
    assert node.volumes.luns == {} and not node.adapter.is_open(VOL_A)


def test_a_restarted_node_does_not_reopen_a_destroyed_volume(tmp_path: Path) -> None:
    first = Node(tmp_path)
    first.ack([assign(VOL_A, 1), replica_of(VOL_B, 1)])
    first.run(first.adapter.destroy(VOL_A, "vol-a"))
    second = Node(tmp_path)
    startup = second.adapter.startup()
    assert startup.for_volume(VOL_A) == () and startup.for_volume(VOL_B) != ()
    assert second.adapter.destroyed == frozenset()  # tombstones are kept in memory only


def test_applied_refuses_a_destroy_whose_record_was_not_forgotten(node: Node) -> None:
    node.ack([assign(VOL_A, 1)])
    plan = node.adapter.destroy(VOL_A, "vol-a")
    with pytest.raises(ValueError, match="not forgotten"):
        node.adapter.applied(plan)
    assert node.adapter.outstanding == 0


@pytest.mark.parametrize(("volume_id", "name"), [("../" + "a" * 29, "vol-a"), (VOL_A, "../etc"), (VOL_A, "")])
def test_destroy_refuses_malformed_ids(node: Node, volume_id: str, name: str) -> None:
    with pytest.raises(InvalidMessage):
        node.adapter.destroy(volume_id, name)
    assert node.adapter.destroyed == frozenset() and node.adapter.outstanding == 0


# ---- the asyncio executor -----------------------------------------------------------------------


async def test_execute_plan_runs_in_order_and_reports(tmp_path: Path) -> None:
    state = NodeState(tmp_path)
    await state.load_async()
    adapter = Adapter(ME, state)
    volumes = FakeVolumes()
    plan = adapter.plan([assign(VOL_A, 1), replica_of(VOL_B, 1)], True, 1.0)
    await execute_plan(plan, adapter, volumes)
    assert volumes.log == [a for a in plan.actions if not isinstance(a, PersistRole)]
    assert state.get(VOL_A) is not None and state.get(VOL_B) is not None
    assert adapter.converged(VOL_A) and adapter.converged(VOL_B)
    assert adapter.outstanding == 0


async def test_execute_plan_reports_a_partial_run(tmp_path: Path) -> None:
    state = NodeState(tmp_path)
    await state.load_async()
    adapter = Adapter(ME, state)
    volumes = FakeVolumes(fail_on=SetAccess)
    plan = adapter.plan([assign(VOL_A, 1)], True, 1.0)
    with pytest.raises(OSError, match="injected"):
        await execute_plan(plan, adapter, volumes)
    assert adapter.outstanding == 0
    assert adapter.is_open(VOL_A) and adapter.access_state(VOL_A) is FENCED
    assert not adapter.converged(VOL_A)
    volumes.fail_on = None
    retry = adapter.plan([assign(VOL_A, 1)], True, 2.0)
    assert retry.actions == (SetAccess(VOL_A, ACTIVE),)
    await execute_plan(retry, adapter, volumes)
    assert adapter.converged(VOL_A)


@dataclass
class BrokenVolume(FakeVolumes):
    """Opening ``broken`` fails (its local copy is corrupt); every other volume is fine."""

    broken: str = VOL_A

    async def open_volume(self, action: OpenVolume) -> None:
        if action.volume_id == self.broken:
            raise OSError("injected: corrupt volume record")
        await super().open_volume(action)


async def test_one_failing_volume_does_not_stop_the_others(tmp_path: Path) -> None:
    state = NodeState(tmp_path)
    await state.load_async()
    adapter = Adapter(ME, state)
    volumes = BrokenVolume()
    plan = adapter.plan([assign(VOL_A, 1), assign(VOL_B, 1), replica_of(VOL_C, 1)], True, 1.0)
    with pytest.raises(OSError, match="corrupt volume record"):
        await execute_plan(plan, adapter, volumes)
    # VOL_A's role was persisted, its open failed, so nothing after that ran for VOL_A ...
    assert state.get(VOL_A) is not None and not adapter.is_open(VOL_A)
    assert [a for a in volumes.log if a.volume_id == VOL_A] == []
    # ... while VOL_B serves and VOL_C stands by, as planned.
    assert adapter.access_state(VOL_B) is ACTIVE and adapter.converged(VOL_B)
    assert adapter.access_state(VOL_C) is STANDBY and adapter.converged(VOL_C)
    assert adapter.outstanding == 0
    retry = adapter.plan([assign(VOL_A, 1), assign(VOL_B, 1), replica_of(VOL_C, 1)], True, 2.0)
    assert {a.volume_id for a in retry.actions} == {VOL_A}  # only the broken one is tried again


@dataclass
class ForgetFirst(FakeVolumes):
    """Records whether the volume's record was still persisted when ``destroy_volume`` ran."""

    state: NodeState | None = None
    record_held: list[bool] = field(default_factory=list)

    async def destroy_volume(self, volume_id: str, name: str) -> None:
        assert self.state is not None
        self.record_held.append(
            self.state.get(volume_id) is not None or self.state.path_of(volume_id).exists()
        )
        await super().destroy_volume(volume_id, name)


async def test_execute_plan_forgets_the_record_before_destroying_the_volume(tmp_path: Path) -> None:
    state = NodeState(tmp_path)
    await state.load_async()
    adapter = Adapter(ME, state)
    volumes = ForgetFirst(state=state)
    await execute_plan(adapter.plan([assign(VOL_A, 1)], True, 1.0), adapter, volumes)
    plan = adapter.destroy(VOL_A, "vol-a")
    await execute_plan(plan, adapter, volumes)
    assert volumes.record_held == [False]
    assert volumes.log[-2:] == [CloseVolume(VOL_A), DestroyVolume(VOL_A, "vol-a")]
    assert adapter.outstanding == 0 and not adapter.is_open(VOL_A)


async def test_a_failed_forget_stops_the_destroy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = NodeState(tmp_path)
    await state.load_async()
    adapter = Adapter(ME, state)
    volumes = FakeVolumes()
    await execute_plan(adapter.plan([assign(VOL_A, 1)], True, 1.0), adapter, volumes)

    def broken(path: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(nodestate, "fsync_dir", broken)
    plan = adapter.destroy(VOL_A, "vol-a")
    with pytest.raises(RecordWriteError):
        await execute_plan(plan, adapter, volumes)
    assert volumes.log[-1] == CloseVolume(VOL_A)  # closed, but the data was not touched
    assert state.get(VOL_A) is not None  # memory keeps the role until the removal is durable
    assert adapter.outstanding == 0 and not adapter.is_open(VOL_A)
    monkeypatch.undo()
    retry = adapter.destroy(VOL_A, "vol-a")
    assert retry.actions == (DestroyVolume(VOL_A, "vol-a"),)
    await execute_plan(retry, adapter, volumes)
    assert volumes.log[-1] == DestroyVolume(VOL_A, "vol-a") and state.get(VOL_A) is None


# ---- property: random assignment streams ---------------------------------------------------------

VOLUMES = (VOL_A, VOL_B, VOL_C)


@st.composite
def an_assignment(draw: st.DrawFn, volume_id: str) -> Assignment:
    epoch = draw(st.integers(0, 6))
    size = draw(st.sampled_from([SIZE, 2 * SIZE]))
    shape = draw(st.sampled_from(["primary", "replica", "elsewhere", "headless"]))
    if shape == "primary":
        return assign(volume_id, epoch, ME, (ME, "n2"), size)
    if shape == "replica":
        other = draw(st.sampled_from(["n2", "n3"]))
        return assign(volume_id, epoch, other, (other, ME), size)
    if shape == "elsewhere":
        return assign(volume_id, epoch, "n2", ("n2", "n3"), size)
    return assign(volume_id, epoch, None, (ME,), size)


@st.composite
def an_ack(draw: st.DrawFn) -> tuple[str, tuple[Assignment, ...], bool, bool]:
    volumes = draw(st.lists(st.sampled_from(VOLUMES), unique=True, max_size=3))
    batch = tuple(draw(an_assignment(v)) for v in volumes)
    return ("ack", batch, draw(st.booleans()), draw(st.booleans()))


STEPS = st.lists(
    st.one_of(
        an_ack(),
        an_ack(),
        st.just(("fence",)),
        st.just(("regain",)),
        st.just(("flush",)),
        st.just(("restart",)),
        st.tuples(st.just("destroy"), st.sampled_from(VOLUMES)),
    ),
    max_size=25,
)


class Model:
    """Drives a Node through steps, queueing plans FIFO, and checks the adapter's promises."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.node = Node(data_dir)
        self.queue: list[AdapterPlan] = []
        self.floor: dict[str, int] = {}
        self.max_persisted: dict[str, int] = {}
        self.lease = False
        self.offered: dict[str, VolumeRole] = {}  # latest accepted role per volume, this process
        self.destroyed: set[str] = set()  # this process's tombstones

    def restart(self) -> None:
        self.node = Node(self.data_dir)
        self.queue = []
        self.floor = {v: r.epoch for v, r in self.node.state.roles.items()}
        self.lease = False
        self.offered = {}
        self.destroyed = set()
        self.hand_out(self.node.adapter.startup())

    def hand_out(self, plan: AdapterPlan) -> None:
        seen: set[str] = set()
        for action in plan.actions:
            if isinstance(action, PersistRole):
                # PersistRole comes before any other action for its volume in this plan.
                assert action.volume_id not in seen, plan
            seen.add(action.volume_id)
            if not self.lease:
                assert not (isinstance(action, SetAccess) and action.state is ACTIVE), plan
        self.queue.append(plan)

    def ack(self, batch: tuple[Assignment, ...], lease: bool) -> None:
        self.lease = lease
        self.node.now += 1.0
        plan = self.node.adapter.plan(batch, lease, self.node.now)
        rejected = {r.volume_id for r in plan.rejected}
        for a in batch:
            if a.volume_id in self.destroyed:
                assert [r.reason for r in plan.rejected if r.volume_id == a.volume_id] == ["volume destroyed"]
                assert plan.for_volume(a.volume_id) == ()
                continue
            floor = self.floor.get(a.volume_id)
            role = VolumeRole.from_assignment(a, ME)
            if floor is not None and a.epoch < floor:
                assert a.volume_id in rejected
            elif floor is None or a.epoch > floor:
                assert a.volume_id not in rejected
                assert plan.for_volume(a.volume_id)[0] == PersistRole(role)
                self.floor[a.volume_id] = a.epoch
                self.offered[a.volume_id] = role
            if a.volume_id not in rejected:
                self.offered[a.volume_id] = role
        self.hand_out(plan)

    def destroy(self, volume_id: str) -> None:
        self.destroyed.add(volume_id)
        self.offered.pop(volume_id, None)
        self.hand_out(self.node.adapter.destroy(volume_id, f"vol-{volume_id[0]}"))
        assert volume_id not in {o.volume_id for o in self.node.adapter.observations(self.node.now)}

    def flush(self) -> None:
        for plan in self.queue:
            self.node.run(plan)  # persists never fail here: no regression, no conflict
            for action in plan.actions:
                if isinstance(action, DestroyVolume):  # its record is gone: no floor any more
                    self.max_persisted.pop(action.volume_id, None)
                    self.floor.pop(action.volume_id, None)
            for volume_id, role in self.node.state.roles.items():
                assert role.epoch >= self.max_persisted.get(volume_id, 0)
                self.max_persisted[volume_id] = role.epoch
        self.queue = []
        adapter = self.node.adapter
        assert adapter.outstanding == 0
        for volume_id in VOLUMES:
            assert adapter.converged(volume_id) or volume_id not in self.node.state.roles
            if volume_id in self.destroyed:
                assert volume_id not in self.node.volumes.luns and self.node.state.get(volume_id) is None
            lu = self.node.volumes.luns.get(volume_id)
            assert adapter.access_state(volume_id) == (None if lu is None else lu.access)
            if lu is not None and lu.access is ACTIVE:
                held = self.node.state.get(volume_id)
                assert self.lease and held is not None and held.role is Role.PRIMARY
                assert self.offered.get(volume_id) == held  # confirmed by this process's latest Acks


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STEPS)
def test_random_assignment_streams_keep_the_promises(steps: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Model(Path(tmp))
        for step in steps:
            if step[0] == "ack":
                _, batch, lease, deferred = step
                model.ack(batch, lease)
                if not deferred:
                    model.flush()
            elif step[0] == "fence":
                model.lease = False
                model.hand_out(model.node.adapter.fence_all())
            elif step[0] == "regain":
                model.lease = True
                model.hand_out(model.node.adapter.lease_regained())
            elif step[0] == "flush":
                model.flush()
            elif step[0] == "destroy":
                model.destroy(step[1])
            else:
                model.restart()
        model.flush()
        # What is on disk is what the node holds, and never below an epoch it once persisted.
        reloaded = NodeState(Path(tmp))
        assert reloaded.load() == ()
        assert dict(reloaded.roles) == dict(model.node.state.roles)
        for volume_id, epoch in model.max_persisted.items():
            assert reloaded.roles[volume_id].epoch == epoch
