"""The primary forwards every write to its in-sync replicas (issue 8; docs/replication.md).

Real processes on loopback: a master and three nodes, a volume with three copies, a real initiator
(tests/tools/gatewriter.c) writing verifiable blocks. Every acknowledged write must be in every
in-sync copy's data file; a replica killed with kill -9 under load is dropped from the in-sync set
under a new epoch and writes go on with the others, none acknowledged missing from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.cluster import TIMING, Cluster
from tests.integration.gate import Writer, read_data_file, read_through_target
from tests.integration.test_gate import assert_nothing_lost
from tests.tools import wait_for

pytestmark = pytest.mark.integration

BLOCKS = 2048


def data_file(cluster: Cluster, node: str) -> Path:
    return cluster.node(node).data_dir / "volumes" / "fw.img"


def three_copies(cluster: Cluster) -> tuple[str, str, str, str]:
    """Create ``fw`` with three copies; (volume id, primary, replica, replica) once all serve."""
    cluster.cli("volume", "create", "fw", "--size", "16MiB", "--replicas", "3")
    v = cluster.wait_converged("fw", epoch=1, copies=3)
    primary = v["primary"]["node_id"]
    r1, r2 = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    cluster.wait_serving(primary, v["volume_id"])
    return v["volume_id"], primary, r1, r2


def test_writes_land_byte_exact_in_all_three_copies(make_cluster: Callable[[int], Cluster]) -> None:
    cluster = make_cluster(3)
    _, primary, r1, r2 = three_copies(cluster)
    writer = Writer(cluster.node(primary).url("fw"), run_id=11, blocks=BLOCKS, depth=16, sync_every=128)
    try:
        writer.wait_acked(3000)
        journal = writer.stop()
    finally:
        writer.kill()
    assert journal.reconnects == 0, writer.summary()
    contents = {f"{n} data file": read_data_file(data_file(cluster, n), BLOCKS) for n in (primary, r1, r2)}
    contents["through the target"] = read_through_target(cluster.node(primary).url("fw"), BLOCKS)
    assert_nothing_lost(journal, contents, 11)
    files = {n: data_file(cluster, n).read_bytes()[: BLOCKS * 4096] for n in (primary, r1, r2)}
    assert files[r1] == files[primary] and files[r2] == files[primary], "the copies differ"
    assert cluster.volume("fw")["epoch"] == 1  # nobody fell behind


def test_a_replica_killed_under_load_is_dropped_and_writes_go_on(
    make_cluster: Callable[[int], Cluster],
) -> None:
    cluster = make_cluster(3)
    volume_id, primary, victim, survivor = three_copies(cluster)
    writer = Writer(cluster.node(primary).url("fw"), run_id=12, blocks=BLOCKS, depth=16, sync_every=128)
    try:
        writer.wait_acked(500)
        cluster.node(victim).kill9()
        killed_at = writer.acked

        def dropped() -> dict[str, object] | None:
            v = cluster.volume("fw")
            return v if v["epoch"] >= 2 and victim not in _in_sync(v) else None

        v = wait_for(
            dropped,
            timeout=TIMING.lease + 20,
            what=f"{victim} dropped from the in-sync set",
            interval=0.05,
        )
        assert _in_sync(v) == {primary, survivor}, v["replicas"]
        writer.wait_acked(killed_at + 1000, timeout=60)
        journal = writer.stop()
    finally:
        writer.kill()
    assert journal.reconnects == 0, writer.summary()
    contents = {f"{n} data file": read_data_file(data_file(cluster, n), BLOCKS) for n in (primary, survivor)}
    assert_nothing_lost(journal, contents, 12)
    persisted = cluster.node(survivor).persisted(volume_id)
    assert persisted is not None and int(persisted["epoch"]) >= 2
    cluster.node(victim).start()  # a clean exit at close


def _in_sync(v: dict[str, object]) -> set[str]:
    replicas = v["replicas"]
    assert isinstance(replicas, list)
    return {r["node_id"] for r in replicas if r.get("sync") == "in_sync"}


def test_kill_9_of_the_primary_fails_over_to_an_in_sync_copy_and_loses_no_acknowledged_write(
    make_cluster: Callable[[int], Cluster],
) -> None:
    """The final gate with three copies (issue 8, test 1, one kill point): the writer logs in at a
    replica's portal and is redirected to the primary; the primary dies by kill -9 under load; an
    in-sync replica is promoted under a new epoch, the writer finds it through the redirect, and
    every acknowledged write is on both remaining in-sync copies."""
    cluster = make_cluster(3)
    volume_id, primary, entry, other = three_copies(cluster)
    writer = Writer(cluster.node(entry).url("fw"), run_id=13, blocks=BLOCKS, depth=16, sync_every=128)
    try:
        writer.wait_acked(800)
        killed_at = time.monotonic()
        cluster.node(primary).kill9()
        writer.wait_reconnects(1, timeout=TIMING.lease + 30)
        writer.wait_acked(writer.acked + 1, timeout=30)
        failover = time.monotonic() - killed_at
        writer.wait_acked(writer.acked + 800, timeout=60)
        journal = writer.stop()
    finally:
        writer.kill()
    v = cluster.volume("fw")
    new_primary = v["primary"]["node_id"]
    assert new_primary in (entry, other) and v["epoch"] >= 2, v
    in_sync = _in_sync(v)
    assert in_sync == {entry, other}, v["replicas"]
    contents = {f"{n} data file": read_data_file(data_file(cluster, n), BLOCKS) for n in sorted(in_sync)}
    contents["through the target"] = read_through_target(cluster.node(new_primary).url("fw"), BLOCKS)
    assert_nothing_lost(journal, contents, 13)
    for n in in_sync:
        persisted = cluster.node(n).persisted(volume_id)
        assert persisted is not None and int(persisted["epoch"]) == v["epoch"]
    print(  # shown with -s
        f"\nFAILOVER: kill -9 of the primary to the first write acknowledged by the new one"
        f" {failover:.2f} s (heartbeat {TIMING.heartbeat} s, lease {TIMING.lease} s, dead after"
        f" {TIMING.dead_after} s)"
    )
