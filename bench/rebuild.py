"""Full rebuild of a 1 GiB volume, and resync throughput (issue 8: goal under 10 s on /dev/shm).

    .venv/bin/python bench/rebuild.py [--size 1GiB] [--rate 0] [--rounds 1]

A master and three nodes (the integration tests' harness, data directories under /dev/shm, every
node started with ``--resync-rate RATE``; 0 is unlimited). A two-copy volume is filled with data
(``qemu-img bench -w -s 1M``, sequential), then its replica is killed for good: the master replaces
it on the third node, which starts all dirty, and the primary copies every region to it. Reported:
the primary's own ``resync done`` record (bytes copied, seconds from the plan to the durable flush)
and, from the outside, the time from the replacement being published to the copy back in the
in-sync set. Each round uses a fresh cluster. Loopback: every process shares the machine's cores.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparrow.sizes import parse_size
from tests.integration.cluster import Cluster
from tests.tools import run, wait_for

MIB = 1 << 20


def fill(url: str, size: int) -> float:
    """Write every byte of the volume once, 1 MiB at a time; MiB/s."""
    out = run(["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-c", str(size // MIB), "-d", "8",
               "-s", "1M", url], timeout=600).stdout  # fmt: skip
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise SystemExit(f"no time in qemu-img bench output:\n{out}")
    return size / MIB / float(m.group(1))


def one_round(size: int, rate: str) -> tuple[float, float, float]:
    """(copied MiB, seconds the primary took, seconds from replacement to in sync)."""
    root = Path(tempfile.mkdtemp(prefix="sparrow-rebuild-", dir="/dev/shm"))
    cluster = Cluster(root, 3, node_args=("--resync-rate", rate)).start()
    try:
        cluster.cli("volume", "create", "rb", "--size", str(size), "--replicas", "2")
        v = cluster.wait_converged("rb", epoch=1, copies=2)
        primary = v["primary"]["node_id"]
        (replica,) = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
        cluster.wait_serving(primary, v["volume_id"])
        mibs = fill(cluster.node(primary).url("rb"), size)
        print(f"  filled {size // MIB} MiB at {mibs:.0f} MiB/s", flush=True)
        cluster.node(replica).kill9()
        spare = next(n for n in ("n1", "n2", "n3") if n not in (primary, replica))

        def replaced() -> bool:
            ids = {r["node_id"] for r in cluster.volume("rb")["replicas"]}
            return spare in ids and replica not in ids

        wait_for(replaced, timeout=60, what="the replacement", interval=0.02)
        started = time.monotonic()

        def in_sync() -> bool:
            entry = next(r for r in cluster.volume("rb")["replicas"] if r["node_id"] == spare)
            return bool(entry["sync"] == "in_sync")

        wait_for(in_sync, timeout=600, what="the copy in sync", interval=0.05)
        outside = time.monotonic() - started
        (done,) = cluster.node(primary).events("resync done")
        cluster.node(replica).start()  # a clean exit at close
        return done["copied_bytes"] / MIB, float(done["seconds"]), outside
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rate", default="0", help="--resync-rate of every node (0: unlimited)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is missing: run `make apt-deps`")
    size = parse_size(args.size)
    times: list[float] = []
    for rnd in range(args.rounds):
        copied, seconds, outside = one_round(size, args.rate)
        times.append(outside)
        print(
            f"round {rnd + 1}: copied {copied:.0f} MiB in {seconds:.2f} s ({copied / seconds:.0f} MiB/s);"
            f" replacement published to in sync {outside:.2f} s",
            flush=True,
        )
    print(f"median replacement to in sync: {statistics.median(times):.2f} s (rate {args.rate})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
