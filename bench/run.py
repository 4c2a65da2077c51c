#!/usr/bin/env python3
"""Sparrow against tgt, same clients, one run, interleaved rounds; prints median ratios.

Both targets serve a same-size file in /dev/shm (tmpfs), so the disk is out of the picture and the
comparison measures the targets. Absolute figures on a shared 2-core machine swing by 2x between
runs; only the per-round ratios Sparrow/tgt are meaningful.

    python bench/run.py [--rounds 5] [--seconds 5] [--size 1GiB] [--only REGEX]

``--only QD1`` runs only the benchmarks whose name matches (re.search), e.g. the queue-depth-1 pair.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TGT_IQN = "iqn.2026-11.ref:tgt"
SPARROW_IQN = "iqn.2026-11.io.sparrow:bench"
#: tgtd's control socket number (-C); per process so that two runs never share one.
CONTROL_PORT = 1000 + os.getpid() % 30000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def run(cmd: list[str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@dataclass
class Target:
    name: str
    url: str
    stop: Callable[[], None]


def start_tgt(size: int, workdir: Path) -> Target:
    img = Path("/dev/shm/sparrow-bench-tgt.img")
    with img.open("wb") as f:
        f.truncate(size)
    port = free_port()
    proc = subprocess.Popen(
        ["tgtd", "-f", "--iscsi", f"portal=127.0.0.1:{port}", "-C", str(CONTROL_PORT)],
        stdout=(workdir / "tgtd.log").open("w"), stderr=subprocess.STDOUT,
    )
    wait_port(port)
    adm = ["tgtadm", "-C", str(CONTROL_PORT), "--lld", "iscsi"]
    run([*adm, "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN])
    run([*adm, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(img)])
    run([*adm, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"])

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        img.unlink(missing_ok=True)

    return Target("tgt", f"iscsi://127.0.0.1:{port}/{TGT_IQN}/1", stop)


def start_sparrow(size: int, workdir: Path, checkout: Path | None = None, name: str = "sparrow") -> Target:
    """``sparrow serve`` from this interpreter, or from ``checkout``'s own .venv (``--base``)."""
    data_dir = Path(tempfile.mkdtemp(prefix="sparrow-bench-", dir="/dev/shm"))
    iscsi, http = free_port(), free_port()
    python = sys.executable if checkout is None else str(checkout / ".venv" / "bin" / "python")
    sparrow = [python, "-m", "sparrow"]
    proc = subprocess.Popen(
        [*sparrow, "serve", "--data-dir", str(data_dir), "--iscsi", f"127.0.0.1:{iscsi}",
         "--http", f"127.0.0.1:{http}", "--log-format", "json", "--log-level", "warning"],
        stdout=(workdir / f"{name}.log").open("w"), stderr=subprocess.STDOUT, cwd=checkout,
    )
    wait_port(http)
    run([*sparrow, "volume", "create", "bench", "--size", str(size), "--api", f"http://127.0.0.1:{http}"])

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)

    return Target(name, f"iscsi://127.0.0.1:{iscsi}/{SPARROW_IQN}/0", stop)


def iscsi_perf(url: str, seconds: int, blocks: int, random: bool, depth: int = 32) -> float:
    cmd = ["iscsi-perf", "-m", str(depth), "-b", str(blocks), "-t", str(seconds)]
    if random:
        cmd.append("-r")
    out = run([*cmd, url], timeout=seconds + 60)
    found = re.findall(r"iops average (\d+)", out)
    if not found:
        raise SystemExit(f"no iops figure in iscsi-perf output:\n{out}")
    return float(found[-1])


def qemu_write(url: str, count: int, depth: int = 32) -> float:
    out = run(["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-c", str(count), "-d", str(depth),
               "-s", "4k", url], timeout=600)
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise SystemExit(f"no time in qemu-img bench output:\n{out}")
    return count / float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--writes", type=int, default=50000, help="4 KiB writes per qemu-img bench run")
    ap.add_argument("--writes-qd1", type=int, default=20000, help="4 KiB writes per QD1 qemu-img bench run")
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--only", metavar="REGEX", help="run only the benchmarks whose name matches")
    ap.add_argument("--base", type=Path, metavar="CHECKOUT",
                    help="also run `sparrow serve` from this checkout's .venv, as target `base`, "
                         "interleaved with the others (before/after in one run)")
    args = ap.parse_args()
    for tool in ("tgtd", "tgtadm", "iscsi-perf", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make apt-deps`")

    benches: dict[str, Callable[[str], float]] = {
        "4k random read QD32 (iscsi-perf -r), IOPS": lambda u: iscsi_perf(u, args.seconds, 8, True),
        "128k sequential read QD32 (iscsi-perf -b 256), IOPS": (
            lambda u: iscsi_perf(u, args.seconds, 256, False)
        ),
        "4k write QD32 (qemu-img bench -w), IOPS": lambda u: qemu_write(u, args.writes),
        "4k random read QD1 (iscsi-perf -m 1 -r), IOPS": lambda u: iscsi_perf(u, args.seconds, 8, True, 1),
        "4k write QD1 (qemu-img bench -w -d 1), IOPS": lambda u: qemu_write(u, args.writes_qd1, 1),
    }
    if args.only:
        benches = {name: fn for name, fn in benches.items() if re.search(args.only, name)}
        if not benches:
            raise SystemExit(f"no benchmark matches {args.only!r}")
    workdir = Path(tempfile.mkdtemp(prefix="sparrow-bench-logs-"))
    targets = [start_sparrow(args.size, workdir)]
    if args.base is not None:
        targets.append(start_sparrow(args.size, workdir, args.base.resolve(), "base"))
    targets.append(start_tgt(args.size, workdir))
    figures: dict[str, dict[str, list[float]]] = {b: {t.name: [] for t in targets} for b in benches}
    try:
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
            if rnd % 2:
                order.reverse()
            for bench, fn in benches.items():
                for t in order:
                    figures[bench][t.name].append(fn(t.url))
                print(f"round {rnd + 1}: {bench}: "
                      + ", ".join(f"{t.name} {figures[bench][t.name][-1]:.0f}" for t in targets), flush=True)
    finally:
        for t in targets:
            t.stop()
    print(f"\n{os.cpu_count()} CPUs; backing files in /dev/shm; {args.rounds} interleaved rounds")
    ours = [t.name for t in targets if t.name != "tgt"]
    print(f"{'benchmark':55} " + " ".join(f"{n:>9}" for n in [*ours, "tgt"])
          + " " + " ".join(f"{n + '/tgt':>12}" for n in ours) + "  (medians; ratio: median of rounds)")
    for bench in benches:
        t = figures[bench]["tgt"]
        medians = [statistics.median(figures[bench][n]) for n in [*ours, "tgt"]]
        ratios = [statistics.median(a / b for a, b in zip(figures[bench][n], t, strict=True)) for n in ours]
        print(f"{bench:55} " + " ".join(f"{m:9.0f}" for m in medians) + " "
              + " ".join(f"{r:12.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
