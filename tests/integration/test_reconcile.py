"""The reconcile pass at the start of a primary's term (docs/replication.md, "Failover and the
dirty maps").

Real processes on loopback: a master and four nodes (each node's replication listener behind a
fault proxy), a volume with three copies, a real initiator (tests/tools/gatewriter.c) writing
verifiable blocks. The link from the primary to one replica is cut, so the writes the primary sends
from then on reach the other replica only (none is acknowledged: every write waits for both), and
the primary and the initiator die by kill -9 (an initiator that lives reissues its unacknowledged
writes to the same blocks on the new primary, which would hide the difference). The link is
restored before any new primary connects. A survivor is promoted, the other stays in sync (write
positions are 0), the dead primary's copy is replaced by a full copy on the spare, a second writer
writes meanwhile; once quiet, all three data files are byte-identical. Without the reconcile the
survivors keep differing in the blocks the dead primary's last writes reached on one of them only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import TIMING, Cluster
from tests.integration.gate import Content, Journal, Writer, Written, read_data_file
from tests.tools import wait_for

pytestmark = pytest.mark.integration

BLOCKS = 4096  # the first writer's blocks: the first 16 MiB
LIVE_BLOCKS = 256  # the second writer's: the first region
VOLUME = "rc"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 4, replication_proxies=True).start()
    yield c
    codes = c.close()
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{c.logs()}"


def data_file(cluster: Cluster, node: str) -> Path:
    return cluster.node(node).data_dir / "volumes" / f"{VOLUME}.img"


def in_sync(v: dict[str, Any]) -> set[str]:
    return {r["node_id"] for r in v["replicas"] if r["sync"] == "in_sync"}


def lost_writes(journals: list[Journal], contents: dict[int, Content]) -> list[str]:
    """Blocks that lost an acknowledged write: each block must hold, of the last journal that
    acknowledged a write there, that write or a later one of its run (a writer killed with kill -9
    printed nothing for the writes it had in flight)."""
    problems = []
    for block, got in contents.items():
        journal = next((j for j in reversed(journals) if block in j.acked), None)
        if journal is None:
            continue
        latest = journal.acked[block]
        if not isinstance(got, Written) or got.run_id != journal.run_id or got.counter < latest:
            problems.append(f"block {block} is {got}, latest ack {latest} of run {journal.run_id}")
    return problems


def test_after_a_failover_under_load_every_copy_ends_byte_identical(cluster: Cluster) -> None:
    cluster.cli("volume", "create", VOLUME, "--size", "32MiB", "--replicas", "3")
    v = cluster.wait_converged(VOLUME, epoch=1, copies=3)
    old = v["primary"]["node_id"]
    entry, cut = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    spare = (set(cluster.nodes) - {old, entry, cut}).pop()
    cluster.wait_serving(old, v["volume_id"])
    writer = Writer(cluster.node(old).url(VOLUME), run_id=41, blocks=BLOCKS, depth=32, sync_every=256)
    try:
        writer.wait_acked(2000)
        proxy = cluster.replication_proxy(cut)
        proxy.cut()
        dropped = proxy.dropped_up
        wait_for(
            lambda: proxy.dropped_up > dropped, timeout=10, what=f"writes to {cut} dropped", interval=0.01
        )
        cluster.node(old).kill9()
        writer.kill()
        journal = writer.journal
    finally:
        writer.kill()
    wait_for(
        lambda: proxy.open_connections == 0, timeout=10, what=f"{old}'s stream to {cut} gone", interval=0.01
    )
    proxy.restore()

    def promoted() -> dict[str, Any] | None:
        v = cluster.volume(VOLUME)
        return v if v["epoch"] >= 2 and v["primary"]["node_id"] in (entry, cut) else None

    at_promotion = wait_for(promoted, timeout=TIMING.lease + 30, what="a survivor promoted", interval=0.05)
    primary = at_promotion["primary"]["node_id"]
    survivor = ({entry, cut} - {primary}).pop()
    # Usually both survivors are in sync when one is promoted (the old primary died before its ACK
    # timeout dropped the cut copy), and the new primary reconciles the other. On a loaded machine
    # the old primary may have dropped the cut copy first, under an epoch of its own: then the
    # survivor is stale and comes back by a resync instead. Both must end byte-identical.
    reconciled = survivor in in_sync(at_promotion)
    cluster.wait_serving(primary, v["volume_id"], timeout=30)
    live = Writer(cluster.node(primary).url(VOLUME), run_id=42, blocks=LIVE_BLOCKS, depth=8, sync_every=64)
    try:
        live.wait_acked(200, timeout=60)

        def settled() -> dict[str, Any] | None:
            v = cluster.volume(VOLUME)
            ids = {r["node_id"] for r in v["replicas"]}
            return v if old not in ids and in_sync(v) == {primary, survivor, spare} else None

        wait_for(
            settled,
            timeout=TIMING.dead_after + 60,
            what=f"{old} replaced by {spare}, all in sync",
            interval=0.1,
        )
        live.wait_acked(live.acked + 200, timeout=60)
        journal2 = live.stop()
    finally:
        live.kill()
    assert journal2.reconnects == 0, live.summary()
    copies = (primary, survivor, spare)
    for n in copies:
        lost = lost_writes([journal, journal2], read_data_file(data_file(cluster, n), BLOCKS))
        assert not lost, (n, lost[:20])
    # Quiet: the copies agree, byte for byte.
    files = {n: data_file(cluster, n).read_bytes() for n in copies}
    digests = {n: hashlib.sha256(data).hexdigest() for n, data in files.items()}
    differ = [
        i // 4096
        for i in range(0, len(files[primary]), 4096)
        if files[primary][i : i + 4096] != files[survivor][i : i + 4096]
    ]
    assert len(set(digests.values())) == 1, (
        digests,
        f"{survivor} differs from {primary} in blocks {differ[:20]}",
    )
    # The new primary copied the survivor the union of both dirty maps, which held those blocks
    # (or, if the survivor was stale at the promotion, resynced it).
    event = "reconcile started" if reconciled else "resync started"
    started = [r for r in cluster.node(primary).events(event) if r["replica"] == survivor]
    assert started and int(started[0]["total_bytes"]) > 0, (event, started)
    print(f"\n{event.split()[0].upper()}: {int(started[0]['total_bytes']) >> 20} MiB copied to {survivor}")
    cluster.node(old).start()  # a clean exit at close
