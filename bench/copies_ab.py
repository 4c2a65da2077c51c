"""A/B of the three-copy write path: this checkout's cluster against another tree's, side by side.

    .venv/bin/python bench/copies_ab.py --base-tree DIR [--pairs 8] [--writes 20000]

Two clusters (a master and three nodes each, the integration tests' harness, data in /dev/shm)
run at once, one from this checkout and one from DIR (a tree of the base revision, e.g. unpacked
with ``git archive REV | tar -x -C DIR``; copy this checkout's compiled ``frontend`` extensions
and ``frontend/_compiled.json`` into it when the compiled modules did not change, so both run
the same build). Each has one three-copy volume; each pair of rounds runs ``qemu-img bench -w -d
32 -s 4k`` against one then the other (the order alternates), so both see the same machine. Per
round it prints IOPS and CPU time per write of the primary, each replica and the client (from
/proc and RUSAGE_CHILDREN); at the end the medians, and the median over pairs of change/base of
the primary's CPU per write. On a shared machine only the paired figures mean much.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.copies import cpu_seconds
from bench.run import qemu_write
from tests.integration.cluster import Cluster

HERE = Path(__file__).resolve().parent.parent


def start(tree: Path, root: Path) -> tuple[Cluster, str, dict[str, int], str]:
    """A cluster whose daemons run ``tree``'s code (``python -m sparrow`` from it), its volume's URL,
    the node pids by role and the primary's node id."""
    here = os.getcwd()
    os.chdir(tree)
    try:
        cluster = Cluster(root, 3).start()
        cluster.cli("volume", "create", "v", "--size", "256MiB", "--replicas", "3")
        v = cluster.wait_converged("v", epoch=1, copies=3)
        primary = v["primary"]["node_id"]
        cluster.wait_serving(primary, v["volume_id"])
    finally:
        os.chdir(here)
    pids = {r["node_id"]: cluster.node(r["node_id"]).proc.pid for r in v["replicas"]}  # type: ignore[union-attr]
    return cluster, cluster.node(primary).url("v"), pids, primary


def round_(url: str, pids: dict[str, int], primary: str, writes: int) -> dict[str, float]:
    before = {n: cpu_seconds(p) for n, p in pids.items()}
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    iops = qemu_write(url, writes)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"iops": iops, "client": (c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime) / writes * 1e6}
    replicas = []
    for n, p in pids.items():
        per = (cpu_seconds(p) - before[n]) / writes * 1e6
        if n == primary:
            out["primary"] = per
        else:
            replicas.append(per)
    out["replica"] = statistics.mean(replicas)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-tree", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--writes", type=int, default=20000)
    args = ap.parse_args()
    roots = [Path(tempfile.mkdtemp(prefix=f"sparrow-ab-{n}-", dir="/dev/shm")) for n in ("base", "this")]
    clusters: list[Cluster] = []
    try:
        sides = {}
        for name, tree, root in (("base", args.base_tree.resolve(), roots[0]), ("this", HERE, roots[1])):
            cluster, url, pids, primary = start(tree, root)
            clusters.append(cluster)
            qemu_write(url, 5000)  # streams open, regions marked
            sides[name] = (url, pids, primary)
        results: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
        for i in range(args.pairs):
            order = ("base", "this") if i % 2 == 0 else ("this", "base")
            for name in order:
                r = round_(*sides[name], args.writes)
                results[name].append(r)
                print(
                    f"pair {i + 1} {name:4}: {r['iops']:6.0f} IOPS, us/write: primary {r['primary']:5.1f},"
                    f" replica {r['replica']:5.1f}, client {r['client']:5.1f}"
                    f"  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        for name, rs in results.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(
                f"{name} medians: {med['iops']:.0f} IOPS, us/write: primary {med['primary']:.1f},"
                f" replica {med['replica']:.1f}, client {med['client']:.1f}"
            )
        for key in ("primary", "replica", "iops"):
            ratios = [t[key] / b[key] for t, b in zip(results["this"], results["base"], strict=True)]
            print(
                f"this/base {key}: median {statistics.median(ratios):.2f}"
                f" (pairs {min(ratios):.2f}-{max(ratios):.2f})"
            )
    finally:
        for cluster in clusters:
            cluster.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
