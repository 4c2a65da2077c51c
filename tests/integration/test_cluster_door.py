"""The heartbeat port as an attacker on the same machine sees it (issue 7, findings 3, 4 and the
heartbeat half of 5): a rogue client speaking the heartbeat codec against a real `sparrow master`
with real nodes, and against a real `sparrow serve`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparrow.cluster.channel import CLIENT_HELLO, SERVER_HELLO_SIZE, VERSION, ChannelError
from sparrow.cluster.messages import Ack, Health, Heartbeat, ReplicaState, Role, SyncState, VolumeObservation
from tests.integration.cluster import Cluster
from tests.integration.daemon import Daemon
from tests.integration.rogue import (
    Closed,
    NodeLink,
    Refused,
    hello,
    other_secret,
    raw_hello,
    secret_file,
    secret_of,
)
from tests.tools import free_port, wait_for

#: The master's handshake and frame timeouts (sparrow.cluster.channel defaults), plus slack.
CLOSE_WITHIN = 5.0 + 3.0


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of ``name{labels}`` in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def node_ids(cluster: Cluster) -> dict[str, dict[str, object]]:
    return {n["node_id"]: n for n in cluster.master.get_json("/v1/nodes")["nodes"]}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 2).start()
    yield c
    c.close()


@pytest.fixture
def served(cluster: Cluster) -> dict[str, object]:
    """A 1-copy volume with CHAP, served by its primary."""
    cluster.cli(
        "volume", "create", "door", "--size", "16MiB", "--replicas", "1",
        "--chap-user", "door-user", "--chap-secret", "door-chap-secret-1234",
    )  # fmt: skip
    volume = cluster.wait_converged("door", epoch=1, copies=1)
    primary = volume["primary"]
    assert isinstance(primary, dict)
    cluster.wait_serving(str(primary["node_id"]), str(volume["volume_id"]))
    return volume


def test_a_process_without_the_secret_is_refused_logged_and_counted(cluster: Cluster) -> None:
    rogue = NodeLink(cluster.master.listen_port, None)
    rogue.send(hello("fake", 1, free=2**62))
    rogue.send(Heartbeat(1, ()))
    assert rogue.closed_within(CLOSE_WITHIN)
    rogue.close()
    assert "fake" not in node_ids(cluster)
    assert (
        sample(cluster.master.metrics(), "sparrow_master_refused_connections_total", reason="bad_magic") >= 1
    )
    line = next(json.loads(x) for x in cluster.master.log().splitlines() if "refused node connection" in x)
    assert (
        line["level"] == "warning" and line["reason"] == "bad_magic" and line["peer"].startswith("127.0.0.1:")
    )
    # A new volume goes to a real node, never to the fake.
    cluster.cli("volume", "create", "after", "--size", "16MiB", "--replicas", "1")
    assert cluster.wait_converged("after", epoch=1, copies=1)["primary"]["node_id"] in ("n1", "n2")


def test_a_process_with_a_wrong_secret_is_refused(cluster: Cluster) -> None:
    # An honest client with the wrong secret sees the master cannot prove the cluster's secret ...
    with pytest.raises(ChannelError) as e:
        NodeLink(cluster.master.listen_port, other_secret())
    assert e.value.code.value == "auth_failed"
    # ... and a rogue that answers the master's challenge with a guess is refused.
    sock = socket.create_connection(("127.0.0.1", cluster.master.listen_port), timeout=5)
    share = bytes([9]) + bytes(31)  # an X25519 key share
    sock.sendall(CLIENT_HELLO.pack(b"SPRW", VERSION, 1, os.urandom(32)) + share)
    answer = b""
    while len(answer) < SERVER_HELLO_SIZE:
        answer += sock.recv(SERVER_HELLO_SIZE - len(answer))
    sock.sendall(os.urandom(32) + raw_hello("fake"))
    sock.settimeout(CLOSE_WITHIN)
    assert sock.recv(100) == b""
    sock.close()
    assert "fake" not in node_ids(cluster)
    assert (
        sample(cluster.master.metrics(), "sparrow_master_refused_connections_total", reason="auth_failed")
        >= 1
    )


def test_a_live_nodes_id_under_a_new_incarnation_is_refused_and_the_node_keeps_serving(
    cluster: Cluster, served: dict[str, object]
) -> None:
    primary = served["primary"]
    assert isinstance(primary, dict)
    node_id, volume_id = str(primary["node_id"]), str(served["volume_id"])
    before = node_ids(cluster)[node_id]
    for attempt in range(5):
        rogue = NodeLink(cluster.master.listen_port, secret_of(cluster.root))
        rogue.send(hello(node_id, 10**18 + attempt, portal="127.0.0.1:1"))
        rogue.send(Heartbeat(1, ()))
        with pytest.raises(Refused) as refused:  # told why, then closed
            rogue.receive()
        assert refused.value.refusal.reason == "live_incarnation"
        assert rogue.closed_within(CLOSE_WITHIN)
        rogue.close()
    assert node_ids(cluster)[node_id]["incarnation"] == before["incarnation"]
    assert node_ids(cluster)[node_id]["iscsi_portal"] == before["iscsi_portal"]
    metrics = cluster.master.metrics()
    assert sample(metrics, "sparrow_master_refused_connections_total", reason="live_incarnation") == 5
    refusals = [json.loads(x) for x in cluster.master.log().splitlines() if '"refused node"' in x]
    assert len(refusals) == 5 and all(r["level"] == "error" for r in refusals)
    # The real node keeps its lease and serves through more than dead_after.
    acks = sample(cluster.node(node_id).metrics(), "sparrow_node_acks_total")
    deadline = time.monotonic() + cluster.timing.dead_after + 0.5
    wait_for(lambda: time.monotonic() > deadline, timeout=10, what="dead_after to pass", interval=0.2)
    assert cluster.node(node_id).access_state(volume_id) == "active_optimized"
    assert sample(cluster.node(node_id).metrics(), "sparrow_node_acks_total") > acks
    v = cluster.volume("door")
    assert v["epoch"] == 1 and v["primary"]["portal"] == cluster.node(node_id).portal


def test_an_out_of_range_hello_is_refused_and_later_nodes_are_still_recorded(cluster: Cluster) -> None:
    for fields in ({"capacity_bytes": 2**63, "free_bytes": 2**63}, {"free_bytes": 2**62 + 1}):
        rogue = NodeLink(cluster.master.listen_port, secret_of(cluster.root))
        rogue.send_plain(raw_hello("huge", **fields))
        assert rogue.closed_within(CLOSE_WITHIN)
        rogue.close()
    assert "huge" not in node_ids(cluster)
    assert (
        sample(cluster.master.metrics(), "sparrow_master_heartbeat_protocol_errors_total", code="bad_field")
        == 2
    )
    # A node that says hello afterwards is recorded (pending: "late" is listed) and, once
    # approved, a 3-copy volume is placed on it.
    late = NodeLink(cluster.master.listen_port, secret_of(cluster.root))
    late.send(hello("late", 1))
    seq = 0

    def placed_on_late() -> Ack | None:
        nonlocal seq
        seq += 1
        ack = late.beat(seq)
        return ack if any(a.name == "three" for a in ack.assignments) else None

    late.beat(0)
    cluster.master.approve("late")  # the operator's step for a new node (docs/operations.md)
    cluster.cli("volume", "create", "three", "--size", "16MiB", "--replicas", "3", "--wait", "0")
    wait_for(placed_on_late, timeout=15, what="the 3-copy volume placed on the late node", interval=0.1)
    late.close()
    assert "Traceback" not in cluster.master.log()


def test_truncated_handshakes_records_and_frames_are_closed_within_the_timeout(cluster: Cluster) -> None:
    port, secret = cluster.master.listen_port, secret_of(cluster.root)
    half_handshake = socket.create_connection(("127.0.0.1", port), timeout=5)
    half_handshake.sendall(b"SPRW" + bytes([VERSION]))
    half_record = NodeLink(port, secret)
    assert half_record.channel is not None
    half_record._raw(half_record.channel.send(raw_hello("cut"))[:-5])
    half_frame = NodeLink(port, secret)
    half_frame.send(hello("cut2", 1))
    half_frame.send_plain(raw_hello("cut3")[:-5])
    started = time.monotonic()
    half_handshake.settimeout(CLOSE_WITHIN)
    assert half_handshake.recv(100) == b""
    assert half_record.closed_within(CLOSE_WITHIN - (time.monotonic() - started))
    assert half_frame.closed_within(CLOSE_WITHIN - (time.monotonic() - started))
    assert time.monotonic() - started < CLOSE_WITHIN
    for sock in (half_handshake, half_record.sock, half_frame.sock):
        sock.close()
    metrics = cluster.master.metrics()
    assert sample(metrics, "sparrow_master_refused_connections_total", reason="handshake_timeout") == 1
    # Whichever comes first here (dead_after is 3.5 s in these tests, the frame timeout 5 s).
    closed = sum(
        sample(metrics, "sparrow_master_heartbeat_protocol_errors_total", code=code)
        for code in ("frame_timeout", "idle_timeout")
    )
    assert closed == 2


def test_ten_thousand_hellos_do_not_make_a_live_node_look_dead(
    cluster: Cluster, served: dict[str, object]
) -> None:
    primary = served["primary"]
    assert isinstance(primary, dict)
    node_id = str(primary["node_id"])
    for i in range(10_000):
        try:
            sock = socket.create_connection(("127.0.0.1", cluster.master.listen_port), timeout=5)
            sock.sendall(raw_hello(node_id, incarnation=i + 2))
            sock.close()
        except OSError:
            pass  # refused or reset under the flood: fine, it is the master's choice
        if i % 1000 == 999:
            assert node_ids(cluster)[node_id]["state"] == "alive", f"after {i + 1} hellos"
    for i in range(20):
        rogue = NodeLink(cluster.master.listen_port, secret_of(cluster.root))
        rogue.send(hello(node_id, 2 * 10**18 + i))
        with pytest.raises(Closed):
            rogue.beat(1)
        rogue.close()
        assert node_ids(cluster)[node_id]["state"] == "alive"
    assert cluster.node(node_id).access_state(str(served["volume_id"])) == "active_optimized"


def test_connections_past_the_handshake_cap_are_closed_at_once(cluster: Cluster) -> None:
    port = cluster.master.listen_port
    # 64 (the cap) + 5 connections that never start a handshake. Which ones the master takes last
    # is the kernel's and the scheduler's business (a node's own reconnect may hold a slot for a
    # moment), so the test counts: at least 5 are closed long before the 5 s handshake timeout.
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(64 + 5)]
    try:
        open_socks = set(socks)
        closed = 0
        deadline = time.monotonic() + 2.0
        while closed < 5 and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_socks), [], [], max(0.0, deadline - time.monotonic()))
            for s in readable:
                open_socks.discard(s)
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b""  # closed, and nothing was sent first
                closed += 1
        assert closed >= 5, f"only {closed} connections past the cap were closed within 2 s"
        metrics = cluster.master.metrics()
        assert sample(metrics, "sparrow_master_refused_connections_total", reason="handshake_cap") >= 5
        assert all(n["state"] == "alive" for n in node_ids(cluster).values())
    finally:
        for sock in socks:
            sock.close()

    # Room again: a member completes its handshake.
    def handshake() -> bool:
        link = NodeLink(port, secret_of(cluster.root))
        link.close()
        return True

    wait_for(handshake, timeout=CLOSE_WITHIN, what="a handshake after the held connections closed")


def test_captured_cluster_bytes_hold_neither_the_chap_secret_nor_the_cluster_secret(
    cluster: Cluster, served: dict[str, object]
) -> None:
    primary = served["primary"]
    assert isinstance(primary, dict)
    proxy = cluster.proxy(str(primary["node_id"]))
    seen = len(proxy.captured)
    wait_for(lambda: len(proxy.captured) > seen + 4096, timeout=10, what="more heartbeats and acks captured")
    captured = bytes(proxy.captured)
    cluster_secret = secret_file(cluster.root).read_bytes().strip()
    for needle in (b"door-chap-secret-1234", b"door-user", cluster_secret, b"iscsi_portal", b"heartbeat"):
        assert needle not in captured, needle


# -- `sparrow serve` --------------------------------------------------------------------------------


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "serve")
    d.start()
    yield d
    if d.running:
        d.stop()


def heartbeat_port(daemon: Daemon) -> int:
    for line in daemon.log().splitlines():
        if '"listening"' in line:
            match = re.fullmatch(r"127\.0\.0\.1:(\d+)", json.loads(line)["heartbeats"])
            assert match, line
            return int(match.group(1))
    raise AssertionError("no listening line")


def test_serve_makes_its_own_secret_once_and_refuses_processes_without_it(serve: Daemon) -> None:
    path = serve.data_dir / "cluster.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    made = path.read_bytes()
    serve.create_volume("vol", "16MiB")
    port = heartbeat_port(serve)
    rogue = NodeLink(port, None)
    rogue.send(hello("fake", 1, free=2**62))
    assert rogue.closed_within(CLOSE_WITHIN)
    rogue.close()
    with pytest.raises(ChannelError):
        NodeLink(port, other_secret())
    # Even with the secret (the same user could read it), the live node's id is refused.
    rogue = NodeLink(port, secret_of(serve.data_dir))
    rogue.send(hello("local", 10**18, portal="127.0.0.1:1"))
    assert rogue.closed_within(CLOSE_WITHIN, read_through=True)  # after its Refusal
    rogue.close()
    status, body = serve.get("/v1/nodes")
    assert status == 200 and [n["node_id"] for n in json.loads(body)["nodes"]] == ["local"]
    _, metrics = serve.get("/metrics")
    for reason in ("bad_magic", "handshake_abandoned", "live_incarnation"):
        assert sample(metrics.decode(), "sparrow_master_refused_connections_total", reason=reason) >= 1, (
            reason
        )
    assert serve.inspect("vol")["served"] is True
    assert serve.stop() == 0
    serve.start()
    assert path.read_bytes() == made
    assert serve.inspect("vol")["served"] is True


def test_a_primary_restarted_at_a_new_portal_serves_again_under_a_new_epoch(
    cluster: Cluster, served: dict[str, object]
) -> None:
    """The same id, a new incarnation and a new portal (here the real node, restarted with another
    --iscsi) must not leave the volume fenced with the node refusing a changed epoch 1."""
    primary = served["primary"]
    assert isinstance(primary, dict)
    node = cluster.node(str(primary["node_id"]))
    volume_id = str(served["volume_id"])
    node.kill9()
    node.iscsi_port = free_port()
    node.start()
    v = wait_for(
        lambda: (v := cluster.volume("door"))["epoch"] == 2 and v["served"] and v,
        timeout=20,
        what="the volume served again under epoch 2",
        interval=0.1,
    )
    assert v["primary"]["portal"] == node.portal
    cluster.wait_serving(node.node_id, volume_id)
    assert "differs from the assignment already accepted" not in node.log()


def test_a_forged_heartbeat_for_a_killed_primary_gets_no_liar_promoted(cluster: Cluster) -> None:
    """A member (it holds the secret) lies: it is a replica, and once the primary is killed it says
    hello under the primary's id (with its own key: it cannot prove the primary's) to report itself
    IN_SYNC. The Hello is refused (``key_mismatch``, docs/cluster.md "Node identity"), so the lie
    is never heard; and the master's own in-sync record decides: the real surviving replica (the
    first of the record's order, the liar placed last) is promoted, never the liar by its word."""
    port, secret = cluster.master.listen_port, secret_of(cluster.root)
    liar = NodeLink(port, secret)
    liar.send(hello("liar", 1, free=1 << 30))
    seq = 0
    volume_id: str | None = None

    def beat() -> Ack:
        nonlocal seq
        seq += 1
        observations: tuple[VolumeObservation, ...] = ()
        if volume_id is not None:
            observations = (VolumeObservation(volume_id, 1, Role.REPLICA, Health.OK, 0, (), True),)
        return liar.beat(seq, observations)

    beat()
    cluster.master.approve("liar")  # an approved member (docs/cluster.md, "Node admission") that lies
    cluster.cli("volume", "create", "lied", "--size", "16MiB", "--replicas", "3", "--wait", "0")
    ack = wait_for(lambda: (a := beat()).assignments and a, timeout=15, what="the liar named", interval=0.1)
    assert isinstance(ack, Ack)
    (assignment,) = ack.assignments
    volume_id, primary = assignment.volume_id, assignment.primary
    assert primary in ("n1", "n2") and "liar" in assignment.replicas
    wait_for(lambda: beat() and cluster.volume("lied")["served"], timeout=15, what="served", interval=0.1)

    cluster.node(str(primary)).kill9()
    forged = NodeLink(port, secret)
    forged.send(hello(str(primary), 10**18, portal=cluster.node(str(primary)).portal))
    lie = VolumeObservation(
        volume_id, 1, Role.PRIMARY, Health.OK, 0, (ReplicaState("liar", SyncState.IN_SYNC, 0),), True
    )
    with pytest.raises(Refused) as refused:
        forged.beat(1, (lie,))
    assert refused.value.refusal.reason == "key_mismatch"
    forged.close()
    t = cluster.timing
    quiet_until = time.monotonic() + t.dead_after + t.lease + t.margin + 2.0
    wait_for(
        lambda: beat() and time.monotonic() > quiet_until,
        timeout=30,
        what="failover time to pass",
        interval=0.2,
    )
    survivor = next(n for n in assignment.replicas if n not in (primary, "liar"))
    assert assignment.replicas.index(survivor) < assignment.replicas.index("liar"), assignment
    v = cluster.volume("lied")
    assert v["epoch"] > 1 and v["primary"]["node_id"] == survivor, v
    assert all(a.primary != "liar" for a in beat().assignments)
    liar.close()


