"""The node-side adapter: from the master's assignments to local actions (docs/cluster.md, "Adapter").

Sans-IO. :meth:`Adapter.plan` turns the assignments of an Ack into an :class:`AdapterPlan`, an
ordered tuple of actions (frozen dataclasses); the asyncio layer executes them in order (see
:func:`execute_plan`) and reports what it did with :meth:`Adapter.applied`. The adapter diffs what
each volume should be against what has been applied, and reports per-volume convergence for the
next heartbeat (:meth:`Adapter.observations`).

Rules (docs/cluster.md; SPC-4 5.15.2 for the asymmetric access states):

- **Epochs only go up.** An assignment whose epoch is lower than the one the node has persisted (or
  has already accepted in an earlier plan) is rejected and never applied; one at the same epoch is a
  no-op for the persisted state (and a different assignment at the same epoch is rejected as a
  conflict). :class:`~sparrow.cluster.nodestate.NodeState` enforces the same floor on every write.
- **Persist before acting.** A volume's :class:`PersistRole` comes before every other action for
  that volume in the plan; if it fails, the executor stops and nothing after it runs.
- **Primary only under a lease.** A volume assigned PRIMARY to this node is served
  (``ACTIVE_OPTIMIZED``) only while the lease is valid and the latest Ack confirmed the assignment;
  otherwise it is fenced: ``TRANSITIONING``, on which the LU refuses reads and writes with NOT
  READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (04/0A, SPC-4 5.15.2.4.6).
  :meth:`Adapter.fence_all` fences every primary when the lease lapses;
  :meth:`Adapter.lease_regained` unfences the confirmed ones.
- **Replicas stand by.** A volume assigned REPLICA is opened (its local store exists) in
  ``STANDBY`` with a login redirect to the primary's portal (RFC 7143 11.13.5, "target moved").
- **Release, never delete.** A volume this node no longer appears in (role NONE, or absent from the
  Ack) is closed; its data and its record stay. The one exception is a volume the master has
  *deleted* (a tombstone in the Ack's ``deleted``, or the embedded ``sparrow serve`` deleting it
  directly): :meth:`Adapter.destroy` plans :class:`DestroyVolume` (closed first if it is open), which
  forgets its record and deletes its local data. From that call on the volume id is a *tombstone*:
  it leaves the adapter's models and its observations, and any later assignment for it (an Ack
  already in flight when the master deleted it) is rejected ("volume destroyed"), never opened.
  Tombstones are kept in memory only: after a restart the master no longer assigns the volume, and
  its record is gone (forgotten before the data is touched), so nothing reopens it. Were the node
  to crash before the record was forgotten, the restart reopens the volume fenced and reports it,
  and the master answers with the volume's tombstone again (Ack ``deleted``, from its authority),
  so it is destroyed then.
- **A restart serves nothing as primary** until an Ack confirms it: after :meth:`Adapter.startup`
  primaries are opened fenced, and only a :meth:`Adapter.plan` with ``lease_valid`` makes them active.

Action semantics the executor must honour (all idempotent, so a repeated action is harmless):
``OpenVolume`` makes the volume's LU exist (creating an empty local store only if none exists; never
truncating one); a newly opened LU starts ``TRANSITIONING`` with no redirect, an open one keeps its
state. ``CloseVolume`` removes the LU and closes the store (data stays). ``SetAccess`` and
``Redirect`` on a volume that is not open do nothing. Plans are executed one at a time, in the order
they were made. ``DestroyVolume`` first removes the volume's record durably
(``NodeState.forget``: a crash after that never reopens or re-creates the volume at startup), then
deletes the local volume (``LocalVolumes.destroy_volume``: its record and data; a user-given backing
stays); it never deletes a local volume that carries another volume id, and with nothing left to
delete it does nothing.
"""

from __future__ import annotations

import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from frontend.scsi.lu import AccessState
from sparrow.cluster.messages import (
    Assignment,
    Health,
    ReplicaState,
    Role,
    UnsupportedCommand,
    VolumeObservation,
    check_node_id,
    check_volume_id,
    check_volume_name,
)
from sparrow.cluster.nodestate import NodeState, VolumeRole

