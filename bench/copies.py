"""4 KiB write IOPS at QD32 of a three-copy volume against a one-copy volume (issue 8).

    .venv/bin/python bench/copies.py [--rounds 5] [--writes 20000]

A master and three nodes (the integration tests' harness, data directories under /dev/shm), one
volume with ``--replicas 1`` and one with ``--replicas 3`` in the same cluster; each round runs
``qemu-img bench -w -d 32 -s 4k`` against each, alternating which goes first, and prints three/one
per round and the median. Loopback: every copy shares the machine's cores.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import qemu_write
from tests.integration.cluster import Cluster


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--writes", type=int, default=20000, help="4 KiB writes per qemu-img bench run")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sparrow-copies-", dir="/dev/shm"))
    cluster = Cluster(root, 3).start()
    try:
        urls: dict[str, str] = {}
        for name, copies in (("one", 1), ("three", 3)):
            cluster.cli("volume", "create", name, "--size", "256MiB", "--replicas", str(copies))
            v = cluster.wait_converged(name, epoch=1, copies=copies)
            primary = v["primary"]["node_id"]
            cluster.wait_serving(primary, v["volume_id"])
            urls[name] = cluster.node(primary).url(name)
        ratios: list[float] = []
        for rnd in range(args.rounds):
            order = ("one", "three") if rnd % 2 == 0 else ("three", "one")
            iops = {name: qemu_write(urls[name], args.writes) for name in order}
            ratios.append(iops["three"] / iops["one"])
            print(
                f"round {rnd + 1}: one copy {iops['one']:.0f} IOPS, three copies {iops['three']:.0f} IOPS,"
                f" ratio {ratios[-1]:.2f}",
                flush=True,
            )
        print(f"median three/one: {statistics.median(ratios):.2f}")
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
