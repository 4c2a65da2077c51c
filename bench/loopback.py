#!/usr/bin/env python3
"""What the kernel alone charges for one replication record over loopback: the floor under
Sparrow's replicated write on this machine (issue 8, docs/performance.md).

A sender process writes ``--size`` bytes (a run of 4 KiB writes as the primary sends it to one
replica) to a receiver process, which reads it and answers 68 bytes (an ACK record's size); the
sender waits for the answer before the next record. No Python beyond the socket calls, no
sealing, no store. Prints the round trip and the CPU of each side per record and per 4 KiB.

    python3 bench/loopback.py [--records 3000] [--size 70000] [--unix]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time

ACK = 68


def receiver(sock: socket.socket, size: int) -> None:
    buf = bytearray(1 << 20)
    pending = 0
    while n := sock.recv_into(buf):
        pending += n
        while pending >= size:
            pending -= size
            sock.sendall(b"a" * ACK)


def cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--size", type=int, default=70000, help="bytes per record (default: 17 writes of 4 KiB)")
    ap.add_argument("--unix", action="store_true", help="a Unix socket pair instead of TCP on 127.0.0.1")
    args = ap.parse_args()
    if args.unix:
        sender, other = socket.socketpair(socket.AF_UNIX)
    else:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            sender = socket.create_connection(listener.getsockname())
            other, _ = listener.accept()
        for s in (sender, other):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pid = os.fork()
    if pid == 0:
        sender.close()
        receiver(other, args.size)
        os._exit(0)
    other.close()
    record = os.urandom(args.size)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.records):
        sender.sendall(record)
        got = 0
        while got < ACK:
            got += len(sender.recv(ACK - got))
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    sender.close()
    os.waitpid(pid, 0)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    per = 1e6 / args.records
    writes = args.size / 4096
    send_cpu, recv_cpu = (cpu(after) - cpu(before)) * per, cpu(child) * per
    print(
        f"{'unix' if args.unix else 'tcp loopback'}, {args.size} B records: round trip {wall * per:.0f} us; "
        f"sender CPU {send_cpu:.0f} us (kernel {(after.ru_stime - before.ru_stime) * per:.0f}), "
        f"receiver CPU {recv_cpu:.0f} us per record; per 4 KiB: sender {send_cpu / writes:.1f} us, "
        f"receiver {recv_cpu / writes:.1f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
