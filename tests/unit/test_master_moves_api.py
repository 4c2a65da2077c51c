"""The operator verbs on the master's API (sparrow.master.moves_api): planned failover, rebuild,
drain and undrain, on a real control loop and AuthorityStore; control steps driven by hand."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sparrow.auth import tokens
from sparrow.cluster.messages import Health, ReplicaState, Role, SyncState, VolumeObservation
from tests.unit.test_master_api import Master, until

MiB = 1 << 20
THREE = ("n1", "n2", "n3")


async def three_copies(m: Master, name: str = "vol") -> str:
    """``name`` placed on n1 (primary), n2, n3 at epoch 1, every copy converged and reported in sync."""
    for node in THREE:
        m.node_reports(node, 1)
    created = await m.json("POST", "/v1/volumes", {"name": name, "size": 64 * MiB, "replicas": 3}, status=201)
    vid: str = created["volume_id"]
    m.control.step(m.clock())
    report(m, vid, epoch=1, primary="n1", replicas=("n2", "n3"), seq=201)
    return vid


def report(m: Master, vid: str, *, epoch: int, primary: str, replicas: tuple[str, ...], seq: int) -> None:
    states = tuple(ReplicaState(n, SyncState.IN_SYNC, 0) for n in replicas)
    m.node_reports(primary, seq, VolumeObservation(vid, epoch, Role.PRIMARY, Health.OK, 0, states, True))
    for node in replicas:
        m.node_reports(node, seq, VolumeObservation(vid, epoch, Role.REPLICA, Health.OK, 0, (), True))


async def answered_after_a_step(m: Master, method: str, path: str, body: Any, status: int = 200) -> Any:
    """Send the request; once the loop has it queued, run one control step; the answer."""
    task = asyncio.create_task(m.json(method, path, body, status=status))
    await until(lambda: any(m.control.moves.pending(v.volume_id) for v in m.control.desired()), "queued")
    m.control.step(m.clock())
    return await asyncio.wait_for(task, 5)


async def test_planned_failover_publishes_the_target_as_primary_through_the_loop(master: Master) -> None:
    vid = await three_copies(master)
    answer = await answered_after_a_step(master, "POST", "/v1/volumes/vol/failover", {"to": "n3"})
    assert answer["epoch"] == 2 and answer["primary"]["node_id"] == "n3"
    assert [(r["node_id"], r["sync"]) for r in answer["replicas"]] == [
        ("n3", "in_sync"),
        ("n2", "in_sync"),
        ("n1", "stale"),  # kept as a copy, out of the in-sync set: it may hold unacknowledged writes
    ]
    recorded = master.store.latest_assignment(vid)
    assert recorded is not None and (recorded.epoch, recorded.primary) == (2, "n3")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"to": "n1"}, "node n1 is already the primary of vol"),
        ({"to": "n9"}, "node n9 holds no copy of vol"),
    ],
)
async def test_a_failover_that_cannot_be_made_is_409_with_one_line(
    master: Master, body: dict[str, str], message: str
) -> None:
    await three_copies(master)
    answer = await master.json("POST", "/v1/volumes/vol/failover", body, status=409)
    assert answer == {"error": message}
    assert master.control.moves.pending(next(iter(master.control.desired())).volume_id) is None


async def test_a_failover_without_an_in_sync_replica_is_409(master: Master) -> None:
    vid = await three_copies(master)
    behind = tuple(ReplicaState(n, SyncState.SYNCING, 0) for n in ("n2", "n3"))
    master.node_reports("n1", 401, VolumeObservation(vid, 1, Role.PRIMARY, Health.OK, 0, behind, True))
    master.control.step(master.clock())  # both dropped from the in-sync set, epoch 2
    answer = await master.json("POST", "/v1/volumes/vol/failover", {}, status=409)
    assert answer == {"error": "volume vol has no in-sync replica to fail over to"}


async def test_rebuild_answers_once_the_copy_is_released(master: Master) -> None:
    vid = await three_copies(master)
    answer = await answered_after_a_step(master, "POST", "/v1/volumes/vol/rebuild", {"replica": "n2"})
    assert answer["epoch"] == 2 and [r["node_id"] for r in answer["replicas"]] == ["n1", "n3"]
    assert answer["status_kind"] == "moving"
    refused = await master.json("POST", "/v1/volumes/vol/rebuild", {"replica": "n1"}, status=409)
    assert "in progress" in refused["error"]
    # n2 reports the volume no more: the copy is asked back, outside the in-sync set.
    report(master, vid, epoch=2, primary="n1", replicas=("n3",), seq=401)
    master.node_reports("n2", 401)
    master.control.step(master.clock())
    back = await master.json("GET", "/v1/volumes/vol")
    assert back["epoch"] == 3
    assert [(r["node_id"], r["sync"]) for r in back["replicas"]] == [
        ("n1", "in_sync"),
        ("n3", "in_sync"),
        ("n2", "stale"),
    ]


async def test_drain_is_persisted_listed_and_moves_the_primary(master: Master) -> None:
    vid = await three_copies(master)
    node = await master.json("POST", "/v1/nodes/n1/drain")
    assert node == {"node_id": "n1", "draining": True, "drain_status": "starting"}
    assert [n.node_id for n in master.store.nodes() if n.draining] == ["n1"]
    master.control.step(master.clock())
    moved = master.store.latest_assignment(vid)
    assert moved is not None and moved.primary == "n2" and moved.replicas == ("n2", "n3", "n1")
    listed = {n["node_id"]: n for n in (await master.json("GET", "/v1/nodes"))["nodes"]}
    assert listed["n1"]["draining"] is True and listed["n1"]["drain_status"]
    assert listed["n2"]["draining"] is False and listed["n2"]["drain_status"] is None
    assert (await master.json("POST", "/v1/nodes/n1/undrain"))["draining"] is False
    assert not any(n.draining for n in master.store.nodes())
    assert (await master.json("POST", "/v1/nodes/n9/drain", status=404)) == {"error": "no node 'n9'"}


# -- who may -------------------------------------------------------------------------------------------


def token(m: Master, role: str, tenant: str | None = None) -> str:
    new = tokens.mint(role, tenant=tenant, created_at=2.0)
    m.store.add_token(new.record)
    return new.plaintext


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/volumes/vol/failover", {"to": "n2"}),
        ("POST", "/v1/volumes/vol/rebuild", {"replica": "n2"}),
        ("POST", "/v1/nodes/n1/drain", None),
        ("POST", "/v1/nodes/n1/undrain", None),
    ],
)
async def test_attackers_are_refused_before_anything_moves(
    master: Master, method: str, path: str, body: Any
) -> None:
    vid = await three_copies(master)
    before = master.store.latest_assignment(vid)
    master.token = None
    await master.json(method, path, body, status=401)
    master.token = token(master, "reader")
    assert "needs operator" in (await master.json(method, path, body, status=403))["error"]
    master.token = token(master, "operator", tenant="other-")
    await master.json(method, path, body, status=403)
    master.token = token(master, "admin", tenant="other-")
    await master.json(method, path, body, status=403)
    assert master.control.moves.pending(vid) is None
    assert not any(n.draining for n in master.store.nodes())
    master.control.step(master.clock())
    assert master.store.latest_assignment(vid) == before


async def test_an_operator_may_and_a_tenant_only_on_its_own_volumes(master: Master) -> None:
    await three_copies(master, "team-a-vol")
    master.token = token(master, "operator", tenant="team-a-")
    answer = await answered_after_a_step(master, "POST", "/v1/volumes/team-a-vol/failover", {"to": "n2"})
    assert answer["primary"]["node_id"] == "n2"
    await master.json("POST", "/v1/nodes/n1/drain", status=403)  # nodes are shared: no tenant token
    master.token = token(master, "operator")
    assert (await master.json("POST", "/v1/nodes/n1/drain"))["draining"] is True
