#!/usr/bin/env python3
"""The primary's CPU per replicated 4 KiB WRITE(10), without sockets: the fast path against the
general path.

A logged-in Connection and a LogicalUnit over a ReplicatedStore (a tmpfs-backed FileBlockStore
under it, its dirty map's bits already durable) with two in-sync replicas behind in-process links:
a link counts the bytes it is handed (no sealing, no socket) and each replica ACKs everything once
per batch, after the batch, as ACKs arrive from real replicas. Batches of 32 commands are driven
as frontend/server.py drives them (a command stepped once, a Task once it waits; one wait per
batch for the fast path's forwarded writes). Prints process CPU microseconds per command, the best
of ``--repeat`` runs; what it leaves out (the channel's sealing, the sockets, the replicas) is in
bench/replpath.py and bench/copies.py.

    python bench/replcore.py [--commands 32000] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.corepath import IQN, commands
from frontend.iscsi.connection import AwaitForwarded, Connection, ExecuteScsi, LoggedIn
from frontend.iscsi.pdu import LoginRequest, encode_bytes
from frontend.iscsi.session import SessionTable
from frontend.scsi.lu import LogicalUnit, LuIdentity
from frontend.server import _Resumed
from frontend.target import Target, TargetRegistry, TargetSettings
from sparrow.node.replicated_store import ReplicatedStore
from sparrow.replication import protocol
from sparrow.replication.protocol import PrimaryStream
from store.blockstore import FileBlockStore
from store.dirtymap import DirtyMap, MarkingStore

VOLUME = uuid.UUID(int=5).hex
SIZE = 1 << 30


class Link:
    """A replica's link in the process: counts what it is sent; ``ack`` ACKs everything sent."""

    def __init__(self, store: ReplicatedStore, node: str, stream: PrimaryStream) -> None:
        self.store, self.node, self.stream = store, node, stream
        self.sent = 0
        asyncio.get_running_loop().call_soon(self._up)

    def _up(self) -> None:
        self.store.stream_open(self.node, self.stream)
        self.ack(self.stream.first_seq - 1)  # the OPEN's answer

    def send(self, data: bytes) -> None:
        self.sent += len(data)

    def close(self) -> None:
        pass

    def ack(self, seq: int | None = None) -> None:
        seq = self.stream.last_seq if seq is None else seq
        for acked in self.stream.feed(protocol.encode(protocol.Ack(VOLUME, self.stream.epoch, seq, 0))):
            self.store.on_acked(self.node, self.stream, acked)  # type: ignore[arg-type]


class Primary:
    def __init__(self, fast_path: bool) -> None:
        self.fast_path = fast_path
        self.links: list[Link] = []

    async def setup(self) -> Connection:
        root = tempfile.mkdtemp(dir="/dev/shm")
        inner = await FileBlockStore.open(
            os.path.join(root, "core.img"), block_size=512, size=SIZE, create=True
        )
        dirty = DirtyMap.open(Path(root) / "core.dirty", VOLUME, SIZE, missing_clean=True)
        await dirty.mark(0, SIZE)  # every bit durable: no write waits for a mark
        loop = asyncio.get_running_loop()
        self.store = ReplicatedStore(
            MarkingStore(inner, dirty), VOLUME, "n1", clock=loop.time, open_link=self._link
        )
        self.store.dirty_map = dirty
        self.store.configure(1, [("n2", "h:1"), ("n3", "h:2")])
        lu = LogicalUnit(self.store, LuIdentity("core", "CORE0001", bytes.fromhex("6" + "0" * 31)))
        registry = TargetRegistry()
        registry.add(Target(IQN, "core", lu))
        conn = Connection(TargetSettings(nop_interval=0), registry, SessionTable(), now=0.0,
                          fast_path=self.fast_path)  # fmt: skip
        keys = {"InitiatorName": "iqn.2026-11.test:bench", "TargetName": IQN, "SessionType": "Normal",
                "HeaderDigest": "None", "DataDigest": "None", "ImmediateData": "Yes", "InitialR2T": "No",
                "MaxRecvDataSegmentLength": "262144", "FirstBurstLength": "65536"}  # fmt: skip
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        conn.receive_data(
            encode_bytes(LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000001, 0, 1, 0, 0, 0, text)), 0.0
        )
        while (ev := conn.next_event()) is not None:
            assert isinstance(ev, LoggedIn), ev
        conn.data_to_send()
        self.conn = conn
        return conn

    def _link(self, store: ReplicatedStore, node: str, portal: str, stream: PrimaryStream) -> Link:
        link = Link(store, node, stream)
        self.links.append(link)
        return link

    async def run(self, n: int) -> float:
        conn = self.conn
        loop = asyncio.get_running_loop()
        batch = 32
        pdus = [commands(True, b * batch, batch) for b in range(n // batch)]
        tasks: set[asyncio.Task[Any]] = set()
        answered = 0

        def done(ev: AwaitForwarded, fut: asyncio.Future[None]) -> None:
            nonlocal answered
            conn.forwarded_done(ev.batch, ev.lu.forwarded_sense(fut.exception()), 1.0)
            answered += 1

        async def execute(ev: ExecuteScsi) -> None:
            assert ev.lu is not None
            conn.complete(ev.task_id, await ev.lu.execute(ev.request), 1.0)

        async def finish(rest: _Resumed) -> None:
            await rest

        t0 = time.process_time()
        for chunk in pdus:
            conn.receive_data(chunk, 1.0)
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, ExecuteScsi):  # as the server: stepped once, a Task once it waits
                    coro = execute(ev)
                    try:
                        first = coro.send(None)
                    except StopIteration:
                        continue
                    task = loop.create_task(finish(_Resumed(coro, first)))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif isinstance(ev, AwaitForwarded):
                    ev.lu.forwarded(ev.ticket).add_done_callback(lambda f, ev=ev: done(ev, f))  # type: ignore[misc]
            await asyncio.sleep(0)  # the turn ends: the links come up, the sends go out
            for link in self.links:
                link.ack()
            await asyncio.sleep(0)  # the ACKs' wake-ups run
            await asyncio.sleep(0)
            conn.data_to_send()
        await asyncio.gather(*tasks)
        elapsed = time.process_time() - t0
        assert self.fast_path or not answered
        return elapsed / (len(pdus) * batch) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    for fast in (True, False):
        best = float("inf")
        for _ in range(args.repeat):
            primary = Primary(fast)
            await primary.setup()
            await primary.run(64)  # the links come up
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
            best = min(best, await primary.run(args.commands))
            if args.profile:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        path = "fast path" if fast else "general path"
        print(
            f"replicated WRITE(10) 4 KiB, two replicas, {path}: {best:.1f} us per command"
            " (the primary, no sockets)"
        )


if __name__ == "__main__":
    asyncio.run(main())
