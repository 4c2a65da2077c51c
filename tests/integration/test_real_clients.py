"""Real initiators against a real daemon: qemu-img, qemu-io, iscsi-ls, iscsi-inq."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.daemon import BASE_IQN, Daemon
from tests.tools import require_tool, run

pytestmark = pytest.mark.integration


def test_qemu_img_copies_a_random_image_in_and_out_bit_exact(daemon: Daemon, tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    daemon.create_volume("copy", "64MiB")
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    url = daemon.url("copy")
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source), url], timeout=300)
    back = tmp_path / "out.img"
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", url, str(back)], timeout=300)
    assert back.read_bytes() == source.read_bytes()


def test_qemu_io_patterns_and_never_written_blocks_read_zero(daemon: Daemon) -> None:
    qemu_io = require_tool("qemu-io")
    daemon.create_volume("pattern", "16MiB", "--block-size", "4096")
    url = daemon.url("pattern")
    out = run([
        qemu_io, "-f", "raw",
        "-c", "write -P 0x5a 0 1M",
        "-c", "write -P 0xa5 8M 64k",
        "-c", "read -P 0x5a 0 1M",
        "-c", "read -P 0xa5 8M 64k",
        "-c", "read -P 0 1M 7M",
        "-c", "read -P 0 15M 1M",
        url,
    ]).stdout
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") >= 4, out


def test_iscsi_ls_discovers_every_target(daemon: Daemon) -> None:
    iscsi_ls = require_tool("iscsi-ls")
    for name in ("alpha", "beta", "gamma"):
        daemon.create_volume(name, "8MiB")
    out = run([iscsi_ls, "-s", f"iscsi://{daemon.portal}"]).stdout
    for name in ("alpha", "beta", "gamma"):
        assert f"{BASE_IQN}:{name}" in out, out
    assert daemon.portal in out, out


def test_vpd_identity_is_stable_across_kill_and_restart(daemon: Daemon) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    daemon.create_volume("stable", "8MiB")
    url = daemon.url("stable")
    serial = run([iscsi_inq, "-e", "1", "-c", "128", url]).stdout
    ident = run([iscsi_inq, "-e", "1", "-c", "131", url]).stdout
    assert "Unit Serial Number" in serial or "serial" in serial.lower(), serial
    assert "NAA" in ident or "naa" in ident.lower(), ident
    daemon.kill9()
    daemon.start()
    assert run([iscsi_inq, "-e", "1", "-c", "128", url]).stdout == serial
    assert run([iscsi_inq, "-e", "1", "-c", "131", url]).stdout == ident


def test_qemu_io_with_a_header_digest(daemon: Daemon) -> None:
    """qemu's iSCSI driver with header-digest=crc32c: HeaderDigest=CRC32C is negotiated and the fast
    path answers with a digest after every header (libiscsi checks each one; a wrong one fails the
    command). Patterns written, read back, and never-written blocks read as zeros."""
    qemu_io = require_tool("qemu-io")
    daemon.create_volume("hdigest", "16MiB")
    portal, iqn, lun = daemon.url("hdigest").removeprefix("iscsi://").split("/")
    spec = {"driver": "raw", "file": {"driver": "iscsi", "transport": "tcp", "portal": portal, "target": iqn,
                                      "lun": int(lun), "header-digest": "crc32c"}}
    out = run([
        qemu_io, "-c", "write -P 0x3c 0 1M", "-c", "write -P 0xc3 4k 4k", "-c", "read -P 0x3c 0 4k",
        "-c", "read -P 0xc3 4k 4k", "-c", "read -P 0x3c 8k 1016k", "-c", "read -P 0 1M 15M",
        "json:" + json.dumps(spec),
    ]).stdout
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    assert out.count("read ") >= 4, out
