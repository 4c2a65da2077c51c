"""A real `sparrow node` process against a fake master: it serves what it is assigned, fences before
its lease runs out, and serves again when the lease comes back.

The fake master is a real TCP server in the test that speaks the real heartbeat codec
(sparrow.cluster.heartbeat): it takes the node's Hello, answers each Heartbeat with an Ack carrying
a lease and an Assignment that names the node primary of one volume at epoch 1, and on demand
stops answering (the connection stays open; no Acks). The initiators are real: qemu-io (libiscsi)
for data, and a small raw iSCSI session built from frontend/iscsi/pdu.py that issues READ(10) in a
tight loop to time the fence: after the last renewal, READ must get CHECK CONDITION, NOT READY,
ASYMMETRIC ACCESS STATE TRANSITION (04/0A, SPC-4 5.15.2.4.6) from the fence deadline (lease minus
fence margin after that renewal's send time) on, and before the lease expires. CLOCK_MONOTONIC is
shared by the processes on one host, so the node's loop clock (logged with the fence) and the test's
``time.monotonic()`` are comparable here.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from frontend.iscsi.pdu import (
    DataIn,
    LoginRequest,
    LoginResponse,
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    encode_bytes,
    target_reader,
)
from sparrow.cluster.channel import ClusterSecret, Plaintext
from sparrow.cluster.heartbeat import FrameDecoder, encode
from sparrow.cluster.messages import Ack, Assignment, Heartbeat, Hello
from tests.integration.cluster import http_get
from tests.integration.process import Proc, scrape_bearer
from tests.integration.rogue import accept_channel, secret_file, secret_of
from tests.tools import free_port, require_tool, run, wait_for

pytestmark = pytest.mark.integration

BASE_IQN = "iqn.2026-11.io.sparrow"
NODE_ID = "node-a"
VOLUME_ID = "5e" * 16
VOLUME = "fenced"
SIZE = 16 * 1024 * 1024
LEASE = 2.0
INTERVAL = 0.5
FENCE_MARGIN = 0.5
#: The first refusal must come before the lease expires (docs/architecture.md, "The fencing bound").
FENCE_BUDGET = LEASE
NOT_READY, UNIT_ATTENTION = 0x2, 0x6
GOOD, CHECK_CONDITION = 0x00, 0x02


# -- the fake master ------------------------------------------------------------------------------


@dataclass
class FakeMaster:
    """Answers heartbeats with Acks while ``answering`` is set; records what it heard and sent."""

    secret: ClusterSecret
    port: int = field(default_factory=free_port)
    answering: threading.Event = field(default_factory=threading.Event)
    hellos: list[Hello] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    #: (seq, time.monotonic() the heartbeat arrived) of the last heartbeat answered with an Ack.
    last_acked: tuple[int, float] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def assignment(self, portal: str) -> Assignment:
        return Assignment(VOLUME_ID, VOLUME, SIZE, 512, 1, NODE_ID, portal, (NODE_ID,))

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.settimeout(0.2)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        decoder = FrameDecoder()
        hello: Hello | None = None
        with conn:
            conn.settimeout(5.0)
            channel, plain = accept_channel(conn, self.secret)
            decoder.feed(plain)
            conn.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                arrived = time.monotonic()
                if not data:
                    return
                for event in channel.feed(data, arrived):
                    if isinstance(event, Plaintext):
                        decoder.feed(event.data)
                while (message := decoder.next_message()) is not None:
                    if isinstance(message, Hello):
                        hello = message
                        with self.lock:
                            self.hellos.append(message)
                        continue
                    assert isinstance(message, Heartbeat), message
                    assert hello is not None, "a heartbeat before the hello"
                    with self.lock:
                        self.seqs.append(message.seq)
                        if not self.answering.is_set():
                            continue
                        ack = Ack(message.seq, LEASE, (self.assignment(hello.iscsi_portal),))
                        conn.sendall(channel.send(encode(ack)))
                        self.last_acked = (message.seq, arrived)


# -- the node process -----------------------------------------------------------------------------


class NodeProcess(Proc):
    """A real `sparrow node` against the test's fake master."""

    def __init__(self, data_dir: Path, master: str) -> None:
        super().__init__(data_dir.name, data_dir.parent)
        self.master = master
        self.iscsi_port = free_port()
        self.http_port = free_port()

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sparrow", "node",
            "--data-dir", str(self.data_dir),
            "--node-id", NODE_ID,
            "--master", self.master,
            "--iscsi", self.portal,
            "--replication", f"127.0.0.1:{free_port()}",
            "--http", f"127.0.0.1:{self.http_port}",
            "--heartbeat-interval", str(INTERVAL),
            "--fence-margin", str(FENCE_MARGIN),
            "--log-format", "json",
            "--cluster-secret-file", str(secret_file(self.root)),
        ]  # fmt: skip

    def stop(self) -> int:
        return self.term(30)

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.iscsi_port}"

    @property
    def iqn(self) -> str:
        return f"{BASE_IQN}:{VOLUME}"

    @property
    def url(self) -> str:
        return f"iscsi://{self.portal}/{self.iqn}/0"

    def health(self) -> dict[str, Any]:
        """GET /healthz: 200, or 503 while a primary is fenced (sparrow.health)."""
        status, body = http_get(f"http://127.0.0.1:{self.http_port}/healthz")
        assert status in (200, 503), status
        return dict(json.loads(body))

    def access_state(self) -> str | None:
        for v in self.health()["volumes"]:
            if v["volume_id"] == VOLUME_ID:
                return str(v["access_state"])
        return None


