"""``sparrow top`` against real daemons, with a real initiator (the gate writer, libiscsi) writing.

``--once`` prints one plain frame whose rates span one interval: the written volume shows a
non-zero write rate read from the serving node's /metrics (through ``sparrow serve``, and through
a cluster whose node is a process of its own, found at the ``http`` address of its Hello). In a
terminal (a pty) the view draws on the alternate screen and leaves it cleanly on ``q`` and on
Ctrl-C, exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sparrow.top.cli import scrape
from tests.integration.cluster import Cluster
from tests.integration.daemon import Daemon
from tests.integration.gate import Writer
from tests.integration.process import daemon_env
from tests.tools import free_port, run

pytestmark = pytest.mark.integration

#: Entering and leaving the alternate screen (rich's Live with screen=True).
ENTER_SCREEN = b"\x1b[?1049h"
LEAVE_SCREEN = b"\x1b[?1049l"


def row(frame: str, first: str) -> list[str]:
    (line,) = [x for x in frame.splitlines() if x.split()[:1] == [first]]
    return line.split()


def write_rate(volume_row: list[str]) -> tuple[float, str]:
    """W/s and the WRITE bytes rate from the end of a volume row: ``R/s W/s N unit/s N unit/s``
    (operations per second as ``840`` or ``12.3k``)."""
    ops = volume_row[-5]
    return (float(ops[:-1]) * 1000 if ops.endswith("k") else float(ops)), " ".join(volume_row[-2:])


def test_once_shows_the_volume_being_written_and_its_write_rate(daemon: Daemon) -> None:
    daemon.create_volume("busy", "16MiB")
    daemon.create_volume("idle", "16MiB")
    writer = Writer(daemon.url("busy"), run_id=11, blocks=1024, depth=4)
    try:
        writer.wait_acked(50)
        frame = daemon.cli("top", "--once", "--interval", "1").stdout
        assert writer.proc.poll() is None, "the writer stopped before the second snapshot"
        writer.stop()
    finally:
        writer.kill()
    busy = row(frame, "busy")
    assert busy[:6] == ["busy", "16", "MiB", "1", "local", "local*"], frame
    assert "served" in busy, frame
    ops, nbytes = write_rate(busy)
    assert ops > 0 and not nbytes.startswith("0 "), frame
    idle = row(frame, "idle")
    assert write_rate(idle) == (0.0, "0 B/s"), frame
    assert row(frame, "local")[:2] == ["local", "alive"], frame


def test_once_reads_the_rates_from_the_serving_nodes_metrics(make_cluster: Callable[[int], Cluster]) -> None:
    cluster = make_cluster(2)
    cluster.cli("volume", "create", "pair", "--size", "16MiB", "--replicas", "2")
    v = cluster.wait_converged("pair", epoch=1, copies=2)
    primary = v["primary"]["node_id"]
    writer = Writer(cluster.node(primary).url("pair"), run_id=12, blocks=1024, depth=4)
    try:
        writer.wait_acked(50)
        frame = cluster.cli("top", "--once", "--interval", "1").stdout
        writer.stop()
    finally:
        writer.kill()
    pair = row(frame, "pair")
    assert pair[4] == primary, frame
    other = "n2" if primary == "n1" else "n1"
    assert f"{primary}* in sync, {other} in sync" in " ".join(pair), frame
    ops, _ = write_rate(pair)
    assert ops > 0, frame
    assert [row(frame, n)[1] for n in ("n1", "n2")] == ["alive", "alive"], frame
    assert "no I/O figures" not in frame, frame


def _spawn_in_a_pty(daemon: Daemon) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: sparrow top with the pty as its terminal
        env = dict(daemon_env(daemon.root), TERM="xterm", COLUMNS="120", LINES="40")
        os.execve(
            sys.executable,
            [sys.executable, "-m", "sparrow", "top", "--api", daemon.api, "--interval", "0.2"],
            env,
        )
    return pid, fd


def _read_until(fd: int, pid: int, wanted: bytes, timeout: float) -> tuple[bytes, int | None]:
    """Read the pty until ``wanted`` appeared (exit code None) or the child exited (its code)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        try:
            if ready:
                seen += os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal (it exited)
            _, status = os.waitpid(pid, 0)
            return seen, os.waitstatus_to_exitcode(status)
        if wanted and wanted in seen:
            return seen, None
    raise AssertionError(f"timed out after {timeout}s waiting for {wanted!r}; got {seen[-500:]!r}")


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_in_a_terminal_it_refreshes_in_place_and_quits_cleanly(daemon: Daemon, key: bytes) -> None:
    daemon.create_volume("shown", "16MiB")
    pid, fd = _spawn_in_a_pty(daemon)
    try:
        first, _ = _read_until(fd, pid, b"shown", timeout=20)
        assert ENTER_SCREEN in first
        _read_until(fd, pid, b"shown", timeout=20)  # redrawn: a second frame
        os.write(fd, key)
        rest, code = _read_until(fd, pid, b"", timeout=20)
        assert code == 0, rest[-500:]
        assert LEAVE_SCREEN in rest, rest[-500:]
        assert b"Traceback" not in first + rest
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_piped_it_prints_plain_frames_until_interrupted(daemon: Daemon) -> None:
    daemon.create_volume("piped", "16MiB")
    command = [sys.executable, "-m", "sparrow", "top", "--api", daemon.api, "--interval", "0.2"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=daemon_env(daemon.root)
    )
    try:
        assert proc.stdout is not None
        frames = 0
        deadline = time.monotonic() + 30
        while frames < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            frames += line.startswith("sparrow top  ")
        assert frames == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"\x1b[" not in out and b"Traceback" not in err, (out[-300:], err)


