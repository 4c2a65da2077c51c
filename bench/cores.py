#!/usr/bin/env python3
"""Issue 9, "use both cores where it pays": would moving work off the event loop help on this machine?

Three experiments, each printing its figures (docs/performance.md, "Both cores", has the results):

    .venv/bin/python bench/cores.py digest [--repeat 3]
        CRC32C (the crc32c C library) per 4 KiB and 128 KiB; whether it releases the GIL (two threads
        against one); the event loop's CPU per 128 KiB digest inline against handing it to a thread
        (run_in_executor, 32 in flight as at QD32); and the core path's CPU per READ/WRITE(10) of
        4 KiB and 128 KiB with HeaderDigest and DataDigest CRC32C against none (no sockets).
    .venv/bin/python bench/cores.py hdigest [--rounds 3] [--count 40000]
        One `sparrow serve` (volume in /dev/shm), qemu-img bench at QD32 (4 KiB writes, 128 KiB reads
        and writes) with qemu's iSCSI header-digest=crc32c against none, alternating; IOPS and the
        daemon's CPU per command from /proc/PID/stat. No client here can ask for DataDigest: libiscsi
        always offers DataDigest=None (and iscsi-perf overrides a header_digest URL argument).
    .venv/bin/python bench/cores.py disk [--rounds 3] [--seconds 5] [--dir /var/tmp]
        `sparrow serve` with its volume file on this machine's disk (1 GiB written with real data),
        the page cache dropped before every run (echo 3 > /proc/sys/vm/drop_caches: root), iscsi-perf
        4 KiB random reads at QD32, one daemon per I/O mode, alternating: `nowait` (what the store
        picks on a disk: preadv2(RWF_NOWAIT) inline, the pool on a miss), `inline` (every pread on the
        event loop, blocking on a miss), `pool` (every read on the thread pool), and `nowait` with a
        32-thread pool instead of IO_THREADS. The modes are forced by a wrapper around the daemon
        (``WRAPPER``), not by a switch in the store; ``nowait-executor`` and ``pool-executor`` hand
        results back through run_in_executor (SPARROW_IO_BATCHED=0) instead of store/iopool.py.
        ``--perf DIR`` records each run with perf -g; ``--writes N`` runs N 4 KiB writes at QD32
        (qemu-img bench) instead of the reads.
    .venv/bin/python bench/cores.py rawdisk [--rounds 2] [--seconds 3] [--dir /var/tmp]
        The same disk without Sparrow: cold 4 KiB random preads from 1, 2, 8 and 32 threads.
    .venv/bin/python bench/cores.py sends [--rounds 3] [--writes 20000]
        A one-copy and a three-copy volume (master + three nodes, /dev/shm), 4 KiB writes QD32, the
        primary under `perf record -g`: its CPU per write and the share under socket-send syscalls.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import free_port, iscsi_perf, qemu_write, run, wait_port

IQN = "iqn.2026-11.io.sparrow:bench"
TICK = os.sysconf("SC_CLK_TCK")


# --- digest --------------------------------------------------------------------------------------


def per_call_us(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def gil_scaling(fn: Callable[[], object], n: int) -> float:
    """Wall time of 2n calls on two threads against n on one: 1.0 if they ran in parallel, 2.0 if
    the GIL (or a busy machine) serialised them."""

    def work() -> None:
        for _ in range(n):
            fn()

    t0 = time.perf_counter()
    work()
    one = time.perf_counter() - t0
    threads = [threading.Thread(target=work) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) / one


async def loop_cpu_per_digest(data: bytes, n: int, offload: bool, depth: int = 32) -> tuple[float, float]:
    """(event-loop thread CPU us, wall us) per digest: inline, or run_in_executor with ``depth`` in
    flight (the hand-off a threaded digest would add per PDU)."""
    import crc32c

    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    fn = crc32c.crc32c
    c0, t0 = time.thread_time(), time.perf_counter()
    if offload:
        for _ in range(n // depth):
            await asyncio.gather(*(loop.run_in_executor(pool, fn, data) for _ in range(depth)))
    else:
        for _ in range(n // depth):
            for _ in range(depth):
                fn(data)
            await asyncio.sleep(0)
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    pool.shutdown()
    done = n // depth * depth
    return cpu / done * 1e6, wall / done * 1e6


async def core_path_us(size: int, write: bool, digests: bool, n: int, fast: bool = True) -> float:
    """CPU us per READ/WRITE(10) of ``size`` bytes through Connection + LogicalUnit + tmpfs store,
    with HeaderDigest/DataDigest CRC32C on or off (as bench/corepath.py, digests parameterised);
    ``fast`` False forces the general path (the fast path takes digest connections too)."""
    from bench import corepath
    from frontend.iscsi.connection import Connection, LoggedIn
    from frontend.iscsi.pdu import LoginRequest, ScsiCommand, encode_bytes
    from frontend.iscsi.session import SessionTable
    from frontend.scsi.lu import LogicalUnit, LuIdentity
    from frontend.target import Target, TargetRegistry, TargetSettings
    from store.blockstore import FileBlockStore

    path = os.path.join(tempfile.mkdtemp(dir="/dev/shm"), "core.img")
    store = await FileBlockStore.open(path, block_size=512, size=1 << 30, create=True)
    try:
        lu = LogicalUnit(store, LuIdentity("core", "CORE0001", bytes.fromhex("6" + "0" * 31)))
        registry = TargetRegistry()
        registry.add(Target(IQN, "core", lu))
        settings = TargetSettings(nop_interval=0, first_burst_length=262144)
        conn = Connection(settings, registry, SessionTable(), now=0.0, fast_path=fast)
        d = "CRC32C" if digests else "None"
        keys = {"InitiatorName": "iqn.2026-11.test:bench", "TargetName": IQN, "SessionType": "Normal",
                "HeaderDigest": d, "DataDigest": d, "ImmediateData": "Yes", "InitialR2T": "No",
                "MaxRecvDataSegmentLength": "262144", "FirstBurstLength": "262144",
                "MaxBurstLength": "262144"}
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        conn.receive_data(encode_bytes(LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000001, 0, 1, 0, 0, 0,
                                                    text)), 0.0)
        while (ev := conn.next_event()) is not None:
            assert isinstance(ev, LoggedIn), ev
        conn.data_to_send()
        blocks, batch = size // 512, 32
        payload = os.urandom(size)
        chunks = []
        for b in range(n // batch):
            pdus = []
            for i in range(b * batch, (b + 1) * batch):
                cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, (i * blocks) % (1 << 21), 0, blocks,
                                  0).ljust(16, b"\0")
                cmd = ScsiCommand(False, True, not write, write, 1, 0, 100 + i, size, i, 0, cdb,
                                  payload if write else b"")
                pdus.append(encode_bytes(cmd, header_digest=digests, data_digest=digests))
            chunks.append(b"".join(pdus))
        return await corepath.time_chunks(conn, chunks, batch)
    finally:
        await store.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def digest(args: argparse.Namespace) -> None:
    import crc32c

    print(f"crc32c {crc32c.__version__}, hardware_based={crc32c.hardware_based}")
    for size in (4096, 131072):
        data = os.urandom(size)
        us = min(per_call_us(functools.partial(crc32c.crc32c, data), 20000 if size == 4096 else 2000)
                 for _ in range(args.repeat))
        print(f"crc32c {size // 1024:3} KiB: {us:6.2f} us per call ({size / us / 1e3:.1f} GB/s)")
    big = os.urandom(131072)
    for label, fn in (("crc32c (default: releases the GIL from 32 KiB)", lambda: crc32c.crc32c(big)),
                      ("crc32c gil_release_mode=0 (holds it)", lambda: crc32c.crc32c(big, 0, 0)),
                      ("hashlib.sha256 (releases it), control", lambda: hashlib.sha256(big).digest())):
        scaling = min(gil_scaling(fn, 3000 if "sha" not in label else 300) for _ in range(args.repeat))
        print(f"two threads / one thread, wall, 128 KiB {label}: {scaling:.2f} "
              "(1.0 = parallel, 2.0 = serialised)")
    for offload in (False, True):
        best = min((asyncio.run(loop_cpu_per_digest(big, 32000, offload)) for _ in range(args.repeat)),
                   key=lambda r: r[0])
        print(f"128 KiB digest {'in a thread pool' if offload else 'inline':16}: event-loop CPU "
              f"{best[0]:6.2f} us, wall {best[1]:6.2f} us per digest")
    for size, n in ((4096, 32000), (131072, 3200)):
        for write in (False, True):
            cells = [min(asyncio.run(core_path_us(size, write, dig, n, fast)) for _ in range(args.repeat))
                     for dig, fast in ((False, True), (True, True), (False, False), (True, False))]
            print(f"core path {'WRITE' if write else 'READ'}(10) {size // 1024:3} KiB: fast path: no "
                  f"digests {cells[0]:6.1f} us, CRC32C header+data {cells[1]:6.1f} us; general path: no "
                  f"digests {cells[2]:6.1f} us, CRC32C header+data {cells[3]:6.1f} us per command")


# --- daemons -------------------------------------------------------------------------------------

#: Run as ``python -c WRAPPER serve ...``: forces the store's I/O mode (CORES_IO_MODE) and pool size
#: (CORES_IO_THREADS) before the daemon starts. Bench only; the store has no such switch.
WRAPPER = """
import concurrent.futures, os, sys
import store.blockstore as b
threads = int(os.environ.get("CORES_IO_THREADS", "0"))
if threads:
    b._EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sparrow-io")
    b._POOL = b.IoPool(threads)
