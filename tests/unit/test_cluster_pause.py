"""Pause and resume, sans-IO: the pause rule (sparrow.cluster.pause), the adapter's SetPaused and
the logical unit's NOT READY (docs/cluster.md, "Pause and resume")."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from frontend.scsi.lu import AccessState
from sparrow.cluster.adapter import OpenVolume, PersistRole, SetAccess, SetPaused
from sparrow.cluster.controller import (
    AssignmentAsk,
    Decision,
    PublishedAssignment,
    StatusKind,
    VolumeStatus,
)
from sparrow.cluster.messages import Assignment
from sparrow.cluster.pause import PAUSED_REASON, PAUSING_REASON, RESUMING_REASON, apply_pause
from tests.unit.test_cluster_adapter import ACTIVE, SIZE, VOL_A, VOL_B, Node, assign, kinds, replica_of
from tests.unit.test_cluster_adapter import node as node
from tests.unit.test_scsi_helpers import (
    A,
    good,
    inquiry,
    make_lu,
    read10,
    read_capacity16,
    request_sense,
    run,
    sense,
    tur,
    write10,
)

OK = VolumeStatus(None, None, StatusKind.OK)
NOT_READY = 0x02


def published(a: Assignment) -> dict[str, PublishedAssignment]:
    return {a.volume_id: PublishedAssignment(a, 0.0)}


def three(paused: bool = False) -> Assignment:
    return Assignment(
        volume_id=VOL_A,
        name="vol-a",
        size=SIZE,
        block_size=512,
        epoch=4,
        primary="n1",
        primary_portal="10.0.0.1:3260",
        replicas=("n1", "n2", "n3"),
        in_sync=("n1", "n2"),
        paused=paused,
    )


# ---- the rule -----------------------------------------------------------------------------------


def test_a_changed_wish_asks_for_the_same_placement_with_it() -> None:
    current = three()
    decision = apply_pause(Decision((), {VOL_A: OK}), {VOL_A: True}, published(current), 7.0)
    (ask,) = decision.asks
    assert (ask.primary, ask.replicas, ask.in_sync) == ("n1", ("n1", "n2", "n3"), ("n1", "n2"))
    assert ask.paused is True
    assert ask.reason == PAUSING_REASON
    assert decision.status[VOL_A] == VolumeStatus(PAUSING_REASON, 7.0, StatusKind.PAUSED)
    # Published: no ask, status "paused by the operator", its since kept from step to step.
    paused = apply_pause(Decision((), {VOL_A: OK}), {VOL_A: True}, published(three(True)), 8.0)
    assert paused.asks == () and paused.status[VOL_A] == VolumeStatus(PAUSED_REASON, 8.0, StatusKind.PAUSED)
    later = apply_pause(Decision((), {VOL_A: OK}), {VOL_A: True}, published(three(True)), 9.0, paused.status)
    assert later.status[VOL_A].since == 8.0
    # Resume: the same placement, not paused.
    resume = apply_pause(Decision((), {VOL_A: OK}), {VOL_A: False}, published(three(True)), 10.0)
    (ask,) = resume.asks
    assert (ask.paused, ask.reason, resume.status[VOL_A].kind) == (False, RESUMING_REASON, StatusKind.MOVING)
    # Nothing to change: nothing asked, the status untouched.
    assert apply_pause(Decision((), {VOL_A: OK}), {VOL_A: False}, published(current), 11.0) == Decision(
        (), {VOL_A: OK}
    )


def test_every_ask_carries_the_wish_so_a_paused_volume_fails_over_paused() -> None:
    promote = AssignmentAsk(VOL_A, "n2", ("n2", "n3"), "promote n2: primary n1 dead", ("n2",))
    degraded = VolumeStatus("primary n1 dead", 3.0, StatusKind.PROMOTING)
    before = Decision((promote,), {VOL_A: degraded})
    decision = apply_pause(before, {VOL_A: True}, published(three(True)), 5.0)
    assert decision.asks == (dataclasses.replace(promote, paused=True),)
    assert decision.status[VOL_A] is degraded  # the failover's status, not "paused"
    # A volume placed while paused is placed paused; one with no primary waits for its placement.
    place = AssignmentAsk(VOL_B, "n1", ("n1",), "place 1 copy on n1", ("n1",))
    fresh = apply_pause(Decision((place,), {VOL_B: OK}), {VOL_B: True}, {}, 5.0)
    assert fresh.asks[0].paused is True
    unplaced = dataclasses.replace(
        three(), primary=None, primary_portal=None, replicas=(), in_sync=(), replication_portals=()
    )
    assert apply_pause(Decision((), {VOL_A: OK}), {VOL_A: True}, published(unplaced), 5.0).asks == ()


# ---- the adapter --------------------------------------------------------------------------------


def test_a_paused_primary_is_paused_before_it_serves_and_a_replica_never_is(node: Node) -> None:
    paused = dataclasses.replace(assign(VOL_A, 1), paused=True)
    plan = node.ack([paused, dataclasses.replace(replica_of(VOL_B, 1), paused=True)])
    assert plan.for_volume(VOL_A) == (
        PersistRole(node.state.get(VOL_A)),  # type: ignore[arg-type]
        OpenVolume(VOL_A, "vol-a", SIZE, 512),
        SetPaused(VOL_A, True),
        SetAccess(VOL_A, ACTIVE),
    )
    assert SetPaused(VOL_B, True) not in plan.actions
    assert node.volumes.luns[VOL_A].paused and not node.volumes.luns[VOL_B].paused
    assert node.adapter.converged(VOL_A)
    # Resume under the next epoch: only the pause changes.
    plan = node.ack([assign(VOL_A, 2), replica_of(VOL_B, 1)])
    assert kinds(plan) == ["PersistRole", "SetPaused"] and not node.volumes.luns[VOL_A].paused


def test_a_restarted_node_serves_a_paused_volume_paused_from_its_first_ack(tmp_path: Path) -> None:
    first = Node(tmp_path)
    first.ack([dataclasses.replace(assign(VOL_A, 3), paused=True)])
    again = Node(tmp_path)  # kill -9 and restart: nothing but the persisted role survives
    again.run(again.adapter.startup())
    assert again.access(VOL_A) is AccessState.TRANSITIONING and not again.volumes.luns[VOL_A].paused
    plan = again.ack([dataclasses.replace(assign(VOL_A, 3), paused=True)])
    assert plan.actions == (SetPaused(VOL_A, True), SetAccess(VOL_A, ACTIVE))
    assert again.volumes.luns[VOL_A].paused


# ---- the logical unit ---------------------------------------------------------------------------


async def test_a_paused_lu_answers_reads_and_writes_not_ready_04_01_and_resumes() -> None:
    lu, _ = make_lu()
    good(await run(lu, write10(0, 1), b"\x5a" * 512))
    lu.paused = True
    for cdb, data in ((read10(0, 1), b""), (write10(0, 1), b"\xa5" * 512), (tur(), b"")):
        assert sense(await run(lu, cdb, data)) == (NOT_READY, 0x04, 0x01)
    # Information commands still answer; REQUEST SENSE reports the condition.
    good(await run(lu, inquiry()))
    good(await run(lu, read_capacity16()))
    answer = await run(lu, request_sense())
    assert bytes(answer.data)[2] & 0x0F == NOT_READY and bytes(answer.data)[12:14] == b"\x04\x01"
    # The fast path does not bypass it (the store answers inline: it would read).
    assert lu.inline_io and lu.read_now(A, 0, 1, 512) is None and not lu.write_now(A, 0, 1, b"\1" * 512)
    lu.paused = False
    assert lu.read_now(A, 0, 1, 512) == b"\x5a" * 512
    answer = await run(lu, read10(0, 1))
    good(answer)
    assert bytes(answer.data) == b"\x5a" * 512


async def test_a_write_already_running_when_the_pause_lands_is_waited_for() -> None:
    # The WRITE passed the LU's checks and its store I/O (on the primary: the replicas' acks) is
    # in flight when the pause lands: it completes, and the pause is applied only after it, so
    # that no write lands once the operator's pause is answered.
    lu, store = make_lu()
    entered, release = asyncio.Event(), asyncio.Event()
    write = store.write

    async def slow_write(offset: int, data: bytes | bytearray | memoryview) -> None:
        entered.set()
        await release.wait()
        await write(offset, data)

    store.write = slow_write  # type: ignore[method-assign]
    running = asyncio.create_task(run(lu, write10(0, 1), b"\x5a" * 512))
    await asyncio.wait_for(entered.wait(), 5)
    lu.paused = True
    assert sense(await run(lu, write10(1, 1), b"\xa5" * 512)) == (NOT_READY, 0x04, 0x01)  # a new one
    drained = asyncio.create_task(lu.drained())
    done, _ = await asyncio.wait({drained}, timeout=0.2)
    assert not done  # the running WRITE holds it
    release.set()
    good(await asyncio.wait_for(running, 5))
    await asyncio.wait_for(drained, 5)
    assert store._read(0, 512) == b"\x5a" * 512 and store._read(512, 512) == b"\0" * 512
    await asyncio.wait_for(lu.drained(), 5)  # nothing running: at once
