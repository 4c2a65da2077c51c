"""The replica side of the replication channel (issue 8, "Replication channel" and test 6): a real
`sparrow master` and two real `sparrow node`s; this test plays the volume's primary on the
replica's `--replication` port with the cluster secret (or without it, or badly).

Writes land in the replica's local store and read back byte-exact from its data file; garbage, no
secret, a stale or newer epoch, a wrong volume, a sender that is not the primary, a truncated frame
and a peer that stops reading its ACKs are each refused with a log line, the node keeps serving
(alive at the master, a new stream opens), and no copy changes."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparrow.cluster.channel import CLIENT_HELLO_SIZE, SERVER_HELLO_SIZE, Channel, Purpose, Side
from sparrow.replication.protocol import (
    HEADER,
    Ack,
    ErrorCode,
    Flush,
    MsgType,
    Open,
    Refuse,
    Unmap,
    Write,
    WriteSame,
    encode,
)
from tests.integration.cluster import Cluster, Node
from tests.integration.replication_peer import ReplicationLink, stream_key
from tests.integration.rogue import other_secret, secret_of
from tests.integration.test_cluster_door import sample
from tests.tools import wait_for

MiB = 1 << 20
SIZE = 32 * MiB
#: The node's handshake / frame / stall timeouts (5 s each by default), plus slack.
CLOSE_WITHIN = 5.0 + 4.0


def cut_off(sock: socket.socket) -> bool:
    """True once the node has closed ``sock`` (FIN or RST) without sending anything."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@dataclass
class Setup:
    cluster: Cluster
    volume_id: str
    epoch: int
    primary: Node
    replica: Node
    #: The seq the replica has applied in this epoch (the next stream opens at seq + 1).
    seq: int = 0

    def data_file(self, node: Node) -> Path:
        return node.data_dir / "volumes" / "rep.img"

    def checksums(self) -> tuple[str, str]:
        return tuple(  # type: ignore[return-value]
            hashlib.sha256(self.data_file(n).read_bytes()).hexdigest() for n in (self.primary, self.replica)
        )

    def stream_key(self) -> bytes:
        """The key the master gave the primary for this replica at this epoch."""
        return stream_key(
            self.cluster.master.data_dir,
            self.volume_id,
            self.epoch,
            self.primary.node_id,
            self.replica.node_id,
        )

    def link(self, **kwargs: object) -> ReplicationLink:
        """A connection as the real primary opens it (holding its stream key)."""
        kwargs.setdefault("stream_key", self.stream_key())
        return ReplicationLink(self.replica.replication_port, secret_of(self.cluster.root), **kwargs)  # type: ignore[arg-type]

    def open(self, link: ReplicationLink) -> None:
        answer = link.open(Open(self.volume_id, self.epoch, self.seq + 1, self.primary.node_id))
        assert answer == Ack(self.volume_id, self.epoch, self.seq, answer.durable_seq), answer

    def refusals(self, reason: str) -> float:
        return sample(self.replica.metrics(), "sparrow_replication_refused_total", reason=reason)

    def refusal_logged(self, reason: str, timeout: float = 0.0) -> dict[str, object]:
        def found() -> dict[str, object] | None:
            records = [
                r for r in self.replica.events("refused replication connection") if r["reason"] == reason
            ]
            return records[-1] if records else None

        record = wait_for(
            found, timeout=timeout or CLOSE_WITHIN, what=f"a refusal ({reason}) in the replica's log"
        )
        assert record["level"] == "warning" and str(record["peer"]).startswith("127.0.0.1:"), record
        return record

    def still_serving(self) -> None:
        """The replica is alive at the master, healthy, and opens a new stream at its position."""
        assert self.replica.running
        nodes = {n["node_id"]: n for n in self.cluster.master.get_json("/v1/nodes")["nodes"]}
        assert nodes[self.replica.node_id]["state"] == "alive", nodes
        assert not self.replica.health()["tasks_failed"]
        link = self.link()
        try:
            self.open(link)
        finally:
            link.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    cluster = Cluster(tmp_path_factory.mktemp("replication"), 2).start()
    try:
        cluster.cli("volume", "create", "rep", "--size", "16MiB", "--replicas", "2")
        cluster.wait_converged("rep", epoch=1, copies=2)
        cluster.cli("volume", "resize", "rep", "--size", f"{SIZE}")  # epoch 2: epoch 1 is now stale
        volume = cluster.wait_converged("rep", epoch=2, copies=2)
        primary = volume["primary"]["node_id"]
        [replica] = [r["node_id"] for r in volume["replicas"] if r["node_id"] != primary]
        s = Setup(cluster, volume["volume_id"], 2, cluster.node(primary), cluster.node(replica))
        wait_for(
            lambda: s.data_file(s.replica).exists() and s.data_file(s.replica).stat().st_size == SIZE,
            timeout=10,
            what="the replica's store at the resized size",
        )
        yield s
    finally:
        codes = cluster.close()
    assert all(code == 0 for code in codes.values()), codes


