"""A real cluster end to end: one `sparrow master`, real `sparrow node` processes, real initiators.

Everything is a real process on loopback (tests/integration/cluster.py) with short timings:
heartbeat 0.25 s, lease 2 s, dead after 3.5 s, margin 0.5 s, fence margin 0.5 s. Each node's
heartbeat connection runs through a fault-injecting proxy (tests/integration/proxy.py) that can
partition it from the master and records when it forwarded each node-to-master chunk.

1. Smoke: placement through the CLI, I/O through the primary, a kill -9 of the master (the same
   epoch and primary come back, no epoch minted) and of a replica (it re-anchors with a new
   incarnation while the primary keeps serving).
2. A partition of the primary (proxy cut): the primary refuses I/O with NOT READY, ASYMMETRIC ACCESS
   STATE TRANSITION (04/0A, SPC-4 5.15.2.4.6) before the lease (counted from the last heartbeat
   that reached the master) expires; no other node is ever given the volume, no epoch is minted (the replicas
   hold no data: "no eligible replica"); healing the partition brings service back.
3. SIGSTOP of the master: the primary fences at its fence deadline (lease minus fence margin after
   its last acknowledged heartbeat's send, the node's own log), before the lease expires, and within
   the lease of the stop; SIGCONT brings service back, data intact.
4. Login redirect: a write through the replica's portal lands on the primary (RFC 7143 11.13.5);
   SendTargets at the replica lists the primary's portal.

The fence is timed with a raw iSCSI session (READ(10) in a tight loop, tests/integration/test_node.py);
CLOCK_MONOTONIC is shared by the processes on one host, so the nodes' loop clocks (in their logs),
the proxy's forward times and the test's ``time.monotonic()`` are comparable.
Run: ``.venv/bin/pytest tests/integration/test_cluster.py -v -s`` (-s prints the measured figures).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.cluster import BASE_IQN, TIMING, Cluster, Node, metric
from tests.integration.test_node import GOOD, UNIT_ATTENTION, Answer, RawSession, qemu_io
from tests.tools import require_tool, run, wait_for

pytestmark = pytest.mark.integration

#: The fence budget: the first refusal must come before the lease expires, counted from the last
#: heartbeat (docs/architecture.md, "The fencing bound"); the node aims at lease - fence margin.
FENCE_BUDGET = TIMING.lease
SERVING = frozenset({"active_optimized", "active_non_optimized"})


def create(cluster: Cluster, name: str, replicas: int) -> None:
    cluster.cli("volume", "create", name, "--size", "64MiB", "--replicas", str(replicas))


def iqn(volume: str) -> str:
    return f"{BASE_IQN}:{volume}"


def refused_in_loop(probe: RawSession, *, give_up_at: float) -> tuple[Answer, float]:
    """READ(10) back to back until one is refused: (the answer, monotonic time it arrived)."""
    while True:
        answer = probe.read10()
        at = time.monotonic()
        if answer.status != GOOD:
            return answer, at
        assert at < give_up_at, "the primary never fenced"


def assert_fence_answer(probe: RawSession, first: Answer) -> None:
    """The first refusal may be the UNIT ATTENTION of the state change (06/2A/06); then 04/0A."""
    if first.sense_key == UNIT_ATTENTION:
        assert (first.asc, first.ascq) == (0x2A, 0x06), first
    else:
        assert first.not_ready_transition, first
    fenced = probe.read_past_unit_attentions()
    assert fenced.not_ready_transition, fenced


class Prober(threading.Thread):
    """READ(10) at the primary every ``interval`` s from its own session; records every answer that
    is not GOOD, so a test can assert that the primary kept serving throughout."""

    def __init__(self, portal: str, volume: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True, name="prober")
        self.session = RawSession(portal, iqn(volume))
        first = self.session.read_past_unit_attentions()
        assert first == Answer(GOOD), first
        self.interval = interval
        self.good = 0
        self.bad: list[tuple[float, Answer | str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                answer = self.session.read10()
            except (OSError, AssertionError) as e:
                self.bad.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                return
            if answer == Answer(GOOD):
                self.good += 1
            else:
                self.bad.append((time.monotonic(), answer))

    def finish(self) -> None:
        self._halt.set()
        self.join(10)
        self.session.close()


@dataclass(frozen=True)
class Sample:
    at: float
    epoch: int
    primary: str | None
    status: str | None
    serving: tuple[str, ...]  # the other nodes whose LU for the volume serves I/O


class Watcher(threading.Thread):
    """Polls the master's view of a volume and the other nodes' access states for it."""

    def __init__(self, cluster: Cluster, volume: str, volume_id: str, others: list[Node]) -> None:
        super().__init__(daemon=True, name="watcher")
        self.cluster = cluster
        self.volume = volume
        self.volume_id = volume_id
        self.others = others
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            try:
                v = self.cluster.volume(self.volume)
                serving = tuple(n.node_id for n in self.others if n.access_state(self.volume_id) in SERVING)
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                continue
            primary = None if v["primary"] is None else v["primary"]["node_id"]
            self.samples.append(Sample(time.monotonic(), v["epoch"], primary, v["status"], serving))

    def finish(self) -> list[Sample]:
        self._halt.set()
        self.join(10)
        return self.samples


# -- 1. smoke -----------------------------------------------------------------------------------------


def test_smoke_place_serve_and_survive_kill_9_of_master_and_replica(
    make_cluster: Callable[[int], Cluster],
) -> None:
    require_tool("qemu-io")
    cluster = make_cluster(3)
    create(cluster, "v", 3)
    epochs: list[int] = []

    def converged_via_cli() -> dict[str, Any] | None:
        v = cluster.inspect("v")
        epochs.append(int(v["epoch"]))
        replicas = v["replicas"]
        ok = (
            v["epoch"] == 1
            and v["primary"] is not None
            and len({r["node_id"] for r in replicas}) == len(replicas) == 3
            and all(r["state"] == "alive" and r["observed_epoch"] == 1 and r["converged"] for r in replicas)
        )
        return v if ok else None

    v = wait_for(converged_via_cli, timeout=20, what="v placed on 3 nodes, converged (CLI)", interval=0.1)
    primary_id = v["primary"]["node_id"]
    primary = cluster.node(primary_id)
    assert v["primary"]["portal"] == primary.portal
    assert v["url"] == primary.url("v")
    assert [r["role"] for r in v["replicas"]] == ["primary", "replica", "replica"]
    volume_id = str(v["volume_id"])
    nodes = cluster.node_list()
    assert [(n["node_id"], n["state"]) for n in nodes] == [("n1", "alive"), ("n2", "alive"), ("n3", "alive")]
    incarnations = {n["node_id"]: n["incarnation"] for n in nodes}
    assert cluster.master.epochs_published() == 1

    cluster.wait_serving(primary_id, volume_id)
    qemu_io(primary.url("v"), "write -P 0x5a 0 64k", "write -P 0xa5 3M 4k")
    qemu_io(primary.url("v"), "read -P 0x5a 0 64k", "read -P 0xa5 3M 4k", "read -P 0 64k 960k")

    # -- kill -9 the master and start it again: the same epoch and primary, nothing minted.
    cluster.master.kill9()
    cluster.master.restart()
    again = cluster.inspect("v")
    epochs.append(again["epoch"])
    assert (again["epoch"], again["primary"]) == (1, v["primary"]), again
    before = cluster.master.epochs_published()
    assert before == 0
    # Let the nodes reconnect and the control loop run many steps on a full view of the cluster.
    v2 = wait_for(converged_via_cli, timeout=20, what="v converged after the master restart", interval=0.1)
    assert v2["primary"] == v["primary"]
    wait_for(
        lambda: (metric(cluster.master.metrics(), "sparrow_master_heartbeats_received_total") or 0) >= 3 * 12,
        timeout=20,
        what="3 s of heartbeats from 3 nodes after the restart",
    )
    assert cluster.master.epochs_published() == 0, "the restarted master minted an epoch"
    assert [n["incarnation"] for n in cluster.node_list()] == list(incarnations.values())
    cluster.wait_serving(primary_id, volume_id)
    qemu_io(primary.url("v"), "read -P 0x5a 0 64k", "read -P 0xa5 3M 4k")

    # -- kill -9 a replica and start it again: it re-anchors; the primary serves throughout.
    replica = cluster.node(next(r["node_id"] for r in v["replicas"] if r["role"] == "replica"))
    prober = Prober(primary.portal, "v")
    prober.start()
    try:
        replica.kill9()
        replica.restart()

        def re_anchored() -> bool:
            view = {n["node_id"]: n for n in cluster.node_list()}[replica.node_id]
            return bool(view["state"] == "alive" and view["incarnation"] > incarnations[replica.node_id])

        wait_for(
            re_anchored, timeout=20, what=f"{replica.node_id} alive with a new incarnation", interval=0.1
        )
        # The new process heard from the master (its counters start afresh), then reports converged.
        wait_for(
            lambda: (metric(replica.metrics(), "sparrow_node_acks_total") or 0) >= 2,
            timeout=10,
            what=f"Acks at the restarted {replica.node_id}",
        )
        v3 = wait_for(
            converged_via_cli, timeout=20, what="v converged after the replica restart", interval=0.1
        )
        assert v3["primary"] == v["primary"]
        assert replica.access_state(volume_id) == "standby"
        record = replica.persisted(volume_id)
        assert record is not None and (record["epoch"], record["role"]) == (1, "replica"), record
    finally:
        prober.finish()
    assert prober.bad == [], f"the primary stopped serving: {prober.bad[:5]}"
    assert prober.good >= 20, prober.good
    qemu_io(primary.url("v"), "read -P 0x5a 0 64k", "read -P 0xa5 3M 4k")
    assert cluster.master.epochs_published() == 0
    # 0 (not placed yet) then 1 for good: never backwards, and no epoch but the first.
    assert epochs == sorted(epochs) and set(epochs) <= {0, 1}, f"epochs: {epochs}"
    print(
        f"\nSMOKE: {prober.good} READs GOOD at the primary while {replica.node_id} was killed and restarted"
    )


# -- 2. a partition of the primary ----------------------------------------------------------------


def test_partitioned_primary_fences_within_the_lease_and_no_epoch_is_minted(
    make_cluster: Callable[[int], Cluster],
) -> None:
    require_tool("qemu-io")
    cluster = make_cluster(3)
    # One copy: nothing can be promoted (with replicas the in-sync one takes over, see
    # test_forwarding.py), so the master must wait and mint nothing.
    create(cluster, "v", 1)
    v = cluster.wait_converged("v", epoch=1, copies=1)
    volume_id = v["volume_id"]
    primary = cluster.node(v["primary"]["node_id"])
    others = [n for n in cluster.nodes.values() if n is not primary]
    proxy = cluster.proxy(primary.node_id)
    cluster.wait_serving(primary.node_id, volume_id)
    qemu_io(primary.url("v"), "write -P 0x3c 0 64k", "write -P 0xc3 5M 4k")
    published = cluster.master.epochs_published()
    assert published == 1

    probe = RawSession(primary.portal, iqn("v"))
    watcher = Watcher(cluster, "v", volume_id, others)
    try:
        assert probe.read_past_unit_attentions() == Answer(GOOD)
        watcher.start()
        wait_for(lambda: len(watcher.samples) >= 2, timeout=5, what="the watcher's first samples")
        cut_at = proxy.cut()
        first, refused_at = refused_in_loop(probe, give_up_at=cut_at + TIMING.lease + 2.0)
        last_up = proxy.last_up()
        assert last_up is not None and last_up <= cut_at
        assert_fence_answer(probe, first)
        delay = refused_at - last_up

        # The master: the primary is dead, its lease safely over, and there is no other copy.
        def no_eligible() -> dict[str, Any] | None:
            view = cluster.volume("v")
            return view if view["status"] == "no eligible replica" else None

        stalled = wait_for(
            no_eligible,
            timeout=TIMING.dead_after + TIMING.lease + TIMING.margin + 5,
            what='status "no eligible replica"',
            interval=0.05,
        )
        status_at = time.monotonic()
        # The status comes once the primary is silent past its lease (lease + margin); the node
        # list calls it dead only at dead_after.
        wait_for(
            lambda: (
                {r["node_id"]: r["state"] for r in cluster.volume("v")["replicas"]}[primary.node_id] == "dead"
            ),
            timeout=TIMING.dead_after + 5,
            what=f"{primary.node_id} dead",
            interval=0.05,
        )
        samples = watcher.finish()
        assert stalled["epoch"] == 1 and stalled["primary"] == v["primary"], stalled
        inspected = cluster.inspect("v")
        assert (inspected["epoch"], inspected["status"]) == (1, "no eligible replica"), inspected
        assert {r["node_id"]: r["state"] for r in inspected["replicas"]}[primary.node_id] == "dead"
        assert cluster.master.epochs_published() == published, "an epoch was minted for a partition"
        assert probe.read10().not_ready_transition  # still fenced

        assert watcher.errors == [], watcher.errors
        assert any(s.at < refused_at for s in samples) and samples[-1].at > refused_at, "window not watched"
        for s in samples:
            assert (s.epoch, s.primary) == (1, primary.node_id), s
            assert s.serving == (), f"{s.serving} served the volume during the partition ({s})"
        for node in others:
            record = node.persisted(volume_id)
            assert record is None or (record["epoch"], record["role"]) == (1, "replica"), record

        # Heal the partition: the same primary serves again, with the data.
        restored_at = proxy.restore()
        wait_for(
            lambda: probe.read_past_unit_attentions() == Answer(GOOD), timeout=10, what="service to resume"
        )
        resumed = time.monotonic() - restored_at
    finally:
        watcher.finish()
        probe.close()
    qemu_io(primary.url("v"), "read -P 0x3c 0 64k", "read -P 0xc3 5M 4k")
    healed = cluster.wait_converged("v", epoch=1, copies=1)
    assert healed["primary"] == v["primary"]
    assert cluster.master.epochs_published() == published
    print(
        f"\nPARTITION: last heartbeat forwarded {(cut_at - last_up) * 1000:.0f} ms before the cut; first "
        f"refused READ {delay * 1000:.1f} ms after it (fence deadline "
        f"{(TIMING.lease - TIMING.fence_margin) * 1000:.0f} ms, lease {FENCE_BUDGET * 1000:.0f} ms: "
        f'{(FENCE_BUDGET - delay) * 1000:.1f} ms before expiry); "no eligible replica" '
        f"{(status_at - last_up):.2f} s after it, epoch still 1; serving again {resumed * 1000:.0f} ms "
        f"after the proxy was restored"
    )
    assert delay < FENCE_BUDGET, f"fenced {delay * 1000:.1f} ms after the last heartbeat reached the master"


# -- 3. the master stops ------------------------------------------------------------------------------


def test_sigstop_of_the_master_fences_the_primary_and_sigcont_restores_it(
    make_cluster: Callable[[int], Cluster],
) -> None:
    require_tool("qemu-io")
    cluster = make_cluster(2)
    create(cluster, "v", 2)
    v = cluster.wait_converged("v", epoch=1, copies=2)
    volume_id = v["volume_id"]
    primary = cluster.node(v["primary"]["node_id"])
    cluster.wait_serving(primary.node_id, volume_id)
    qemu_io(primary.url("v"), "write -P 0x77 0 64k", "write -P 0x88 7M 4k")
    fences_before = len(primary.events("fenced"))

    probe = RawSession(primary.portal, iqn("v"))
    try:
        assert probe.read_past_unit_attentions() == Answer(GOOD)
        stopped_at = cluster.master.sigstop()
        first, refused_at = refused_in_loop(probe, give_up_at=stopped_at + TIMING.lease + 2.0)
        assert_fence_answer(probe, first)
        events = wait_for(
            lambda: primary.events("fenced")[fences_before:] or None, timeout=5, what="the fence in the log"
        )
        event = events[0]
        lease_sent_at = event["lease_expired_at"] - TIMING.lease  # send time of the last acked heartbeat
        delay = refused_at - lease_sent_at
        metrics = primary.metrics()
        assert "sparrow_node_lease_valid 0.0" in metrics, metrics
        assert primary.access_state(volume_id) == "transitioning"

        cont_at = cluster.master.sigcont()
        wait_for(
            lambda: probe.read_past_unit_attentions() == Answer(GOOD), timeout=10, what="service to resume"
        )
        resumed = time.monotonic() - cont_at
    finally:
        probe.close()
    qemu_io(primary.url("v"), "read -P 0x77 0 64k", "read -P 0x88 7M 4k")
    after = cluster.wait_converged("v", epoch=1, copies=2)
    assert after["primary"] == v["primary"]
    assert cluster.master.epochs_published() == 1
    print(
        f"\nMASTER SIGSTOP: last acked heartbeat sent {(stopped_at - lease_sent_at) * 1000:.0f} ms before "
        f"the stop; fence applied {event['late_ms']:.2f} ms after its deadline, "
        f"{event['before_expiry_ms']:.1f} ms before the lease expired; first refused READ "
        f"{delay * 1000:.1f} ms after that heartbeat's send ({(FENCE_BUDGET - delay) * 1000:.1f} ms before "
        f"expiry), {(refused_at - stopped_at) * 1000:.1f} ms after the stop; "
        f"serving again {resumed * 1000:.0f} ms after SIGCONT"
    )
    assert delay < FENCE_BUDGET, f"fenced {delay * 1000:.1f} ms after the last acked heartbeat was sent"
    assert refused_at - stopped_at < FENCE_BUDGET, "fenced later than the lease after the stop"
    assert event["before_expiry_ms"] > 0, "the fence did not land before the lease expired"
    assert refused_at >= event["fence_deadline"] - 0.005, "fenced before the fence deadline"


# -- 4. login redirect --------------------------------------------------------------------------------


def test_a_write_through_the_replicas_portal_lands_on_the_primary(
    make_cluster: Callable[[int], Cluster],
) -> None:
    require_tool("qemu-io")
    iscsi_ls = require_tool("iscsi-ls")
    cluster = make_cluster(2)
    create(cluster, "v", 2)
    v = cluster.wait_converged("v", epoch=1, copies=2)
    volume_id = v["volume_id"]
    primary = cluster.node(v["primary"]["node_id"])
    replica = cluster.node(next(r["node_id"] for r in v["replicas"] if r["role"] == "replica"))
    cluster.wait_serving(primary.node_id, volume_id)
    assert replica.access_state(volume_id) == "standby"

    qemu_io(replica.url("v"), "write -P 0x6b 0 64k", "write -P 0x6c 2M 4k")
    qemu_io(primary.url("v"), "read -P 0x6b 0 64k", "read -P 0x6c 2M 4k", "read -P 0 64k 960k")
    # The write went to the primary, which forwarded it to the replica's own copy.
    with (replica.data_dir / "volumes" / "v.img").open("rb") as f:
        assert f.read(64 << 10) == b"\x6b" * (64 << 10)

    out = run([iscsi_ls, "-s", f"iscsi://{replica.portal}"], timeout=60)
    text = out.stdout + out.stderr
    lines = [ln for ln in text.splitlines() if iqn("v") in ln]
    assert lines, text
    assert any(f"{primary.portal},1" in ln for ln in lines), text
    assert replica.portal not in text, text
    assert "Lun:0" in text, text


def test_deleting_a_volume_removes_every_nodes_copy_even_of_a_node_that_was_down(
    make_cluster: Callable[[int], Cluster],
) -> None:
    """The master sends a tombstone to each node that still reports a copy of a deleted volume;
    a node that was down at the delete gets its tombstone once it is back (the authority keeps
    them), and nothing else on the nodes is touched."""
    cluster = make_cluster(3)
    create(cluster, "doomed", 3)
    create(cluster, "kept", 3)
    doomed = cluster.wait_converged("doomed", epoch=1, copies=3)
    cluster.wait_converged("kept", epoch=1, copies=3)
    files = {n: cluster.node(n).data_dir / "volumes" / "doomed.img" for n in ("n1", "n2", "n3")}
    assert all(f.exists() for f in files.values()), files
    down = next(n for n in ("n1", "n2", "n3") if n != doomed["primary"]["node_id"])
    cluster.node(down).term()

    cluster.cli("volume", "delete", "doomed")
    up = [n for n in files if n != down]
    wait_for(lambda: not any(files[n].exists() for n in up), timeout=10, what="the copies on live nodes gone")
    assert files[down].exists()  # it was down: nobody told it yet
    cluster.node(down).start()
    wait_for(lambda: not files[down].exists(), timeout=10, what=f"{down}'s copy gone after its restart")
    for n in files:
        node = cluster.node(n)
        assert node.persisted(doomed["volume_id"]) is None  # its role record is forgotten too
        assert (node.data_dir / "volumes" / "kept.img").exists()
    cluster.wait_converged("kept", epoch=1, copies=3)


def test_a_dead_replica_leaves_the_in_sync_set_and_its_replacement_starts_stale(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Issue 8, the in-sync set at the master: a new volume's copies all start in sync; a replica
    killed for good is replaced under a new epoch, leaves the set, and its replacement starts
    outside it (it holds none of the data until its resync is done: paced here at 1 KiB/s, so it
    stays syncing); the set is recorded with the epoch, so a master restarted with kill -9 reads
    back the same set and mints nothing."""
    cluster = make_cluster(4, node_args=("--resync-rate", "1KiB"))
    create(cluster, "v", 3)
    v = cluster.wait_converged("v", epoch=1, copies=3)
    assert [r["sync"] for r in v["replicas"]] == ["in_sync"] * 3, v["replicas"]
    primary = v["primary"]["node_id"]
    dead, survivor = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    (spare,) = {"n1", "n2", "n3", "n4"} - {r["node_id"] for r in v["replicas"]}

    cluster.node(dead).kill9()
    replaced = cluster.wait_converged("v", epoch=2, copies=3, timeout=TIMING.dead_after + 20)
    sync = {r["node_id"]: r["sync"] for r in replaced["replicas"]}
    assert sync[primary] == sync[survivor] == "in_sync", replaced["replicas"]
    assert sync[spare] in ("stale", "syncing"), replaced["replicas"]
    assert replaced["primary"]["node_id"] == primary

    cluster.master.kill9()
    cluster.master.restart()
    again = cluster.wait_converged("v", epoch=2, copies=3)
    assert {r["node_id"] for r in again["replicas"] if r["sync"] == "in_sync"} == {primary, survivor}
    assert cluster.master.epochs_published() == 0, "the restarted master minted an epoch"