#: Access states in which the LU serves reads and writes.
SERVING_STATES = frozenset({AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED})
_NO_POSITIONS: Mapping[str, int] = types.MappingProxyType({})
_NO_HEALTH: Mapping[str, Health] = types.MappingProxyType({})
_NO_REPLICA_STATES: Mapping[str, tuple[ReplicaState, ...]] = types.MappingProxyType({})
_NO_ERRORS: Mapping[str, str] = types.MappingProxyType({})
_NO_UNSUPPORTED: Mapping[str, tuple[UnsupportedCommand, ...]] = types.MappingProxyType({})


# -- actions ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersistRole:
    """Durably record ``role`` (``NodeState.persist``) before anything that depends on it."""

    role: VolumeRole

    @property
    def volume_id(self) -> str:
        return self.role.volume_id


@dataclass(frozen=True, slots=True)
class OpenVolume:
    """Make the volume's LU exist (fenced, ``TRANSITIONING``, if it is new)."""

    volume_id: str
    name: str
    size: int
    block_size: int


@dataclass(frozen=True, slots=True)
class CloseVolume:
    """Remove the volume's LU and close its store; never delete data."""

    volume_id: str


@dataclass(frozen=True, slots=True)
class SetAccess:
    """Set the LU's asymmetric access state (SPC-4 5.15.2.4)."""

    volume_id: str
    state: AccessState


@dataclass(frozen=True, slots=True)
class Redirect:
    """Redirect logins to the volume's target to ``portal`` (``host:port``), or stop redirecting."""

    volume_id: str
    portal: str | None


@dataclass(frozen=True, slots=True)
class DestroyVolume:
    """The master deleted the volume: forget its record, then delete its local store and data."""

    volume_id: str
    name: str


Action: TypeAlias = PersistRole | OpenVolume | CloseVolume | SetAccess | Redirect | DestroyVolume


@dataclass(frozen=True, slots=True)
class Rejection:
    """An assignment the adapter refused; it was not applied."""

    volume_id: str
    offered: int
    held: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class AdapterPlan:
    """What to do, in order, and what was refused. ``planned_at`` is the ``now`` given to ``plan``."""

    actions: tuple[Action, ...]
    rejected: tuple[Rejection, ...] = ()
    planned_at: float | None = None

    def for_volume(self, volume_id: str) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.volume_id == volume_id)


# -- the adapter --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Local:
    """What has been applied to one volume locally (its LU), as far as the adapter knows."""

    spec: OpenVolume
    access: AccessState
    redirect: str | None


@dataclass(frozen=True, slots=True)
class _Desired:
    spec: OpenVolume
    access: AccessState
    redirect: str | None


def _fold(local: dict[str, _Local], action: Action) -> None:
    """Apply ``action`` to the local-state model ``local`` (the executor's semantics, above)."""
    volume_id = action.volume_id
    current = local.get(volume_id)
    if isinstance(action, OpenVolume):
        if current is None:
            local[volume_id] = _Local(action, AccessState.TRANSITIONING, None)
        else:
            local[volume_id] = _Local(action, current.access, current.redirect)
    elif isinstance(action, (CloseVolume, DestroyVolume)):
        local.pop(volume_id, None)
    elif isinstance(action, SetAccess) and current is not None:
        local[volume_id] = _Local(current.spec, action.state, current.redirect)
    elif isinstance(action, Redirect) and current is not None:
        local[volume_id] = _Local(current.spec, current.access, action.portal)


