"""Failover time against the heartbeat and lease settings (issue 8, docs/performance.md "Failover").

    .venv/bin/python bench/failover.py [--rounds 3] [--timing HEARTBEAT,LEASE,MARGIN,DEAD_AFTER ...]

Per round a fresh master and three nodes (the integration tests' harness, data directories under
/dev/shm), a volume with three copies, the gate writer (16 writes in flight) logged in at a
replica's portal; kill -9 of the primary; the time from the kill to the first write acknowledged by
the new primary, and to the master's publish of the new epoch (tests/integration/failover.py).
Prints each round and, per setting, the median, min and max. The fence margin is 0.5 s throughout.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.integration import failover as fo
from tests.integration.cluster import Cluster, Timing
from tests.integration.gate import Writer

SETTINGS = ("1,5,1,8", "0.5,3,0.5,4", "0.25,2,0.5,3.5")


def parse(text: str) -> Timing:
    heartbeat, lease, margin, dead_after = (float(x) for x in text.split(","))
    return Timing(heartbeat=heartbeat, lease=lease, dead_after=dead_after, margin=margin, fence_margin=0.5)


def one_round(timing: Timing, run_id: int) -> fo.Failover:
    root = Path(tempfile.mkdtemp(prefix="sparrow-failover-", dir="/dev/shm"))
    cluster = Cluster(root, 3, timing).start()
    try:
        _, _, entry, _ = fo.three_copies(cluster)
        writer = Writer(cluster.node(entry).url(fo.VOLUME), run_id=run_id, blocks=fo.BLOCKS, depth=16)
        try:
            writer.wait_acked(300)
            return fo.kill_primary(cluster, writer)
        finally:
            writer.kill()
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timing", nargs="*", default=list(SETTINGS), help="HEARTBEAT,LEASE,MARGIN,DEAD_AFTER")
    args = ap.parse_args()
    rows = []
    for text in args.timing:
        timing = parse(text)
        runs = []
        for rnd in range(args.rounds):
            f = one_round(timing, run_id=100 + rnd)
            runs.append(f)
            print(f"{text} round {rnd + 1}: {fo.describe(timing, f)}", flush=True)
        acks = [f.first_ack for f in runs]
        published = statistics.median(f.published for f in runs)
        rows.append((timing, statistics.median(acks), min(acks), max(acks), published))
    print(
        "\n| heartbeat | lease | margin | dead after | kill -> first ack (median, min-max) | -> new epoch |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for t, median, low, high, published in rows:
        print(
            f"| {t.heartbeat} s | {t.lease} s | {t.margin} s | {t.dead_after} s |"
            f" {median:.2f} s ({low:.2f}-{high:.2f}) | {published:.2f} s |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