def test_writes_land_in_the_replicas_store_byte_exact(setup: Setup) -> None:
    before_primary = hashlib.sha256(setup.data_file(setup.primary).read_bytes()).hexdigest()
    blocks = {offset: os.urandom(4096) for offset in (0, 8192, 5 * MiB, SIZE - 4096)}
    link = setup.link()
    setup.open(link)
    s = setup.seq
    messages = [
        Write(setup.volume_id, 2, s + 1, 0, blocks[0]),
        Write(setup.volume_id, 2, s + 2, 8192, blocks[8192], fua=True),
        Write(setup.volume_id, 2, s + 3, 5 * MiB, blocks[5 * MiB]),
        Write(setup.volume_id, 2, s + 4, SIZE - 4096, blocks[SIZE - 4096]),
        # The same block twice, in order: the later write wins.
        Write(setup.volume_id, 2, s + 5, MiB, b"\x01" * MiB),
        Write(setup.volume_id, 2, s + 6, MiB, b"\x02" * 4096),
        WriteSame(setup.volume_id, 2, s + 7, 3 * MiB, 64 * 1024, b"\xab" * 512),
        Write(setup.volume_id, 2, s + 8, 6 * MiB, b"\xff" * 8192),
        Unmap(setup.volume_id, 2, s + 9, 6 * MiB, 4096),
        Flush(setup.volume_id, 2, s + 10),
    ]
    link.send(*messages[:4])  # several messages in one record, and pipelined: no ack awaited
    for m in messages[4:]:
        link.send(m)
    assert link.ack_until(s + 10, durable=s + 10) == Ack(setup.volume_id, 2, s + 10, s + 10)
    link.close()
    setup.seq = s + 10

    data = setup.data_file(setup.replica).read_bytes()
    assert len(data) == SIZE
    for offset, block in blocks.items():
        assert data[offset : offset + 4096] == block
    assert data[MiB : MiB + 4096] == b"\x02" * 4096 and data[MiB + 4096 : 2 * MiB] == b"\x01" * (MiB - 4096)
    assert data[3 * MiB : 3 * MiB + 64 * 1024] == b"\xab" * 64 * 1024
    assert (
        data[6 * MiB : 6 * MiB + 4096] == bytes(4096)
        and data[6 * MiB + 4096 : 6 * MiB + 8192] == b"\xff" * 4096
    )
    # Only the replica's copy changed (no primary was wired to forward anything yet).
    assert hashlib.sha256(setup.data_file(setup.primary).read_bytes()).hexdigest() == before_primary
    assert sample(setup.replica.metrics(), "sparrow_replication_applied_total") >= 10
    opened = setup.replica.events("replication stream opened")[-1]
    assert opened["volume_id"] == setup.volume_id and opened["primary"] == setup.primary.node_id


def test_garbage_is_refused(setup: Setup) -> None:
    before = setup.checksums()
    link = ReplicationLink(setup.replica.replication_port, None)
    link.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(200))
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    setup.refusal_logged("bad_magic")
    assert setup.refusals("bad_magic") >= 1
    assert setup.checksums() == before
    setup.still_serving()


def test_a_peer_without_the_secret_is_refused(setup: Setup) -> None:
    before = setup.checksums()
    channel = Channel(other_secret(), Side.CLIENT, Purpose.REPLICATION, time.monotonic())
    with socket.create_connection(
        ("127.0.0.1", setup.replica.replication_port), timeout=CLOSE_WITHIN
    ) as sock:
        sock.sendall(channel.initiate())
        answer = b""
        while len(answer) < SERVER_HELLO_SIZE:
            chunk = sock.recv(SERVER_HELLO_SIZE - len(answer))
            assert chunk
            answer += chunk
        sock.sendall(os.urandom(32))  # a MAC it cannot compute without the secret
        assert cut_off(sock)
    setup.refusal_logged("auth_failed")
    # A handshake for another purpose (a heartbeat channel) is refused too.
    heartbeat = Channel(secret_of(setup.cluster.root), Side.CLIENT, Purpose.HEARTBEAT, time.monotonic())
    with socket.create_connection(
        ("127.0.0.1", setup.replica.replication_port), timeout=CLOSE_WITHIN
    ) as sock:
        hello = heartbeat.initiate()
        assert len(hello) == CLIENT_HELLO_SIZE
        sock.sendall(hello)
        assert cut_off(sock)
    setup.refusal_logged("wrong_purpose")
    assert setup.checksums() == before
    setup.still_serving()


