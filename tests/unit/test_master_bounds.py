"""The master API's bounds and truths (issue 7): /healthz answers 503 with the reasons while a
volume is not served or a task has failed; a volume no node could hold is refused at create; a
dead node that holds no copy can be forgotten (DELETE /v1/nodes/ID), a live or holding one not;
one that only the history of deleted volumes names is forgotten too, and counts for nothing after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sparrow.cluster.lease import LeaseConfig
from sparrow.cluster.messages import Health, Heartbeat, Hello, Role, VolumeObservation
from sparrow.cluster.nodeidentity import AdmissionPolicy, NodeKey, NodeKeys
from sparrow.supervision import TaskSupervisor
from tests.unit.test_master_api import Master

TiB = 1 << 40  # the capacity Master.node_reports announces
TIMING = LeaseConfig()


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[Master]:
    m = Master(tmp_path, supervisor=TaskSupervisor())
    await m.client.start_server()
    yield m
    await m.client.close()
    m.store.close()


def _primary(volume_id: str, epoch: int, health: Health = Health.OK) -> VolumeObservation:
    return VolumeObservation(volume_id, epoch, Role.PRIMARY, health, 0, (), converged=True)


async def test_healthz_is_503_with_the_reason_while_a_volume_is_not_served(master: Master) -> None:
    master.node_reports("n1", 1)
    vid = (await master.json("POST", "/v1/volumes", {"name": "v", "size": "1MiB"}, status=201))["volume_id"]
    master.control.step(master.clock())
    master.node_reports("n1", 2, _primary(vid, 1))
    health = await master.json("GET", "/healthz")
    assert health["status"] == "ok" and health["reasons"] == [] and health["volumes_not_served"] == []

    master.node_reports("n1", 3, _primary(vid, 1, Health.DEGRADED))  # the primary fenced itself
    health = await master.json("GET", "/healthz", status=503)
    assert health["status"] == "unhealthy"
    assert health["reasons"] == ["volume v: primary n1 is fenced (health degraded)"]
    assert health["volumes_not_served"] == [
        {"volume_id": vid, "name": "v", "reason": "primary n1 is fenced (health degraded)"}
    ]

    master.node_reports("n1", 4, VolumeObservation(vid, 1, Role.PRIMARY, Health.OK, 0, (), converged=False))
    health = await master.json("GET", "/healthz", status=503)
    assert health["reasons"] == ["volume v: transitioning: primary n1 reports epoch 1 as primary, "
                                 "not converged (published: epoch 1)"]  # fmt: skip

    master.node_reports("n1", 5, _primary(vid, 1))
    master.clock.now += TIMING.dead_after
    health = await master.json("GET", "/healthz", status=503)
    assert health["reasons"] == ["volume v: primary n1 is not alive"]


async def test_healthz_is_503_while_a_task_has_failed(master: Master) -> None:
    supervisor = master.api.supervisor
    assert supervisor is not None
    assert (await master.json("GET", "/healthz"))["status"] == "ok"
    supervisor.failed("node-recorder", OverflowError("Python int too large to convert to SQLite INTEGER"))
    health = await master.json("GET", "/healthz", status=503)
    assert health["reasons"] == [
        "task node-recorder failed: OverflowError: Python int too large to convert to SQLite INTEGER"
    ]
    assert health["tasks_failed"][0]["task"] == "node-recorder"
    supervisor.recovered("node-recorder")
    assert (await master.json("GET", "/healthz"))["status"] == "ok"


async def test_a_volume_larger_than_any_node_is_refused_with_the_reason(master: Master) -> None:
    # No node has reported a capacity yet: nothing to check against, the volume waits unplaced.
    await master.json("POST", "/v1/volumes", {"name": "early", "size": "1PiB"}, status=201)
    master.node_reports("n1", 1)  # capacity 1 TiB
    answer = await master.json("POST", "/v1/volumes", {"name": "huge", "size": "1PiB"}, status=400)
    assert answer["error"] == (
        "size 1125899906842624 bytes (1 PiB) is larger than any node can hold: the largest capacity "
        "a node has reported is 1099511627776 bytes (1 TiB)"
    )
    assert [v["name"] for v in (await master.json("GET", "/v1/volumes"))["volumes"]] == ["early"]
    await master.json("POST", "/v1/volumes", {"name": "fits", "size": TiB}, status=201)
    # A pending node's word does not count: one claiming 1 PiB raises no bound.
    big = Hello("n9", 1, "192.0.2.9:3260", "192.0.2.9:7000", "192.0.2.9:8080", 1 << 50, 1 << 50)
    master.control.observations.record(big, "n9", master.clock())
    master.control.node_keys = NodeKeys({"n9": NodeKey(b"9" * 32).public}, {}, AdmissionPolicy.APPROVE)
    await master.json("POST", "/v1/volumes", {"name": "huge", "size": "1PiB"}, status=400)


async def test_the_capacity_of_a_node_known_from_an_earlier_run_counts(tmp_path: Path) -> None:
    first = Master(tmp_path)
    first.node_reports("n1", 1)
    await first.client.close()
    first.store.close()
    again = Master(tmp_path)  # a restarted master: n1 is only in the authority
    await again.client.start_server()
    try:
        await again.json("POST", "/v1/volumes", {"name": "huge", "size": 2 * TiB}, status=400)
    finally:
        await again.client.close()
        again.store.close()


async def test_forget_a_dead_node_that_holds_nothing(master: Master) -> None:
    master.node_reports("ghost", 1)
    refused = await master.json("DELETE", "/v1/nodes/ghost", status=409)
    assert refused["error"] == "node 'ghost' is alive; stop it (and wait until it is dead) first"
    master.clock.now += TIMING.dead_after
    await master.json("DELETE", "/v1/nodes/ghost", status=204)
    assert (await master.json("GET", "/v1/nodes"))["nodes"] == []
    assert master.store.nodes() == () and not master.control.observations.known("ghost")
    missing = await master.json("DELETE", "/v1/nodes/ghost", status=404)
    assert missing["error"] == "no node 'ghost'"


async def test_a_node_that_holds_a_copy_is_not_forgotten(master: Master) -> None:
    master.node_reports("n1", 1)
    vid = (await master.json("POST", "/v1/volumes", {"name": "v", "size": "1MiB"}, status=201))["volume_id"]
    master.control.step(master.clock())
    master.clock.now += TIMING.dead_after
    refused = await master.json("DELETE", "/v1/nodes/n1", status=409)
    assert refused["error"] == "node 'n1' holds a copy of v; move or delete it first"
    assert [n.node_id for n in master.store.nodes()] == ["n1"]
    assert master.store.latest_assignment(vid) is not None


async def test_a_node_only_deleted_volumes_named_is_forgotten_and_bounds_nothing(tmp_path: Path) -> None:
    master = Master(tmp_path)
    await master.client.start_server()
    try:
        master.node_reports("n1", 1)  # 1 TiB
        big = Hello("big", 1, "192.0.2.9:3260", "192.0.2.9:7000", "192.0.2.9:8080", 4 * TiB, 4 * TiB)
        master.control.observations.record(big, "big", master.clock())
        master.store.upsert_hello(big, seen_at=1.0)
        master.control.observations.record(Heartbeat(seq=1, observations=()), "big", master.clock())
        body = {"name": "v", "size": 3 * TiB}
        vid = (await master.json("POST", "/v1/volumes", body, status=201))["volume_id"]
        master.control.step(master.clock())
        assert master.control.current(vid).primary == "big"  # type: ignore[union-attr]
        await master.json("DELETE", "/v1/volumes/v", status=204)
        master.clock.now += TIMING.dead_after
        master.node_reports("n1", 2)  # n1 stays alive; big is dead

        # The recorded history names big as primary (of a deleted volume): it is forgotten all the same.
        await master.json("DELETE", "/v1/nodes/big", status=204)
        assert [n["node_id"] for n in (await master.json("GET", "/v1/nodes"))["nodes"]] == ["n1"]
        assert [n.node_id for n in master.store.nodes()] == ["n1"]
        assert master.store.max_epoch(vid) is not None  # the history stays
        refused = await master.json("POST", "/v1/volumes", {"name": "w", "size": 3 * TiB}, status=400)
        assert "the largest capacity a node has reported is 1099511627776 bytes (1 TiB)" in refused["error"]
        assert (await master.json("DELETE", "/v1/nodes/big", status=404))["error"] == "no node 'big'"
    finally:
        await master.client.close()
        master.store.close()

    again = Master(tmp_path)  # a restarted master: neither listed, nor a bound, nor given a lease
    await again.client.start_server()
    try:
        assert [n["node_id"] for n in (await again.json("GET", "/v1/nodes"))["nodes"]] == ["n1"]
        await again.json("POST", "/v1/volumes", {"name": "w", "size": 3 * TiB}, status=400)
        # Its Hello again makes it a new node.
        again.control.observations.record(big, "big", again.clock())
        again.store.upsert_hello(big, seen_at=2.0)
        assert [n["node_id"] for n in (await again.json("GET", "/v1/nodes"))["nodes"]] == ["big", "n1"]
        await again.json("POST", "/v1/volumes", {"name": "w", "size": 3 * TiB}, status=201)
    finally:
        await again.client.close()
        again.store.close()
