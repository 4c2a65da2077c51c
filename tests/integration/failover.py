"""Failover time, kill -9 of the primary to the first write acknowledged by the new one (issue 8).

Shared by tests/integration/test_failover_time.py (at the default timings, asserting the 10 s
bound) and bench/failover.py (a table over heartbeat and lease settings). The writer's acks carry
their wall-clock time (tests/tools/gatewriter.c), which is also the clock of the daemons' log
timestamps, so the kill, the master's publish of the new epoch and the first new ack are on one
clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.integration.cluster import Cluster, Timing
from tests.integration.gate import Writer
from tests.tools import wait_for

#: The daemons' defaults (sparrow.cluster.lease.LeaseConfig, DEFAULT_FENCE_MARGIN).
DEFAULTS = Timing(heartbeat=1.0, lease=5.0, dead_after=8.0, margin=1.0, fence_margin=0.5)
BLOCKS = 2048
VOLUME = "fo"


@dataclass(frozen=True, slots=True)
class Failover:
    """Seconds after the kill: the master published the new epoch, the writer had its first
    write acknowledged by the new primary."""

    old_primary: str
    new_primary: str
    epoch: int
    published: float
    first_ack: float


def log_time(record: dict[str, Any]) -> float:
    """A daemon log record's timestamp (ISO-8601 UTC) as ``time.time()`` seconds."""
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()


def data_file(cluster: Cluster, node: str) -> Path:
    return cluster.node(node).data_dir / "volumes" / f"{VOLUME}.img"


def three_copies(cluster: Cluster, timeout: float = 30.0) -> tuple[str, str, str, str]:
    """Create the volume with three copies; (volume id, primary, replica, replica) once served."""
    cluster.cli("volume", "create", VOLUME, "--size", "16MiB", "--replicas", "3")
    v = cluster.wait_converged(VOLUME, epoch=1, copies=3, timeout=timeout)
    primary = v["primary"]["node_id"]
    r1, r2 = (r["node_id"] for r in v["replicas"] if r["role"] == "replica")
    cluster.wait_serving(primary, v["volume_id"], timeout=timeout)
    return v["volume_id"], primary, r1, r2


def kill_primary(cluster: Cluster, writer: Writer, timeout: float = 60.0) -> Failover:
    """kill -9 the volume's primary under the writer's load; wait for the first write acknowledged
    on the writer's next session (by the new primary: acks the old one wrote before it died may
    still arrive after the kill, on the old session) and for the publish."""
    before = cluster.volume(VOLUME)
    old = before["primary"]["node_id"]
    session = writer.journal.reconnects  # the writer's next reconnect is this kill's
    killed_at = time.time()
    cluster.node(old).kill9()
    writer.wait(
        "the first write acknowledged on the writer's next session",
        lambda j: len(j.reconnect_acks) > session and len(j.acks) > j.reconnect_acks[session],
        timeout,
    )
    first = writer.journal.ack_times[writer.journal.reconnect_acks[session]]
    after = cluster.volume(VOLUME)
    published = wait_for(
        lambda: [
            r
            for r in cluster.master.events("published assignment")
            if r.get("volume") == VOLUME and int(r["epoch"]) > int(before["epoch"])
        ],
        timeout=10,
        what="the master's log of the new epoch",
    )[0]
    return Failover(
        old_primary=old,
        new_primary=after["primary"]["node_id"],
        epoch=int(after["epoch"]),
        published=log_time(published) - killed_at,
        first_ack=first - killed_at,
    )


def describe(timing: Timing, f: Failover) -> str:
    return (
        f"kill -9 of the primary to the first write acknowledged by the new one {f.first_ack:.2f} s"
        f" (new epoch published after {f.published:.2f} s; heartbeat {timing.heartbeat} s, lease"
        f" {timing.lease} s, margin {timing.margin} s, fence margin {timing.fence_margin} s)"
    )
