"""Bounded HTTP resources (issue 7, finding 5; sparrow.httplimits) on a real `sparrow serve`.

Every limit is set low in a TOML config so that the tests take seconds; the daemon applies the
same code to the master's and the node's listeners (sparrow.lifecycle.start_http).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster import metric
from tests.integration.daemon import Daemon
from tests.integration.process import admin_token, bearer
from tests.tools import wait_for

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 1.0
IDLE_TIMEOUT = 3.0
MAX_CONNECTIONS = 230
#: Scheduling slack on a loaded 2-CPU machine.
SLACK = 1.5


#: The cap of the connection-cap test: with its 10 extra connections, under the listen backlog (100),
#: so the kernel queues them all and the daemon accepts them at once (a full backlog drops SYNs and
#: the client retries seconds later, which would test the kernel, not the cap).
SMALL_CAP = 40


def _daemon(tmp_path: Path, max_connections: int) -> Iterator[Daemon]:
    config = tmp_path / "sparrow.toml"
    config.write_text(
        "[http]\n"
        f"header_timeout = {HEADER_TIMEOUT}\n"
        f"body_timeout = {BODY_TIMEOUT}\n"
        f"idle_timeout = {IDLE_TIMEOUT}\n"
        f"max_connections = {max_connections}\n"
    )
    d = Daemon(tmp_path / "data", extra_args=("--config", str(config)))
    d.start()
    yield d
    assert d.stop() == 0, d.log_tail()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Daemon]:
    yield from _daemon(tmp_path, MAX_CONNECTIONS)


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Daemon]:
    yield from _daemon(tmp_path, SMALL_CAP)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer has closed ``sock`` (readable now, with EOF or a reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def _closed_total(daemon: Daemon, reason: str) -> float | None:
    status, body = daemon.get("/metrics")
    assert status == 200
    return metric(body.decode(), f'sparrow_http_connections_closed_total{{reason="{reason}"}}')


def test_slow_headers_are_closed_after_the_header_timeout_and_others_are_served(limited: Daemon) -> None:
    """200 connections send a request head a byte a second: each is closed within the header
    timeout, and a normal request succeeds meanwhile."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 64
    socks: dict[socket.socket, float] = {}
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", limited.http_port), timeout=5)
        socks[s] = time.monotonic()
    open_socks = dict(socks)
    closed_after: list[float] = []
    sent = 0
    served = None
    deadline = time.monotonic() + HEADER_TIMEOUT + SLACK + 2.0
    next_byte = time.monotonic()
    try:
        while open_socks and time.monotonic() < deadline:  # bounded: at most a few seconds
            now = time.monotonic()
            if now >= next_byte and sent < len(head):
                for s in list(open_socks):
                    with contextlib.suppress(OSError):  # closed under us: found below
                        s.send(head[sent : sent + 1])
                sent += 1
                next_byte = now + 1.0
            if served is None and sent >= 2:  # the slow clients are all connected and sending
                status, body = limited.get("/healthz")
                served = (status, json.loads(body))
            readable, _, _ = select.select(list(open_socks), [], [], max(0.0, min(0.1, next_byte - now)))
            for s in readable:
                if _closed_by_peer(s):
                    closed_after.append(time.monotonic() - open_socks.pop(s))
        assert not open_socks, f"{len(open_socks)} slow connections still open after the header timeout"
        assert served is not None and served[0] == 200 and served[1]["status"] == "ok", served
        assert sent < len(head), "the head was sent whole: the test proves nothing"
        assert len(closed_after) == 200
        assert max(closed_after) <= HEADER_TIMEOUT + SLACK, max(closed_after)
        assert min(closed_after) >= HEADER_TIMEOUT - 0.1, min(closed_after)
    finally:
        for s in socks:
            s.close()
    assert _closed_total(limited, "header_timeout") == 200.0


