"""Catch-up and full rebuild (issue 8, test 3; docs/replication.md, "Catch-up").

Real processes on loopback: a master and three (four) nodes, a volume with three copies, a real
initiator (tests/tools/gatewriter.c) writing verifiable blocks all along. A replica killed with
kill -9 and restarted is resynced while the writes go on: only the dirty regions are copied, it is
reported syncing (with its progress) and then back in the in-sync set, and every copy ends
byte-identical with every acknowledged write. A replica lost for good is replaced on a fourth node
with a full copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sparrow.node.checkpoint import CHECKPOINT_INTERVAL
from store.dirtymap import DirtyBitmap
from tests.integration.cluster import TIMING, Cluster, metric
from tests.integration.gate import Writer, read_data_file
from tests.integration.test_gate import assert_nothing_lost
from tests.tools import wait_for

pytestmark = pytest.mark.integration

MIB = 1 << 20
BLOCKS = 2048  # the writer's blocks: the first 8 MiB, 8 regions
SIZE = 128 * MIB


def data_file(cluster: Cluster, node: str, volume: str) -> Path:
    return cluster.node(node).data_dir / "volumes" / f"{volume}.img"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sync_of(v: dict[str, Any], node: str) -> dict[str, Any]:
    return next(r for r in v["replicas"] if r["node_id"] == node)


def three_copies(cluster: Cluster, name: str, size: str) -> tuple[str, str, str, str]:
    cluster.cli("volume", "create", name, "--size", size, "--replicas", "3")
    v = cluster.wait_converged(name, epoch=1, copies=3)
    primary = v["primary"]["node_id"]
    r1, r2 = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    cluster.wait_serving(primary, v["volume_id"])
    return v["volume_id"], primary, r1, r2


def wait_syncing_then_in_sync(cluster: Cluster, name: str, node: str, timeout: float) -> list[dict[str, Any]]:
    """Poll the volume's view (what ``sparrow volume inspect --json`` prints; the CLI itself once
    it shows ``syncing``) until ``node`` is in sync; every resync progress seen while it was
    syncing (at least one)."""
    seen: list[dict[str, Any]] = []

    def back() -> dict[str, Any] | None:
        v = cluster.volume(name)
        entry = sync_of(v, node)
        if entry["sync"] == "syncing":
            assert entry["resync"] is not None, entry
            if not seen:  # the CLI prints the same view (a moment later: it may have moved on)
                cli = sync_of(cluster.inspect(name), node)
                assert cli["sync"] != "syncing" or set(cli["resync"]) == {"done_bytes", "total_bytes"}
            seen.append(entry["resync"])
        else:
            assert entry["resync"] is None, entry
        return v if entry["sync"] == "in_sync" and seen else None

    wait_for(back, timeout=timeout, what=f"{node} syncing, then in sync", interval=0.05)
    return seen


def test_a_restarted_replica_catches_up_only_the_dirty_regions_while_writes_go_on(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Issue 8, test 3: kill -9 one replica under write load, keep writing, restart it."""
    # A slow resync (4 MiB/s) so that `syncing` is seen; the dirty regions are 8 MiB at most.
    cluster = make_cluster(3, node_args=("--resync-rate", "4MiB"))
    _, primary, victim, survivor = three_copies(cluster, "rs", "128MiB")
    writer = Writer(cluster.node(primary).url("rs"), run_id=31, blocks=BLOCKS, depth=8, sync_every=64)
    try:
        writer.wait_acked(500)
        cluster.node(victim).kill9()
        killed_at = writer.acked

        def dropped() -> dict[str, Any] | None:
            v = cluster.volume("rs")
            return v if sync_of(v, victim)["sync"] != "in_sync" else None

        wait_for(dropped, timeout=TIMING.lease + 20, what=f"{victim} dropped", interval=0.05)
        writer.wait_acked(writer.acked + 1000, timeout=60)
        cluster.node(victim).start()
        restarted_at = writer.acked
        seen = wait_syncing_then_in_sync(cluster, "rs", victim, timeout=60)
        writer.wait_acked(writer.acked + 300, timeout=60)  # writes go on with it back in sync
        journal = writer.stop()
    finally:
        writer.kill()
    assert journal.reconnects == 0, writer.summary()
    # What was copied: the dirty regions, no more; at least every region written while it was away.
    away = {block * 4096 // MIB for block, _ in journal.acks[killed_at:restarted_at]}
    written = {block * 4096 // MIB for block, _ in journal.acks}
    total = seen[-1]["total_bytes"]
    assert len(away) * MIB <= total <= len(written) * MIB, (seen, away, written)
    assert total <= SIZE // 16
    planned = [p for p in seen if p["total_bytes"]]  # (0, 0) until the replica's map is in
    assert all(0 <= p["done_bytes"] <= p["total_bytes"] == total for p in planned), seen
    assert [p["done_bytes"] for p in planned] == sorted(p["done_bytes"] for p in planned), seen
    copied = metric(cluster.node(primary).metrics(), "sparrow_resync_bytes_total")
    assert copied == total, (copied, total)
    print(f"\nRESYNC: {total // MIB} MiB copied of {SIZE // MIB} MiB ({len(away)} regions written away)")
    # Every copy byte-identical, every acknowledged write in each.
    nodes = (primary, victim, survivor)
    contents = {f"{n} data file": read_data_file(data_file(cluster, n, "rs"), BLOCKS) for n in nodes}
    assert_nothing_lost(journal, contents, 31)
    digests = {n: digest(data_file(cluster, n, "rs")) for n in nodes}
    assert len(set(digests.values())) == 1, digests
    v = cluster.volume("rs")
    assert {r["node_id"] for r in v["replicas"] if r["sync"] == "in_sync"} == set(nodes), v["replicas"]

    # Every copy in sync: a checkpoint clears the dirty maps (the primary's and the replicas').
    def clean() -> bool:
        return all(dirty_regions(cluster, n, "rs", v["volume_id"]) == [] for n in nodes)

    wait_for(
        clean,
        timeout=CHECKPOINT_INTERVAL * 3 + 10,
        what="the dirty maps cleared: "
        + ", ".join(f"{n} {dirty_regions(cluster, n, 'rs', v['volume_id'])}" for n in nodes),
        interval=0.2,
    )
    # Away again while only region 0 is written: the catch-up copies that region alone.
    copied_before = metric(cluster.node(primary).metrics(), "sparrow_resync_bytes_total")
    cluster.node(victim).kill9()
    second = Writer(cluster.node(primary).url("rs"), run_id=33, blocks=256, depth=8, sync_every=64)
    try:
        wait_for(dropped, timeout=TIMING.lease + 20, what=f"{victim} dropped again", interval=0.05)
        second.wait_acked(300, timeout=60)
        cluster.node(victim).start()
        again = wait_syncing_then_in_sync(cluster, "rs", victim, timeout=60)
        journal2 = second.stop()
    finally:
        second.kill()
    copied_again = metric(cluster.node(primary).metrics(), "sparrow_resync_bytes_total")
    assert copied_before is not None and copied_again is not None
    assert copied_again - copied_before == MIB, (copied_before, copied_again, again)
    assert all(p["total_bytes"] in (0, MIB) for p in again), again
    contents = {f"{n} data file": read_data_file(data_file(cluster, n, "rs"), 256) for n in nodes}
    assert_nothing_lost(journal2, contents, 33)
    digests = {n: digest(data_file(cluster, n, "rs")) for n in nodes}
    assert len(set(digests.values())) == 1, digests
    print(f"RESYNC: then {(copied_again - copied_before) / MIB:.0f} MiB after writes to one region")


def dirty_regions(cluster: Cluster, node: str, volume: str, volume_id: str) -> list[int]:
    path = cluster.node(node).data_dir / "volumes" / f"{volume}.dirty"
    return list(DirtyBitmap.decode(path.read_bytes(), volume_id, SIZE // MIB))


def test_a_replacement_copy_gets_a_full_copy_and_all_copies_end_identical(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(4, node_args=("--resync-rate", "8MiB"))  # 4 s: `syncing` is seen
    nodes = {"n1", "n2", "n3", "n4"}
    _, primary, victim, survivor = three_copies(cluster, "fc", "32MiB")
    spare = (nodes - {primary, victim, survivor}).pop()
    writer = Writer(cluster.node(primary).url("fc"), run_id=32, blocks=BLOCKS, depth=8, sync_every=64)
    try:
        writer.wait_acked(300)
        cluster.node(victim).kill9()  # for good: replaced once dead

        def replaced() -> dict[str, Any] | None:
            v = cluster.volume("fc")
            ids = {r["node_id"] for r in v["replicas"]}
            return v if spare in ids and victim not in ids else None

        wait_for(replaced, timeout=TIMING.dead_after + 30, what=f"{victim} replaced by {spare}", interval=0.1)
        seen = wait_syncing_then_in_sync(cluster, "fc", spare, timeout=60)
        writer.wait_acked(writer.acked + 300, timeout=60)
        journal = writer.stop()
    finally:
        writer.kill()
    assert seen[-1]["total_bytes"] == 32 * MIB, seen  # every region: a full copy
    copies = (primary, survivor, spare)
    contents = {f"{n} data file": read_data_file(data_file(cluster, n, "fc"), BLOCKS) for n in copies}
    assert_nothing_lost(journal, contents, 32)
    digests = {n: digest(data_file(cluster, n, "fc")) for n in copies}
    assert len(set(digests.values())) == 1, digests
    cluster.node(victim).start()  # a clean exit at close
