"""Heartbeat-codec peers for integration tests, with or without the cluster secret.

:func:`secret_file` gives a test cluster its one secret file. :class:`NodeLink` is a blocking
client of a real master's heartbeat port: it runs the cluster channel's handshake with a secret
(or skips it: ``secret=None`` sends plain heartbeat frames, as a process without the secret would)
and then speaks the heartbeat codec through the channel; it signs each Hello it sends with a node
key (docs/cluster.md, "Node identity"): its own, or by default :func:`rogue_key` of the node id, the
same on every connection, never a real node's (which is in that node's data directory).
:func:`accept_channel` is the same for a fake master's end of a connection from a real node.
"""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import msgpack

from sparrow.cluster.channel import (
    DEFAULT_MAX_PLAINTEXT,
    Channel,
    ChannelError,
    ClusterSecret,
    HandshakeBytes,
    Plaintext,
    Purpose,
    Side,
)
from sparrow.cluster.heartbeat import HEADER, FrameDecoder, encode
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.cluster.masteridentity import verify as verify_master
from sparrow.cluster.messages import Ack, Heartbeat, Hello, Message, Refusal, VolumeObservation
from sparrow.cluster.nodeidentity import NodeKey
from sparrow.clustersecret import generate_cluster_secret, load_cluster_secret
from sparrow.nodekey import NODE_KEY_NAME, load_node_key
from tests.tools import FAKE_MASTER

SECRET_NAME = "cluster.secret"


def secret_file(root: Path) -> Path:
    """``ROOT/cluster.secret``, made (0600) on first use."""
    path = root / SECRET_NAME
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        generate_cluster_secret(path)
    return path


def secret_of(root: Path) -> ClusterSecret:
    return load_cluster_secret(secret_file(root))


def other_secret() -> ClusterSecret:
    return ClusterSecret.from_text(b"not-the-cluster-secret-" + b"x" * 32)


class Closed(Exception):
    """The peer closed the connection (or it failed)."""


class Refused(Closed):
    """The master refused the Hello (its ``Refusal``, then it closed the connection)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"refused: {refusal.reason}: {refusal.detail}")
        self.refusal = refusal


def rogue_key(node_id: str) -> NodeKey:
    """The key a test client proves for ``node_id`` unless given one: the same on every connection
    (a fake node reconnects as itself), never the real node's."""
    return NodeKey(hashlib.sha256(b"rogue " + node_id.encode()).digest())


def node_key_of(data_dir: Path) -> NodeKey:
    """A real node's own key, read from its data directory (only its owner can)."""
    return load_node_key(data_dir / NODE_KEY_NAME)


