"""Master identity (docs/cluster.md, "Master identity"): nodes pin the master's key. Real processes
on loopback: a master, two nodes, and a rogue `sparrow master` that holds the cluster secret and a
copy of the real authority (every volume, assignment and node key binding) but not the real
master's master.key. Each node's heartbeats go through its own FaultProxy, which the test points
at the rogue."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sparrow.cluster.channel import Channel, ChannelError, ClusterSecret, Plaintext, Purpose
from sparrow.cluster.heartbeat import FrameDecoder
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.masterkey import master_key
from sparrow.masterpin import PIN_NAME
from tests.integration.cluster import Cluster, Master, Timing
from tests.integration.process import daemon_env
from tests.integration.rogue import ChannelLink, Closed, accept_channel, secret_of
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


class Relay:
    """A member in the middle: it holds the cluster secret, so it completes one channel handshake
    with the node (as the master) and another with the real master (as a node), and relays the
    plaintext of every record between them, sealed again for the other side. The master's proof
    it passes on was made for the relay's own connection to the master."""

    def __init__(self, secret: ClusterSecret, master_port: int) -> None:
        self.secret, self.master_port = secret, master_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        #: Plaintext bytes relayed from the nodes (after their handshakes) and from the master.
        self.from_node = 0
        self.from_master = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                node, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(node,), daemon=True).start()

    def _relay(self, node: socket.socket) -> None:
        upstream = None
        try:
            to_node, early = accept_channel(node, self.secret, identity=None)
            upstream = socket.create_connection(("127.0.0.1", self.master_port), timeout=10)
            master = ChannelLink(upstream, self.secret, Purpose.HEARTBEAT, FrameDecoder())
            assert master.channel is not None and not early
            upstream.settimeout(None)
            node.settimeout(None)
            up = threading.Thread(target=self._pump, args=(node, to_node, upstream, master.channel, True))
            up.start()
            self._pump(upstream, master.channel, node, to_node, False)
            up.join(5)
        except (OSError, Closed, ChannelError, AssertionError):
            pass
        finally:
            node.close()
            if upstream is not None:
                upstream.close()

    def _pump(
        self, src: socket.socket, opened: Channel, dst: socket.socket, sealed: Channel, up: bool
    ) -> None:
        try:
            while data := src.recv(65536):
                for event in opened.feed(data, time.monotonic()):
                    if isinstance(event, Plaintext):
                        if up:
                            self.from_node += len(event.data)
                        else:
                            self.from_master += len(event.data)
                        dst.sendall(sealed.send(event.data))
        except (OSError, ChannelError):
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_a_member_in_the_middle_relaying_the_masters_proof_is_refused(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The node's heartbeats go through a member in the middle that runs its own handshakes and
    relays: the real master's proof arrives, for the relay's binding, not the node's: refused
    (`bad_proof`) before the node says anything, so nothing of the node reaches the master through
    it and the relay reads no Ack. Sent straight again, the node is admitted."""
    cluster = make_cluster(1)
    node = cluster.node("n1")
    real = master_key_cli(cluster.master.data_dir, cluster.root)
    wait_for(lambda: (node.data_dir / PIN_NAME).exists(), timeout=20, what="the first-use pin", interval=0.1)
    hellos = len(cluster.master.events("node hello"))
    relay = Relay(secret_of(cluster.root), cluster.master.listen_port)
    try:
        point(cluster, "n1", relay.port)
        line = wait_for(
            lambda: next((e for e in node.events(REFUSED_EVENT) if e["reason"] == "bad_proof"), None),
            timeout=20,
            what="the relayed proof refused",
            interval=0.1,
        )
        assert line["pinned_master_key"] == real and line["offered_master_key"] == real
        assert sample(node.metrics(), "sparrow_node_master_refused_total", reason="bad_proof") >= 1
        assert relay.from_master > 0  # the master's MasterHello went through ...
        assert relay.from_node == 0  # ... the node said nothing after it: no Hello, no heartbeat
        assert len(cluster.master.events("node hello")) == hellos
    finally:
        point(cluster, "n1", cluster.master.listen_port)
        relay.close()
    wait_for(
        lambda: {n["node_id"]: n for n in cluster.node_list()}["n1"]["state"] == "alive",
        timeout=20,
        what="n1 back with the real master",
        interval=0.1,
    )