mode = os.environ.get("CORES_IO_MODE", "")
if mode:
    forced = {"inline": b.IoPath.MEMORY, "pool": b.IoPath.POOL, "nowait": b.IoPath.NOWAIT}[mode]
    b._choose_io_path = lambda fd: forced
sys.argv[0] = "sparrow"
from sparrow.cli import main
sys.exit(main())
"""


@dataclass
class Daemon:
    name: str
    url: str
    pid: int
    data: Path

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK


@contextmanager
def daemon(name: str, data_root: str, size: int, env: dict[str, str]) -> Iterator[Daemon]:
    data = Path(tempfile.mkdtemp(prefix=f"sparrow-cores-{name}-", dir=data_root))
    iscsi, http = free_port(), free_port()
    log = (Path(tempfile.gettempdir()) / f"sparrow-cores-{name}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "serve", "--data-dir", str(data), "--iscsi", f"127.0.0.1:{iscsi}",
         "--http", f"127.0.0.1:{http}", "--log-format", "json", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
    )
    try:
        wait_port(http, 30)
        run([sys.executable, "-m", "sparrow", "volume", "create", "bench", "--size", str(size),
             "--api", f"http://127.0.0.1:{http}"])
        yield Daemon(name, f"iscsi://127.0.0.1:{iscsi}/{IQN}/0", proc.pid, data)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data, ignore_errors=True)


def qemu_bench(url: str, count: int, size: str, write: bool, header_digest: str) -> float:
    """IOPS of ``qemu-img bench`` at QD32 through qemu's iSCSI driver with its header-digest option
    (iscsi-perf's URL argument is overridden by iscsi-perf itself: it always offers None,CRC32C)."""
    m = re.match(r"iscsi://([^/]+)/([^/]+)/(\d+)$", url)
    assert m, url
    spec = {"driver": "raw", "file": {"driver": "iscsi", "transport": "tcp", "portal": m[1], "target": m[2],
                                      "lun": int(m[3]), "header-digest": header_digest}}
    out = run(["qemu-img", "bench", "-f", "raw", "-t", "none", *(["-w"] if write else []), "-c", str(count),
               "-d", "32", "-s", size, "json:" + json.dumps(spec)], timeout=600)
    found = re.search(r"Run completed in ([\d.]+) seconds", out)
    assert found, out
    return count / float(found[1])


def hdigest(args: argparse.Namespace) -> None:
    benches = {"4k write QD32": (args.count, "4k", True), "128k read QD32": (args.count // 8, "128k", False),
               "128k write QD32": (args.count // 8, "128k", True)}
    ratios: dict[str, list[float]] = {b: [] for b in benches}
    with daemon("hdigest", "/dev/shm", 1 << 30, {}) as d:
        for rnd in range(args.rounds):
            for name, (count, size, write) in benches.items():
                got = {}
                for dig in (("none", "crc32c") if rnd % 2 == 0 else ("crc32c", "none")):
                    c0 = d.cpu()
                    iops = qemu_bench(d.url, count, size, write, dig)
                    got[dig] = (iops, (d.cpu() - c0) / count * 1e6)
                ratios[name].append(got["crc32c"][0] / got["none"][0])
                (a, ca), (b, cb) = got["none"], got["crc32c"]
                print(f"round {rnd + 1}: {name}: no digest {a:.0f} IOPS ({ca:.1f} us CPU/cmd), "
                      f"header digest {b:.0f} IOPS ({cb:.1f} us CPU/cmd)", flush=True)
    for name, rs in ratios.items():
        print(f"{name:16} header digest / none, median of rounds {statistics.median(rs):.2f}")


def fill(d: Daemon, size: int) -> None:
    """Write real blocks into the volume's file (a hole or an unwritten extent reads without I/O)."""
    files = [p for p in d.data.rglob("*") if p.is_file() and p.stat().st_size == size]
    assert len(files) == 1, files
    run(["dd", "if=/dev/urandom", f"of={files[0]}", "bs=1M", f"count={size >> 20}", "conv=notrunc,fsync",
         "status=none"])


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk(args: argparse.Namespace) -> None:
    size = args.size
    every = {"nowait": {"CORES_IO_MODE": "nowait"},
             "nowait-executor": {"CORES_IO_MODE": "nowait", "SPARROW_IO_BATCHED": "0"},
             "inline": {"CORES_IO_MODE": "inline"},
             "pool": {"CORES_IO_MODE": "pool"},
             "pool-executor": {"CORES_IO_MODE": "pool", "SPARROW_IO_BATCHED": "0"},
             "nowait-32threads": {"CORES_IO_MODE": "nowait", "CORES_IO_THREADS": "32"},
             "nowait-8threads": {"CORES_IO_MODE": "nowait", "CORES_IO_THREADS": "8"}}
    modes = {m: every[m] for m in args.modes.split(",")}
    from store.blockstore import IO_THREADS

    print(f"I/O pool threads (IO_THREADS): {IO_THREADS}; volume {size >> 20} MiB under {args.dir}")
    figures: dict[str, list[float]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        ds = {m: stack.enter_context(daemon(m, args.dir, size, env)) for m, env in modes.items()}
        for d in ds.values():
            fill(d, size)
        names = list(modes)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for m in order:
                drop_caches()
                d = ds[m]
                perf = None
                if args.perf is not None:
                    args.perf.mkdir(parents=True, exist_ok=True)
                    perf = subprocess.Popen(["perf", "record", "-q", "-g", "-p", str(d.pid), "-o",
                                             str(args.perf / f"{m}-{rnd + 1}.data")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(0.5)  # perf attaches
                c0, t0 = d.cpu(), time.monotonic()
                if args.writes:
                    iops = qemu_write(d.url, args.writes)
                else:
                    iops = iscsi_perf(d.url, args.seconds, 8, True)
                if perf is not None:
                    perf.send_signal(signal.SIGINT)
                    perf.wait(60)
                figures[m].append(iops)
                busy = (d.cpu() - c0) / (time.monotonic() - t0) * 100
                print(f"round {rnd + 1}: {m:17} {iops:8.0f} IOPS, {busy:5.1f} % of a core", flush=True)
    base = figures["nowait"]
    for m, fs in figures.items():
        ratio = statistics.median(a / b for a, b in zip(fs, base, strict=True))
        print(f"{m:17} median {statistics.median(fs):8.0f} IOPS, /nowait median of rounds {ratio:.2f}")


def rawdisk(args: argparse.Namespace) -> None:
    """The disk alone: 4 KiB random preads of a 1 GiB file of real data, cold cache, from 1, 2, 8 and
    32 Python threads (os.pread releases the GIL), no event loop: the device's latency and how far
    it scales with depth."""
    path = Path(tempfile.mkdtemp(prefix="sparrow-cores-raw-", dir=args.dir)) / "raw.img"
    try:
        run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={args.size >> 20}", "conv=fsync",
             "status=none"])
        fd = os.open(path, os.O_RDONLY)
        blocks = args.size // 4096
        for threads in (1, 2, 8, 32) * args.rounds:
            drop_caches()
            counts = [0] * threads
            stop = time.monotonic() + args.seconds

            def work(i: int, counts: list[int] = counts, stop: float = stop) -> None:
                rnd = random.Random(i)
                while time.monotonic() < stop:
                    os.pread(fd, 4096, rnd.randrange(blocks) * 4096)
                    counts[i] += 1

            pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            iops = sum(counts) / args.seconds
            print(f"{threads:2} threads: {iops:8.0f} IOPS ({threads / iops * 1e6:6.0f} us per read at that "
                  "depth)", flush=True)
        os.close(fd)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


#: The kernel's TCP send, whatever syscall uvloop used (write, writev, sendmsg); on loopback it includes
#: delivering to the receiving socket, which the kernel does in the sender's context.
SEND_SYMBOLS = ("tcp_sendmsg",)


def perf_shares(data: Path, symbols: tuple[str, ...]) -> dict[str, float]:
    """Inclusive share of the samples under each kernel symbol (perf report --children)."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--children", "--sort", "sym", "--stdio", "-g",
                          "none"], capture_output=True, text=True, check=True).stdout
    shares = dict.fromkeys(symbols, 0.0)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in shares and parts[0].endswith("%"):
            shares[parts[-1]] = float(parts[0].rstrip("%"))
    return shares


def sends(args: argparse.Namespace) -> None:
    """A master and three nodes (the integration harness, /dev/shm), a one-copy and a three-copy volume;
    per round, qemu-img bench 4 KiB writes QD32 against each under ``perf record -g`` of its primary:
    CPU per write and how much of it is under the socket-send syscalls (inclusive: on loopback the
    kernel delivers to the receiving socket in the sender's context)."""
    from tests.integration.cluster import Cluster

    root = Path(tempfile.mkdtemp(prefix="sparrow-cores-sends-", dir="/dev/shm"))
    cluster = Cluster(root, 3).start()
    try:
        targets: dict[str, tuple[str, int]] = {}
        for name, copies in (("one", 1), ("three", 3)):
            cluster.cli("volume", "create", name, "--size", "256MiB", "--replicas", str(copies))
            v = cluster.wait_converged(name, epoch=1, copies=copies)
            primary = v["primary"]["node_id"]
            cluster.wait_serving(primary, v["volume_id"])
            node = cluster.node(primary)
            targets[name] = (node.url(name), node.proc.pid)  # type: ignore[union-attr]
        for rnd in range(args.rounds):
            for name in (("one", "three") if rnd % 2 == 0 else ("three", "one")):
                url, pid = targets[name]
                data = root / f"perf-{name}-{rnd}.data"
                perf = subprocess.Popen(["perf", "record", "-q", "-g", "-p", str(pid), "-o", str(data)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)  # perf attaches
                c0 = Daemon(name, url, pid, root).cpu()
                iops = qemu_write(url, args.writes)
                cpu = Daemon(name, url, pid, root).cpu() - c0
                perf.send_signal(signal.SIGINT)
                perf.wait(60)
                shares = perf_shares(data, SEND_SYMBOLS)
                per_write = cpu / args.writes * 1e6
                send = sum(shares.values())
                label = "one copy" if name == "one" else "three copies"
                print(f"round {rnd + 1}: {label}: {iops:.0f} IOPS, primary {per_write:.1f} us CPU per write, "
                      f"{send:.1f} % of its samples under tcp_sendmsg "
                      f"(~{per_write * send / 100:.1f} us per write)", flush=True)
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("digest")
    p.add_argument("--repeat", type=int, default=3)
    p = sub.add_parser("hdigest")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=40000, help="4 KiB writes per run (128 KiB: an eighth)")
    p = sub.add_parser("disk")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--dir", default="/var/tmp", help="a directory on a disk (not tmpfs)")
    p.add_argument("--size", type=int, default=1 << 30)
    p.add_argument("--perf", type=Path, help="perf record -g each run into DIR/<mode>-<round>.data")
    p.add_argument("--writes", type=int, default=0,
                   help="instead of reads: N 4 KiB writes QD32 (qemu-img bench)")
    p.add_argument("--modes", default="nowait,nowait-executor,inline,nowait-8threads",
                   help="comma-separated, nowait first: nowait, nowait-executor, inline, pool, "
                   "pool-executor, nowait-8threads, nowait-32threads")
    p = sub.add_parser("rawdisk")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--dir", default="/var/tmp", help="a directory on a disk (not tmpfs)")
    p.add_argument("--size", type=int, default=1 << 30)
    p = sub.add_parser("sends")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--writes", type=int, default=20000)
    args = ap.parse_args()
    {"digest": digest, "hdigest": hdigest, "disk": disk, "rawdisk": rawdisk, "sends": sends}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
