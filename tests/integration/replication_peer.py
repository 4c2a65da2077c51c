"""A test primary for a real node's replication port: it holds the cluster secret (or not) and
speaks the replication protocol (sparrow.replication.protocol) through the cluster channel."""

from __future__ import annotations

import socket

from sparrow.cluster.channel import ClusterSecret, Purpose
from sparrow.replication.protocol import MAX_MESSAGE, Ack, Message, MessageDecoder, Open, Refuse, encode
from tests.integration.rogue import ChannelLink


class ReplicationLink(ChannelLink):
    """One replication connection to a node, as a primary (honest or not) would open it."""

    peer = "the node"

    def __init__(
        self, port: int, secret: ClusterSecret | None, *, timeout: float = 10.0, rcvbuf: int | None = None
    ) -> None:
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
        self.send_plain(b"".join(encode(m) for m in messages))

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
