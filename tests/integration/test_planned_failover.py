"""Issue 8, test 5: planned failover and drain through the CLI while a real initiator writes.

Real processes on loopback: a master and four nodes, a volume with three copies (the fourth node
is the spare a drain moves a copy to), the gate writer (tests/integration/gate.py, libiscsi)
logged in at a replica's portal and redirected to the primary. ``sparrow volume failover --to``
moves the primary to an in-sync replica; then ``sparrow node drain`` of the new primary moves it
again and replaces the drained copy on the spare. Nothing acknowledged is lost (the judge, on the
data file of every copy the master records in sync and through the target); the writer sees only
errors it recovers from (reconnects, NOT READY while the LU changes hands), never a write that
fails for another reason. The planned-failover pause (the longest stretch without an
acknowledgement once the command was issued) is printed (-s).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from sparrow.replication.protocol import Ack, ErrorCode, Open, Refuse, Write
from tests.integration.cluster import Cluster
from tests.integration.gate import Writer, read_data_file, read_through_target
from tests.integration.replication_peer import ReplicationLink, stream_key
from tests.integration.rogue import secret_of
from tests.integration.test_gate import assert_nothing_lost
from tests.tools import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BLOCKS = 2048
#: Writer diagnostics an initiator recovers from: the session lost (it logs in again and follows
#: the redirect), no answer in time (the same), a command cancelled (libiscsi's
#: SCSI_STATUS_CANCELLED, 0x0f000000: the connection was closed under it; the same), and NOT READY,
#: LOGICAL UNIT NOT ACCESSIBLE while the access state changes (04/0A transition, 04/0B standby:
#: it retries). Anything else (another sense, a status the initiator does not retry) is not.
RETRYABLE = re.compile(
    r"E (session lost: .*|no answer for .*"
    r"|(write \d+|synchronize cache): status 0xf000000\b.*"
    r"|(write \d+|synchronize cache): check condition NOT READY \(0x2\) ascq 0x040[ab])$"
)


class TimedWriter(Writer):
    """The gate writer, remembering when (monotonic) each acknowledgement line arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ack_times: list[float] = []
        super().__init__(*args, **kwargs)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                with self._changed:
                    if line.startswith("A "):
                        self.ack_times.append(time.monotonic())
                    self.journal.feed(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def pause_since(self, start: float) -> float:
        """The longest gap between two acknowledgements after ``start`` (seconds)."""
        with self._lock:
            times = [t for t in self.ack_times if t >= start]
            before = [t for t in self.ack_times if t < start]
        if before:
            times.insert(0, before[-1])
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def in_sync(v: dict[str, Any]) -> list[str]:
    return [r["node_id"] for r in v["replicas"] if r.get("sync") == "in_sync"]


def reported_in_sync(cluster: Cluster, volume: str, nodes: set[str]) -> dict[str, Any] | None:
    """The volume once every copy in ``nodes`` has reported the current epoch, converged."""
    v = cluster.volume(volume)
    ok = all(
        r["observed_epoch"] == v["epoch"] and r["converged"] for r in v["replicas"] if r["node_id"] in nodes
    )
    return v if ok and v["served"] else None


def test_planned_failover_and_drain_through_the_cli_lose_nothing(
    make_cluster: Callable[[int], Cluster],
) -> None:
    cluster = make_cluster(4)
    cluster.cli("volume", "create", "pf", "--size", "16MiB", "--replicas", "3")
    v = cluster.wait_converged("pf", epoch=1, copies=3)
    volume_id = v["volume_id"]
    old = v["primary"]["node_id"]
    entry, target = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    (spare,) = set(cluster.nodes) - {old, entry, target}
    cluster.wait_serving(old, volume_id)
    writer = TimedWriter(cluster.node(entry).url("pf"), run_id=31, blocks=BLOCKS, depth=16, sync_every=128)
    try:
        writer.wait_acked(800)

        # -- planned failover through the CLI ---------------------------------------------------
        started = time.monotonic()
        out = cluster.cli("volume", "failover", "pf", "--to", target, "--wait", "30").stdout
        assert out == f"volume pf: primary is {target} (epoch 2)\n"
        after_failover = writer.acked
        writer.wait_acked(after_failover + 500, timeout=60)
        failover_pause = writer.pause_since(started)
        v = cluster.volume("pf")
        assert v["epoch"] >= 2 and v["primary"]["node_id"] == target
        assert [r["node_id"] for r in v["replicas"]] == [target, entry, old]
        # The old primary stays, out of sync until its catch-up (a resync) brings it back.
        assert in_sync(v)[:2] == [target, entry]
        persisted = cluster.node(old).persisted(volume_id)
        assert persisted is not None and persisted["epoch"] >= 2 and persisted["role"] == "replica"

        # -- drain the new primary: the primary moves to the other in-sync copy, its copy goes to
        # the spare node; the drain completes (the stale copy is replaced at once) --------------
        started = time.monotonic()
        drained = cluster.cli("node", "drain", target, "--wait", "60", "--json").stdout
        assert json.loads(drained)["drain_status"] == "drained: holds no copy"
        writer.wait_acked(writer.acked + 500, timeout=60)
        drain_pause = writer.pause_since(started)
        nodes = {n["node_id"]: n for n in cluster.node_list()}
        assert nodes[target]["draining"] is True and nodes[entry]["draining"] is False
        v = wait_for(lambda: reported_in_sync(cluster, "pf", {entry}), timeout=20, what="pf served by entry")
        assert v["primary"]["node_id"] == entry
        assert target not in [r["node_id"] for r in v["replicas"]] and spare in [
            r["node_id"] for r in v["replicas"]
        ]
        journal = writer.stop()
    finally:
        writer.kill()

    bad = [e for e in journal.errors if not RETRYABLE.match(e.strip())]
    assert not bad, f"errors the initiator does not recover from: {bad[:5]}"
    copies = in_sync(v)
    assert copies[0] == entry, v["replicas"]  # and the copies resynced meanwhile
    contents = {
        f"{n} data file": read_data_file(cluster.node(n).data_dir / "volumes" / "pf.img", BLOCKS)
        for n in copies
    }
    contents["through the target"] = read_through_target(cluster.node(entry).url("pf"), BLOCKS)
    assert_nothing_lost(journal, contents, 31)
    assert cluster.cli("node", "undrain", target).stdout == f"node {target} takes new copies again\n"
    print(  # shown with -s
        f"\nPLANNED FAILOVER: longest pause without an acknowledgement {failover_pause:.2f} s (failover),"
        f" {drain_pause:.2f} s (drain of the primary); {journal.reconnects} reconnects,"
        f" {len(journal.errors)} retryable errors, {len(journal.acks)} writes acknowledged"
    )


def test_rebuild_releases_the_copy_and_adds_it_back_while_io_runs(
    make_cluster: Callable[..., Cluster],
) -> None:
    """``sparrow volume rebuild``: the copy is released by its node, then added back as a new copy
    outside the in-sync set (a resync, paced at 2 MiB/s here, copies it in full and brings it
    back); the volume serves throughout and every copy ends with every acknowledged write. The
    primary's copy and the last in-sync replica are refused with the reason."""
    cluster = make_cluster(3, node_args=("--resync-rate", "2MiB"))
    cluster.cli("volume", "create", "rb", "--size", "16MiB", "--replicas", "3")
    v = cluster.wait_converged("rb", epoch=1, copies=3)
    volume_id, primary = v["volume_id"], v["primary"]["node_id"]
    victim, other = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    cluster.wait_serving(primary, volume_id)
    refused = cluster.cli("volume", "rebuild", "rb", "--replica", primary, check=False)
    assert refused.returncode == 1 and refused.stderr.startswith(
        f"sparrow: error: node {primary} is the primary"
    )
    writer = Writer(cluster.node(primary).url("rb"), run_id=32, blocks=BLOCKS, depth=16, sync_every=128)
    try:
        writer.wait_acked(500)
        out = cluster.cli("volume", "rebuild", "rb", "--replica", victim).stdout
        assert out.startswith("volume rb: rebuild the copy on ")

        def back() -> dict[str, Any] | None:
            v = cluster.volume("rb")
            copies = {r["node_id"]: r for r in v["replicas"]}
            copy = copies.get(victim)
            ok = copy is not None and copy["observed_epoch"] == v["epoch"] and copy["converged"]
            return v if ok and v["epoch"] == 3 else None

        v = wait_for(back, timeout=30, what=f"the copy on {victim} added back")
        sync = [(r["node_id"], r["sync"]) for r in v["replicas"]]
        assert sync[:2] == [(primary, "in_sync"), (other, "in_sync")]
        assert sync[2] in ((victim, "stale"), (victim, "syncing")), sync  # a new copy: resync fills it
        again = cluster.cli("volume", "rebuild", "rb", "--replica", other, check=False)
        assert again.returncode == 1 and "last in-sync replica" in again.stderr
        wait_for(
            lambda: victim in in_sync(cluster.volume("rb")), timeout=60, what=f"{victim} resynced"
        )
        writer.wait_acked(writer.acked + 500, timeout=60)
        journal = writer.stop()
    finally:
        writer.kill()
    reasons = [e["reason"] for e in cluster.master.events("published assignment")]
    assert reasons[1:] == [
        f"rebuild the copy on {victim}: release it",
        f"rebuild the copy on {victim}: add it back as a new copy",
        f"replica {victim} back in the in-sync set",
    ]
    assert cluster.node(victim).events("target unexported"), "the node did not release its copy"
    assert journal.reconnects == 0 and not journal.errors, writer.summary()
    contents = {
        f"{n} data file": read_data_file(cluster.node(n).data_dir / "volumes" / "rb.img", BLOCKS)
        for n in (primary, other, victim)
    }
    assert_nothing_lost(journal, contents, 32)
    persisted = cluster.node(victim).persisted(volume_id)
    assert persisted is not None and (persisted["epoch"], persisted["role"]) == (4, "replica")


def test_after_a_planned_failover_every_replica_refuses_the_old_primarys_epoch(
    make_cluster: Callable[[int], Cluster],
) -> None:
    """The test plays the old primary on both replicas' replication ports, at epoch 1, with the
    cluster secret: a write is applied before the failover; once each has persisted epoch 2 (the
    target as primary, the other as its replica) the old primary's next write is refused
    ``stale_epoch`` and never lands: the refusal that keeps a deposed primary from completing a
    write."""
    cluster = make_cluster(3)
    cluster.cli("volume", "create", "fe", "--size", "16MiB", "--replicas", "3")
    v = cluster.wait_converged("fe", epoch=1, copies=3)
    volume_id, old = v["volume_id"], v["primary"]["node_id"]
    target, other = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    offset = 4 << 20
    links = {}
    for node in (target, other):  # nothing writes to the real primary: it opens no stream
        key = stream_key(cluster.master.data_dir, volume_id, 1, old, node)  # as the old primary holds it
        link = ReplicationLink(cluster.node(node).replication_port, secret_of(cluster.root), stream_key=key)
        assert link.open(Open(volume_id, 1, 1, old)) == Ack(volume_id, 1, 0, 0)
        link.send(Write(volume_id, 1, 1, offset, b"\x11" * 4096))
        link.ack_until(1)
        links[node] = link
    cluster.cli("volume", "failover", "fe", "--to", target, "--wait", "30")
    for node in (target, other):
        wait_for(
            lambda node=node: (cluster.node(node).persisted(volume_id) or {}).get("epoch") == 2,  # type: ignore[misc]
            timeout=10,
            what=f"{node} to persist epoch 2",
        )
        links[node].send(Write(volume_id, 1, 2, offset, b"\x22" * 4096, fua=True))
        answer = links[node].receive()
        assert isinstance(answer, Refuse) and answer.code is ErrorCode.STALE_EPOCH, (node, answer)
        links[node].close()
        with (cluster.node(node).data_dir / "volumes" / "fe.img").open("rb") as f:
            f.seek(offset)
            assert f.read(4096) == b"\x11" * 4096  # the deposed epoch's write never landed


def test_drain_of_an_in_sync_replica_adds_a_copy_and_waits_for_it_and_undrain_takes_it_back(
    make_cluster: Callable[..., Cluster],
) -> None:
    """An in-sync copy on a draining node stays until the copy placed on the spare node is in sync
    (resync fills it, paced at 256 KiB/s here; until then the drain waits and says so);
    ``undrain`` ends the drain and the copy it added, still syncing, is dropped again."""
    cluster = make_cluster(4, node_args=("--resync-rate", "256KiB"))
    cluster.cli("volume", "create", "dr", "--size", "16MiB", "--replicas", "3")
    v = cluster.wait_converged("dr", epoch=1, copies=3)
    placed = [r["node_id"] for r in v["replicas"]]
    drained = placed[1]
    (spare,) = set(cluster.nodes) - set(placed)
    waiting = f"draining {drained}: waiting for the copies on {spare} to be in sync"
    timed_out = cluster.cli("node", "drain", drained, "--wait", "3", check=False)
    assert timed_out.returncode == 1
    assert timed_out.stderr.startswith("sparrow: error: timed out after 3s waiting for ")
    v = cluster.wait_converged("dr", epoch=2, copies=4)
    sync = [(r["node_id"], r["sync"]) for r in v["replicas"]]
    assert sync[:3] == [(n, "in_sync") for n in placed]
    assert sync[3] in ((spare, "stale"), (spare, "syncing")), sync
    assert v["status"] == waiting and v["status_kind"] == "moving"
    node = {n["node_id"]: n for n in cluster.node_list()}[drained]
    assert (node["draining"], node["drain_status"]) == (True, waiting)
    cluster.cli("node", "undrain", drained)
    v = cluster.wait_converged("dr", epoch=3, copies=3)
    assert [(r["node_id"], r["sync"]) for r in v["replicas"]] == [(n, "in_sync") for n in placed]
