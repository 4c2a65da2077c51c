"""Master identity (docs/cluster.md, "Master identity"): nodes pin the master's key. Real processes
on loopback: a master, two nodes, and a rogue `sparrow master` that holds the cluster secret and a
copy of the real authority (every volume, assignment and node key binding) but not the real
master's master.key. Each node's heartbeats go through its own FaultProxy, which the test points
at the rogue."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.masterkey import master_key
from sparrow.masterpin import PIN_NAME
from tests.integration.cluster import Cluster, Master, Timing
from tests.integration.process import daemon_env
from tests.integration.test_cluster_door import sample
from tests.tools import wait_for

REFUSED_EVENT = "master refused: it did not prove the pinned master key"


class RogueMaster(Master):
    """A second real master with the cluster's secret and its own data directory (so its own
    master.key: another master identity)."""

    def __init__(self, root: Path, timing: Timing) -> None:
        super().__init__(root, timing)
        self.name = "rogue"
        self.data_dir = root / "rogue"
        self.log_path = root / "rogue.log"


def master_key_cli(data_dir: Path, root: Path) -> str:
    """`sparrow master key --data-dir DIR --json`."""
    done = subprocess.run(
        [sys.executable, "-m", "sparrow", "master", "key", "--data-dir", str(data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=daemon_env(root),
        check=True,
    )
    return str(json.loads(done.stdout)["master_key"])


def point(cluster: Cluster, node_id: str, port: int) -> None:
    """Send ``node_id``'s heartbeat connections to ``port`` from now on (the open one is reset)."""
    proxy = cluster.proxy(node_id)
    proxy.upstream = ("127.0.0.1", port)
    proxy.reset()


def refused(cluster: Cluster, node_id: str) -> float:
    return sample(cluster.node(node_id).metrics(), "sparrow_node_master_refused_total", reason="key_mismatch")


