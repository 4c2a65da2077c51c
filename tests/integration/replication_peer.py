"""A test primary for a real node's replication port: it holds the cluster secret (or not), the
stream key of the real primary (or not), and speaks the replication protocol
(sparrow.replication.protocol) through the cluster channel."""

from __future__ import annotations

import socket
from pathlib import Path

from sparrow.cluster.channel import ClusterSecret, Purpose
from sparrow.clustersecret import load_cluster_secret
from sparrow.masterkey import MASTER_KEY_NAME
from sparrow.replication.protocol import MAX_MESSAGE, Ack, Message, MessageDecoder, Open, Refuse, encode
from sparrow.replication.streamauth import NO_PROOF, derive_stream_key
from tests.integration.rogue import ChannelLink


def stream_key(master_data_dir: Path, volume_id: str, epoch: int, primary: str, replica: str) -> bytes:
    """The stream key the master hands ``primary`` and ``replica`` (read from its key file, as only
    a test can: the master sends it to no one else)."""
    master_key = load_cluster_secret(master_data_dir / MASTER_KEY_NAME).key
    return derive_stream_key(master_key, volume_id, epoch, primary, replica)


class ReplicationLink(ChannelLink):
    """One replication connection to a node, as a primary (honest or not) would open it."""

    peer = "the node"

    def __init__(
        self,
        port: int,
        secret: ClusterSecret | None,
        *,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
        stream_key: bytes | None = None,
    ) -> None:
        #: An OPEN sent without a proof is signed with it on this connection (None: sent as is).
        self.stream_key = stream_key
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        super().__init__(sock, secret, Purpose.REPLICATION, MessageDecoder(), max_plaintext=MAX_MESSAGE)

    def send(self, *messages: Message) -> None:
        self.send_plain(b"".join(encode(self._signed(m)) for m in messages))

    def _signed(self, message: Message) -> Message:
        if isinstance(message, Open) and message.proof == NO_PROOF and self.stream_key is not None:
            assert self.channel is not None
            return message.signed(self.stream_key, self.channel.binding)
        return message

    def receive(self) -> Message:
        message: Message = self.receive_message()
        return message

    def open(self, open_: Open) -> Ack | Refuse:
        self.send(open_)
        answer = self.receive()
        assert isinstance(answer, Ack | Refuse), answer
        return answer

    def ack_until(self, applied: int, durable: int = 0) -> Ack:
        """Read ACKs until one reports ``applied`` (and ``durable``)."""
        while True:
            answer = self.receive()
            assert isinstance(answer, Ack), answer
            if answer.applied_seq >= applied and answer.durable_seq >= durable:
                return answer

    def closed_within(self, seconds: float, *, read_through: bool = True) -> bool:
        """True if the node closes the connection within ``seconds`` (anything it sends first is read)."""
        return super().closed_within(seconds, read_through=read_through)