def test_once_against_no_master_is_one_line_and_exit_1(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    proc = run(
        [sys.executable, "-m", "sparrow", "top", "--once", "--api", api],
        check=False,
        env=daemon_env(tmp_path),
    )
    assert proc.returncode == 1, proc
    assert proc.stderr == f"sparrow: error: cannot reach the Sparrow daemon at {api}: connection refused\n"


# --- a node's /metrics address is what the node said: the answer is not trusted ---------------------


class Peer:
    """A listener on loopback that answers each connection with ``answer(conn)`` and keeps what
    it was sent (a thread: the hostile side of a scrape)."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.accepted = threading.Event()
        self._answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            self.accepted.set()
            with conn:
                self.received = conn.recv(65536)
                self._answer(conn)

    def close(self) -> None:
        self.sock.close()


def test_a_node_dripping_its_answer_is_cut_off_at_the_scrape_timeout() -> None:
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n")
        while not stop.wait(0.1):  # a byte every 0.1 s: each read is quick, the answer never ends
            conn.sendall(b"X")

    peer = Peer(drip)
    started = time.monotonic()
    try:
        with pytest.raises(OSError, match="no whole answer within 1 s"):
            scrape(peer.url, timeout=1.0)
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        peer.close()


def test_a_node_answering_without_end_is_cut_off_at_the_limit() -> None:
    def flood(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        with contextlib.suppress(OSError):
            while True:
                conn.sendall(b"# x\n" * 16384)

    peer = Peer(flood)
    try:
        with pytest.raises(OSError, match="larger than 1048576 bytes"):
            scrape(peer.url, timeout=10.0, limit=1 << 20)
    finally:
        peer.close()


def test_a_redirect_is_not_followed_and_no_credential_is_sent() -> None:
    elsewhere = Peer(lambda conn: conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nsparrow_x 1\n"))
    redirect = f"HTTP/1.0 302 Found\r\nLocation: {elsewhere.url}\r\n\r\n".encode()
    peer = Peer(lambda conn: conn.sendall(redirect))
    try:
        with pytest.raises(OSError, match="HTTP 302"):
            scrape(peer.url)
        assert peer.received.startswith(b"GET /metrics HTTP/1.0\r\n")
        assert b"authorization" not in peer.received.lower() and b"cookie" not in peer.received.lower()
        assert not elsewhere.accepted.is_set()
    finally:
        peer.close()
        elsewhere.close()


def test_the_scrape_token_is_the_only_credential_sent_to_a_node() -> None:
    peer = Peer(lambda conn: conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nsparrow_x 1\n"))
    token = "sps_" + "ab" * 32
    try:
        assert scrape(peer.url, token=token) == "sparrow_x 1\n"
        head = peer.received.decode().split("\r\n")
        assert head[0] == "GET /metrics HTTP/1.0" and head[2:] == [f"Authorization: Bearer {token}", "", ""]
        assert "spw_" not in peer.received.decode() and b"cookie" not in peer.received.lower()
    finally:
        peer.close()


def test_with_a_reader_token_top_shows_the_volumes_and_says_why_no_node_rates(daemon: Daemon) -> None:
    """The scrape token is for admins only (a scrape token outlives a revoked API token)."""
    daemon.create_volume("ro", "16MiB")
    minted = json.loads(daemon.cli("token", "create", "--role", "reader", "--json").stdout)
    frame = daemon.cli("top", "--once", "--interval", "0.2", "--token", minted["token"]).stdout
    assert row(frame, "ro")[:2] == ["ro", "16"], frame
    assert "HTTP 401 (no scrape token:" in frame and "admin" in frame, frame