@pytest.mark.parametrize(("epoch", "code"), [(1, ErrorCode.STALE_EPOCH), (3, ErrorCode.NEWER_EPOCH)])
def test_an_epoch_that_is_not_the_persisted_one_is_refused(setup: Setup, epoch: int, code: ErrorCode) -> None:
    before = setup.checksums()
    link = setup.link()
    # The OPEN and a write pipelined behind it: neither is applied.
    link.send(
        Open(setup.volume_id, epoch, 1, setup.primary.node_id),
        Write(setup.volume_id, epoch, 1, 0, b"\xee" * 4096, fua=True),
    )
    answer = link.receive()
    assert isinstance(answer, Refuse) and answer.code is code, answer
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    assert setup.refusal_logged(code.reason)["volume_id"] is None
    assert setup.checksums() == before
    setup.still_serving()


@pytest.mark.parametrize("case", ["unknown volume", "not the primary", "to the primary"])
def test_a_wrong_volume_or_sender_is_refused(setup: Setup, case: str) -> None:
    before = setup.checksums()
    port, volume_id, sender, code = {
        "unknown volume": (
            setup.replica.replication_port,
            "ab" * 16,
            setup.primary.node_id,
            ErrorCode.UNKNOWN_VOLUME,
        ),
        "not the primary": (setup.replica.replication_port, setup.volume_id, "n9", ErrorCode.NOT_PRIMARY),
        "to the primary": (
            setup.primary.replication_port,
            setup.volume_id,
            setup.primary.node_id,
            ErrorCode.NOT_REPLICA,
        ),
    }[case]
    link = ReplicationLink(port, secret_of(setup.cluster.root))
    link.send(Open(volume_id, setup.epoch, 1, sender), Write(volume_id, setup.epoch, 1, 0, b"\xee" * 4096))
    answer = link.receive()
    assert isinstance(answer, Refuse) and answer.code is code, answer
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    assert setup.checksums() == before
    setup.still_serving()


@pytest.mark.parametrize("key", ["none", "another epoch's", "the wrong master's"])
def test_a_member_that_is_not_the_primary_cannot_open_a_stream_as_the_primary(setup: Setup, key: str) -> None:
    """Issue 8: a member holds the cluster secret and says it is the primary, at the current epoch,
    at the replica's position: without the stream key the master gave the primary its OPEN is
    refused ``not_authorized`` and the write behind it never lands."""
    before = setup.checksums()
    refused_before = setup.refusals("not_authorized")
    keys = {
        "none": None,
        # What a deposed primary holds: the key of epoch 1.
        "another epoch's": stream_key(
            setup.cluster.master.data_dir, setup.volume_id, 1, setup.primary.node_id, setup.replica.node_id
        ),
        "the wrong master's": hashlib.sha256(b"a guess").digest(),
    }
    link = setup.link(stream_key=keys[key])
    link.send(
        Open(setup.volume_id, setup.epoch, setup.seq + 1, setup.primary.node_id),
        Write(setup.volume_id, setup.epoch, setup.seq + 1, 0, b"\xee" * 4096, fua=True),
    )
    answer = link.receive()
    assert isinstance(answer, Refuse) and answer.code is ErrorCode.NOT_AUTHORIZED, answer
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    setup.refusal_logged("not_authorized")
    assert setup.refusals("not_authorized") == refused_before + 1
    assert setup.checksums() == before
    setup.still_serving()


def test_an_open_replayed_on_another_connection_is_refused(setup: Setup) -> None:
    """An OPEN the real primary sent (recorded by a member on the path) proves nothing on a
    connection of the member's own: the proof is bound to the channel's nonces."""
    before = setup.checksums()
    honest = setup.link()
    recorded = Open(setup.volume_id, setup.epoch, setup.seq + 1, setup.primary.node_id).signed(
        setup.stream_key(), honest.channel.binding if honest.channel is not None else b""
    )
    opened = honest.open(recorded)
    assert opened == Ack(setup.volume_id, setup.epoch, setup.seq, opened.durable_seq), opened
    honest.close()
    replay = setup.link(stream_key=None)
    answer = replay.open(recorded)
    assert isinstance(answer, Refuse) and answer.code is ErrorCode.NOT_AUTHORIZED, answer
    assert replay.closed_within(CLOSE_WITHIN)
    replay.close()
    assert "does not prove" in str(setup.refusal_logged("not_authorized")["detail"])
    assert setup.checksums() == before
    setup.still_serving()


