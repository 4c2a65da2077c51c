#!/usr/bin/env python3
"""Per-write CPU cost of the replication stream's sans-IO path, without sockets (issue 8).

The primary's end numbers and encodes ``--batch`` 4 KiB WRITEs (``PrimaryStream.write``), seals
them in one cluster-channel record; the replica's end opens the record, decodes and checks each
message (``ReplicaStream.feed``), reports the batch applied (``done``, no store) and seals the
cumulative ACK, which the primary opens and matches (``PrimaryStream.feed``). Prints microseconds
of CPU per write for each end; ``--profile`` shows where they go.

    python bench/replpath.py [--writes 200000] [--batch 32] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparrow.cluster.channel import Channel, ClusterSecret, HandshakeBytes, Plaintext, Purpose, Side
from sparrow.cluster.messages import Role
from sparrow.replication.protocol import (
    MAX_MESSAGE,
    Opened,
    PrimaryStream,
    ReplicaPositions,
    ReplicaStream,
    VolumeView,
)

VID = "ab" * 16
SIZE = 1 << 30


def channels() -> tuple[Channel, Channel]:
    secret = ClusterSecret.from_text(b"x" * 64)
    client = Channel(secret, Side.CLIENT, Purpose.REPLICATION, 0.0, max_plaintext=MAX_MESSAGE)
    server = Channel(secret, Side.SERVER, Purpose.REPLICATION, 0.0, max_plaintext=MAX_MESSAGE)
    to_server = [client.initiate()]
    while not (client.established and server.established):
        for data in to_server:
            to_client = [e.data for e in server.feed(data, 0.0) if isinstance(e, HandshakeBytes)]
        to_server = []
        for data in to_client:
            to_server += [e.data for e in client.feed(data, 0.0) if isinstance(e, HandshakeBytes)]
    return client, server


def run(writes: int, batch: int) -> tuple[float, float]:
    client, server = channels()
    view = VolumeView(VID, 3, Role.REPLICA, "n1", SIZE, 4096)
    primary = PrimaryStream(VID, 3, "n1", window=4096)
    replica = ReplicaStream(lambda _v: view, ReplicaPositions())
    [opened] = [e for p in server.feed(client.send(primary.open(0.0)), 0.0) if isinstance(p, Plaintext)
                for e in replica.feed(p.data)]  # fmt: skip
    assert isinstance(opened, Opened)
    primary.feed(opened.ack)
    data = memoryview(bytes(4096))
    cpu_primary = cpu_replica = 0.0
    offset = 0
    for _ in range(writes // batch):
        t0 = time.process_time()
        parts = []
        for _ in range(batch):
            _, msg = primary.write(offset, data, 0.0)
            parts.append(msg)
            offset = (offset + 4096) % SIZE
        record = client.send(b"".join(parts))
        t1 = time.process_time()
        last = 0
        for event in server.feed(record, 0.0):
            assert isinstance(event, Plaintext)
            for apply in replica.feed(event.data):
                last = apply.seq
        ack = server.send(replica.done(last))
        t2 = time.process_time()
        for event in client.feed(ack, 0.0):
            assert isinstance(event, Plaintext)
            primary.feed(event.data)
        t3 = time.process_time()
        cpu_primary += (t1 - t0) + (t3 - t2)
        cpu_replica += t2 - t1
    n = writes // batch * batch
    return cpu_primary / n * 1e6, cpu_replica / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=32, help="writes sealed in one record, one ACK each")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run, args.writes, args.batch)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return 0
    primary, replica = run(args.writes, args.batch)
    print(f"per 4 KiB write, batches of {args.batch}: primary {primary:.2f} us, replica {replica:.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