def test_a_member_saying_hello_as_itself_on_a_second_connection_closes_the_first(cluster: Cluster) -> None:
    # One member, many connections as one node id: each would get MAX_HEARTBEATS_PER_SECOND Acks
    # (the whole volume directory each) a second. The master keeps only the newest.
    secret = secret_of(cluster.root)
    links = []
    try:
        for seq in range(3):
            link = NodeLink(cluster.master.listen_port, secret)
            links.append(link)
            link.send(hello("door-member", 1))
            assert isinstance(link.beat(seq + 1), Ack)
        for older in links[:-1]:
            assert older.closed_within(CLOSE_WITHIN, read_through=True), "an older connection was kept"
        assert isinstance(links[-1].beat(10), Ack)  # the newest still served
        metrics = cluster.master.metrics()
        assert sample(metrics, "sparrow_master_heartbeat_protocol_errors_total", code="superseded") >= 2
        assert all(n["state"] == "alive" for i, n in node_ids(cluster).items() if i != "door-member")
    finally:
        for link in links:
            link.close()


def test_an_authenticated_connection_that_never_says_hello_is_closed(cluster: Cluster) -> None:
    # Empty records keep the channel's idle clock fed without a frame: only a Hello deadline ends it.
    link = NodeLink(cluster.master.listen_port, secret_of(cluster.root))
    try:
        deadline = time.monotonic() + 5.0 + CLOSE_WITHIN
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                link.send_plain(b"")
            except OSError:
                closed = True
                break
            closed = link.closed_within(0.5)
        assert closed, "a Hello-less connection was kept open"
        assert (
            sample(
                cluster.master.metrics(),
                "sparrow_master_heartbeat_protocol_errors_total",
                code="hello_timeout",
            )
            == 1
        )
    finally:
        link.close()