def test_a_truncated_frame_is_refused(setup: Setup) -> None:
    before = setup.checksums()
    link = setup.link()
    setup.open(link)
    whole = encode(Write(setup.volume_id, 2, setup.seq + 1, 0, b"\xee" * 4096))
    assert whole[1] == MsgType.WRITE and len(whole) == HEADER.size + 8 + 4096
    link.send_plain(whole[:1000])  # the record is whole; the message in it is not, and never will be
    started = time.monotonic()
    answer = link.receive()
    assert isinstance(answer, Refuse) and answer.code is ErrorCode.TRUNCATED, answer
    assert 4.0 < time.monotonic() - started < CLOSE_WITHIN
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    setup.refusal_logged("truncated")
    assert setup.checksums() == before
    setup.still_serving()


def test_a_peer_that_stops_reading_its_acks_is_disconnected(setup: Setup) -> None:
    before = setup.checksums()
    link = setup.link(rcvbuf=4096, timeout=30.0)
    setup.open(link)
    first = setup.seq + 1
    region = SIZE - 8 * MiB  # zeros, written with zeros: applied, and the copy stays the same

    def flood() -> None:
        seq = first
        try:
            for _ in range(4000):  # the replica ACKs a run (a record) at most once: ~4000 ACKs unread
                batch = []
                for _ in range(16):
                    batch.append(Write(setup.volume_id, 2, seq, region + (seq % 2048) * 512, bytes(512)))
                    seq += 1
                link.send(*batch)
        except OSError:  # the node cut the connection
            pass

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    # Never reading a byte of the ACKs. They are cumulative (one per up to 16 applies or a run), so it is
    # the 64 KiB-for-5 s rule that cuts the peer off, once the flood has piled them up.
    setup.refusal_logged("not_reading", timeout=CLOSE_WITHIN + 10)
    sender.join(timeout=30)
    assert not sender.is_alive()
    assert link.closed_within(CLOSE_WITHIN)  # cut off (what it sends may have been buffered first)
    link.close()
    closed = wait_for(
        lambda: [
            r for r in setup.replica.events("replication stream closed") if r["applied_seq"] >= first - 1
        ][-1:],
        timeout=10,
        what="the stream's close logged",
    )[0]
    setup.seq = int(closed["applied_seq"])
    assert setup.checksums() == before
    setup.still_serving()


def test_the_handshake_is_capped_and_timed(setup: Setup) -> None:
    before = setup.checksums()
    port = setup.replica.replication_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN) for _ in range(64)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN) as over:
            assert cut_off(over)  # the 65th in the handshake is cut off at once
        setup.refusal_logged("handshake_cap")
        for sock in idle:  # the 64 that never said anything are cut off after the handshake timeout
            assert cut_off(sock)
        setup.refusal_logged("handshake_timeout")
    finally:
        for sock in idle:
            sock.close()
    # Authenticated, but no OPEN: cut off after the same timeout.
    link = setup.link()
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    setup.refusal_logged("open_timeout")
    assert setup.checksums() == before
    setup.still_serving()


def test_a_replica_that_moved_to_a_new_epoch_refuses_the_old_primarys_next_write(setup: Setup) -> None:
    link = setup.link()
    setup.open(link)
    s = setup.seq
    link.send(Write(setup.volume_id, 2, s + 1, 12 * MiB, b"\x11" * 4096))
    link.ack_until(s + 1)
    setup.cluster.cli("volume", "resize", "rep", "--size", f"{SIZE + 16 * MiB}")  # epoch 3, same primary
    wait_for(
        lambda: (setup.replica.persisted(setup.volume_id) or {}).get("epoch") == 3,
        timeout=10,
        what="the replica to persist epoch 3",
    )
    link.send(Write(setup.volume_id, 2, s + 2, 12 * MiB, b"\x22" * 4096, fua=True))
    answer = link.receive()
    assert isinstance(answer, Refuse) and answer.code is ErrorCode.STALE_EPOCH, answer
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    with setup.data_file(setup.replica).open("rb") as f:
        f.seek(12 * MiB)
        assert f.read(4096) == b"\x11" * 4096  # the deposed epoch's write never landed
    setup.epoch, setup.seq = 3, 0
    setup.still_serving()


def test_the_replica_stops_cleanly_with_a_stream_open(setup: Setup) -> None:
    link = setup.link()
    setup.open(link)
    link.send(Write(setup.volume_id, setup.epoch, setup.seq + 1, 0, b"\x33" * 4096))
    link.ack_until(setup.seq + 1)
    assert setup.replica.term() == 0  # SIGTERM: the stream is closed, the stores flushed
    assert link.closed_within(CLOSE_WITHIN)
    link.close()
    assert setup.data_file(setup.replica).read_bytes()[:4096] == b"\x33" * 4096