def test_connections_over_the_cap_are_closed_at_once_and_counted(capped: Daemon) -> None:
    # 10 connections more than the cap, opened at once: exactly 10 are closed, long before any timeout
    # could have closed them, and the rest stay open.
    address = ("127.0.0.1", capped.http_port)
    started = time.monotonic()
    socks = [socket.create_connection(address, timeout=5) for _ in range(SMALL_CAP + 10)]
    try:
        open_socks = set(socks)
        closed: list[socket.socket] = []
        deadline = started + HEADER_TIMEOUT / 2
        while len(closed) < 10 and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_socks), [], [], max(0.0, deadline - time.monotonic()))
            for s in readable:
                if _closed_by_peer(s):
                    open_socks.discard(s)
                    closed.append(s)
        assert len(closed) == 10, (len(closed), capped.log_tail())
        assert time.monotonic() - started < HEADER_TIMEOUT, "too slow to tell the cap from the timeout"
        still_closed = [s for s in open_socks if _closed_by_peer(s)]
        assert still_closed == []  # the ones under the cap are still open
    finally:
        for s in socks:
            s.close()
    # Room again once the daemon has seen them go; until then it refuses (and counts) this request too.
    refused_here = 0
    deadline = time.monotonic() + 10
    while True:
        try:
            closed_total = _closed_total(capped, "too_many_connections")
            break
        except (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError):
            refused_here += 1
            assert time.monotonic() < deadline, "no room for a request 10 s after the connections closed"
            time.sleep(0.02)  # the poll interval of tests.tools.wait_for
    assert closed_total == 10.0 + refused_here


def test_a_client_that_never_reads_its_answers_is_cut_off(limited: Daemon) -> None:
    """A client pipelines requests for /openapi.json (public, 60 KiB each) and reads nothing: the
    daemon's sends stall once the socket buffers are full. aiohttp would wait on them without end
    (its keep-alive timer does not run while a request is in progress), holding one of the
    max_connections slots for as long as the client liked; it is aborted after the idle timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect(("127.0.0.1", limited.http_port))
        s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 200)
        sent = time.monotonic()
        wait_for(
            lambda: _closed_total(limited, "send_timeout") == 1.0,
            timeout=IDLE_TIMEOUT + SLACK + 5,
            what="the stalled connection cut off",
        )
        assert time.monotonic() - sent >= IDLE_TIMEOUT - 0.1
        tcp_state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        assert tcp_state == 7, tcp_state  # TCP_CLOSE: reset by the daemon, its buffers dropped
        assert _closed_total(limited, "send_timeout") == 1.0  # nothing else was cut off


def test_a_slow_body_is_answered_408_and_closed(limited: Daemon) -> None:
    # With a valid token: a request without one is refused (401) before its body is read.
    token = admin_token(limited.root, limited.api).encode()
    with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as s:
        s.sendall(
            b"POST /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token + b"\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"name": "slow",'
        )
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):  # until the daemon closes the connection
            answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"request body not received within 1 s" in answer, answer
    assert elapsed >= BODY_TIMEOUT - 0.1, elapsed
    assert _closed_total(limited, "body_timeout") == 1.0
    assert json.loads(limited.get("/v1/volumes")[1]) == {"volumes": []}  # nothing was created


def test_an_idle_kept_alive_connection_is_closed(limited: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        answered = time.monotonic()
        s.settimeout(IDLE_TIMEOUT + 5)
        assert s.recv(1) == b""  # closed by the daemon, not by this timeout
        idle = time.monotonic() - answered
    assert IDLE_TIMEOUT - 0.1 <= idle <= IDLE_TIMEOUT + SLACK, idle


def test_a_whole_body_in_time_still_gets_its_answers(limited: Daemon) -> None:
    """What held before stays: a body that arrives in time is read once; too large is a JSON 413."""
    import urllib.request

    def post(body: bytes) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(
            limited.api + "/v1/volumes",
            data=body,
            headers={"Content-Type": "application/json", **bearer(limited.root, limited.api)},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return int(e.code), json.loads(e.read())

    assert post(b"x" * (1 << 20)) == (413, {"error": "request body too large"})
    assert post(b"{") == (400, {"error": "request body is not valid JSON"})
    status, created = post(b'{"name": "ok", "size": "8MiB"}')
    assert status == 201 and created["name"] == "ok", created
