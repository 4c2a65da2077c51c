"""sparrow.cluster.publisher: epochs minted durably, one transaction per publish, and only here.

The crash test runs a real publisher process and kills it with a real SIGKILL at random moments.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparrow.cluster.authority import (
    AuthorityStore,
    NodeAddresses,
    UnknownNode,
    UnknownVolume,
)
from sparrow.cluster.epoch import Epoch
from sparrow.cluster.publisher import InvalidAsk, Publisher
from store.migrations import AUTHORITY_FILE

REPO = Path(__file__).resolve().parents[2]
VOL_A = "a" * 32
VOL_B = "b" * 32
VOL_C = "c" * 32
ADDR = {
    n: NodeAddresses(f"10.0.0.{i}:3260", f"10.0.0.{i}:3261", f"10.0.0.{i}:3280")
    for i, n in ((1, "n1"), (2, "n2"))
}
#: Built from pieces so this file does not match itself.
CONSTRUCTION = re.compile(r"\b" + "Epoch" + r"\s*\(")


@dataclasses.dataclass(frozen=True)
class Ask:
    volume_id: str
    primary: str | None
    replicas: tuple[str, ...]
    reason: str = "test"
    #: The in-sync set (None: every copy, as for a new volume).
    sync: tuple[str, ...] | None = None

    @property
    def in_sync(self) -> tuple[str, ...]:
        return self.replicas if self.sync is None else self.sync


def seed(path: Path, volume_ids: tuple[str, ...] = (VOL_A, VOL_B)) -> None:
    with AuthorityStore.open(path) as store:
        for i, volume_id in enumerate(volume_ids):
            store.add_volume(
                f"vol{i}", size=1 << 20, block_size=512, replicas=2, created_at=1.0, volume_id=volume_id
            )
        for node_id, addresses in ADDR.items():
            store.upsert_node(node_id, incarnation=1, addresses=addresses, capacity=1 << 30, seen_at=1.0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / AUTHORITY_FILE
    seed(p)
    return p


@pytest.fixture
def store(path: Path) -> Iterator[AuthorityStore]:
    s = AuthorityStore.open(path)
    yield s
    s.close()


def committed(path: Path) -> dict[str, list[tuple[int, str | None]]]:
    """(epoch, primary) per volume as another connection sees it: what is committed."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT volume_id, epoch, primary_node FROM assignments ORDER BY 1, 2").fetchall()
    finally:
        conn.close()
    out: dict[str, list[tuple[int, str | None]]] = {}
    for volume_id, epoch, primary in rows:
        out.setdefault(volume_id, []).append((epoch, primary))
    return out


# --- minting ---------------------------------------------------------------------------------------


def test_epochs_start_at_one_and_count_per_volume(store: AuthorityStore, path: Path) -> None:
    publisher = Publisher(store, wall_clock=lambda: 42.0)
    a1 = publisher.publish(Ask(VOL_A, "n1", ("n1", "n2")))
    a2 = publisher.publish(Ask(VOL_A, "n2", ("n2", "n1")))
    b1 = publisher.publish(Ask(VOL_B, None, ()))
    a3 = publisher.publish(Ask(VOL_A, "n1", ("n1",)))
    assert [a.epoch for a in (a1, a2, b1, a3)] == [1, 2, 1, 3]
    assert (a1.volume_id, a1.name, a1.size, a1.block_size) == (VOL_A, "vol0", 1 << 20, 512)
    assert (a1.primary, a1.primary_portal, a1.replicas) == ("n1", "10.0.0.1:3260", ("n1", "n2"))
    assert (b1.primary, b1.primary_portal, b1.replicas) == (None, None, ())
    assert a3.restored_epoch == Epoch.restore(3)
    assert store.latest_assignment(VOL_A) == a3
    assert committed(path) == {VOL_A: [(1, "n1"), (2, "n2"), (3, "n1")], VOL_B: [(1, None)]}
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT DISTINCT created_at FROM assignments").fetchall() == [(42.0,)]
    conn.close()


