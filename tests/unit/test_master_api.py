"""The master's HTTP API (sparrow.master.api) on a real control loop and a tmp_path AuthorityStore.

The clock is injected; control steps are driven by hand with explicit ``now``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sparrow.auth import tokens
from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.channel import ClusterSecret
from sparrow.cluster.lease import LeaseConfig
from sparrow.cluster.messages import (
    Health,
    Heartbeat,
    Hello,
    ReplicaState,
    Role,
    SyncState,
    VolumeObservation,
)
from sparrow.httpjson import ApiError
from sparrow.master.api import LocalNode, MasterApi, MasterMetrics, build_app
from sparrow.master.control import ControlLoop, restore
from sparrow.metricsauth import MetricsDoor
from sparrow.supervision import TaskSupervisor
from store.backing import BackingPolicy
from store.volumes import naa_from_uuid, serial_from_uuid

MiB = 1 << 20
TIMING = LeaseConfig()
BASE = "iqn.2026-11.io.sparrow"


class Clock:
    def __init__(self, now: float = 10.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Master:
    def __init__(
        self, data_dir: Path, local: LocalNode | None = None, supervisor: TaskSupervisor | None = None
    ) -> None:
        self.store = AuthorityStore.open_in(data_dir)
        admin = tokens.mint("admin", created_at=1.0)
        self.store.add_token(admin.record)
        #: The token :meth:`json` sends (None: none).
        self.token: str | None = admin.plaintext
        self.clock = Clock()
        self.control: ControlLoop = restore(self.store, TIMING, self.clock())
        self.metrics = MasterMetrics()
        self.metrics.bind(self.control, self.clock)
        #: /metrics opens to this secret's scrape token too (sparrow.metricsauth).
        self.secret = ClusterSecret.from_text(b"a cluster secret of the unit tests, 40+ chars")
        self.door = MetricsDoor.of(self.secret, public=False, registry=self.metrics.registry)
        self.api = MasterApi(
            control=self.control,
            metrics=self.metrics,
            clock=self.clock,
            wall_clock=lambda: 1_800_000_000.0,
            local=local,
            backing_policy=BackingPolicy.of(["/dev"]),
            supervisor=supervisor,
            metrics_door=self.door,
        )
        self.client: TestClient[Any, Any] = TestClient(TestServer(build_app(self.api)))

    def node_reports(self, node_id: str, seq: int, *obs: VolumeObservation, incarnation: int = 1) -> None:
        h = Hello(node_id, incarnation, f"192.0.2.{seq % 200 + 1}:3260", "192.0.2.1:7000", "192.0.2.1:8080",
                  1 << 40, 1 << 30)  # fmt: skip
        if self.control.observations.hello(node_id) != h:
            self.control.observations.record(h, node_id, self.clock())
            self.store.upsert_hello(h, seen_at=1.0)
        self.control.observations.record(Heartbeat(seq=seq, observations=obs), node_id, self.clock())

    async def json(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        resp = await self.client.request(method, path, json=body, headers=headers)
        assert resp.status == status, await resp.text()
        return await resp.json() if resp.status != 204 else None


async def test_create_get_list_and_delete_a_volume(master: Master) -> None:
    created = await master.json(
        "POST", "/v1/volumes", {"name": "vol1", "size": "64MiB", "replicas": 1}, status=201
    )
    assert len(created["volume_id"]) == 32 and int(created["volume_id"], 16) >= 0
    assert created == {
        "name": "vol1",
        "volume_id": created["volume_id"],
        "serial": serial_from_uuid(created["volume_id"]),
        "naa": naa_from_uuid(created["volume_id"]),
        "size": 64 * MiB,
        "block_size": 512,
        "physical_block_size": None,
        "chap": None,
        "backing": None,
        "paused": False,
        "replicas_wanted": 1,
        "created_at": "2027-01-15T08:00:00Z",
        "iqn": f"{BASE}:vol1",
        "lun": 0,
        "epoch": 0,
        "primary": None,
        "replicas": [],
        "served": False,
        "status": None,
        "status_kind": None,
        "url": None,
    }
    record = master.store.volume(created["volume_id"])
    assert record is not None and record.replicas == 1 and record.name == "vol1"
    assert await master.json("GET", "/v1/volumes/vol1") == created
    assert await master.json("GET", "/v1/volumes") == {"volumes": [created]}

    await master.json("DELETE", "/v1/volumes/vol1", status=204)
    assert await master.json("GET", "/v1/volumes") == {"volumes": []}
    await master.json("GET", "/v1/volumes/vol1", status=404)
    await master.json("DELETE", "/v1/volumes/vol1", status=404)


async def test_a_placed_volume_shows_its_epoch_primary_replicas_and_url(master: Master) -> None:
    master.node_reports("n1", 1)
    created = await master.json("POST", "/v1/volumes", {"name": "vol1", "size": 64 * MiB}, status=201)
    vid = created["volume_id"]
    master.clock.now = 11.0
    master.control.step(11.0)
    before = await master.json("GET", "/v1/volumes/vol1")
    assert before["epoch"] == 1
    portal = master.control.observations.hello("n1").iscsi_portal  # type: ignore[union-attr]
    assert before["primary"] == {"node_id": "n1", "portal": portal}
    assert before["url"] == f"iscsi://{portal}/{BASE}:vol1/0"
    assert before["replicas"] == [
        {
            "node_id": "n1",
            "role": "primary",
            "state": "alive",
            "observed_epoch": None,
            "observed_role": None,
            "health": None,
            "converged": None,
            "write_position": None,
            "sync": "in_sync",
            "resync": None,
        }
    ]
    master.clock.now = 12.0
    master.node_reports("n1", 2, VolumeObservation(vid, 1, Role.PRIMARY, Health.OK, 4096, (), True))
    master.control.step(12.0)
    after = await master.json("GET", "/v1/volumes/vol1")
    assert after["replicas"][0] | {} == {
        "node_id": "n1",
        "role": "primary",
        "state": "alive",
        "observed_epoch": 1,
        "observed_role": "primary",
        "health": "ok",
        "converged": True,
        "write_position": 4096,
        "sync": "in_sync",
        "resync": None,
    }
    assert after["status"] is None and after["status_kind"] == "ok"

    master.clock.now = 12.0 + TIMING.dead_after
    dead = await master.json("GET", "/v1/volumes/vol1")
    assert dead["replicas"][0]["state"] == "dead"


async def test_inspect_says_which_copies_are_in_sync(master: Master) -> None:
    """Issue 8 "Inspect": each copy's ``sync``. The primary reports n2 behind: the master records
    it out of the in-sync set under a new epoch, and inspect shows it stale."""
    master.node_reports("n1", 1)
    master.node_reports("n2", 1)
    created = await master.json(
        "POST", "/v1/volumes", {"name": "two", "size": 64 * MiB, "replicas": 2}, status=201
    )
    vid = created["volume_id"]
    master.clock.now = 11.0
    master.control.step(11.0)
    placed = await master.json("GET", "/v1/volumes/two")
    assert placed["epoch"] == 1
    assert [(r["node_id"], r["sync"]) for r in placed["replicas"]] == [("n1", "in_sync"), ("n2", "in_sync")]
    master.clock.now = 12.0
    behind = ReplicaState("n2", SyncState.SYNCING, 0)
    master.node_reports("n1", 201, VolumeObservation(vid, 1, Role.PRIMARY, Health.OK, 4096, (behind,), True))
    master.node_reports("n2", 201, VolumeObservation(vid, 1, Role.REPLICA, Health.OK, 0, (), True))
    master.control.step(12.0)
    dropped = await master.json("GET", "/v1/volumes/two")
    assert dropped["epoch"] == 2
    assert [(r["node_id"], r["sync"]) for r in dropped["replicas"]] == [("n1", "in_sync"), ("n2", "stale")]
    assert master.store.latest_assignment(vid).in_sync == ("n1",)  # type: ignore[union-attr]
    assert dropped["replicas"][1]["resync"] is None
    # The primary resyncs it: `syncing`, with its progress (the shape the CLI's --wait reads).
    # (Seqs 201 apart: the test's Hello portal follows the seq.)
    master.clock.now = 13.0
    syncing = ReplicaState("n2", SyncState.SYNCING, 0, 5 * MiB, 64 * MiB)
    master.node_reports("n1", 401, VolumeObservation(vid, 2, Role.PRIMARY, Health.OK, 0, (syncing,), True))
    master.node_reports("n2", 401, VolumeObservation(vid, 2, Role.REPLICA, Health.OK, 0, (), True))
    master.control.step(13.0)
    v = await master.json("GET", "/v1/volumes/two")
    assert v["epoch"] == 2
    assert v["replicas"][1]["sync"] == "syncing"
    assert v["replicas"][1]["resync"] == {"done_bytes": 5 * MiB, "total_bytes": 64 * MiB}
    assert v["replicas"][0]["resync"] is None
    # Caught up: reported IN_SYNC, added back under a new epoch (the controller's RESYNCED rule).
    master.clock.now = 14.0
    caught_up = ReplicaState("n2", SyncState.IN_SYNC, 0)
    master.node_reports("n1", 601, VolumeObservation(vid, 2, Role.PRIMARY, Health.OK, 0, (caught_up,), True))
    master.control.step(14.0)
    back = await master.json("GET", "/v1/volumes/two")
    assert back["epoch"] == 3
    assert [(r["node_id"], r["sync"], r["resync"]) for r in back["replicas"]] == [
        ("n1", "in_sync", None),
        ("n2", "in_sync", None),
    ]


async def test_the_status_says_why_a_volume_is_not_placed(master: Master) -> None:
    await master.json("POST", "/v1/volumes", {"name": "big", "size": "1GiB", "replicas": 3}, status=201)
    master.node_reports("n1", 1)
    master.control.step(10.0)
    got = await master.json("GET", "/v1/volumes/big")
    assert got["epoch"] == 0
    assert got["status"] == "not enough live nodes (have 1, need 3)"
    assert got["status_kind"] == "not_enough_nodes"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"name": "v", "size": "1MiB", "replicas": 4}, 400, "replicas must be 1..3"),
        ({"name": "v", "size": "1MiB", "replicas": 0}, 400, "replicas must be 1..3"),
        ({"name": "v", "size": "1MiB", "replicas": "2"}, 400, "replicas must be an integer"),
        ({"name": "v", "size": "1MiB", "replicas": True}, 400, "replicas must be an integer"),
        ({"name": "v"}, 400, "missing field 'size'"),
        ({"size": "1MiB"}, 400, "missing field 'name'"),
        ({"name": "V_bad", "size": "1MiB"}, 400, "not a volume name"),
        ({"name": "v", "size": 1000}, 400, "not a multiple of the block size"),
        ({"name": "v", "size": "1MiB", "block_size": 1024}, 400, "block_size"),
        ({"name": "v", "size": "1MiB", "chap_user": "u"}, 400, "CHAP needs both chap_user and chap_secret"),
        ({"name": "v", "size": "1MiB", "chap_secret": "s"}, 400, "CHAP needs both chap_user and chap_secret"),
        (
            {"name": "v", "size": "1MiB", "chap_mutual_user": "t", "chap_mutual_secret": "m"},
            400,
            "mutual CHAP needs one-way CHAP too",
        ),
        (
            {"name": "v", "size": "1MiB", "chap_user": "u", "chap_secret": "s", "chap_mutual_user": "t"},
            400,
            "mutual CHAP needs both chap_mutual_user and chap_mutual_secret",
        ),
        (
            {
                "name": "v",
                "size": "1MiB",
                "chap_user": "u",
                "chap_secret": "s",
                "chap_mutual_user": "t",
                "chap_mutual_secret": "s",
            },
            400,
            "chap_mutual_secret: must differ from the initiator's secret",
        ),
        ({"name": "v", "size": "1MiB", "chap_user": 5, "chap_secret": "s"}, 400, "chap_user must be"),
        # A name is sent in the login's text (key=value, NUL-separated): nothing may end the pair.
        (
            {
                "name": "v",
                "size": "1MiB",
                "chap_user": "u",
                "chap_secret": "s",
                "chap_mutual_user": "t\x00AuthMethod=None",
                "chap_mutual_secret": "m",
            },
            400,
            "chap_mutual_user: no control characters",
        ),
        ({"name": "v", "size": "1MiB", "chap_user": "u\x1b[2J", "chap_secret": "s"}, 400, "chap_user: no"),
        ({"name": "v", "size": "1MiB", "chap_user": "u", "chap_secret": "s" * 1025}, 400, "chap_secret"),
        ({"name": "v", "size": "1MiB", "physical_block_size": "4k"}, 400, "physical_block_size must be"),
        ({"name": "v", "size": "1MiB", "physical_block_size": 1024}, 400, "physical_block_size"),
        (
            {"name": "v", "size": "1MiB", "block_size": 4096, "physical_block_size": 512},
            400,
            "physical_block_size",
        ),
        ({"name": "v", "size": "1MiB", "backing": "disk.img"}, 400, "backing: must be an absolute path"),
        ({"name": "v", "size": "1MiB", "lun": 3}, 400, "unknown field 'lun'"),
        ({"name": "v", "size": "lots"}, 400, ""),
        ([1, 2], 400, "must be a JSON object"),
    ],
)
async def test_bad_creates_are_refused_with_a_reason(
    master: Master, body: Any, status: int, fragment: str
) -> None:
    answer = await master.json("POST", "/v1/volumes", body, status=status)
    assert fragment in answer["error"]
    assert master.store.volumes() == ()


async def test_a_taken_name_is_409_naming_what_differs_and_a_retry_is_200(master: Master) -> None:
    body = {"name": "v", "size": "1MiB", "chap_user": "u", "chap_secret": "secret-one-12"}
    created = await master.json("POST", "/v1/volumes", body, status=201)
    # A retry with identical parameters (defaults included) answers with the volume, 200.
    again = await master.json("POST", "/v1/volumes", {**body, "block_size": 512, "replicas": 1}, status=200)
    assert again["volume_id"] == created["volume_id"]
    other = {**body, "size": "2MiB", "replicas": 2, "chap_secret": "secret-two-34"}
    answer = await master.json("POST", "/v1/volumes", other, status=409)
    assert answer["error"] == (
        "volume v exists with other parameters: size is 1048576 (1 MiB), asked 2097152 (2 MiB); "
        "replicas is 1, asked 2; chap_secret differs"
    )
    no_chap = await master.json("POST", "/v1/volumes", {"name": "v", "size": "1MiB"}, status=409)
    assert no_chap["error"] == (
        "volume v exists with other parameters: chap_user is 'u', asked None; chap_secret differs"
    )
    assert len(master.store.volumes()) == 1


async def test_nodes_lists_observed_and_remembered_nodes(master: Master) -> None:
    master.node_reports("n2", 1)
    master.clock.now = 12.5
    # n1 is known to the authority from an earlier run but has not reported to this master.
    master.store.upsert_hello(
        Hello("n1", 3, "192.0.2.50:3260", "192.0.2.50:7000", "192.0.2.50:8080", 1 << 40, 5), seen_at=1.0
    )
    nodes = (await master.json("GET", "/v1/nodes"))["nodes"]
    assert [n["node_id"] for n in nodes] == ["n1", "n2"]
    assert nodes[0] == {
        "node_id": "n1",
        "state": "dead",
        "incarnation": 3,
        "last_heartbeat_age": None,
        "iscsi_portal": "192.0.2.50:3260",
        "replication": "192.0.2.50:7000",
        "http": "192.0.2.50:8080",
        "capacity_bytes": 1 << 40,
        "free_bytes": None,
        "skipped": [],
        "draining": False,
        "drain_status": None,
        "node_key": None,
        "admission": None,
    }
    assert nodes[1]["state"] == "alive"
    assert nodes[1]["incarnation"] == 1
    assert nodes[1]["last_heartbeat_age"] == 2.5
    assert nodes[1]["free_bytes"] == 1 << 30
    master.clock.now = 10.0 + TIMING.dead_after
    nodes = (await master.json("GET", "/v1/nodes"))["nodes"]
    assert nodes[1]["state"] == "dead"


async def test_metrics_and_healthz(master: Master) -> None:
    master.node_reports("n1", 1)
    await master.json("POST", "/v1/volumes", {"name": "a", "size": "1MiB"}, status=201)
    await master.json("POST", "/v1/volumes", {"name": "b", "size": "1MiB", "replicas": 2}, status=201)
    master.control.step(10.0)
    master.metrics.epochs_published.inc()
    master.metrics.heartbeats_received.inc(3)
    resp = await master.client.get("/metrics", headers={"Authorization": f"Bearer {master.token}"})
    assert resp.status == 200
    text = await resp.text()
    assert 'sparrow_master_nodes{state="alive"} 1.0' in text
    assert 'sparrow_master_nodes{state="dead"} 0.0' in text
    assert "sparrow_master_nodes_pending 0.0" in text
    assert 'sparrow_master_volumes{status="unplaced"} 1.0' in text  # a: the step that placed it
    assert 'sparrow_master_volumes{status="not_enough_nodes"} 1.0' in text
    assert "sparrow_master_epochs_published_total 1.0" in text
    assert "sparrow_master_heartbeats_received_total 3.0" in text
    health = await master.json("GET", "/healthz", status=503)  # neither volume is served
    assert health["status"] == "unhealthy" and (health["nodes"], health["nodes_alive"]) == (1, 1)
    assert health["volumes"] == 2 and health["tasks_failed"] == []
    assert [(v["name"], v["reason"]) for v in health["volumes_not_served"]] == [
        ("a", "primary n1 has not reported the volume yet"),
        ("b", "no primary: not enough live nodes (have 1, need 2)"),
    ]


async def test_unknown_routes_are_json_errors(master: Master) -> None:
    answer = await master.json("GET", "/v1/nope", status=404)
    assert answer == {"error": "no such endpoint: GET /v1/nope"}
    answer = await master.json("PUT", "/v1/volumes", {}, status=405)
    assert "not allowed" in answer["error"]


async def test_create_with_export_settings_keeps_secrets_out_of_answers(master: Master) -> None:
    body = {
        "name": "secure",
        "size": "64MiB",
        "block_size": 512,
        "physical_block_size": 4096,
        "chap_user": "iqn.host",
        "chap_secret": "initiator-secret",
        "chap_mutual_user": "target",
        "chap_mutual_secret": "target-secret-9",
        "backing": "/dev/disk/by-id/x",
    }
    created = await master.json("POST", "/v1/volumes", body, status=201)
    assert (created["physical_block_size"], created["chap"], created["backing"]) == (
        4096, {"user": "iqn.host", "mutual_user": "target"}, "/dev/disk/by-id/x",
    )  # fmt: skip
    for answer in (
        created,
        await master.json("GET", "/v1/volumes/secure"),
        await master.json("GET", "/v1/volumes"),
    ):
        assert "secret" not in json.dumps(answer).replace("chap_secret", "")
    # The settings reach the node in its assignment.
    master.node_reports("n1", 1)
    (published,) = master.control.step(master.clock()).published
    assert published.chap is not None and published.chap.secret == "initiator-secret"
    assert (published.physical_block_size, published.backing) == (4096, "/dev/disk/by-id/x")


async def test_resize_grows_and_publishes_the_next_epoch(master: Master) -> None:
    await master.json("POST", "/v1/volumes", {"name": "vol1", "size": "64MiB"}, status=201)
    master.node_reports("n1", 1)
    (first,) = master.control.step(master.clock()).published

    grown = await master.json("POST", "/v1/volumes/vol1/resize", {"size": "128MiB"})
    assert (grown["size"], grown["epoch"]) == (128 * MiB, first.epoch + 1)
    (current,) = master.control.assignments_for("n1")
    assert (current.size, current.epoch) == (128 * MiB, first.epoch + 1)
    same = await master.json("POST", "/v1/volumes/vol1/resize", {"size": 128 * MiB})
    assert (same["size"], same["epoch"]) == (128 * MiB, first.epoch + 1)

    for body, fragment in (
        ({"size": "32MiB"}, "only grow"),
        ({"size": 128 * MiB + 100}, "not a multiple of the block size"),
        ({}, "missing field 'size'"),
        ({"size": "1GiB", "block_size": 4096}, "unknown field 'block_size'"),
    ):
        answer = await master.json("POST", "/v1/volumes/vol1/resize", body, status=400)
        assert fragment in answer["error"]
    assert (await master.json("POST", "/v1/volumes/nope/resize", {"size": "1GiB"}, status=404))["error"]
    assert master.store.latest_assignment(current.volume_id) == current


# --- ?wait: answer once the volume is served ----------------------------------------------------


async def until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Let the server run until ``condition`` holds (a deadline, never a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def recorded(master: Master, name: str) -> bool:
    return any(v.name == name for v in master.control.desired())


async def test_wait_answers_once_the_primary_reports_the_epoch_converged(master: Master) -> None:
    master.node_reports("n1", 1)
    post = asyncio.create_task(
        master.json("POST", "/v1/volumes?wait=30", {"name": "vol1", "size": 64 * MiB}, status=201)
    )
    await until(lambda: recorded(master, "vol1"), "the volume to be recorded")
    master.control.step(master.clock())
    vid = next(v.volume_id for v in master.control.desired() if v.name == "vol1")
    master.node_reports("n1", 2, VolumeObservation(vid, 1, Role.PRIMARY, Health.OK, 0, (), False))
    await asyncio.sleep(0.05)  # not converged yet: the answer must still be pending
    assert not post.done()
    master.node_reports("n1", 3, VolumeObservation(vid, 1, Role.PRIMARY, Health.DEGRADED, 0, (), True))
    await asyncio.sleep(0.05)  # converged but fenced (no lease): still pending
    assert not post.done()
    master.node_reports("n1", 4, VolumeObservation(vid, 1, Role.PRIMARY, Health.OK, 0, (), True))
    created = await asyncio.wait_for(post, 5)
    assert created["epoch"] == 1 and created["url"] is not None and created["served"] is True
    assert created["replicas"][0]["converged"] is True


async def test_wait_ends_at_once_when_the_controller_cannot_place_the_volume(master: Master) -> None:
    post = asyncio.create_task(
        master.json("POST", "/v1/volumes?wait=30", {"name": "vol1", "size": 64 * MiB}, status=201)
    )
    await until(lambda: recorded(master, "vol1"), "the volume to be recorded")
    master.control.step(master.clock())  # no live node: "not enough live nodes"
    created = await asyncio.wait_for(post, 5)
    assert created["url"] is None and created["status_kind"] == "not_enough_nodes"


async def test_wait_ends_at_its_deadline(master: Master) -> None:
    master.node_reports("n1", 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    post = asyncio.create_task(
        master.json("POST", "/v1/volumes?wait=0.3", {"name": "vol1", "size": 64 * MiB}, status=201)
    )
    await until(lambda: recorded(master, "vol1"), "the volume to be recorded")
    master.control.step(master.clock())  # placed, never reported
    created = await asyncio.wait_for(post, 5)
    assert loop.time() - started >= 0.3
    assert created["epoch"] == 1 and created["replicas"][0]["converged"] is None


@pytest.mark.parametrize("wait", ["soon", "-1", "61"])
async def test_a_bad_wait_is_400(master: Master, wait: str) -> None:
    answer = await master.json("POST", f"/v1/volumes?wait={wait}", {"name": "v", "size": MiB}, status=400)
    assert "wait must be" in answer["error"]


# --- the embedded mode's local node ---------------------------------------------------------------


class FakeLocalNode:
    """A LocalNode that records what the API asked of it."""

    def __init__(self) -> None:
        self.creates: list[tuple[str, int | None, int, str | None]] = []
        self.destroyed: list[tuple[str | None, str]] = []
        self.offline = [{"name": "broken", "path": "/d/volumes/broken.json", "reason": "corrupt"}]

    def health(self) -> Mapping[str, Any]:
        """The shape of sparrow.node.daemon.Node.health (the OpenAPI document's NodeHealth)."""
        return {
            "status": "ok",
            "reasons": [],
            "volumes_not_served": [],
            "tasks_failed": [],
            "node_id": "local",
            "incarnation": 1,
            "master": {"address": "127.0.0.1:1", "connected": True, "last_error": None},
            "lease": {"valid": True, "remaining_seconds": 4.0},
            "fences": 0,
            "last_error": None,
            "volumes": [],
            "offline": self.offline,
        }

    async def check_create(self, name: str, size: int | None, block_size: int, backing: str | None) -> int:
        self.creates.append((name, size, block_size, backing))
        if backing == "/dev/missing":
            raise ApiError(400, "cannot open /dev/missing: no such file")
        return size if size is not None else 8 * MiB

    async def destroy(self, volume_id: str | None, name: str) -> None:
        if volume_id is None and not any(o["name"] == name for o in self.offline):
            raise ApiError(404, f"no volume named {name!r}")
        self.destroyed.append((volume_id, name))


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[Master, FakeLocalNode]]:
    local = FakeLocalNode()
    m = Master(tmp_path, local)
    await m.client.start_server()
    yield m, local
    await m.client.close()
    m.store.close()


