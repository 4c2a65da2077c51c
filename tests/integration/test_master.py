"""A real `sparrow master` process, a fake node speaking the real heartbeat codec over real TCP, and
the real CLI: placement, the Ack's assignment, and no epoch minted by a restart (kill -9)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparrow.cluster.channel import ClusterSecret
from sparrow.cluster.messages import Ack, Assignment, Health, Heartbeat, Hello, VolumeObservation
from tests.integration.process import Proc, bearer, daemon_env
from tests.integration.rogue import NodeLink, secret_file, secret_of
from tests.tools import free_port, run, wait_for

pytestmark = pytest.mark.integration

BASE_IQN = "iqn.2026-11.io.sparrow"


class MasterProcess(Proc):
    """A real `sparrow master` on loopback with its own data directory and free ports."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir.name, data_dir.parent)
        self.listen_port = free_port()
        self.http_port = free_port()

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sparrow", "master",
            "--data-dir", str(self.data_dir),
            "--listen", f"127.0.0.1:{self.listen_port}",
            "--http", f"127.0.0.1:{self.http_port}",
            "--heartbeat-interval", "0.2",
            "--log-format", "json",
            "--cluster-secret-file", str(secret_file(self.root)),
        ]  # fmt: skip

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> int:
        return self.term(20)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            [sys.executable, "-m", "sparrow", *args, "--api", self.api],
            check=check,
            timeout=30,
            env=daemon_env(self.root),
        )

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.api + path, headers=bearer(self.root, self.api))
        with urllib.request.urlopen(request, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if path != "/metrics" else body.decode()


class FakeNode:
    """A node that speaks the real codec: Hello, then a Heartbeat per call, reading each Ack."""

    def __init__(self, node_id: str, port: int, incarnation: int, secret: ClusterSecret) -> None:
        self.hello = Hello(
            node_id, incarnation, "127.0.0.1:3261", "127.0.0.1:7001", "127.0.0.1:8081", 1 << 40, 1 << 32
        )
        self.port = port
        self.secret = secret
        self.seq = 0
        self.have: dict[str, Assignment] = {}  # what the node "applied"
        self.link: NodeLink | None = None

    def connect(self) -> None:
        self.close()
        self.link = NodeLink(self.port, self.secret)
        self.link.send(self.hello)

    def beat(self) -> Ack:
        assert self.link is not None
        self.seq += 1
        observations = tuple(
            VolumeObservation(a.volume_id, a.epoch, a.role_of(self.hello.node_id), Health.OK, 0, (), True)
            for a in self.have.values()
        )
        return self.link.beat(self.seq, observations)

    def apply(self, ack: Ack) -> None:
        self.have = {a.volume_id: a for a in ack.assignments}

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


@pytest.fixture
def master(tmp_path: Path) -> Iterator[MasterProcess]:
    m = MasterProcess(tmp_path / "master")
    m.start()
    yield m
    if m.proc is not None and m.proc.poll() is None:
        code = m.stop()
        assert code == 0, f"master exited {code} on SIGTERM:\n{m.log()}"


def assignment_for(ack: Ack, name: str) -> Assignment | None:
    return next((a for a in ack.assignments if a.name == name), None)


def test_placement_survives_a_kill_9_without_a_new_epoch(master: MasterProcess) -> None:
    node = FakeNode("n1", master.listen_port, incarnation=time.time_ns(), secret=secret_of(master.root))
    node.connect()
    first = node.beat()
    assert first.lease_seconds == 5.0
    assert first.assignments == ()
    master.cli("node", "approve", "n1")  # a new node is pending until approved (docs/operations.md)

    created = json.loads(
        master.cli(
            "volume", "create", "vol1", "--size", "64MiB", "--replicas", "1", "--wait", "0", "--json"
        ).stdout
    )
    assert created["name"] == "vol1" and created["replicas_wanted"] == 1 and created["epoch"] == 0

    def placed() -> Assignment | None:
        ack = node.beat()
        node.apply(ack)
        return assignment_for(ack, "vol1")

    assignment = wait_for(placed, timeout=10, what="an Ack assigning vol1", interval=0.1)
    assert assignment.epoch == 1
    assert assignment.primary == "n1"
    assert assignment.primary_portal == "127.0.0.1:3261"
    assert assignment.replicas == ("n1",)
    assert assignment.volume_id == created["volume_id"]
    assert assignment.size == 64 << 20 and assignment.block_size == 512

    inspected = json.loads(master.cli("volume", "inspect", "vol1", "--json").stdout)
    assert inspected["epoch"] == 1
    assert inspected["primary"] == {"node_id": "n1", "portal": "127.0.0.1:3261"}
    assert inspected["url"] == f"iscsi://127.0.0.1:3261/{BASE_IQN}:vol1/0"
    assert inspected["replicas"][0]["node_id"] == "n1" and inspected["replicas"][0]["role"] == "primary"

    nodes = json.loads(master.cli("node", "list", "--json").stdout)
    assert [(n["node_id"], n["state"], n["incarnation"]) for n in nodes] == [
        ("n1", "alive", node.hello.incarnation)
    ]
    table = master.cli("node", "list").stdout.splitlines()
    header = ["NODE", "STATE", "INCARNATION", "LAST-HEARTBEAT", "PORTAL", "DRAINING", "ADMISSION"]
    assert table[0].split() == header
    assert table[1].split()[:3] == ["n1", "alive", str(node.hello.incarnation)]
    assert table[1].split()[-1] == "approved"

    # kill -9 the master, start it again on the same data directory and ports.
    master.kill9()
    master.start()
    node.connect()  # the node reconnects: same process, same incarnation
    ack = node.beat()
    again = assignment_for(ack, "vol1")
    assert again == assignment  # the same epoch 1, straight from the authority
    node.apply(ack)

    # Several control steps (0.2 s each) with the node reporting what it has: nothing is minted.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        ack = node.beat()
        assert [(a.name, a.epoch) for a in ack.assignments] == [("vol1", 1)]
        time.sleep(0.1)
    volume = master.get("/v1/volumes/vol1")
    assert volume["epoch"] == 1
    assert volume["status"] is None
    assert volume["replicas"][0]["observed_epoch"] == 1 and volume["replicas"][0]["converged"] is True
    metrics = master.get("/metrics")
    assert "sparrow_master_epochs_published_total 0.0" in metrics
    assert 'sparrow_master_nodes{state="alive"} 1.0' in metrics
    node.close()


def test_a_second_master_on_the_same_data_dir_is_refused(master: MasterProcess, tmp_path: Path) -> None:
    other = run(
        [sys.executable, "-m", "sparrow", "master", "--data-dir", str(master.data_dir),
         "--listen", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
         "--cluster-secret-file", str(secret_file(master.root))],
        check=False, timeout=30,
    )  # fmt: skip
    assert other.returncode == 1
    assert "in use by another sparrow process" in other.stderr
    assert "Traceback" not in other.stderr


def test_a_protocol_error_closes_only_that_connection(master: MasterProcess) -> None:
    bad = NodeLink(master.listen_port, secret_of(master.root))
    bad.send(Heartbeat(seq=1, observations=()))  # no Hello first
    assert bad.closed_within(5)  # closed without an Ack
    bad.close()
    node = FakeNode("n2", master.listen_port, incarnation=1, secret=secret_of(master.root))
    node.connect()
    assert node.beat().seq == 1
    node.close()
    wait_for(lambda: "Heartbeat before Hello" in master.log(), timeout=5, what="the logged reason")


def test_sigterm_exits_0(tmp_path: Path) -> None:
    m = MasterProcess(tmp_path / "m")
    m.start()
    assert m.get("/healthz")["status"] == "ok"
    assert m.stop() == 0
    assert '"stopped"' in m.log()


def test_an_unmigrated_v1_authority_is_refused_with_the_migrate_command(tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "v1" / "authority.sqlite3"
    shutil.copyfile(fixture, data_dir / "authority.sqlite3")
    before = (data_dir / "authority.sqlite3").read_bytes()
    refused = run(
        [sys.executable, "-m", "sparrow", "master", "--data-dir", str(data_dir),
         "--listen", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
         "--cluster-secret-file", str(secret_file(tmp_path))],
        check=False, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 1
    assert f"`sparrow migrate {data_dir}`" in refused.stderr
    assert "schema version 1; this Sparrow needs version 9" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (data_dir / "authority.sqlite3").read_bytes() == before
