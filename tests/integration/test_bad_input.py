"""Hostile bytes on the wire: the daemon answers or drops that connection and serves everyone else."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from pathlib import Path

import pytest

from frontend.iscsi.pdu import ScsiCommand
from frontend.server import MAX_CONNECTIONS, MAX_UNBOUND_PER_ADDRESS
from frontend.target import TargetSettings
from tests.integration.cluster import BASE_IQN
from tests.integration.daemon import Daemon
from tests.integration.test_node import RawSession
from tests.tools import require_tool, run, wait_for

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _login_pdu(data: bytes, *, dsl: int | None = None) -> bytes:
    bhs = bytearray(48)
    bhs[0] = 0x43  # immediate login request
    bhs[1] = 0x87  # T=1, CSG=1, NSG=3
    length = len(data) if dsl is None else dsl
    bhs[5:8] = length.to_bytes(3, "big")
    bhs[8:14] = bytes.fromhex("400000000001")
    pad = (-len(data)) % 4
    return bytes(bhs) + data + b"\0" * pad


def _assert_still_serving_any(daemon: Daemon, name: str) -> None:
    qemu_io = require_tool("qemu-io")
    run([qemu_io, "-f", "raw", "-c", "read 0 1M", daemon.url(name)])


def _assert_still_serving(daemon: Daemon, name: str) -> None:
    qemu_io = require_tool("qemu-io")
    out = run([qemu_io, "-f", "raw", "-c", "read -P 0x42 0 1M", daemon.url(name)]).stdout
    assert "Pattern verification failed" not in out, out


@pytest.fixture
def victim(daemon: Daemon) -> str:
    qemu_io = require_tool("qemu-io")
    daemon.create_volume("victim", "8MiB")
    run([qemu_io, "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "flush", daemon.url("victim")])
    return "victim"


def test_garbage_and_truncated_pdus(daemon: Daemon, victim: str) -> None:
    host, port = "127.0.0.1", daemon.iscsi_port
    attacks = [
        os.urandom(4096),
        b"\xff" * 48,
        _login_pdu(b"InitiatorName=x\0")[:30],  # truncated header, then close
        _login_pdu(b"", dsl=0xFFFFFF),  # promises a 16 MiB segment
        _login_pdu(b"\xff\xfe=\x00" * 100),  # not UTF-8
        _login_pdu(b"A" * 9000),  # no '=' at all, oversized
    ]
    for payload in attacks:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    _assert_still_serving(daemon, victim)


def test_half_open_flood_does_not_block_service(daemon: Daemon, victim: str) -> None:
    # From another address than the initiator's: one address gets MAX_UNBOUND_PER_ADDRESS of them.
    flooder = ("127.0.0.3", 0)
    socks = [
        socket.create_connection(("127.0.0.1", daemon.iscsi_port), timeout=5, source_address=flooder)
        for _ in range(200)
    ]
    try:
        for s in socks[:100]:
            s.sendall(_login_pdu(b"InitiatorName=iqn.x")[:40])
        _assert_still_serving(daemon, victim)
    finally:
        for s in socks:
            s.close()
    _assert_still_serving(daemon, victim)


def test_idle_connections_from_one_address_leave_room_for_others(daemon: Daemon, victim: str) -> None:
    # More connections than the daemon's whole cap (1024), from 127.0.0.3; the initiator that
    # must still be served comes from 127.0.0.1. Each flood connection sends nothing (a slow
    # login), so none would close before the 15 s login timeout.
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        for _ in range(MAX_CONNECTIONS + 16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.3", 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", daemon.iscsi_port))

        def flood_trimmed() -> bool:
            poller = select.poll()  # not select(): the descriptors pass 1024
            by_fd = {s.fileno(): s for s in socks}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(500):
                r = by_fd[fd]
                with contextlib.suppress(ConnectionResetError):
                    assert r.recv(100) == b""
                socks.remove(r)
                r.close()
            return len(socks) <= MAX_UNBOUND_PER_ADDRESS

        wait_for(flood_trimmed, timeout=10, what=f"the flood cut to {MAX_UNBOUND_PER_ADDRESS} connections")
        _assert_still_serving(daemon, victim)
        # Served while the flood stood: its connections' login timeout had not closed them yet.
        assert time.monotonic() - started < TargetSettings().login_timeout
    finally:
        for s in socks:
            s.close()
    _assert_still_serving(daemon, victim)


def test_unknown_opcode_in_login_phase_is_answered_not_fatal(daemon: Daemon, victim: str) -> None:
    bhs = bytearray(48)
    bhs[0] = 0x1C  # not an initiator opcode
    with socket.create_connection(("127.0.0.1", daemon.iscsi_port), timeout=5) as s:
        s.sendall(bytes(bhs) + struct.pack(">I", 0))
        s.settimeout(5)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            s.recv(4096)
    _assert_still_serving(daemon, victim)


def test_client_that_disconnects_mid_write_leaves_the_data_untouched(daemon: Daemon, victim: str) -> None:
    """A WRITE whose Data-Out never completes is never executed: the blocks keep their old data."""
    from frontend.iscsi.pdu import R2T, DataOut, ScsiCommand
    from tests.integration.daemon import BASE_IQN
    from tests.integration.test_node import RawSession

    session = RawSession(daemon.portal, f"{BASE_IQN}:{victim}")
    try:
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 64, 0).ljust(16, b"\0")  # WRITE(10), 64 blocks
        itt = session._itt()
        first = b"\xee" * 4096  # immediate data; the rest must be solicited with R2T
        session._send(
            ScsiCommand(
                False, True, False, True, 1, 0, itt, 64 * 512, session.cmd_sn, session.exp_stat_sn, cdb, first
            )
        )
        r2t = session._receive()
        assert isinstance(r2t, R2T), r2t
        half = r2t.desired_length // 2
        session._send(
            DataOut(False, 0, itt, r2t.ttt, session.exp_stat_sn, 0, r2t.buffer_offset, b"\xee" * half)
        )
    finally:
        session.close()  # gone mid-transfer
    _assert_still_serving(daemon, victim)


def _open_sessions(daemon: Daemon) -> float:
    """``sparrow_iscsi_sessions{kind="normal"}``: a session counts until its socket is gone."""
    status, body = daemon.get("/metrics")
    assert status == 200
    prefix = 'sparrow_iscsi_sessions{kind="normal"} '
    return next(float(ln.split()[-1]) for ln in body.decode().splitlines() if ln.startswith(prefix))


def test_an_initiator_that_never_reads_its_data_is_cut_off_and_frees_its_buffers(tmp_path: Path) -> None:
    """A logged-in initiator sends READs and never reads the answers (a slow client, or one that
    wants the target to hold its data): the daemon stops reading from it, its NOP-In goes
    unanswered, and the connection is ended, not left waiting for ever to flush its buffers."""
    config = tmp_path / "sparrow.toml"
    config.write_text("[iscsi]\nnop_interval = 1.0\nnop_timeout = 2.0\n")
    daemon = Daemon(tmp_path / "data", extra_args=("--config", str(config)))
    daemon.start()
    try:
        daemon.create_volume("victim", "64MiB")
        probe = RawSession(daemon.portal, f"{BASE_IQN}:victim")
        probe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert _open_sessions(daemon) == 1
        for _ in range(32):  # 32 MiB asked, the default command window
            cdb = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 2048, 0)
            probe._send(
                ScsiCommand(
                    False, True, True, False, 1, 0, probe._itt(), MiB, probe.cmd_sn, probe.exp_stat_sn, cdb
                )
            )
            probe.cmd_sn += 1
        try:
            wait_for(
                lambda: _open_sessions(daemon) == 0, timeout=15, what="the non-reading session to be closed"
            )
        finally:
            probe.close()
        _assert_still_serving_any(daemon, "victim")
    finally:
        assert daemon.stop() == 0, daemon.log_tail()


def test_a_login_sent_a_byte_a_second_is_cut_off_at_the_login_timeout(daemon: Daemon, victim: str) -> None:
    """A slow client in the login phase: each byte keeps the connection busy, none completes a
    login; the whole login must arrive within the login timeout (frontend.target.TargetSettings)."""
    timeout = TargetSettings().login_timeout
    pdu = _login_pdu(b"InitiatorName=iqn.2026-11.test:slow\0SessionType=Discovery\0")
    with socket.create_connection(("127.0.0.1", daemon.iscsi_port), timeout=5) as s:
        opened = time.monotonic()
        closed_after = None
        for byte in pdu:  # one a second: the attack's own pace, far longer than the timeout
            with contextlib.suppress(OSError):
                s.send(bytes([byte]))
            readable, _, _ = select.select([s], [], [], 1.0)
            if readable:
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b"", "answered a login that never completed"
                closed_after = time.monotonic() - opened
                break
        assert closed_after is not None, "still open after the whole PDU went out a byte a second"
    assert timeout - 0.5 <= closed_after <= timeout + 3.0, closed_after
    _assert_still_serving(daemon, victim)