def test_nodes_pin_the_first_master_and_refuse_a_member_playing_master(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Both nodes pin the real master's key on first use (DATA_DIR/master.pin, 0644, the key
    `sparrow master key` prints). The primary's heartbeats are then sent to a rogue master holding
    the secret and a copy of the authority: the node refuses it before saying Hello (an error line
    naming both keys, a metric), so the rogue records no Hello and no heartbeat and the node
    applies nothing from it; its lease lapses and it fences; the real master fails the volume over
    to the other copy. Pointed back, the node is admitted again. Restarted, it keeps its pin: the
    rogue is refused again, never pinned."""
    cluster = make_cluster(2)
    real = master_key_cli(cluster.master.data_dir, cluster.root)
    assert real == MasterIdentity.derive(master_key(cluster.master.data_dir)).public.hex()
    assert cluster.master.events("master key")[-1]["master_key"] == real
    for node in cluster.nodes.values():
        pinned = wait_for(
            lambda node=node: next(iter(node.events("master key pinned on first use")), None),
            timeout=20,
            what=f"{node.name} pinned the master",
            interval=0.1,
        )
        assert pinned["master_key"] == real and pinned["level"] == "warning"
        pin = node.data_dir / PIN_NAME
        assert pin.read_text() == real + "\n" and pin.stat().st_mode & 0o777 == 0o644

    cluster.cli("volume", "create", "mine", "--size", "16MiB", "--replicas", "2")
    v = cluster.wait_converged("mine", epoch=1, copies=2)
    primary, volume_id = str(v["primary"]["node_id"]), str(v["volume_id"])
    other = next(n for n in cluster.nodes if n != primary)
    cluster.wait_serving(primary, volume_id)

    rogue = RogueMaster(cluster.root, cluster.timing)
    rogue.data_dir.mkdir(parents=True)
    copy = rogue.data_dir / "authority.sqlite3"
    subprocess.run(
        [sys.executable, "-m", "sparrow", "backup", str(cluster.master.data_dir), str(copy)],
        capture_output=True, text=True, timeout=30, env=daemon_env(cluster.root), check=True,
    )  # fmt: skip
    rogue.start()
    try:
        fake = master_key_cli(rogue.data_dir, cluster.root)
        assert fake != real
        node = cluster.node(primary)
        point(cluster, primary, rogue.listen_port)
        line = wait_for(
            lambda: next(iter(node.events(REFUSED_EVENT)), None), timeout=20, what="the refusal", interval=0.1
        )
        assert line["level"] == "error" and line["reason"] == "key_mismatch"
        assert line["pinned_master_key"] == real and line["offered_master_key"] == fake
        assert "sparrow master key" in line["detail"] and "--master-key" in line["detail"]
        assert refused(cluster, primary) >= 1
        # Fenced on its own lease; the real master moves the volume to the in-sync copy.
        wait_for(
            lambda: node.access_state(volume_id) != "active_optimized",
            timeout=10,
            what="the primary fenced",
            interval=0.05,
        )
        v = wait_for(
            lambda: (x := cluster.volume("mine"))["served"] and x["epoch"] >= 2 and x,
            timeout=30,
            what="failed over by the real master",
            interval=0.1,
        )
        assert v["primary"]["node_id"] == other
        # The rogue heard nothing: no Hello, no heartbeat; so it sent no Ack the node could apply.
        assert rogue.events("node hello") == []
        assert sample(rogue.metrics(), "sparrow_master_heartbeats_received_total") == 0
        assert node.persisted(volume_id) is not None and node.persisted(volume_id)["epoch"] == 1  # type: ignore[index]
        assert (node.data_dir / PIN_NAME).read_text() == real + "\n"

        point(cluster, primary, cluster.master.listen_port)
        wait_for(
            lambda: {n["node_id"]: n for n in cluster.node_list()}[primary]["state"] == "alive",
            timeout=20,
            what="the node back with the real master",
            interval=0.1,
        )
        wait_for(
            lambda: (node.persisted(volume_id) or {}).get("epoch", 0) >= 2,
            timeout=20,
            what="the node took on the real master's new epoch",
            interval=0.1,
        )

        # A restart keeps the pin: straight to the rogue, it is refused, not pinned.
        assert node.term() == 0
        before = len(node.events(REFUSED_EVENT))
        point(cluster, primary, rogue.listen_port)
        node.start()
        assert node.events("master key pin")[-1]["source"] == "file"
        wait_for(
            lambda: len(node.events(REFUSED_EVENT)) > before, timeout=20, what="refused again", interval=0.1
        )
        assert (node.data_dir / PIN_NAME).read_text() == real + "\n"
        assert len(node.events("master key pinned on first use")) == 1
        assert rogue.events("node hello") == []
        point(cluster, primary, cluster.master.listen_port)
        wait_for(
            lambda: {n["node_id"]: n for n in cluster.node_list()}[primary]["state"] == "alive",
            timeout=20,
            what="the restarted node back",
            interval=0.1,
        )
    finally:
        rogue.term()


def test_a_master_restored_on_a_new_disk_is_still_the_master_its_nodes_pinned(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """`sparrow backup` carries master.key: the master's disk is lost (a fresh data directory, whose
    first start makes another master.key, which the node refuses), `sparrow restore` of the backup
    brings the authority and the key back, and the node admits the restored master and serves its
    volume again."""
    cluster = make_cluster(1)
    node = cluster.node("n1")
    real = master_key_cli(cluster.master.data_dir, cluster.root)
    cluster.cli("volume", "create", "kept", "--size", "16MiB", "--replicas", "1")
    volume_id = str(cluster.wait_converged("kept", epoch=1, copies=1)["volume_id"])
    backup_file = tmp_path / "authority.bak"
    out = subprocess.run(
        [sys.executable, "-m", "sparrow", "backup", str(cluster.master.data_dir), str(backup_file)],
        capture_output=True, text=True, timeout=30, env=daemon_env(cluster.root), check=True,
    ).stdout  # fmt: skip
    assert "carries master.key" in out

    assert cluster.master.term() == 0
    lost = cluster.master.data_dir.rename(tmp_path / "lost-disk")
    credentials = cluster.root / "xdg" / "sparrow" / "credentials.json"
    token = credentials.read_bytes()  # the fresh master bootstraps a token of its own over it
    cluster.master.start()  # a new disk: a new master.key, another identity
    fresh = master_key_cli(cluster.master.data_dir, cluster.root)
    assert fresh != real
    wait_for(
        lambda: next((e for e in node.events(REFUSED_EVENT) if e["offered_master_key"] == fresh), None),
        timeout=20,
        what="the node refusing the master with another key",
        interval=0.1,
    )
    assert cluster.master.term() == 0
    out = subprocess.run(
        [sys.executable, "-m", "sparrow", "restore", str(backup_file), str(cluster.master.data_dir)],
        capture_output=True, text=True, timeout=30, env=daemon_env(cluster.root), check=True,
    ).stdout  # fmt: skip
    assert "restored master.key" in out
    assert master_key_cli(cluster.master.data_dir, cluster.root) == real
    refusals = len(node.events(REFUSED_EVENT))
    credentials.write_bytes(token)
    cluster.master.start()
    wait_for(
        lambda: (x := cluster.volume("kept"))["served"] and x["primary"]["node_id"] == "n1",
        timeout=cluster.timing.dead_after + 30,
        what="the volume served under the restored master",
        interval=0.1,
    )
    cluster.wait_serving("n1", volume_id)
    assert len(node.events(REFUSED_EVENT)) == refusals  # admitted at once: the same master
    assert lost.is_dir()


def test_the_operators_master_key_is_pinned_and_re_pinning_is_a_restart_with_the_new_key(
    make_cluster: Callable[..., Cluster],
) -> None:
    """`sparrow node --master-key` pins the key given (replacing the first-use pin, logged), so the
    real master, proving another key, is refused; restarting the node with the real master's key
    (the operator's re-pin, docs/operations.md) admits it again."""
    cluster = make_cluster(1)
    node = cluster.node("n1")
    real = master_key_cli(cluster.master.data_dir, cluster.root)
    wait_for(lambda: (node.data_dir / PIN_NAME).exists(), timeout=20, what="the first-use pin", interval=0.1)
    other = MasterIdentity.derive(b"K" * 32).public.hex()

    assert node.term() == 0
    node.extra_args = ("--master-key", other)
    node.start()
    repinned = node.events("master key re-pinned by the operator")
    assert repinned[-1]["master_key"] == other and repinned[-1]["replaced"] == real
    assert node.events("master key pin")[-1]["source"] == "operator"
    line = wait_for(
        lambda: next(iter(node.events(REFUSED_EVENT)), None), timeout=20, what="the refusal", interval=0.1
    )
    assert line["pinned_master_key"] == other and line["offered_master_key"] == real
    assert (node.data_dir / PIN_NAME).read_text() == other + "\n"

    assert node.term() == 0
    node.extra_args = ("--master-key", real)
    node.start()
    refusals = len(node.events(REFUSED_EVENT))
    wait_for(
        lambda: {n["node_id"]: n for n in cluster.node_list()}["n1"]["state"] == "alive"
        and len(node.events("connected to master")) > 0,
        timeout=20,
        what="n1 admitting the real master again",
        interval=0.1,
    )
    assert (node.data_dir / PIN_NAME).read_text() == real + "\n"
    assert len(node.events(REFUSED_EVENT)) == refusals

    # A pin file others may change is never trusted (nor silently replaced by a first use).
    assert node.term() == 0
    pin = node.data_dir / PIN_NAME
    pin.chmod(0o666)
    node.extra_args = ()
    failed = subprocess.run(node.command(), capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
    assert f"master pin file {pin}" in failed.stderr and "--master-key" in failed.stderr
    assert pin.read_text() == real + "\n"