async def test_a_local_node_sizes_and_checks_a_backing_device(embedded: tuple[Master, FakeLocalNode]) -> None:
    master, local = embedded
    created = await master.json("POST", "/v1/volumes", {"name": "dev", "backing": "/dev/sdz"}, status=201)
    assert created["size"] == 8 * MiB and created["backing"] == "/dev/sdz"
    assert local.creates == [("dev", None, 512, "/dev/sdz")]
    refused = await master.json("POST", "/v1/volumes", {"name": "x", "backing": "/dev/missing"}, status=400)
    assert "no such file" in refused["error"] and not recorded(master, "x")


async def test_without_a_local_node_a_backing_needs_a_size(master: Master) -> None:
    refused = await master.json("POST", "/v1/volumes", {"name": "dev", "backing": "/dev/sdz"}, status=400)
    assert "size" in refused["error"]


async def test_delete_destroys_the_local_copy(embedded: tuple[Master, FakeLocalNode]) -> None:
    master, local = embedded
    created = await master.json("POST", "/v1/volumes", {"name": "vol1", "size": MiB}, status=201)
    await master.json("DELETE", "/v1/volumes/vol1", status=204)
    await master.json("DELETE", "/v1/volumes/broken", status=204)  # offline, never adopted
    assert local.destroyed == [(created["volume_id"], "vol1"), (None, "broken")]
    missing = await master.json("DELETE", "/v1/volumes/ghost", status=404)
    assert "ghost" in missing["error"]


async def test_healthz_reports_the_local_offline_volumes(embedded: tuple[Master, FakeLocalNode]) -> None:
    master, local = embedded
    master.node_reports("local", 1)
    health = await master.json("GET", "/healthz")
    assert health["status"] == "degraded" and health["offline"] == local.offline
    local.offline = []
    assert (await master.json("GET", "/healthz"))["status"] == "ok"
