"""Issue 7 on a real cluster (a master and nodes on loopback, tests/integration/cluster.py):
/healthz tells the truth about fenced and unserved volumes (503 with the reasons), a volume no
node could hold is refused at create, and `sparrow node forget` removes only a dead node that
holds no copy (also one that the history of a deleted volume names)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import TIMING, Cluster, http_get
from tests.integration.process import scrape_bearer
from tests.integration.rogue import secret_file
from tests.tools import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "c", getattr(request, "param", 1)).start()
    yield c
    codes = c.close()
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{c.logs()}"


def _health(cluster: Cluster, url: str) -> tuple[int, dict[str, Any]]:
    """/healthz in full (the scrape token opens it on the master and on a node)."""
    status, body = http_get(url + "/healthz", headers=scrape_bearer(secret_file(cluster.root)))
    return status, dict(json.loads(body))


def test_healthz_is_503_while_the_volume_is_fenced_or_its_primary_dead(cluster: Cluster) -> None:
    cluster.cli("volume", "create", "v", "--size", "8MiB")
    volume = cluster.wait_converged("v", epoch=1, copies=1)
    n1 = cluster.node("n1")
    node_url = f"http://127.0.0.1:{n1.http_port}"
    wait_for(lambda: _health(cluster, node_url)[0] == 200, timeout=10, what="n1 healthy")
    wait_for(lambda: _health(cluster, cluster.master.api)[0] == 200, timeout=10, what="master healthy")

    # The master stops: n1's lease runs out and it fences its primary.
    cluster.master.sigstop()
    try:
        _, health = wait_for(
            lambda: (h := _health(cluster, node_url))[0] == 503 and h,
            timeout=TIMING.lease + 5,
            what="n1 unhealthy: fenced",
        )
        assert health["status"] == "unhealthy", health
        assert health["volumes_not_served"] == [
            {"volume_id": volume["volume_id"], "name": "v", "reason": "primary fenced (no valid lease)"}
        ], health
        assert health["reasons"] == ["volume v: primary fenced (no valid lease)"], health
    finally:
        cluster.master.sigcont()
    wait_for(lambda: _health(cluster, node_url)[0] == 200, timeout=10, what="n1 healthy again")
    # ... and the master has heard so (else its last word from n1 may still be "fenced").
    wait_for(lambda: _health(cluster, cluster.master.api)[0] == 200, timeout=10, what="master healthy again")

    # n1 is cut off from the master: the master sees its primary die.
    cluster.proxy("n1").cut()
    try:
        _, health = wait_for(
            lambda: (h := _health(cluster, cluster.master.api))[0] == 503 and h,
            timeout=TIMING.dead_after + 5,
            what="the master unhealthy: primary dead",
        )
        assert health["reasons"] == ["volume v: primary n1 is not alive"], health
    finally:
        cluster.proxy("n1").restore()
    wait_for(
        lambda: _health(cluster, cluster.master.api)[0] == 200, timeout=10, what="the master healthy again"
    )


def test_a_volume_larger_than_any_node_is_refused_at_create(cluster: Cluster) -> None:
    wait_for(lambda: cluster.node_list()[0]["capacity_bytes"], timeout=10, what="n1's capacity")
    capacity = cluster.node_list()[0]["capacity_bytes"]
    refused = cluster.cli("volume", "create", "huge", "--size", "1PiB", check=False)
    assert refused.returncode == 1, refused
    assert "is larger than any node can hold" in refused.stderr, refused.stderr
    assert f"the largest capacity a node has reported is {capacity} bytes" in refused.stderr
    assert json.loads(cluster.cli("volume", "list", "--json").stdout) == []


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_node_forget_removes_only_a_dead_node_that_holds_no_copy(cluster: Cluster) -> None:
    refused = cluster.cli("node", "forget", "n2", check=False)
    assert refused.returncode == 1 and "node 'n2' is alive" in refused.stderr, refused.stderr

    cluster.cli("volume", "create", "v", "--size", "8MiB")
    primary = cluster.wait_converged("v", epoch=1, copies=1)["primary"]["node_id"]
    holder, idle = cluster.node(primary), cluster.node("n2" if primary == "n1" else "n1")
    for node in (holder, idle):
        assert node.term() == 0

    def states() -> dict[str, str]:
        return {n["node_id"]: n["state"] for n in cluster.node_list()}

    wait_for(lambda: set(states().values()) == {"dead"}, timeout=TIMING.dead_after + 5, what="both dead")
    refused = cluster.cli("node", "forget", holder.node_id, check=False)
    assert refused.returncode == 1, refused
    assert f"node {holder.node_id!r} holds a copy of v" in refused.stderr, refused.stderr

    assert cluster.cli("node", "forget", idle.node_id).stdout == f"forgot node {idle.node_id}\n"
    assert states() == {holder.node_id: "dead"}
    missing = cluster.cli("node", "forget", idle.node_id, check=False)
    assert missing.returncode == 1 and f"no node {idle.node_id!r}" in missing.stderr

    # The volume is deleted: its recorded history still names the holder as primary, and the
    # holder is forgotten all the same (its record stays for the history, marked forgotten).
    cluster.cli("volume", "delete", "v")
    assert cluster.cli("node", "forget", holder.node_id).stdout == f"forgot node {holder.node_id}\n"
    assert states() == {}
    again = cluster.cli("node", "forget", holder.node_id, check=False)
    assert again.returncode == 1 and f"no node {holder.node_id!r}" in again.stderr

    cluster.master.term()  # a restarted master does not bring either back
    cluster.master.start()
    assert states() == {}

    holder.start()  # its Hello again makes it a new node
    wait_for(lambda: states() == {holder.node_id: "alive"}, timeout=10, what=f"{holder.node_id} back")
