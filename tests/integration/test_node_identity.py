"""Node identity (docs/cluster.md, "Node identity"; issue 8: "a valid member lying"): real
`sparrow master` and `sparrow node` processes on loopback, and an attacker that holds the cluster
secret and drives the heartbeat channel with the repo's own client code (tests/integration/rogue.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from sparrow.cluster.messages import Health, Role, VolumeObservation
from sparrow.nodekey import NODE_KEY_NAME
from tests.integration.cluster import Cluster
from tests.integration.rogue import NodeLink, Refused, hello, node_key_of, secret_of
from tests.integration.test_cluster_door import sample
from tests.tools import wait_for


def refusals(cluster: Cluster, reason: str) -> float:
    return sample(cluster.master.metrics(), "sparrow_master_refused_connections_total", reason=reason)


def test_a_member_saying_hello_as_a_dead_node_with_its_own_key_is_refused_and_the_node_keeps_its_volume(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The primary of a one-copy volume is killed; a member (it has the secret) says Hello as that
    node, from another portal, with its own key, and reports the volume as its own: refused
    (``key_mismatch``) before any Ack, so it gets no assignment, no lease, no stream key and its
    portal is never published. The real node, restarted on the same data directory (same key),
    is admitted and serves the volume again at the same epoch."""
    cluster = make_cluster(2)
    cluster.cli("volume", "create", "mine", "--size", "16MiB", "--replicas", "1")
    v = cluster.wait_converged("mine", epoch=1, copies=1)
    owner, volume_id = str(v["primary"]["node_id"]), str(v["volume_id"])
    node = cluster.node(owner)
    cluster.wait_serving(owner, volume_id)
    bound = [e for e in cluster.master.events("node key bound on first use") if e["node"] == owner]
    assert len(bound) == 1 and bound[0]["node_key"] == node_key_of(node.data_dir).public.hex()
    listed = {n["node_id"]: n for n in cluster.node_list()}
    assert listed[owner]["node_key"] == bound[0]["node_key"]

    node.kill9()
    claim = VolumeObservation(volume_id, 1, Role.PRIMARY, Health.OK, 0, (), True)
    for attempt in range(3):
        rogue = NodeLink(cluster.master.listen_port, secret_of(cluster.root))  # its own key
        rogue.send(hello(owner, 10**18 + attempt, portal="127.0.0.1:1"))
        with pytest.raises(Refused) as refused:
            rogue.beat(1, (claim,))
        rogue.close()
        assert refused.value.refusal.reason == "key_mismatch"
        assert f"sparrow node rekey {owner}" in refused.value.refusal.detail
    assert refusals(cluster, "key_mismatch") == 3
    line = cluster.master.events("refused node")[-1]
    assert line["level"] == "error" and line["reason"] == "key_mismatch" and owner in line["detail"]
    v = cluster.volume("mine")
    assert v["epoch"] == 1 and v["primary"]["portal"] == node.portal
    assert {n["node_id"]: n for n in cluster.node_list()}[owner]["iscsi_portal"] == node.portal

    node.start()
    cluster.wait_serving(owner, volume_id)
    v = wait_for(
        lambda: (x := cluster.volume("mine"))["served"] and x, timeout=10, what="served again", interval=0.1
    )
    assert v["epoch"] == 1 and v["primary"] == {"node_id": owner, "portal": node.portal}
    assert node.events("master refused this node") == []


def test_a_replaced_disk_is_refused_until_the_operator_rekeys_the_node(
    make_cluster: Callable[..., Cluster],
) -> None:
    """n2's node.key is lost (as with a new disk): it makes a new key, and the master refuses it
    (the reason in both logs, the node's line naming its new key); `sparrow node rekey n2 --key`
    (audited) pins the new key and the node is back without a restart. A node whose key file is
    corrupt does not start: one line, exit 1, the file left as it was."""
    cluster = make_cluster(2)
    node = cluster.node("n2")
    old = node_key_of(node.data_dir).public.hex()
    wait_for(
        lambda: {n["node_id"]: n for n in cluster.node_list()}["n2"]["node_key"] == old,
        timeout=20,
        what="n2 bound to its key",
        interval=0.1,
    )
    assert node.term() == 0
    (node.data_dir / NODE_KEY_NAME).unlink()
    node.start()  # READY does not wait for the master
    refusal = wait_for(
        lambda: next(iter(node.events("master refused this node")), None),
        timeout=20,
        what="the node's refusal line",
        interval=0.1,
    )
    new = node_key_of(node.data_dir).public.hex()
    assert new != old and refusal["level"] == "error" and refusal["reason"] == "key_mismatch"
    assert refusal["node_key"] == new and old in refusal["detail"]
    assert "key_mismatch" in str(node.health()["master"]["last_error"])
    assert refusals(cluster, "key_mismatch") >= 1

    wait_for(
        lambda: {n["node_id"]: n for n in cluster.node_list()}["n2"]["state"] == "dead",
        timeout=20,
        what="n2 dead on the master",
        interval=0.2,
    )
    answer = json.loads(cluster.cli("node", "rekey", "n2", "--key", new, "--json").stdout)
    assert answer == {"node_id": "n2", "node_key": new}
    wait_for(
        lambda: {n["node_id"]: n for n in cluster.node_list()}["n2"]["state"] == "alive",
        timeout=20,
        what="n2 admitted with its new key",
        interval=0.2,
    )
    assert {n["node_id"]: n for n in cluster.node_list()}["n2"]["node_key"] == new
    audit = [json.loads(x) for x in (cluster.master.data_dir / "audit.jsonl").read_text().splitlines()]
    assert any(a.get("verb") == "node.rekey" and a.get("args", {}).get("key") == new for a in audit), audit
    # A live node keeps its identity: rekey is refused with the reason, nothing changes.
    busy = cluster.cli("node", "rekey", "n2", check=False)
    assert busy.returncode == 1 and "alive" in busy.stderr and busy.stderr.count("\n") == 1

    assert node.term() == 0
    key_file = node.data_dir / NODE_KEY_NAME
    key_file.write_text("not a key\n")
    started = time.monotonic()
    failed = subprocess.run(node.command(), capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and time.monotonic() - started < 30
    assert failed.stderr.count("\n") == 1 and f"node key file {key_file}" in failed.stderr
    assert "sparrow node rekey" in failed.stderr
    assert key_file.read_text() == "not a key\n"
