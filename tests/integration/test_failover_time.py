"""Failover time at the default timings (issue 8: at most 10 s from kill -9 of the primary to the
first write acknowledged by the new primary).

A master and three nodes at the daemons' defaults (heartbeat 1 s, lease 5 s, fence margin 0.5 s,
margin 1 s, dead after 8 s), a volume with three copies, the gate writer logged in at a replica's
portal (redirected to the primary) with 16 writes in flight; the primary dies by kill -9. The
figure is printed with -s (docs/performance.md, "Failover").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import failover as fo
from tests.integration.cluster import Cluster
from tests.integration.gate import Writer, read_data_file, read_through_target
from tests.integration.test_gate import assert_nothing_lost

pytestmark = pytest.mark.integration

#: Issue 8's bound, kill -9 to the first acknowledged write.
BOUND = 10.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3, fo.DEFAULTS).start()
    yield c
    codes = c.close()
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{c.logs()}"


def test_failover_at_the_default_timings_takes_at_most_10_seconds(cluster: Cluster) -> None:
    _, primary, entry, other = fo.three_copies(cluster)
    writer = Writer(cluster.node(entry).url(fo.VOLUME), run_id=21, blocks=fo.BLOCKS, depth=16, sync_every=128)
    try:
        writer.wait_acked(500)
        failover = fo.kill_primary(cluster, writer)
        writer.wait_acked(writer.acked + 300)
        journal = writer.stop()
    finally:
        writer.kill()
    print(f"\nFAILOVER at the defaults: {fo.describe(fo.DEFAULTS, failover)}")  # shown with -s
    assert failover.old_primary == primary and failover.new_primary in (entry, other), failover
    assert failover.epoch >= 2
    # The old primary's lease had to run out first: t_a + lease + margin, t_a within one heartbeat.
    assert failover.published >= fo.DEFAULTS.lease + fo.DEFAULTS.margin - fo.DEFAULTS.heartbeat, failover
    assert failover.first_ack <= BOUND, fo.describe(fo.DEFAULTS, failover)
    # Before the old primary could even be called dead (its last heartbeat came at most one interval
    # before the kill): waiting for dead_after as well as the lease was pure downtime.
    assert failover.first_ack < fo.DEFAULTS.dead_after - fo.DEFAULTS.heartbeat, fo.describe(
        fo.DEFAULTS, failover
    )
    contents = {f"{n} data file": read_data_file(fo.data_file(cluster, n), fo.BLOCKS) for n in (entry, other)}
    new_primary = cluster.node(failover.new_primary)
    contents["through the target"] = read_through_target(new_primary.url(fo.VOLUME), fo.BLOCKS)
    assert_nothing_lost(journal, contents, 21)
    cluster.node(primary).start()  # a clean exit at close