@dataclass(frozen=True)
class Answer:
    status: int
    sense_key: int | None = None
    asc: int | None = None
    ascq: int | None = None

    @property
    def not_ready_transition(self) -> bool:
        return (self.status, self.sense_key, self.asc, self.ascq) == (CHECK_CONDITION, NOT_READY, 0x04, 0x0A)


class RawSession:
    def __init__(self, portal: str, iqn: str) -> None:
        host, port = portal.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = target_reader(max_data_segment_length=1 << 20)
        self.itt = 0
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        keys = {
            "InitiatorName": "iqn.2026-11.test:fence-probe",
            "SessionType": "Normal",
            "TargetName": iqn,
            "HeaderDigest": "None",
            "DataDigest": "None",
        }
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        self._send(
            LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000042, 0, self._itt(), 0, self.cmd_sn, 0, text)
        )
        resp = self._receive()
        assert isinstance(resp, LoginResponse), resp
        assert resp.status_class == 0 and resp.transit and resp.nsg == 3, resp
        self.exp_stat_sn = resp.stat_sn + 1

    def _itt(self) -> int:
        self.itt += 1
        return self.itt

    def _send(self, pdu: object) -> None:
        self.sock.sendall(encode_bytes(pdu))  # type: ignore[arg-type]

    def _receive(self) -> object:
        while (pdu := self.reader.next_pdu()) is None:
            data = self.sock.recv(65536)
            assert data, "the target closed the connection"
            self.reader.feed(data)
        return pdu

    def read10(self, lba: int = 0) -> Answer:
        """READ(10) of one 512-byte block; NOP-Ins from the target are answered on the way."""
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, 1, 0)
        itt = self._itt()
        self._send(ScsiCommand(False, True, True, False, 1, 0, itt, 512, self.cmd_sn, self.exp_stat_sn, cdb))
        self.cmd_sn += 1
        while True:
            pdu = self._receive()
            if isinstance(pdu, NopIn):
                if pdu.ttt != 0xFFFFFFFF:
                    self._send(NopOut(True, 0, 0xFFFFFFFF, pdu.ttt, self.cmd_sn, self.exp_stat_sn))
                continue
            if isinstance(pdu, DataIn):
                if pdu.status_present:
                    self.exp_stat_sn = pdu.stat_sn + 1
                    return Answer(pdu.status)
                continue
            assert isinstance(pdu, ScsiResponse), pdu
            self.exp_stat_sn = pdu.stat_sn + 1
            sense = bytes(pdu.data)
            if pdu.status == CHECK_CONDITION and len(sense) >= 14:
                return Answer(pdu.status, sense[2] & 0x0F, sense[12], sense[13])
            return Answer(pdu.status)

    def read_past_unit_attentions(self) -> Answer:
        """READ(10), repeated past UNIT ATTENTIONs (each access state change queues one)."""
        for _ in range(8):
            answer = self.read10()
            if answer.sense_key != UNIT_ATTENTION:
                return answer
        raise AssertionError("unit attentions without end")

    def close(self) -> None:
        self.sock.close()


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def master(tmp_path: Path) -> Iterator[FakeMaster]:
    m = FakeMaster(secret_of(tmp_path))
    m.start()
    yield m
    m.stop()