class Adapter:
    """Turns assignments into ordered local actions for ``node_id`` (see the module docstring).

    ``state`` must be loaded. The adapter reads persisted roles from it; it never writes it (the
    executor does, for each :class:`PersistRole`).
    """

    def __init__(self, node_id: str, state: NodeState) -> None:
        self.node_id = check_node_id("node_id", node_id)
        self.state = state
        #: The latest role accepted from an assignment (this process), persisted or not yet.
        self._target: dict[str, VolumeRole] = {}
        #: Volumes whose assignment the latest Ack confirmed (accepted, not rejected).
        self._confirmed: set[str] = set()
        #: Volumes with local state that the latest Ack does not mention.
        self._released: set[str] = set()
        #: What has been applied to each open volume.
        self._local: dict[str, _Local] = {}
        #: Plans handed out and not yet reported by ``applied`` (executed in this order).
        self._outstanding: list[AdapterPlan] = []
        #: Volumes the master deleted (:meth:`destroy`): never opened again by this process.
        self._destroyed: set[str] = set()
        self._lease_valid = False

    # ---- queries ------------------------------------------------------------------------------------

    @property
    def lease_valid(self) -> bool:
        """The lease as the adapter last heard of it (``plan``, ``fence_all``, ``lease_regained``)."""
        return self._lease_valid

    @property
    def destroyed(self) -> frozenset[str]:
        """The volume ids :meth:`destroy` was called for (this process; tombstones, in memory)."""
        return frozenset(self._destroyed)

    def is_open(self, volume_id: str) -> bool:
        return volume_id in self._local

    def access_state(self, volume_id: str) -> AccessState | None:
        """The applied access state of an open volume; None if it is not open."""
        local = self._local.get(volume_id)
        return None if local is None else local.access

    @property
    def outstanding(self) -> int:
        """How many plans were handed out and not yet reported by :meth:`applied`."""
        return len(self._outstanding)

    def _expected(self) -> dict[str, _Local]:
        """The local state once every outstanding plan has run: what a new plan starts from."""
        local = dict(self._local)
        for plan in self._outstanding:
            for action in plan.actions:
                _fold(local, action)
        return local

    def _known(self, expected: Mapping[str, _Local]) -> list[str]:
        ids = set(self.state.roles) | set(self._target) | set(self._local) | set(expected)
        return sorted(ids - set(self.state.unreadable) - self._destroyed)

    def _hand_out(self, plan: AdapterPlan) -> AdapterPlan:
        if plan.actions:
            self._outstanding.append(plan)
        return plan

    def _latest(self, volume_id: str) -> VolumeRole | None:
        """The newest role accepted for the volume: persisted, or about to be by an outstanding plan."""
        held = self.state.get(volume_id)
        target = self._target.get(volume_id)
        if target is None or (held is not None and held.epoch > target.epoch):
            return held
        return target

    def _desired(self, volume_id: str, role: VolumeRole | None, confirmed: bool) -> _Desired | None:
        """What the volume should look like locally; None means closed."""
        if role is None or volume_id in self._released or role.role is Role.NONE:
            return None
        spec = OpenVolume(role.volume_id, role.name, role.size, role.block_size)
        if role.role is Role.REPLICA:
            return _Desired(spec, AccessState.STANDBY, role.primary_portal)
        serving = confirmed and self._lease_valid
        return _Desired(spec, AccessState.ACTIVE_OPTIMIZED if serving else AccessState.TRANSITIONING, None)

    def converged(self, volume_id: str) -> bool:
        """True once everything planned for the volume's latest accepted epoch has been applied.

        For a destroyed volume: once it is closed and its record forgotten.
        """
        if volume_id in self._destroyed:
            return (
                volume_id not in self._local
                and self.state.get(volume_id) is None
                and volume_id not in self.state.unreadable
            )
        if volume_id in self.state.unreadable:
            return False
        latest = self._latest(volume_id)
        if latest != self.state.get(volume_id):
            return False
        desired = self._desired(volume_id, latest, volume_id in self._confirmed)
        local = self._local.get(volume_id)
        if desired is None:
            return local is None
        return local is not None and (local.spec, local.access, local.redirect) == (
            desired.spec,
            desired.access,
            desired.redirect,
        )

    # ---- planning -----------------------------------------------------------------------------------

    @staticmethod
    def _reconcile(expected: Mapping[str, _Local], volume_id: str, desired: _Desired | None) -> list[Action]:
        """Actions that take the expected local state of ``volume_id`` to ``desired``."""
        local = expected.get(volume_id)
        if desired is None:
            return [] if local is None else [CloseVolume(volume_id)]
        actions: list[Action] = []
        if local is None:
            actions.append(desired.spec)
            access, redirect = AccessState.TRANSITIONING, None
        else:
            if local.spec != desired.spec:
                actions.append(desired.spec)
            access, redirect = local.access, local.redirect
        set_access: list[Action] = [] if access == desired.access else [SetAccess(volume_id, desired.access)]
        set_redirect: list[Action] = (
            [] if redirect == desired.redirect else [Redirect(volume_id, desired.redirect)]
        )
        if desired.access in SERVING_STATES:
            # Point logins here before serving.
            actions += set_redirect + set_access
        else:
            # Stop serving before pointing logins elsewhere.
            actions += set_access + set_redirect
        return actions

    def _settle(self, expected: Mapping[str, _Local], volume_id: str) -> list[Action]:
        """Actions that take the volume to what its latest accepted role asks for, that role
        persisted first (again, if an earlier plan's PersistRole has not run or did not succeed)."""
        latest = self._latest(volume_id)
        actions: list[Action] = []
        if latest is not None and latest != self.state.get(volume_id):
            actions.append(PersistRole(latest))
        desired = self._desired(volume_id, latest, volume_id in self._confirmed)
        return actions + self._reconcile(expected, volume_id, desired)

    def plan(self, assignments: Sequence[Assignment], lease_valid: bool, now: float) -> AdapterPlan:
        """Plan for the assignments of one Ack (all of this node's; a volume it omits is released).

        ``lease_valid`` is the node's lease at ``now`` (``LeaseClock.valid(now)``) after applying
        the Ack. Raises ValueError if a volume appears twice.
        """
        ids = [a.volume_id for a in assignments]
        if len(set(ids)) != len(ids):
            raise ValueError("a volume appears twice in the assignments")
        self._lease_valid = lease_valid
        expected = self._expected()
        actions: list[Action] = []
        rejected: list[Rejection] = []
        self._confirmed = set()
        # Release first, so a volume leaving this node is closed before others start serving.
        self._released = set(self._known(expected)) - set(ids)
        for volume_id in sorted(self._released):
            actions += self._settle(expected, volume_id)
        for assignment in sorted(assignments, key=lambda a: a.volume_id):
            volume_id = assignment.volume_id
            if volume_id in self._destroyed:
                held_role = self.state.get(volume_id)
                held_epoch = None if held_role is None else held_role.epoch
                rejected.append(Rejection(volume_id, assignment.epoch, held_epoch, "volume destroyed"))
                continue
            unreadable = self.state.unreadable.get(volume_id)
            if unreadable is not None:
                rejected.append(
                    Rejection(volume_id, assignment.epoch, None, f"persisted state unreadable: {unreadable}")
                )
                continue
            held = self.state.get(volume_id)
            target = self._target.get(volume_id)
            offered = VolumeRole.from_assignment(assignment, self.node_id)
            floor = max((r.epoch for r in (held, target) if r is not None), default=None)
            same_epoch = [r for r in (held, target) if r is not None and r.epoch == offered.epoch]
            if floor is not None and offered.epoch < floor:
                reason = f"epoch {offered.epoch} is lower than the held epoch {floor}"
            elif any(r != offered for r in same_epoch):
                reason = f"differs from the assignment already accepted at epoch {offered.epoch}"
            else:
                self._confirmed.add(volume_id)
                self._target[volume_id] = offered
                actions += self._settle(expected, volume_id)
                continue
            rejected.append(Rejection(volume_id, offered.epoch, floor, reason))
            # Keep the role held, but a rejected assignment confirms nothing: a primary is fenced.
            actions += self._settle(expected, volume_id)
        return self._hand_out(AdapterPlan(tuple(actions), tuple(rejected), now))

    def destroy_failed(self, volume_id: str) -> bool:
        """A :class:`DestroyVolume` did not complete. If the volume's record is still there (the
        forget failed), it stops being a tombstone: it is reported again, so the master's next
        tombstone retries the destroy. Returns whether it was taken back. Once the record is
        forgotten the tombstone stays (nothing would report the volume again)."""
        if volume_id in self.state.roles or volume_id in self.state.unreadable:
            self._destroyed.discard(volume_id)
            return True
        return False

    def destroy(self, volume_id: str, name: str) -> AdapterPlan:
        """The master deleted the volume: close it if it is (expected to be) open, then destroy it.

        From this call on the volume id is a tombstone (see the module docstring): it is dropped
        from the adapter's models, no longer reported, and every later assignment for it is
        rejected. Calling it again plans only the (idempotent) :class:`DestroyVolume`. Raises
        ``InvalidMessage`` for a malformed volume id or name.
        """
        check_volume_id("volume_id", volume_id)
        check_volume_name("name", name)
        expected = self._expected()
        self._destroyed.add(volume_id)
        self._target.pop(volume_id, None)
        self._confirmed.discard(volume_id)
        self._released.discard(volume_id)
        actions: list[Action] = []
        if volume_id in expected:
            actions.append(CloseVolume(volume_id))
        actions.append(DestroyVolume(volume_id, name))
        return self._hand_out(AdapterPlan(tuple(actions)))

    def startup(self) -> AdapterPlan:
        """After a restart (state loaded, no Ack yet): open the persisted volumes, primaries fenced."""
        expected = self._expected()
        actions: list[Action] = []
        for volume_id in self._known(expected):
            actions += self._settle(expected, volume_id)
        return self._hand_out(AdapterPlan(tuple(actions)))

    def fence_all(self) -> AdapterPlan:
        """The lease lapsed: ``TRANSITIONING`` for every volume that serves or may serve as primary.

        That is every volume whose latest accepted role is PRIMARY, and every volume that will be
        serving once the outstanding plans have run (this plan runs after them, so the fence wins).
        A destroyed volume that is still serving (its destroy plan has not run yet) is fenced too:
        the executor applies the fence to the LUs at once.
        """
        self._lease_valid = False
        expected = self._expected()
        actions: list[Action] = []
        for volume_id in sorted(self._destroyed & set(self._local)):
            if self._local[volume_id].access in SERVING_STATES:
                actions.append(SetAccess(volume_id, AccessState.TRANSITIONING))
        for volume_id in self._known(expected):
            latest = self._latest(volume_id)
            local = expected.get(volume_id)
            primary = latest is not None and latest.role is Role.PRIMARY
            if primary or (local is not None and local.access in SERVING_STATES):
                actions.append(SetAccess(volume_id, AccessState.TRANSITIONING))
        return self._hand_out(AdapterPlan(tuple(actions)))

    def lease_regained(self) -> AdapterPlan:
        """The lease is valid again: unfence the primaries the latest Ack confirmed (and persisted)."""
        self._lease_valid = True
        expected = self._expected()
        actions: list[Action] = []
        for volume_id in self._known(expected):
            actions += self._settle(expected, volume_id)
        return self._hand_out(AdapterPlan(tuple(actions)))

    # ---- execution feedback -------------------------------------------------------------------------

    def applied(
        self, plan: AdapterPlan, count: int | None = None, *, ran: Collection[int] | None = None
    ) -> None:
        """The executor ran the first ``count`` actions of ``plan`` (all of them by default), or
        exactly the actions at the indices ``ran`` (the executor skips the rest of a volume's
        actions after one of them failed, and goes on with the other volumes).

        Every plan the adapter hands out (``plan``, ``startup``, ``fence_all``, ``lease_regained``)
        must be reported here once, also when it failed part way or was not run at all
        (``count=0``): until then the adapter plans on the assumption that it will run. Raises
        ValueError if a :class:`PersistRole` reported as run is not in the state, or if the record
        of a volume whose :class:`DestroyVolume` is reported as run is still there.
        """
        for index, outstanding in enumerate(self._outstanding):
            if outstanding is plan:
                del self._outstanding[index]
                break
        if ran is not None:
            actions = tuple(plan.actions[i] for i in sorted(ran))
        else:
            actions = plan.actions if count is None else plan.actions[:count]
        for action in actions:
            if isinstance(action, PersistRole):
                held = self.state.get(action.volume_id)
                if held is None or held.epoch < action.role.epoch:
                    raise ValueError(
                        f"volume {action.volume_id}: epoch {action.role.epoch} was not persisted"
                    )
            elif isinstance(action, DestroyVolume) and (
                action.volume_id in self.state.roles or action.volume_id in self.state.unreadable
            ):
                raise ValueError(f"volume {action.volume_id}: destroyed, but its record was not forgotten")
        for action in actions:
            _fold(self._local, action)

    # ---- reporting ----------------------------------------------------------------------------------

    def _health(self, volume_id: str, held: VolumeRole | None) -> Health:
        local = self._local.get(volume_id)
        if local is None:
            return Health.OFFLINE
        if held is not None and held.role is Role.PRIMARY and local.access not in SERVING_STATES:
            return Health.DEGRADED
        return Health.OK

    def observations(
        self,
        now: float,
        write_positions: Mapping[str, int] = _NO_POSITIONS,
        health: Mapping[str, Health] = _NO_HEALTH,
        replica_states: Mapping[str, tuple[ReplicaState, ...]] = _NO_REPLICA_STATES,
        errors: Mapping[str, str] = _NO_ERRORS,
        unsupported: Mapping[str, tuple[UnsupportedCommand, ...]] = _NO_UNSUPPORTED,
    ) -> tuple[VolumeObservation, ...]:
        """Per-volume observations for the next heartbeat, sorted by volume id.

        Reported: every volume whose persisted role is PRIMARY or REPLICA (and that the latest Ack
        did not release), every volume still open, and every volume whose record is unreadable
        (epoch 0, role NONE, FAILED); never a destroyed volume. ``epoch`` and ``role`` are what the
        node has *persisted*; ``converged`` says whether the local state matches them (and nothing
        newer is pending).
        Health defaults to OK for an open volume, DEGRADED for a primary that is open but not
        serving (fenced: no lease, or not yet confirmed), OFFLINE for a volume that is not open;
        write positions to 0. ``errors`` and ``unsupported`` are the node's diagnostics
        (sparrow/node/diagnostics.py), reported with the volumes that are reported.
        ``now`` is the heartbeat's time (the observation carries no timestamp of its own).
        """
        del now  # part of the sans-IO signature; nothing here depends on time yet
        out: list[VolumeObservation] = []
        unreadable = set(self.state.unreadable) - self._destroyed
        for volume_id in sorted(set(self._known(self._local)) | unreadable):
            if volume_id in self.state.unreadable:
                out.append(VolumeObservation(volume_id, 0, Role.NONE, Health.FAILED, 0, (), converged=False))
                continue
            held = self.state.get(volume_id)
            is_open = volume_id in self._local
            serving_role = held is not None and held.role is not Role.NONE and volume_id not in self._released
            if not (serving_role or is_open):
                continue
            out.append(
                VolumeObservation(
                    volume_id=volume_id,
                    epoch=0 if held is None else held.epoch,
                    role=Role.NONE if held is None else held.role,
                    health=health.get(volume_id, self._health(volume_id, held)),
                    write_position=write_positions.get(volume_id, 0),
                    replica_states=replica_states.get(volume_id, ()),
                    converged=self.converged(volume_id),
                    error=errors.get(volume_id),
                    unsupported=unsupported.get(volume_id, ()),
                )
            )
        return tuple(out)