class ChannelLink:
    """One blocking connection through the cluster channel (``purpose``), or plain when ``secret``
    is None, as a member (honest or not) would open it; ``decoder`` frames the plaintext (it has
    ``feed`` and ``next_message``). Every byte written is kept in :attr:`sent`."""

    #: Who is at the other end, for the Closed messages.
    peer = "the peer"

    def __init__(
        self,
        sock: socket.socket,
        secret: ClusterSecret | None,
        purpose: Purpose,
        decoder: Any,
        *,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
    ) -> None:
        self.sock = sock
        self.decoder = decoder
        self.channel: Channel | None = None
        self.sent: list[bytes] = []
        if secret is not None:
            try:
                self._handshake(secret, purpose, max_plaintext)
            except BaseException:
                self.sock.close()
                raise

    def _handshake(self, secret: ClusterSecret, purpose: Purpose, max_plaintext: int) -> None:
        self.channel = Channel(secret, Side.CLIENT, purpose, time.monotonic(), max_plaintext=max_plaintext)
        self._raw(self.channel.initiate())
        while not self.channel.established:
            for event in self.channel.feed(self._recv(), time.monotonic()):
                if isinstance(event, HandshakeBytes):
                    self._raw(event.data)

    def _raw(self, data: bytes) -> None:
        self.sent.append(data)
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except OSError as e:
            raise Closed(str(e)) from None
        if not data:
            raise Closed(f"closed by {self.peer}")
        return data

    def send_raw(self, data: bytes) -> None:
        self._raw(data)

    def send_plain(self, data: bytes) -> None:
        """``data`` as the content of one channel record (or as is, with no channel)."""
        self._raw(data if self.channel is None else self.channel.send(data))

    def receive_message(self) -> Any:
        """The next framed message from the peer (raises Closed)."""
        while True:
            message = self.decoder.next_message()
            if message is not None:
                return message
            data = self._recv()
            if self.channel is None:
                self.decoder.feed(data)
                continue
            try:
                events = self.channel.feed(data, time.monotonic())
            except ChannelError as e:
                raise Closed(str(e)) from None
            for event in events:
                if isinstance(event, Plaintext):
                    self.decoder.feed(event.data)

    def closed_within(self, seconds: float, *, read_through: bool = False) -> bool:
        """True if the peer closes the connection within ``seconds``. Bytes it sends first end the
        wait with False, or are read and passed over with ``read_through``."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
            if not read_through:
                return False

    def close(self) -> None:
        self.sock.close()


class NodeLink(ChannelLink):
    """One heartbeat connection to a master, as a node (honest or not) would open it."""

    peer = "the master"

    def __init__(
        self, port: int, secret: ClusterSecret | None, *, timeout: float = 5.0, key: NodeKey | None = None
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        super().__init__(sock, secret, Purpose.HEARTBEAT, FrameDecoder())
        #: The key each Hello is signed with (None: :func:`rogue_key` of its node id).
        self.key = key
        #: The key the master proved in its first message (docs/cluster.md, "Master identity").
        self.master_key: bytes | None = None
        if self.channel is not None:
            try:
                self.master_key = verify_master(self.receive_message(), self.channel.binding)
            except BaseException:
                self.sock.close()
                raise

    def send(self, message: Message) -> None:
        """Send ``message``; a Hello without a proof is signed for this connection first."""
        if isinstance(message, Hello) and message.proof is None and self.channel is not None:
            key = self.key or rogue_key(message.node_id)
            message = key.sign_hello(message, self.channel.binding)
        self.send_plain(encode(message))

    def receive(self) -> Message:
        """The next message from the master; raises Refused for a Refusal, Closed at the end."""
        message: Message = self.receive_message()
        if isinstance(message, Refusal):
            raise Refused(message)
        return message

    def beat(self, seq: int, observations: tuple[VolumeObservation, ...] = ()) -> Ack:
        """Send Heartbeat ``seq``; its Ack. Acks the master pushed on a publish before it (they
        repeat an earlier seq, docs/cluster.md "Pushed Acks") are skipped: the next heartbeat's
        Ack carries the same assignments."""
        self.send(Heartbeat(seq, observations))
        while True:
            ack = self.receive()
            assert isinstance(ack, Ack) and ack.seq <= seq, ack
            if ack.seq == seq:
                return ack


def hello(node_id: str, incarnation: int, *, portal: str = "127.0.0.1:3261", free: int = 1 << 32) -> Hello:
    return Hello(node_id, incarnation, portal, "127.0.0.1:7001", "127.0.0.1:8081", max(free, 1 << 40), free)


def raw_hello(node_id: str, **fields: int) -> bytes:
    """A Hello frame with any numbers (the Hello dataclass refuses out-of-range ones)."""
    body = {
        "t": "hello", "v": 1, "node_id": node_id, "incarnation": 1, "iscsi_portal": "127.0.0.1:3261",
        "replication": "127.0.0.1:7001", "http": "127.0.0.1:8081", "capacity_bytes": 1 << 40,
        "free_bytes": 1 << 40, **fields,
    }  # fmt: skip
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def accept_channel(
    conn: socket.socket, secret: ClusterSecret, identity: MasterIdentity | None = FAKE_MASTER
) -> tuple[Channel, bytes]:
    """Run the master's end of the handshake on ``conn`` and prove ``identity``'s master key (as
    a master's first message does; docs/cluster.md "Master identity"; None: prove nothing);
    returns the open channel and the plaintext of any records that came with the client's last
    handshake message."""
    channel = Channel(secret, Side.SERVER, Purpose.HEARTBEAT, time.monotonic())
    plain = b""
    while not channel.established:
        data = conn.recv(65536)
        if not data:
            raise Closed("the node closed the connection in the handshake")
        for event in channel.feed(data, time.monotonic()):
            if isinstance(event, HandshakeBytes):
                conn.sendall(event.data)
            elif isinstance(event, Plaintext):
                plain += event.data
    if identity is not None:
        conn.sendall(channel.send(encode(identity.hello(channel.binding))))
    return channel, plain
