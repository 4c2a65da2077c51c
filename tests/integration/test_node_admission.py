"""Node admission (docs/cluster.md, "Node admission"): a node id no one approved is held pending
by a real master, against members that hold the cluster secret and say Hello as a new node."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from sparrow.cluster.messages import Ack
from sparrow.cluster.nodeidentity import NodeKey
from tests.integration.cluster import Cluster, metric
from tests.integration.rogue import NodeLink, Refused, hello, rogue_key, secret_of
from tests.integration.test_audit import call
from tests.tools import wait_for


def listed(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in cluster.node_list()}


class Member:
    """A process with the cluster secret that says Hello as ``node_id`` with ``key`` and
    heartbeats on each :meth:`beat` (faster than dead_after, so the master deems it alive)."""

    def __init__(self, cluster: Cluster, node_id: str, key: NodeKey | None = None) -> None:
        self.link = NodeLink(cluster.master.listen_port, secret_of(cluster.root), key=key)
        self.link.send(hello(node_id, 1, free=1 << 40))
        self.seq = 0

    def beat(self) -> Ack:
        self.seq += 1
        return self.link.beat(self.seq)


def test_a_new_node_id_is_pending_gets_no_copy_and_becomes_a_target_once_approved(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Two approved nodes; a member with the secret says Hello as n9 (the most free space): it is
    pending (listed so, with its key; logged once; counted), its Acks carry nothing, and a volume
    wanting three copies is not placed on it. An operator token may not approve it (403);
    `sparrow node approve n9` does (audited), and the volume gets its third copy there. A master
    restart keeps the approval, and keeps another node pending."""
    cluster = make_cluster(2)
    rogue = Member(cluster, "n9")
    first = rogue.beat()
    assert (first.assignments, first.directory, first.stream_keys, first.discovery_chap) == ((), (), (), None)
    n9 = wait_for(lambda: listed(cluster).get("n9"), timeout=10, what="n9 listed")
    assert (n9["admission"], n9["node_key"]) == ("pending", rogue_key("n9").public.hex())
    assert n9["state"] == "alive" and {listed(cluster)[n]["admission"] for n in ("n1", "n2")} == {"approved"}
    assert metric(cluster.master.metrics(), "sparrow_master_nodes_pending") == 1

    cluster.cli("volume", "create", "three", "--size", "16MiB", "--replicas", "3", "--wait", "0")

    def stepped() -> dict[str, Any] | None:
        assert rogue.beat().assignments == ()  # alive all along, never given a copy
        v = cluster.volume("three")
        return v if v["status_kind"] is not None else None

    v = wait_for(stepped, timeout=10, what="a control step on three", interval=0.1)
    assert v["epoch"] == 0 and v["status_kind"] == "not_enough_nodes", v
    awaiting = "awaiting approval: n9 (sparrow node approve)"
    assert v["status"] == f"not enough live nodes (have 2, need 3); {awaiting}", v
    (line,) = [e for e in cluster.master.events("node awaiting approval") if e["node"] == "n9"]
    assert (line["level"], line["node"], line["node_key"]) == ("warning", "n9", rogue_key("n9").public.hex())

    operator = json.loads(
        cluster.cli("token", "create", "--role", "operator", "--name", "op", "--json").stdout
    )
    status, answer = call(cluster.master.api, "POST", "/v1/nodes/n9/approve", operator["token"], {})
    assert status == 403, answer
    assert listed(cluster)["n9"]["admission"] == "pending"

    answer = json.loads(cluster.cli("node", "approve", "n9", "--json").stdout)
    assert answer == {"node_id": "n9", "node_key": rogue_key("n9").public.hex(), "admission": "approved"}
    placed = wait_for(
        lambda: next((a for a in rogue.beat().assignments if a.name == "three"), None),
        timeout=10,
        what="a copy of three on n9",
    )
    assert "n9" in placed.replicas and len(placed.replicas) == 3
    audit = [json.loads(x) for x in (cluster.master.data_dir / "audit.jsonl").read_text().splitlines()]
    approvals = [a for a in audit if a.get("verb") == "node.approve" and a["args"].get("node_id") == "n9"]
    results = {a["id"]: a["status"] for a in audit if a["type"] == "result"}
    statuses = [a.get("status", results.get(a["id"])) for a in approvals]  # refused: in the call's line
    assert statuses == [403, 200] and approvals[0]["who"] == operator["id"], approvals
    assert metric(cluster.master.metrics(), "sparrow_master_nodes_pending") == 0

    other = Member(cluster, "n10")
    other.beat()
    wait_for(lambda: listed(cluster).get("n10"), timeout=10, what="n10 listed")
    rogue.link.close()
    other.link.close()
    assert cluster.master.term() == 0
    cluster.master.start()
    nodes = listed(cluster)
    assert (nodes["n9"]["admission"], nodes["n10"]["admission"]) == ("approved", "pending")
    again = Member(cluster, "n10")
    assert again.beat().assignments == ()  # still pending after the restart
    again.link.close()


def test_a_node_approved_ahead_must_prove_that_key(make_cluster: Callable[..., Cluster]) -> None:
    """`sparrow node approve n8 --key K` before n8 ever connects: a Hello proving another key is
    refused (key_mismatch) before any Ack; one proving K joins approved. Approving a node that
    never said Hello without naming its key is refused with one line naming --key."""
    cluster = make_cluster(1)
    right = NodeKey(b"k" * 32)
    refused = cluster.cli("node", "approve", "n8", check=False)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1 and "--key" in refused.stderr
    cluster.cli("node", "approve", "n8", "--key", right.public.hex())

    wrong = Member(cluster, "n8")  # rogue_key("n8"), not the approved key
    with pytest.raises(Refused) as e:
        wrong.beat()
    assert e.value.refusal.reason == "key_mismatch"
    wrong.link.close()

    good = Member(cluster, "n8", key=right)
    good.beat()
    n8 = wait_for(lambda: listed(cluster).get("n8"), timeout=10, what="n8 listed")
    assert (n8["admission"], n8["node_key"]) == ("approved", right.public.hex())
    good.link.close()
