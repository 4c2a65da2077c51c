#!/usr/bin/env python3
"""A replica's CPU per replicated 4 KiB WRITE, without sockets (issue 8).

One ``ReplicaConnection`` (sparrow/node/replication.py) on a fake transport, applying to a
tmpfs-backed ``FileBlockStore`` behind its dirty map (``MarkingStore``), as ``sparrow node`` does.
The primary's end seals batches of ``--batch`` sequential 4 KiB WRITEs, one channel record each,
ahead of time (not measured); the measured part is everything the replica does with them: open the
record, decode and check each message, apply (pwritev), mark the dirty map, encode and seal the
ACK, and the loop turns the worker needs. The next record is fed once the replica is idle (its
queue applied, no dirty-map write in flight): on a real replica the next writes arrive a
millisecond or more later, a mark's fdatasync takes less. Prints process CPU microseconds per
write (a dirty-map mark included: on tmpfs it is written on the loop), the best of ``--repeat`` runs,
for two cases:

- ``dirty``: every region already durably dirty (no marks: the per-message cost);
- ``fresh``: a clean map, so the sequential writer reaches a new 1 MiB region every 256 writes
  and each needs a durable mark first (what a replica does after checkpoints cleared the regions
  behind the writer, as on ``bench/copies.py``).

    python bench/replicacore.py [--writes 65536] [--batch 16] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparrow.cluster.channel import Channel, ClusterSecret, HandshakeBytes, Purpose, Side
from sparrow.cluster.messages import Role
from sparrow.node.replication import ReplicaConnection, ReplicaServer
from sparrow.replication.protocol import MAX_MESSAGE, Open, VolumeView, Write, encode
from sparrow.replication.streamauth import derive_stream_key
from store.blockstore import FileBlockStore
from store.dirtymap import DirtyMap, MarkingStore

SECRET = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")
VID = "0123456789abcdef0123456789abcdef"
SIZE = 256 << 20  # bench/copies.py's volumes
KEY = derive_stream_key(b"m" * 32, VID, 2, "n1", "n2")
VIEW = VolumeView(VID, 2, Role.REPLICA, "n1", SIZE, 512, stream_key=KEY)


class Transport(asyncio.Transport):
    """Takes what the replica writes (its ACKs) and keeps the last bytes for the peer."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        raise AssertionError("the bench never fills the replica's queue")

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default


async def run(writes: int, batch: int, fresh: bool, profile: cProfile.Profile | None) -> float:
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        inner = await FileBlockStore.open(str(root / "r.img"), block_size=512, size=SIZE, create=True)
        dirty = DirtyMap.open(root / "r.dirty", VID, SIZE, missing_clean=True)
        if not fresh:
            await dirty.mark(0, SIZE)
        store = MarkingStore(inner, dirty)
        srv = ReplicaServer(
            secret=SECRET,
            lookup=lambda vid: VIEW if vid == VID else None,
            store_for=lambda vid: store,
            clock=lambda: 0.0,
            dirty_for=lambda vid: dirty,
        )
        conn = ReplicaConnection(srv)
        transport = Transport()
        conn.connection_made(transport)
        peer = Channel(SECRET, Side.CLIENT, Purpose.REPLICATION, 0.0, max_plaintext=MAX_MESSAGE)
        pending = [peer.initiate()]
        while pending:
            for data in pending:
                conn.data_received(data)
            pending = []
            for data in transport.written:
                pending += [e.data for e in peer.feed(data, 0.0) if isinstance(e, HandshakeBytes)]
            transport.written.clear()
        opening = Open(VID, 2, 1, "n1", session=7).signed(KEY, peer.binding)
        conn.data_received(peer.send(encode(opening)))
        assert conn._opened, conn.closed_reason
        payload = bytes(4096)
        records = []
        seq = 1
        for first in range(0, writes, batch):
            parts = []
            for i in range(first, min(first + batch, writes)):
                parts.append(encode(Write(VID, 2, seq, (i * 4096) % SIZE, payload)))
                seq += 1
            records.append(peer.send(b"".join(parts)))
        last = seq - 1
        await asyncio.sleep(0)  # the worker starts and waits
        if profile is not None:
            profile.enable()
        t0 = time.process_time()
        for record in records:
            conn.data_received(record)
            while True:
                persisting = dirty._persisting
                if persisting is not None:  # a mark's write and fdatasync: idle until it is done
                    await persisting
                elif conn._queue or not conn._idle:  # the worker's turns, as the loop runs them
                    await asyncio.sleep(0)
                else:
                    break
        elapsed = time.process_time() - t0
        if profile is not None:
            profile.disable()
        assert conn.closed_reason is None, conn.closed_reason
        assert conn.stream.applied_seq == last, (conn.stream.applied_seq, last)
        conn.close("bench over", abort=True)
        await asyncio.sleep(0)
        dirty.close()
        await inner.close()
        return elapsed / writes * 1e6
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=16, help="writes per channel record (one data_received)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    for fresh in (False, True):
        best = float("inf")
        for _ in range(args.repeat):
            prof = cProfile.Profile() if args.profile else None
            best = min(best, await run(args.writes, args.batch, fresh, prof))
            if prof is not None:
                pstats.Stats(prof).sort_stats("tottime").print_stats(16)
        case = "fresh map (a mark per 1 MiB)" if fresh else "regions already dirty"
        print(f"replica, 4 KiB WRITEs in records of {args.batch}, {case}: {best:.2f} us per write")


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as the node runs
        runner.run(main())