# -- execution (the thin asyncio side) ----------------------------------------------------------------


class LocalVolumes(Protocol):
    """What the executor needs from the node's volume layer (the daemon implements it)."""

    async def open_volume(self, action: OpenVolume) -> None: ...

    async def close_volume(self, volume_id: str) -> None: ...

    async def set_access(self, volume_id: str, state: AccessState) -> None: ...

    async def redirect(self, volume_id: str, portal: str | None) -> None: ...

    async def destroy_volume(self, volume_id: str, name: str) -> None:
        """Delete the local volume ``name`` (closed first if open), record and data; a no-op when
        there is none; refuses (raises) when the local ``name`` carries another volume id."""
        ...


async def execute_plan(
    plan: AdapterPlan,
    adapter: Adapter,
    volumes: LocalVolumes,
    failures: dict[str, BaseException] | None = None,
) -> None:
    """Run ``plan``'s actions in order; report what ran to ``adapter`` even if one fails.

    A failing action (e.g. ``RecordWriteError`` or ``EpochRegression`` from a PersistRole, or a
    store error opening a volume) stops that volume's part of the plan -- nothing after it runs for
    that volume, so nothing acts on a role that was not persisted -- while the other volumes' actions
    still run: one broken volume never keeps the others from being served or fenced. The first
    error then propagates (the others are added to it as notes). Callers run one plan at a time. A
    :class:`DestroyVolume` forgets the volume's record (durably) before the local volume is deleted.
    ``failures``, when given (empty), receives each failed volume's error by volume id.
    """
    ran: list[int] = []
    failed: dict[str, BaseException] = {} if failures is None else failures
    try:
        for index, action in enumerate(plan.actions):
            if action.volume_id in failed:
                continue
            try:
                await _run(action, adapter, volumes)
            except Exception as e:
                failed[action.volume_id] = e
                continue
            ran.append(index)
    finally:
        adapter.applied(plan, ran=ran)
    if failed:
        first, *others = failed.values()
        for other in others:
            first.add_note(f"also failed: {type(other).__name__}: {other}")
        raise first


async def _run(action: Action, adapter: Adapter, volumes: LocalVolumes) -> None:
    if isinstance(action, PersistRole):
        await adapter.state.persist_async(action.role)
    elif isinstance(action, OpenVolume):
        await volumes.open_volume(action)
    elif isinstance(action, CloseVolume):
        await volumes.close_volume(action.volume_id)
    elif isinstance(action, SetAccess):
        await volumes.set_access(action.volume_id, action.state)
    elif isinstance(action, Redirect):
        await volumes.redirect(action.volume_id, action.portal)
    else:
        await adapter.state.forget_async(action.volume_id)
        await volumes.destroy_volume(action.volume_id, action.name)
