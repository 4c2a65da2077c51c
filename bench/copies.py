"""4 KiB write IOPS at QD32 of a three-copy volume against a one-copy volume (issue 8).

    .venv/bin/python bench/copies.py [--rounds 5] [--writes 20000] [--profile DIR] [--depths 1,8,32,128]

A master and three nodes (the integration tests' harness, data directories under /dev/shm), one
volume with ``--replicas 1`` and one with ``--replicas 3`` in the same cluster; each round runs
``qemu-img bench -w -d 32 -s 4k`` against each, alternating which goes first, and prints three/one
per round and the median. Loopback: every copy shares the machine's cores.

``--profile DIR`` then runs one more bench of each volume while ``py-spy record --gil``
(``pip install py-spy``; needs ptrace rights) samples the one-copy node, then the three-copy
primary and both replicas, and writes each one's collapsed stacks to ``DIR/<role>-<node>.txt``;
it prints per process the CPU time per write and the read/write syscalls per write (/proc), the
client's (qemu-img's) CPU time per write, and a summary of the samples (own time by function,
time under each function).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import qemu_write
from tests.integration.cluster import Cluster


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--writes", type=int, default=20000, help="4 KiB writes per qemu-img bench run")
    ap.add_argument("--profile", type=Path, help="py-spy the three processes of a three-copy run into DIR")
    ap.add_argument(
        "--depths",
        type=lambda v: [int(d) for d in v.split(",")],
        default=[32],
        help="queue depths to run in each round, comma-separated (default 32; e.g. 1,8,32,128)",
    )
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
        ratios: dict[int, list[float]] = {depth: [] for depth in args.depths}

        def at(depth: int) -> str:  # the default run prints as it always did
            return "" if args.depths == [32] else f" at QD{depth}"

        for rnd in range(args.rounds):
            order = ("one", "three") if rnd % 2 == 0 else ("three", "one")
            for depth in args.depths:
                count = args.writes if depth > 1 else max(1, args.writes // 4)
                iops = {name: qemu_write(urls[name], count, depth) for name in order}
                ratios[depth].append(iops["three"] / iops["one"])
                print(
                    f"round {rnd + 1}{at(depth)}: one copy {iops['one']:.0f} IOPS,"
                    f" three copies {iops['three']:.0f} IOPS, ratio {ratios[depth][-1]:.2f}",
                    flush=True,
                )
        for depth, found in ratios.items():
            if found:
                print(f"median three/one{at(depth)}: {statistics.median(found):.2f}")
        if args.profile is not None:
            one = cluster.inspect("one")["primary"]["node_id"]
            print("one copy:")
            profile(cluster, {one: "one"}, urls["one"], args.writes, args.profile)
            three = cluster.inspect("three")
            primary = three["primary"]["node_id"]
            roles = {primary: "primary"} | {
                r["node_id"]: "replica" for r in three["replicas"] if r["node_id"] != primary
            }
            print("three copies:")
            profile(cluster, roles, urls["three"], args.writes, args.profile)
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def io_calls(pid: int) -> tuple[int, int]:
    """(read, write) syscalls so far (/proc/PID/io: socket and file I/O alike)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


def profile(cluster: Cluster, roles: dict[str, str], url: str, writes: int, out: Path) -> None:
    """One more three-copy run with py-spy on each node (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    pids = {node: cluster.node(node).proc.pid for node in roles}  # type: ignore[union-attr]
    spy = str(Path(sys.executable).parent / "py-spy")
    spies = {
        node: subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--gil", "--nonblocking",
             "--output", str(out / f"{roles[node]}-{node}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for node, pid in pids.items()
    }  # fmt: skip
    time.sleep(1.0)  # py-spy attaches
    cpu = {node: cpu_seconds(pid) for node, pid in pids.items()}
    calls = {node: io_calls(pid) for node, pid in pids.items()}
    started = time.monotonic()
    client = resource.getrusage(resource.RUSAGE_CHILDREN)
    iops = qemu_write(url, writes)
    wall = time.monotonic() - started
    after_client = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after_client.ru_utime - client.ru_utime) + (after_client.ru_stime - client.ru_stime)
    cpu = {node: cpu_seconds(pid) - cpu[node] for node, pid in pids.items()}
    after = {node: io_calls(pid) for node, pid in pids.items()}
    calls = {node: (after[node][0] - calls[node][0], after[node][1] - calls[node][1]) for node in pids}
    for spy in spies.values():
        spy.send_signal(2)
    for spy in spies.values():
        spy.wait(timeout=60)
    print(f"profiled run: {iops:.0f} IOPS, {wall:.1f}s")
    print(f"client (qemu-img): {client_cpu:.2f} CPU s, {client_cpu / writes * 1e6:.1f} us/write")
    for node, role in roles.items():
        per_op = cpu[node] / writes * 1e6
        reads, written = (n / writes for n in calls[node])
        print(
            f"{role} {node}: {cpu[node]:.2f} CPU s ({cpu[node] / wall:.0%} of a core), {per_op:.1f} us/write,"
            f" syscalls per write: {reads:.2f} reads, {written:.2f} writes"
        )
        summarize(out / f"{role}-{node}.txt")


#: Where a sample's time goes: the first of these functions found from the innermost frame out.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("local store write", ("FileBlockStore.", "MemoryBlockStore.")),
    ("socket sends (replication records, ACKs)",
     ("StreamWriter.write", "ReplicaConnection._write", "ChannelLink.send")),
    ("channel seal/open (AES-256-GCM)", ("Channel.",)),
    ("replication codec (PrimaryStream, ReplicaStream)", ("replication/protocol.py",)),
    ("replica apply loop", ("ReplicaConnection._apply", "ReplicaConnection._contiguous")),
    ("replica receive (data_received)", ("ReplicaConnection.",)),
    ("forward log, waiters, ACK matching (ReplicatedStore)", ("ReplicatedStore.",)),
    ("replication link (ChannelLink)", ("ChannelLink.",)),
    ("iSCSI send (responses)", ("IscsiProtocol._flush",)),
    ("iSCSI + SCSI (frontend, LU)", ("IscsiProtocol.", "Connection.", "LogicalUnit.", "BlockIo")),
    ("heartbeat, convergence", ("Heartbeat", "Convergence", "Adapter")),
)  # fmt: skip


def summarize(path: Path, top: int = 12) -> None:
    """Own time by function and a breakdown by :data:`BUCKETS`, from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        print(f"  (no profile in {path})")
        return
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")  # "function (path:line)"
        total += n
        own[frames[-1].split(":")[0]] += n
        label = next(
            (label for f in reversed(frames) for label, names in BUCKETS if any(x in f for x in names)),
            "other (event loop, asyncio)",
        )
        buckets[label] += n
    if not total:
        print("  (no samples)")
        return
    print(f"  {total} samples holding the GIL; by part:")
    for name, n in buckets.most_common():
        print(f"    {n / total:6.1%}  {name}")
    print("  own time by function:")
    for name, n in own.most_common(top):
        print(f"    {n / total:6.1%}  {name}")


if __name__ == "__main__":
    raise SystemExit(main())