@pytest.fixture
def node(tmp_path: Path, master: FakeMaster) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "data", master.address)
    yield n
    if n.proc is not None and n.proc.poll() is None:
        n.proc.kill()
        n.proc.wait(timeout=10)


def qemu_io(url: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [require_tool("qemu-io"), "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = run([*args, url], check=check, timeout=60)
    if check:
        out = proc.stdout + proc.stderr
        assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    return proc


def wait_serving(node: NodeProcess, timeout: float = 15.0) -> None:
    wait_for(lambda: node.access_state() == "active_optimized", timeout=timeout, what="the node to serve")


# -- the tests ------------------------------------------------------------------------------------


def test_node_serves_its_assignment_fences_when_the_lease_lapses_and_serves_again(
    master: FakeMaster, node: NodeProcess
) -> None:
    require_tool("qemu-io")
    master.answering.set()
    node.start()
    wait_serving(node)

    hello = master.hellos[0]
    assert (hello.node_id, hello.iscsi_portal) == (NODE_ID, node.portal)
    assert hello.capacity_bytes >= hello.free_bytes > 0

    # 1. The node serves the volume it was assigned, to a real initiator.
    qemu_io(node.url, "write -P 0x5a 0 64k", "write -P 0xa5 1M 4k")
    qemu_io(node.url, "read -P 0x5a 0 64k", "read -P 0xa5 1M 4k", "read -P 0 64k 960k")
    assert (node.data_dir / "volumes" / f"{VOLUME}.img").exists()
    record = json.loads((node.data_dir / "cluster" / f"{VOLUME_ID}.json").read_text())
    assert record["body"]["epoch"] == 1 and record["body"]["role"] == "primary", record

    probe = RawSession(node.portal, node.iqn)
    try:
        assert probe.read_past_unit_attentions() == Answer(GOOD)

        # 2. After a few renewals, the master goes silent (connection open, no Acks): the node
        # must fence by itself, counting the lease from the send of the last renewal.
        wait_for(lambda: master.last_acked and master.last_acked[0] >= 4, timeout=10, what="renewals")
        with master.lock:
            master.answering.clear()
            assert master.last_acked is not None
            last_seq, last_renewal_arrived = master.last_acked
        while True:
            answer = probe.read10()
            refused_at = time.monotonic()
            if answer.status != GOOD:
                break
            assert refused_at - last_renewal_arrived < LEASE + 2.0, "the node never fenced"
            time.sleep(0.002)
        # A UNIT ATTENTION (ASYMMETRIC ACCESS STATE CHANGED, 06/2A/06) may come first; then NOT READY.
        if answer.sense_key == UNIT_ATTENTION:
            assert (answer.asc, answer.ascq) == (0x2A, 0x06), answer
        fenced = probe.read_past_unit_attentions()
        assert fenced.not_ready_transition, fenced
        assert probe.read10().not_ready_transition  # and it stays fenced

        [event] = wait_for(lambda: node.events("fenced") or None, timeout=5, what="the fence in the log")
        lease_sent_at = event["lease_expired_at"] - LEASE  # the node's send time of the last renewal
        delay = refused_at - lease_sent_at
        print(
            f"\nFENCE: last renewal heartbeat seq {last_seq} sent at t={lease_sent_at:.4f} (master got it "
            f"{(last_renewal_arrived - lease_sent_at) * 1000:.2f} ms later); lease {LEASE:.1f} s; "
            f"fence applied by the node at t={event['fenced_at']:.4f} ({event['late_ms']:.2f} ms after "
            f"its deadline, {event['before_expiry_ms']:.1f} ms before expiry); first refused READ "
            f"answered at t={refused_at:.4f}: fence delay {delay * 1000:.1f} ms from the send (deadline "
            f"{(LEASE - FENCE_MARGIN) * 1000:.0f} ms, lease {FENCE_BUDGET * 1000:.0f} ms), "
            f"{(lease_sent_at + LEASE - refused_at) * 1000:.1f} ms before the lease expired"
        )
        assert delay < FENCE_BUDGET, f"fenced {delay:.3f}s after the last renewal was sent"
        assert event["before_expiry_ms"] > 0, "the fence did not land before the lease expired"
        assert refused_at >= lease_sent_at + LEASE - FENCE_MARGIN - 0.005, "fenced before the fence deadline"
        assert node.access_state() == "transitioning"
        assert master.seqs[-1] > last_seq, "the node stopped heartbeating"
        url = f"http://127.0.0.1:{node.http_port}/metrics"
        _, body = http_get(url, headers=scrape_bearer(secret_file(node.root)))
        metrics = body.decode()
        assert "sparrow_node_fences_total 1.0" in metrics and "sparrow_node_lease_valid 0.0" in metrics

        # qemu-io cannot read either.
        failed = qemu_io(node.url, "read -P 0x5a 0 4k", check=False)
        out = failed.stdout + failed.stderr
        assert failed.returncode != 0 or "failed" in out.lower() or "error" in out.lower(), out

        # 3. The master answers again: service comes back, with the data.
        resumed_at = time.monotonic()
        master.answering.set()
        wait_for(
            lambda: probe.read_past_unit_attentions() == Answer(GOOD), timeout=10, what="service to resume"
        )
        print(
            f"RESUME: serving again {(time.monotonic() - resumed_at) * 1000:.0f} ms after the master answered"
        )
    finally:
        probe.close()
    qemu_io(node.url, "read -P 0x5a 0 64k", "read -P 0xa5 1M 4k")

    seqs = master.seqs
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "heartbeat seqs must increase"
    assert node.stop() == 0, node.log()


def test_a_restarted_node_serves_only_after_an_ack_confirms_it(master: FakeMaster, node: NodeProcess) -> None:
    require_tool("qemu-io")
    master.answering.set()
    node.start()
    wait_serving(node)
    qemu_io(node.url, "write -P 0x3c 0 64k")
    assert node.stop() == 0, node.log()
    seq_before = max(master.seqs)

    # Restart with the master silent: the persisted primary is exported, but fenced.
    master.answering.clear()
    node.start()
    assert node.access_state() == "transitioning"
    probe = RawSession(node.portal, node.iqn)
    try:
        assert probe.read_past_unit_attentions().not_ready_transition
        wait_for(lambda: len(master.hellos) >= 2, timeout=5, what="the second hello")
        assert master.hellos[1].incarnation > master.hellos[0].incarnation
        time.sleep(3 * INTERVAL)  # heartbeats flow, but no Ack: still fenced
        assert probe.read_past_unit_attentions().not_ready_transition
        assert node.access_state() == "transitioning"

        master.answering.set()
        wait_for(lambda: probe.read_past_unit_attentions() == Answer(GOOD), timeout=10, what="service")
    finally:
        probe.close()
    qemu_io(node.url, "read -P 0x3c 0 64k")
    # A new process numbers its heartbeats afresh; within each process they increase.
    assert master.seqs[-1] >= 1 and seq_before >= 1
    assert node.stop() == 0, node.log()