def test_the_assignment_is_committed_when_publish_returns(store: AuthorityStore, path: Path) -> None:
    assignment = Publisher(store).publish(Ask(VOL_A, "n1", ("n1",)))
    # Another connection (another process, in effect) already sees it.
    assert committed(path) == {VOL_A: [(assignment.epoch, "n1")]}


def test_a_restart_continues_from_the_recorded_maximum(path: Path) -> None:
    with AuthorityStore.open(path) as store:
        for _ in range(5):
            Publisher(store).publish(Ask(VOL_A, None, ()))
    with AuthorityStore.open(path) as store:
        assert store.max_epoch(VOL_A) == Epoch.restore(5)
        assert Publisher(store).publish(Ask(VOL_A, "n2", ("n2",))).epoch == 6


def test_a_deleted_volume_keeps_its_epochs_and_gets_no_new_ones(store: AuthorityStore, path: Path) -> None:
    publisher = Publisher(store)
    publisher.publish(Ask(VOL_A, None, ()))
    store.delete_volume(VOL_A, deleted_at=2.0)
    with pytest.raises(UnknownVolume):
        publisher.publish(Ask(VOL_A, None, ()))
    assert store.max_epoch(VOL_A) == Epoch.restore(1)


@pytest.mark.parametrize(
    ("ask", "error", "match"),
    [
        (Ask(VOL_C, None, ()), UnknownVolume, VOL_C),
        (Ask(VOL_A, "n3", ("n3",)), UnknownNode, "'n3'"),
        (Ask(VOL_A, "n1", ("n1", "n9")), UnknownNode, "'n9'"),
        (Ask(VOL_A, "n1", ("n2", "n1")), InvalidAsk, "primary 'n1' first"),
        (Ask(VOL_A, "n1", ()), InvalidAsk, "primary 'n1' first"),
        (Ask(VOL_A, None, ("n1", "n1")), InvalidAsk, "appears twice"),
        (Ask(VOL_A, None, ("N1",)), InvalidAsk, "not a node id"),
    ],
)
def test_refused_asks_write_nothing(
    store: AuthorityStore, path: Path, ask: Ask, error: type[Exception], match: str
) -> None:
    publisher = Publisher(store)
    publisher.publish(Ask(VOL_A, None, ()))
    with pytest.raises(error, match=match):
        publisher.publish(ask)
    assert committed(path) == {VOL_A: [(1, None)]}
    assert publisher.publish(Ask(VOL_A, None, ())).epoch == 2  # the refused ask used no epoch


def test_a_failure_inside_the_transaction_rolls_it_back(store: AuthorityStore, path: Path) -> None:
    def broken_clock() -> float:
        raise OSError("clock gone")

    with pytest.raises(OSError, match="clock gone"):
        Publisher(store, wall_clock=broken_clock).publish(Ask(VOL_A, "n1", ("n1",)))
    assert committed(path) == {}
    assert store.max_epoch(VOL_A) is None
    assert Publisher(store).publish(Ask(VOL_A, "n1", ("n1",))).epoch == 1


# --- only the publisher mints --------------------------------------------------------------------------


def test_pattern_matches_direct_construction() -> None:
    assert CONSTRUCTION.search("e = " + "Epoch" + "(previous.value + 1)")
    assert not CONSTRUCTION.search("e = Epoch.restore(3)")
    assert not CONSTRUCTION.search("e = txn.max_epoch(volume_id)")


def test_epochs_are_constructed_only_in_the_publisher() -> None:
    allowed = {REPO / "sparrow" / "cluster" / "publisher.py", REPO / "sparrow" / "cluster" / "epoch.py"}
    offenders = []
    scanned = 0
    for top in ("sparrow", "frontend", "store"):
        for source in sorted((REPO / top).rglob("*.py")):
            scanned += 1
            if source in allowed:
                continue
            for number, line in enumerate(source.read_text().splitlines(), 1):
                if CONSTRUCTION.search(line):
                    offenders.append(f"{source.relative_to(REPO)}:{number}: {line.strip()}")
    assert scanned > 50  # the scan really walked the tree
    assert offenders == []
    assert CONSTRUCTION.search((REPO / "sparrow" / "cluster" / "publisher.py").read_text())


