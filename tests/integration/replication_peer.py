"""A test primary for a real node's replication port: it holds the cluster secret (or not) and
speaks the replication protocol (sparrow.replication.protocol) through the cluster channel."""

from __future__ import annotations

import socket
import time

from sparrow.cluster.channel import (
    Channel,
    ChannelError,
    ClusterSecret,
    HandshakeBytes,
    Plaintext,
    Purpose,
    Side,
)
from sparrow.replication.protocol import MAX_MESSAGE, Ack, Message, MessageDecoder, Open, Refuse, encode
from tests.integration.rogue import Closed


class ReplicationLink:
    """One replication connection to a node, as a primary (honest or not) would open it."""

    def __init__(
        self, port: int, secret: ClusterSecret | None, *, timeout: float = 10.0, rcvbuf: int | None = None
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.decoder = MessageDecoder()
        self.channel: Channel | None = None
        if secret is not None:
            try:
                self._handshake(secret)
            except BaseException:
                self.sock.close()
                raise

    def _handshake(self, secret: ClusterSecret) -> None:
        self.channel = Channel(
            secret, Side.CLIENT, Purpose.REPLICATION, time.monotonic(), max_plaintext=MAX_MESSAGE
        )
        self.sock.sendall(self.channel.initiate())
        while not self.channel.established:
            for event in self.channel.feed(self._recv(), time.monotonic()):
                if isinstance(event, HandshakeBytes):
                    self.sock.sendall(event.data)

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except OSError as e:
            raise Closed(str(e)) from None
        if not data:
            raise Closed("closed by the node")
        return data

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_plain(self, data: bytes) -> None:
        """``data`` as the plaintext of one channel record."""
        assert self.channel is not None
        self.sock.sendall(self.channel.send(data))

    def send(self, *messages: Message) -> None:
        self.send_plain(b"".join(encode(m) for m in messages))

    def receive(self) -> Message:
        assert self.channel is not None
        while True:
            message = self.decoder.next_message()
            if message is not None:
                return message
            try:
                events = self.channel.feed(self._recv(), time.monotonic())
            except ChannelError as e:
                raise Closed(str(e)) from None
            for event in events:
                if isinstance(event, Plaintext):
                    self.decoder.feed(event.data)

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

    def closed_within(self, seconds: float) -> bool:
        """True if the node closes the connection within ``seconds`` (anything it sends first is read)."""
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

    def close(self) -> None:
        self.sock.close()
