"""`sparrow serve` is a master and one node in one process: what that adds to the single-node daemon."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path

import pytest

from store.volumes import VolumeManager
from tests.integration.daemon import Daemon
from tests.tools import require_tool, run

pytestmark = pytest.mark.integration


def test_a_volume_is_placed_on_the_local_node_with_an_epoch(daemon: Daemon) -> None:
    volume = daemon.create_volume("placed", "8MiB")
    assert volume["epoch"] == 1
    assert volume["primary"] == {"node_id": "local", "portal": daemon.portal}
    assert volume["url"] == daemon.url("placed") and volume["status_kind"] == "ok"
    nodes = json.loads(daemon.cli("node", "list", "--json").stdout)
    assert [(n["node_id"], n["state"]) for n in nodes] == [("local", "alive")]
    status, body = daemon.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    status, body = daemon.get("/metrics")
    text = body.decode()
    assert "sparrow_master_epochs_published_total 1.0" in text, text  # the master's metrics...
    assert "sparrow_node_lease_valid 1.0" in text, text  # ... the node's ...
    assert 'sparrow_volume_size_bytes{volume="placed"} 8.388608e+06' in text, text  # ... the frontend's


def test_restart_serves_the_same_epoch_without_minting_one(daemon: Daemon) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    before = daemon.create_volume("again", "8MiB")
    daemon.kill9()
    daemon.start()  # READY=1 only once every volume is served again
    run([iscsi_inq, daemon.url("again")])
    after = daemon.inspect("again")
    assert after["epoch"] == before["epoch"] == 1
    _, body = daemon.get("/metrics")
    assert "sparrow_master_epochs_published_total 0.0" in body.decode()


def test_delete_removes_the_data_and_the_name_can_be_reused(daemon: Daemon) -> None:
    qemu_io = require_tool("qemu-io")
    first = daemon.create_volume("gone", "8MiB")
    run([qemu_io, "-f", "raw", "-c", "write -P 0x66 0 1M", "-c", "flush", daemon.url("gone")])
    daemon.cli("volume", "delete", "gone")
    volumes = daemon.data_dir / "volumes"
    assert not (volumes / "gone.json").exists() and not (volumes / "gone.img").exists()
    assert not (daemon.data_dir / "cluster" / f"{first['volume_id']}.json").exists()
    second = daemon.create_volume("gone", "8MiB")
    assert second["volume_id"] != first["volume_id"] and second["serial"] != first["serial"]
    out = run([qemu_io, "-f", "raw", "-c", "read -P 0 0 1M", daemon.url("gone")]).stdout
    assert "Pattern verification failed" not in out, out
    assert daemon.stop() == 0
    daemon.start()
    names = [v["name"] for v in json.loads(daemon.cli("volume", "list", "--json").stdout)]
    assert names == ["gone"] and daemon.inspect("gone")["volume_id"] == second["volume_id"]


def test_a_single_node_data_dir_is_adopted_with_its_identity_and_data(tmp_path: Path) -> None:
    qemu_io = require_tool("qemu-io")
    iscsi_inq = require_tool("iscsi-inq")
    data_dir = tmp_path / "data"

    async def single_node_volume() -> tuple[str, str]:
        manager = VolumeManager(data_dir)
        await manager.load_all()
        volume = await manager.create("legacy", 8 << 20)
        await volume.store.write(0, b"\x5a" * (1 << 20))
        await volume.store.flush()
        await manager.close()
        return volume.meta.volume_id, volume.meta.serial

    volume_id, serial = asyncio.run(single_node_volume())
    daemon = Daemon(data_dir)
    daemon.start()
    try:
        adopted = daemon.inspect("legacy")
        assert adopted["volume_id"] == volume_id and adopted["serial"] == serial
        assert adopted["epoch"] == 1 and adopted["url"] == daemon.url("legacy")
        out = run([qemu_io, "-f", "raw", "-c", "read -P 0x5a 0 1M", daemon.url("legacy")]).stdout
        assert "Pattern verification failed" not in out, out
        assert serial in run([iscsi_inq, "-e", "1", "-c", "128", daemon.url("legacy")]).stdout
    finally:
        assert daemon.stop() == 0


def test_a_volume_that_failed_to_load_keeps_its_name_until_deleted(daemon: Daemon) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    daemon.create_volume("good", "8MiB")
    daemon.create_volume("bad", "8MiB")
    assert daemon.stop() == 0
    record = daemon.data_dir / "volumes" / "bad.json"
    record.write_text(record.read_text()[:-20] + "garbage")
    daemon.start()
    # A new volume never takes the name (and so never the files) of one that failed to load: a
    # create with other parameters is refused, an identical one is a retry answered with the
    # recorded volume, not served (the warning), and nothing is created.
    taken = daemon.cli("volume", "create", "bad", "--size", "16MiB", check=False)
    assert taken.returncode != 0 and "exists with other parameters" in taken.stderr, taken.stderr
    retry = daemon.cli("volume", "create", "bad", "--size", "8MiB", "--wait", "1", check=False)
    assert retry.returncode == 0 and "is not served yet" in retry.stderr, retry.stderr
    assert record.read_text().endswith("garbage")
    status, body = daemon.get("/healthz")
    health = json.loads(body)
    assert status == 503 and [o["name"] for o in health["offline"]] == ["bad"], health
    assert [v["name"] for v in health["volumes_not_served"]] == ["bad"], health
    daemon.cli("volume", "delete", "bad")
    assert not record.exists() and not (daemon.data_dir / "volumes" / "bad.img").exists()
    health = json.loads(daemon.get("/healthz")[1])
    assert health["status"] == "ok" and health["offline"] == [], health
    run([iscsi_inq, daemon.url("good")])


def test_a_failed_start_is_one_line_and_leaves_the_data_dir_usable(tmp_path: Path) -> None:
    """The HTTP port is taken: the master and the node were already up (authority open, heartbeat
    and iSCSI listeners bound); they are torn down, the error is one line, and the data directory
    is not left locked."""
    daemon = Daemon(tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", daemon.http_port))
        taken.listen()
        proc = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sparrow:")]
    assert lines == [
        f"sparrow: error: cannot listen for HTTP on 127.0.0.1:{daemon.http_port}: address already in use"
    ]
    assert "Traceback" not in proc.stderr + proc.stdout
    daemon.start()
    try:
        daemon.create_volume("after", "8MiB")
    finally:
        assert daemon.stop() == 0


def test_serve_refuses_a_config_file_others_may_read_that_holds_the_discovery_secret(tmp_path: Path) -> None:
    config = tmp_path / "sparrow.toml"
    config.write_text('[iscsi.discovery_chap]\nuser = "disco"\nsecret = "discovery-secret-1"\n')
    config.chmod(0o644)
    daemon = Daemon(tmp_path / "data", extra_args=("--config", str(config)))
    proc = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sparrow:")]
    assert len(lines) == 1 and "accessible by group or others (mode 0644); chmod 600 it" in lines[0], lines
    assert "discovery-secret-1" not in proc.stderr + proc.stdout
    config.chmod(0o600)
    daemon.start()
    assert daemon.stop() == 0
