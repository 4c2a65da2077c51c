#!/usr/bin/env python3
"""The fast path against the general path: two `sparrow serve` processes side by side, one with
SPARROW_FAST_PATH=0, the same clients against each in alternating order; prints fast/general per
round and the medians. Both serve a 1 GiB volume from /dev/shm.

    .venv/bin/python bench/fastpath_ab.py [--rounds 3] [--seconds 3] [--writes 30000] [--pure]

With ``--pure`` it compares the compiled build against SPARROW_PURE_PYTHON=1 instead (both with the
fast path; frontend/build.py), printing compiled/pure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import Target, iscsi_perf, qemu_write, start_sparrow


def start(variable: str, value: str, workdir: Path) -> Target:
    os.environ[variable] = value
    try:
        return start_sparrow(1 << 30, workdir)
    finally:
        os.environ.pop(variable, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=30000)
    ap.add_argument("--pure", action="store_true", help="compiled against SPARROW_PURE_PYTHON=1")
    args = ap.parse_args()
    variable, on, off = ("SPARROW_PURE_PYTHON", "0", "1") if args.pure else ("SPARROW_FAST_PATH", "1", "0")
    a, b = ("compiled", "pure") if args.pure else ("fast", "general")
    benches: dict[str, Callable[[str], float]] = {
        "4k random read QD32": lambda u: iscsi_perf(u, args.seconds, 8, True),
        "4k write QD32": lambda u: qemu_write(u, args.writes),
        "128k sequential read QD32": lambda u: iscsi_perf(u, args.seconds, 256, False),
        "4k random read QD1": lambda u: iscsi_perf(u, args.seconds, 8, True, 1),
        "4k write QD1": lambda u: qemu_write(u, args.writes // 3, 1),
    }
    workdir = Path(tempfile.mkdtemp(prefix="sparrow-fastpath-ab-"))
    fast, general = start(variable, on, workdir), start(variable, off, workdir)
    ratios: dict[str, list[float]] = {b: [] for b in benches}
    try:
        for rnd in range(args.rounds):
            for name, fn in benches.items():
                order = (fast, general) if rnd % 2 == 0 else (general, fast)
                got = {t.url: fn(t.url) for t in order}
                ratios[name].append(got[fast.url] / got[general.url])
                print(f"round {rnd + 1}: {name}: {a} {got[fast.url]:.0f}, {b} {got[general.url]:.0f}",
                      flush=True)
    finally:
        fast.stop()
        general.stop()
    for name, rs in ratios.items():
        print(f"{name:30} {a}/{b} median {statistics.median(rs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
