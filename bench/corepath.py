#!/usr/bin/env python3
"""Per-command CPU cost of the sans-IO path, without sockets: PDUs in, Data-In/Response bytes out.

Feeds a logged-in Connection batches of 32 READ(10) or WRITE(10) commands (4 KiB), runs each on a
LogicalUnit over a tmpfs-backed FileBlockStore, completes it and collects the output, exactly as
frontend/server.py does. Prints CPU microseconds per command (process time, so that other work on
the machine is not counted), the best of ``--repeat`` runs, for the fast path (what the server runs)
and, with ``--general``, for the general path too. `--profile` shows where they go.

    python bench/corepath.py [--commands 64000] [--repeat 3] [--general] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import struct
import tempfile
import time

from frontend.iscsi.connection import Connection, ExecuteScsi, LoggedIn
from frontend.iscsi.pdu import LoginRequest, ScsiCommand, encode_bytes
from frontend.iscsi.session import SessionTable
from frontend.scsi.lu import LogicalUnit, LuIdentity
from frontend.target import Target, TargetRegistry, TargetSettings
from store.blockstore import FileBlockStore

IQN = "iqn.2026-11.io.sparrow:core"


async def setup(fast_path: bool) -> tuple[Connection, LogicalUnit]:
    path = os.path.join(tempfile.mkdtemp(dir="/dev/shm"), "core.img")
    store = await FileBlockStore.open(path, block_size=512, size=1 << 30, create=True)
    lu = LogicalUnit(store, LuIdentity("core", "CORE0001", bytes.fromhex("6" + "0" * 31)))
    registry = TargetRegistry()
    registry.add(Target(IQN, "core", lu))
    conn = Connection(TargetSettings(nop_interval=0), registry, SessionTable(), now=0.0, fast_path=fast_path)
    keys = {"InitiatorName": "iqn.2026-11.test:bench", "TargetName": IQN, "SessionType": "Normal",
            "HeaderDigest": "None", "DataDigest": "None", "ImmediateData": "Yes", "InitialR2T": "No",
            "MaxRecvDataSegmentLength": "262144", "FirstBurstLength": "65536"}
    text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
    conn.receive_data(encode_bytes(LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000001, 0, 1, 0, 0, 0, text),
                                   header_digest=False, data_digest=False), 0.0)
    while (ev := conn.next_event()) is not None:
        assert isinstance(ev, LoggedIn), ev
    conn.data_to_send()
    return conn, lu


def commands(write: bool, start_sn: int, count: int) -> bytes:
    out = []
    payload = os.urandom(4096)
    for i in range(count):
        lba = (i * 8) % (1 << 20)
        op = 0x2A if write else 0x28
        cdb = struct.pack(">BBIBHB", op, 0, lba, 0, 8, 0).ljust(16, b"\0")
        cmd = ScsiCommand(False, True, not write, write, 1, 0, 100 + i, 4096, start_sn + i, 0, cdb,
                          payload if write else b"")
        out.append(encode_bytes(cmd, header_digest=False, data_digest=False))
    return b"".join(out)


async def run(conn: Connection, write: bool, n: int) -> float:
    batch = 32
    sn = 0  # the login carried CmdSN 0 and did not consume it
    pdus = [commands(write, sn + b * batch, batch) for b in range(n // batch)]
    return await time_chunks(conn, pdus, batch)


async def time_chunks(conn: Connection, chunks: list[bytes], batch: int) -> float:
    """Process CPU per command, in us, for feeding ``chunks`` (``batch`` commands each) through
    ``conn`` and executing what it asks."""
    t0 = time.process_time()
    for chunk in chunks:
        conn.receive_data(chunk, 1.0)
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, ExecuteScsi):
                assert ev.lu is not None
                conn.complete(ev.task_id, await ev.lu.execute(ev.request), 1.0)
        out = conn.data_to_send()
        assert out
    return (time.process_time() - t0) / (len(chunks) * batch) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=64000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--general", action="store_true", help="also measure the general path")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    for fast in (True, False) if args.general else (True,):
        for write in (False, True):
            best = float("inf")
            for _ in range(args.repeat):
                conn, _lu = await setup(fast)
                if args.profile:
                    prof = cProfile.Profile()
                    prof.enable()
                best = min(best, await run(conn, write, args.commands))
                if args.profile:
                    prof.disable()
                    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            path = "fast path" if fast else "general path"
            print(f"{'WRITE' if write else 'READ'}(10) 4 KiB, {path}: {best:.1f} us per command "
                  "(core path, no sockets)")


if __name__ == "__main__":
    asyncio.run(main())
