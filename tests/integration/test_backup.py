"""``sparrow backup`` / ``sparrow restore`` (sparrow.backup) with real processes.

A backup taken while the master creates and deletes volumes is a sound authority database; a
restore is refused while the master runs; a restore into the stopped master brings the volumes
back, and a node that saw a higher epoch than the backup holds never sees an epoch go back: the
restored master mints past it (sparrow.cluster.epochfloor).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sparrow.cluster.authority import AuthorityStore
from tests.integration.cluster import TIMING, Cluster
from tests.integration.process import admin_token, daemon_env
from tests.integration.test_audit import call
from tests.tools import run, wait_for

pytestmark = pytest.mark.integration


def sparrow(cluster: Cluster, *args: str, check: bool = True) -> str:
    command = [sys.executable, "-m", "sparrow", *args]
    proc = run(command, timeout=60, env=daemon_env(cluster.root), check=check)
    return proc.stdout + proc.stderr


def test_a_backup_under_create_and_delete_load_is_a_sound_authority(
    make_cluster: Callable[[int], Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    api, data_dir = cluster.master.api, cluster.master.data_dir
    admin = admin_token(cluster.root, api)
    stop = threading.Event()
    done: list[int] = []

    def churn() -> None:
        for i in range(400):  # bounded: at most 400 creates and deletes
            if stop.is_set():
                break
            status, answer = call(api, "POST", "/v1/volumes", admin, {"name": f"churn{i}", "size": "1MiB"})
            assert status == 201, answer
            if i > 0:
                status, answer = call(api, "DELETE", f"/v1/volumes/churn{i - 1}", admin)
                assert status == 204, answer
            done.append(i)

    worker = threading.Thread(target=churn)
    worker.start()
    backups = tmp_path / "backups"
    backups.mkdir()
    try:
        for k in range(4):
            before = len(done)
            out = sparrow(cluster, "backup", str(data_dir), str(backups / f"b{k}.sqlite3"))
            assert "backed up" in out, out
            assert len(done) > before or k == 0 or not worker.is_alive(), "no load during the backup"
    finally:
        stop.set()
        worker.join(timeout=60)
    assert len(done) >= 4, done

    for k in range(4):
        path = backups / f"b{k}.sqlite3"
        assert path.stat().st_mode & 0o077 == 0
        assert not Path(f"{path}-wal").exists()  # self-contained
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.close()
        copy = tmp_path / f"open{k}.sqlite3"
        shutil.copy(path, copy)
        with AuthorityStore.open(copy) as store:  # this Sparrow opens it as its authority
            live = [v.name for v in store.volumes()]
        # between a create and the delete of the one before it, two are live: consecutive names
        numbers = sorted(int(n.removeprefix("churn")) for n in live)
        assert len(numbers) in (1, 2) and numbers[-1] - numbers[0] == len(numbers) - 1, live

    out = sparrow(cluster, "backup", str(data_dir), str(backups / "b0.sqlite3"), check=False)
    assert "never overwrites" in out, out
    authority = (data_dir / "authority.sqlite3").read_bytes()
    out = sparrow(cluster, "restore", str(backups / "b0.sqlite3"), str(data_dir), check=False)
    assert "in use" in out and "daemon stopped" in out, out
    assert (data_dir / "authority.sqlite3").read_bytes() == authority
    assert not (data_dir / "restore.json").exists()


def node_epochs(cluster: Cluster, volume_id: str) -> dict[str, int]:
    out = {}
    for node_id, node in cluster.nodes.items():
        persisted = node.persisted(volume_id)
        if persisted is not None:
            out[node_id] = int(persisted["epoch"])
    return out


def test_a_restored_master_brings_the_volumes_back_and_never_lets_an_epoch_go_back(
    make_cluster: Callable[[int], Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(3)
    cluster.cli("volume", "create", "kept", "--size", "16MiB", "--replicas", "2")
    v1 = cluster.wait_converged("kept", epoch=1, copies=2)
    volume_id, primary = v1["volume_id"], v1["primary"]["node_id"]
    (replica,) = [r["node_id"] for r in v1["replicas"] if r["role"] == "replica"]
    (spare,) = set(cluster.nodes) - {primary, replica}
    backup_file = tmp_path / "authority.bak"
    sparrow(cluster, "backup", str(cluster.master.data_dir), str(backup_file))

    # After the backup: the replica dies and is replaced under epoch 2, which the backup lacks.
    cluster.node(replica).kill9()
    v2 = cluster.wait_converged("kept", epoch=2, copies=2, timeout=TIMING.dead_after + 20)
    assert {r["node_id"] for r in v2["replicas"]} == {primary, spare}
    before = node_epochs(cluster, volume_id)
    assert before[primary] == 2 and before[spare] == 2, before

    assert cluster.master.term() == 0
    out = sparrow(cluster, "restore", str(backup_file), str(cluster.master.data_dir))
    assert "restored 1 volumes (highest epoch 1)" in out, out
    assert (cluster.master.data_dir / "restore.json").exists()
    seen: dict[str, list[int]] = {n: [e] for n, e in before.items()}
    cluster.master.restart()

    # The restored master holds epoch 1; the nodes hold 2. It mints 3 with the epoch-2 primary.
    def converged_above() -> dict[str, object] | None:
        for node_id, epoch in node_epochs(cluster, volume_id).items():
            seen.setdefault(node_id, []).append(epoch)
        v = cluster.volume("kept")
        return v if v["epoch"] == 3 and v["served"] else None

    v3 = wait_for(converged_above, timeout=TIMING.dead_after + 30, what="kept at epoch 3", interval=0.05)
    assert v3["primary"]["node_id"] == primary, v3
    assert not (cluster.master.data_dir / "restore.json").exists()
    for node_id, epochs in seen.items():
        assert epochs == sorted(epochs), f"{node_id}'s persisted epoch went back: {epochs}"
    for node in cluster.nodes.values():
        for event in node.events("assignment rejected"):
            assert event.get("volume_id") != volume_id, f"{node.name} was offered an older epoch: {event}"

    # The audit trail: epochs 1, 2 minted before, the restore, then 3 (never 2 again).
    lines = [json.loads(x) for x in (cluster.master.data_dir / "audit.jsonl").read_text().splitlines()]
    story = [(x["type"], x.get("epoch")) for x in lines if x["type"] in ("epoch", "restore")]
    assert story == [("epoch", 1), ("epoch", 2), ("restore", None), ("epoch", 3)], story
    assert "epoch floor" in lines[-1]["reason"] or any("epoch floor" in str(x.get("reason")) for x in lines)
    cluster.node(replica).start()  # the dead copy comes back to a cluster past it
