"""A/B benchmark: this checkout's `sparrow serve` against the one of another git revision.

    .venv/bin/python bench/ab.py --base REV [--rounds 5] [--seconds 5] [--writes 30000]

Both daemons serve a 1 GiB volume from /dev/shm at the same time; every round runs the same clients
(iscsi-perf 4 KiB random reads at QD32, qemu-img bench 4 KiB writes at QD32) against each, in
alternating order, and prints this/base per round and the medians. Use it to tell whether a change
moved the I/O path; use bench/run.py to compare with tgt. The base revision is checked out in a
temporary git worktree and run with this checkout's virtualenv. Both run pure Python
(SPARROW_PURE_PYTHON=1): the base tree is not compiled, and a compiled checkout against it would
measure the compiler (bench/fastpath_ab.py --pure measures that).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import free_port, iscsi_perf, qemu_write, wait_port

IQN = "iqn.2026-11.io.sparrow:bench"
SERVE_READY = 30.0


@dataclass(frozen=True)
class Served:
    name: str
    url: str


@contextmanager
def serve(tree: Path, name: str, size: int) -> Iterator[Served]:
    """`sparrow serve` from ``tree`` (its packages first on sys.path: ``python -m`` from its root)."""
    data = Path(tempfile.mkdtemp(prefix=f"sparrow-ab-{name}-", dir="/dev/shm"))
    iscsi, http = free_port(), free_port()
    py = [sys.executable, "-m", "sparrow"]
    log = (Path(tempfile.gettempdir()) / f"sparrow-ab-{name}.log").open("w")
    proc = subprocess.Popen(
        [*py, "serve", "--data-dir", str(data), "--iscsi", f"127.0.0.1:{iscsi}", "--http",
         f"127.0.0.1:{http}", "--log-format", "json", "--log-level", "warning"],
        cwd=tree, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SPARROW_PURE_PYTHON": "1"},
    )  # fmt: skip
    try:
        wait_port(http, SERVE_READY)
        api = f"http://127.0.0.1:{http}"
        subprocess.run([*py, "volume", "create", "bench", "--size", str(size), "--api", api],
                       cwd=tree, check=True, capture_output=True)  # fmt: skip
        url = f"iscsi://127.0.0.1:{iscsi}/{IQN}/0"
        deadline = time.monotonic() + SERVE_READY  # an older serve answers the create before it serves
        while subprocess.run(["iscsi-inq", url], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: {url} not served within {SERVE_READY:g} s")
        yield Served(name, url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sparrow-ab-base-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--writes", type=int, default=30000)
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    ratios: dict[str, list[float]] = {"4k random read": [], "4k write": []}
    with worktree(args.base) as base_tree, serve(base_tree, "base", 1 << 30) as base, \
            serve(here, "this", 1 << 30) as this:  # fmt: skip
        for r in range(args.rounds):
            order = (base, this) if r % 2 == 0 else (this, base)
            got: dict[str, tuple[float, float]] = {}
            for target in order:
                got[target.name] = (
                    iscsi_perf(target.url, args.seconds, 8, True),
                    qemu_write(target.url, args.writes),
                )
            read, write = (got["this"][i] / got["base"][i] for i in (0, 1))
            ratios["4k random read"].append(read)
            ratios["4k write"].append(write)
            print(f"round {r + 1}: this/base 4k random read {read:.3f}, 4k write {write:.3f}", flush=True)
    for workload, values in ratios.items():
        print(f"{workload}: this/base median {statistics.median(values):.3f} over {len(values)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
