"""The daemon as an operator meets it: lock, signals, restarts, corrupt metadata, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon
from tests.tools import free_port, require_tool, run

pytestmark = pytest.mark.integration


def test_second_daemon_on_the_same_data_dir_exits_with_a_clear_error(daemon: Daemon) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sparrow", "serve", "--data-dir", str(daemon.data_dir),
         "--iscsi", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "in use" in (proc.stderr + proc.stdout).lower()


def test_flushed_writes_survive_kill_9(daemon: Daemon) -> None:
    qemu_io = require_tool("qemu-io")
    daemon.create_volume("durable", "16MiB")
    url = daemon.url("durable")
    # 4 MiB then SYNCHRONIZE CACHE, and 1 MiB written with FUA: both durable when acknowledged
    run([qemu_io, "-f", "raw", "-c", "write -P 0x3c 0 4M", "-c", "flush", "-c", "write -P 0x7e -f 4M 1M",
         url])
    daemon.kill9()
    daemon.start()
    out = run([qemu_io, "-f", "raw", "-c", "read -P 0x3c 0 4M", "-c", "read -P 0x7e 4M 1M", url]).stdout
    assert "Pattern verification failed" not in out, out


def test_corrupt_metadata_takes_only_that_volume_offline(daemon: Daemon) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    daemon.create_volume("good", "8MiB")
    daemon.create_volume("bad", "8MiB")
    assert daemon.stop() == 0
    meta = daemon.data_dir / "volumes" / "bad.json"
    assert meta.exists(), sorted(p.name for p in (daemon.data_dir / "volumes").iterdir())
    meta.write_text(meta.read_text()[:-20] + "garbage")
    daemon.start()
    run([iscsi_inq, daemon.url("good")])
    bad = run([iscsi_inq, daemon.url("bad")], check=False)
    assert bad.returncode != 0
    status, body = daemon.get("/healthz")
    health = json.loads(body)
    assert status == 503 and health["status"] == "unhealthy", health  # "bad" should be served
    assert [v["name"] for v in health["volumes_not_served"]] == ["bad"], health
    assert "bad" in daemon.log() and "corrupt" in daemon.log().lower()


def test_sigterm_exits_zero_and_volumes_come_back(daemon: Daemon) -> None:
    first = daemon.create_volume("keep", "8MiB")
    assert daemon.stop() == 0
    daemon.start()
    again = daemon.inspect("keep")
    assert again["serial"] == first["serial"] and again["naa"] == first["naa"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["volume", "create", "x", "--size", "12parsecs"], "size"),
        (["volume", "create", "x", "--size", "0"], "size"),
        (["volume", "inspect", "does-not-exist"], "not"),
        (["volume", "delete", "does-not-exist"], "not"),
        (["volume", "resize", "does-not-exist", "--size", "1GiB"], "not"),
    ],
)
def test_cli_errors_are_one_line_and_non_zero(daemon: Daemon, args: list[str], needle: str) -> None:
    proc = daemon.cli(*args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0].lower(), proc.stderr


def test_cli_duplicate_volume_is_refused(daemon: Daemon) -> None:
    first = daemon.create_volume("twice", "8MiB")
    # The same create again is a retry: the volume as it is (idempotent).
    again = daemon.create_volume("twice", "8MiB")
    assert again["volume_id"] == first["volume_id"]
    proc = daemon.cli("volume", "create", "twice", "--size", "16MiB", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "exists with other parameters: size is 8388608" in proc.stderr, proc.stderr


def test_cli_unreachable_daemon() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sparrow", "volume", "list", "--api", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "cannot reach" in proc.stderr.lower(), proc.stderr


def test_resize_grows_the_volume_seen_by_initiators(daemon: Daemon) -> None:
    rc16 = require_tool("iscsi-readcapacity16")
    daemon.create_volume("grow", "8MiB")
    url = daemon.url("grow")
    before = run([rc16, url]).stdout
    daemon.cli("volume", "resize", "grow", "--size", "16MiB")
    after = run([rc16, url]).stdout
    assert before != after
    assert str(16 * 1024 * 1024 // 512 - 1) in after or "16777216" in after, after


def test_volume_list_json(daemon: Daemon, tmp_path: Path) -> None:
    daemon.create_volume("listed", "8MiB")
    rows = json.loads(daemon.cli("volume", "list", "--json").stdout)
    assert any(r["name"] == "listed" for r in rows), rows