# --- kill -9 -------------------------------------------------------------------------------------------

CHILD = """
import os
import signal
import sys
from dataclasses import dataclass

from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.publisher import Publisher


@dataclass(frozen=True)
class Ask:
    volume_id: str
    primary: str | None
    replicas: tuple[str, ...]

    @property
    def in_sync(self) -> tuple[str, ...]:
        return self.replicas


store = AuthorityStore.open(sys.argv[1])
die_at = int(sys.argv[2])
volumes = sys.argv[3:]
if die_at:
    statements = 0

    def trace(sql):
        global statements
        statements += 1
        if statements == die_at:  # SIGKILL ourselves as this statement starts
            os.kill(os.getpid(), signal.SIGKILL)

    store._conn.set_trace_callback(trace)
publisher = Publisher(store)
print("ready", flush=True)
i = 0
while True:
    primary = ("n1", "n2", None)[i % 3]
    replicas = () if primary is None else (primary,)
    a = publisher.publish(Ask(volumes[i % len(volumes)], primary, replicas))
    print(a.volume_id, a.epoch, a.primary, flush=True)
    i += 1
"""


def run_and_kill(
    path: Path, volume_ids: tuple[str, ...], lines_before_kill: int, die_at_statement: int = 0
) -> list[tuple[str, int, str | None]]:
    """Start a publishing process and SIGKILL it: after it reported ``lines_before_kill`` commits,
    or (``die_at_statement``) by itself as its Nth SQL statement starts (BEGIN, a SELECT, the
    INSERT, COMMIT...). Returns every commit it reported (a line is printed only after publish
    returned, i.e. after COMMIT)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(die_at_statement), *volume_ids],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert child.stdout is not None and child.stderr is not None
    text = ""
    try:
        first = child.stdout.readline()
        assert first == "ready\n", f"child failed: {first!r} {child.stderr.read()}"
        for _ in range(0 if die_at_statement else lines_before_kill):
            line = child.stdout.readline()
            assert line, f"child died early: {child.stderr.read()}"
            text += line
        if not die_at_statement:
            os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, child.stderr.read()
        text += child.stdout.read()  # what it reported between the last read and the kill
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    out = []
    for line in text.split("\n")[:-1]:  # the text after the last newline may be a cut-off line
        volume_id, epoch, primary = line.split()
        out.append((volume_id, int(epoch), None if primary == "None" else primary))
    return out


def test_kill_9_at_random_moments_leaves_a_consistent_store(tmp_path: Path) -> None:
    path = tmp_path / AUTHORITY_FILE
    volume_ids = (VOL_A, VOL_B, VOL_C)
    seed(path, volume_ids)
    rng = random.Random(20261122)
    reported: list[tuple[str, int, str | None]] = []
    for round_ in range(8):
        if round_ % 2:
            reported += run_and_kill(path, volume_ids, 0, die_at_statement=rng.randint(1, 120))
        else:
            reported += run_and_kill(path, volume_ids, rng.randint(0, 25))

        with AuthorityStore.open(path) as store:
            conn = sqlite3.connect(path)
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            conn.close()
            state = committed(path)
            for volume_id in volume_ids:
                epochs = [e for e, _ in state.get(volume_id, [])]
                # Strictly increasing from 1 with no gap.
                assert epochs == list(range(1, len(epochs) + 1))
                max_epoch = store.max_epoch(volume_id)
                assert (max_epoch.value if max_epoch else 0) == len(epochs)
            # Everything a process reported as published survived its kill -9, as reported.
            for volume_id, epoch, primary in reported:
                assert (epoch, primary) in state[volume_id]
    assert len(reported) > 0

    with AuthorityStore.open(path) as store:
        before = store.max_epoch(VOL_B)
        assignment = Publisher(store).publish(Ask(VOL_B, "n2", ("n2",)))
        assert assignment.epoch == (before.value if before else 0) + 1
