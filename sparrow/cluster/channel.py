"""The cluster channel: a mutually authenticated, encrypted byte stream between cluster members
(docs/cluster.md, "The cluster channel").

Every member holds the same cluster secret (``sparrow.clustersecret`` reads it from a file only its
owner can read): at least 32 characters of text. From it,
``K = HKDF-SHA256(secret, info="sparrow cluster v1")`` and the handshake key
``Ka = HKDF-SHA256(K, info="sparrow cluster v1 handshake")``. The secret and the keys never cross
the wire.

Handshake (fixed-size messages; ``purpose`` says what the stream carries, :class:`Purpose`)::

    C -> S  b"SPRW" | version (1 byte) | purpose (1 byte) | nonce_c (32 bytes) | share_c (32)
    S -> C  nonce_s (32) | share_s (32) | HMAC-SHA256(Ka, b"server" | transcript)
    C -> S  HMAC-SHA256(Ka, b"client" | transcript)

    transcript = b"SPRW" | version | purpose | nonce_c | share_c | nonce_s | share_s

``share_c`` and ``share_s`` are ephemeral X25519 public keys (version 2). Each side checks the
other's MAC with ``hmac.compare_digest``; the labels keep a MAC from being reflected to the other
side, the fresh nonces keep a recorded handshake from being replayed. The client sends nothing but
its handshake before it has checked the server's MAC; the server hands nothing to the layer above
before it has checked the client's.

Records: each direction gets its own key, ``HKDF-SHA256(K | X25519(shares), salt=nonce_c |
nonce_s, info=b"sparrow cluster v1 " + purpose + direction)``: every member holds ``K``, but only
the two ends of this connection hold the shared X25519 secret, so another member that sees the
bytes (on the path) cannot open or forge the records, and a recorded connection stays sealed even
if the cluster secret leaks later. A record is ``length (4 bytes, big
endian) | AES-256-GCM(key, nonce=counter, plaintext, aad=length)``, the 96-bit nonce being
the record's number in its direction (0, 1, 2 ...). A tampered, replayed, reordered or truncated
record fails to open: :class:`ChannelError` with ``BAD_RECORD``; the connection is then closed.

Sans-IO: :meth:`Channel.feed` takes bytes and ``now`` and returns :class:`ChannelEvent`\\ s
(bytes to write during the handshake, ``Established``, plaintext); :meth:`Channel.send` seals
plaintext. :meth:`Channel.deadline` is the one instant the asyncio layer arms a timer for, and
:meth:`Channel.check` raises the timeout that has passed: the handshake must complete within
``handshake_timeout``, a record once begun within ``frame_timeout``, and with ``idle_timeout`` set
a record must arrive at least that often.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAGIC = b"SPRW"
#: Version 2 added the X25519 shares (docs/cluster.md, "The cluster channel"); version 3 seals
#: records with AES-256-GCM instead of ChaCha20-Poly1305 (a third of the CPU per replicated write
#: record where the CPU has AES instructions, as x86-64 and arm64 servers do: docs/performance.md).
VERSION = 3
#: The records' AEAD (a 256-bit key, a 96-bit nonce, a 16-byte tag).
AEAD = AESGCM
NONCE_SIZE = 32
#: An X25519 public key.
SHARE_SIZE = 32
MAC_SIZE = 32
TAG_SIZE = 16
#: The length prefix of a record: unsigned 32-bit big-endian, the sealed size (tag included).
RECORD_HEADER = struct.Struct(">I")
#: The client's hello: magic, version, purpose, nonce_c; its X25519 share follows.
CLIENT_HELLO = struct.Struct(f">4sBB{NONCE_SIZE}s")
CLIENT_HELLO_SIZE = CLIENT_HELLO.size + SHARE_SIZE
SERVER_HELLO_SIZE = NONCE_SIZE + SHARE_SIZE + MAC_SIZE
CLIENT_FINISH_SIZE = MAC_SIZE
#: The largest plaintext of one record by default (a heartbeat frame is at most 1 MiB + 4).
DEFAULT_MAX_PLAINTEXT = (1 << 20) + 64
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_FRAME_TIMEOUT = 5.0
#: The shortest cluster secret accepted (characters of text, e.g. 64 hex digits from `secret generate`).
MIN_SECRET_LEN = 32
_INFO = b"sparrow cluster v1"
_MAX_COUNTER = 2**96 - 1


class Purpose(enum.IntEnum):
    """What a channel carries; bound into the handshake and the record keys."""

    HEARTBEAT = 1
    REPLICATION = 2


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ChannelErrorCode(enum.Enum):
    """Why a channel was closed; the value is the ``reason`` label of the refusal metrics."""

    #: The first bytes are not ``SPRW`` (e.g. a plain heartbeat frame from a node with no secret).
    BAD_MAGIC = "bad_magic"
    UNSUPPORTED_VERSION = "unsupported_version"
    #: The peer opened the channel for another purpose.
    WRONG_PURPOSE = "wrong_purpose"
    #: The peer's MAC does not verify: it does not hold the cluster secret.
    AUTH_FAILED = "auth_failed"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: A record was begun and not completed in time (a truncated frame).
    FRAME_TIMEOUT = "frame_timeout"
    #: No record within ``idle_timeout``.
    IDLE_TIMEOUT = "idle_timeout"
    RECORD_TOO_LARGE = "record_too_large"
    #: A record that does not open: tampered, replayed, reordered or cut.
    BAD_RECORD = "bad_record"
    #: Bytes sent before the handshake completed, or the channel is already broken.
    NOT_ESTABLISHED = "not_established"


class ChannelError(Exception):
    """The channel cannot go on; ``code`` says why. The connection is closed."""

    def __init__(self, code: ChannelErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class SecretError(Exception):
    """A cluster secret (or its file: sparrow.clustersecret) that is missing, unreadable, too short
    or readable by others."""


# -- the secret ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterSecret:
    """The key derived from a cluster secret (``K``); the secret text itself is not kept."""

    key: bytes = field(repr=False)

    @classmethod
    def from_text(cls, text: bytes) -> ClusterSecret:
        text = text.strip()
        if len(text) < MIN_SECRET_LEN:
            raise SecretError(f"a cluster secret needs at least {MIN_SECRET_LEN} characters, got {len(text)}")
        return cls(_hkdf(text, salt=None, info=_INFO))

    @property
    def handshake_key(self) -> bytes:
        return _hkdf(self.key, salt=None, info=_INFO + b" handshake")


def _hkdf(key: bytes, *, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


# -- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeBytes:
    """Bytes of the handshake to write to the peer now."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """Both ends are authenticated; :meth:`Channel.send` may be used."""


@dataclass(frozen=True, slots=True)
class Plaintext:
    """The opened content of one record from the peer."""

    data: bytes


ChannelEvent = HandshakeBytes | Established | Plaintext


class _State(enum.Enum):
    #: Client: ClientHello written, waiting for ServerHello. Server: waiting for ClientHello.
    HELLO = "hello"
    #: Server: ServerHello written, waiting for the client's MAC.
    FINISH = "finish"
    OPEN = "open"
    BROKEN = "broken"


# -- the channel -----------------------------------------------------------------------------------


class Channel:
    """One end of a cluster channel (``side``); see the module docstring."""

    def __init__(
        self,
        secret: ClusterSecret,
        side: Side,
        purpose: Purpose,
        now: float,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        idle_timeout: float | None = None,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.secret = secret
        self.side = side
        self.purpose = purpose
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.max_plaintext = max_plaintext
        self._random = random_bytes
        self._state = _State.HELLO
        self._buffer = bytearray()
        self._started = now
        #: When the record now partly buffered began to arrive (None: no partial record).
        self._partial_since: float | None = None
        self._last_record = now
        self._fed_at = now
        self._nonce_c = b""
        self._nonce_s = b""
        self._share_c = b""
        self._share_s = b""
        #: This end's ephemeral X25519 key (from ``random_bytes``, so tests can fix it).
        self._dh = X25519PrivateKey.from_private_bytes(random_bytes(SHARE_SIZE))
        self._shared = b""
        self._seal: AESGCM | None = None
        self._open: AESGCM | None = None
        self._send_counter = 0
        self._recv_counter = 0
        self._error: ChannelError | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def established(self) -> bool:
        return self._state is _State.OPEN

    @property
    def binding(self) -> bytes:
        """This connection's channel binding: the handshake transcript (magic, version, purpose,
        both nonces and both X25519 shares), which both ends know once the handshake is done and
        no other connection shares (a member in the middle runs two handshakes: two bindings). A
        proof bound to it cannot be replayed on another connection (the replication OPEN's,
        ``sparrow.replication.streamauth``)."""
        if self._state is not _State.OPEN:
            raise ChannelError(ChannelErrorCode.NOT_ESTABLISHED, "no channel binding before the handshake")
        return self._transcript()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (a partial handshake message or record)."""
        return len(self._buffer)

    def deadline(self) -> float | None:
        """The instant :meth:`check` will next raise at, unless bytes arrive first."""
        if self._state is _State.BROKEN:
            return None
        if self._state is not _State.OPEN:
            return self._started + self.handshake_timeout
        deadlines = []
        if self._partial_since is not None:
            deadlines.append(self._partial_since + self.frame_timeout)
        if self.idle_timeout is not None:
            deadlines.append(self._last_record + self.idle_timeout)
        return min(deadlines) if deadlines else None

    def check(self, now: float) -> None:
        """Raise ChannelError if a deadline has passed at ``now``."""
        if self._error is not None:
            raise self._error
        if self._state is not _State.OPEN:
            if now >= self._started + self.handshake_timeout:
                self._fail(
                    ChannelErrorCode.HANDSHAKE_TIMEOUT,
                    f"handshake not complete after {self.handshake_timeout}s",
                )
            return
        if self._partial_since is not None and now >= self._partial_since + self.frame_timeout:
            self._fail(
                ChannelErrorCode.FRAME_TIMEOUT,
                f"a record begun {now - self._partial_since:.1f}s ago is incomplete ({self.buffered} bytes)",
            )
        if self.idle_timeout is not None and now >= self._last_record + self.idle_timeout:
            self._fail(ChannelErrorCode.IDLE_TIMEOUT, f"no record for {now - self._last_record:.1f}s")

    def _fail(self, code: ChannelErrorCode, message: str) -> NoReturn:
        self._error = ChannelError(code, message)
        self._state = _State.BROKEN
        self._buffer.clear()
        raise self._error

    # -- handshake ---------------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The client's first message (call once, right after connecting)."""
        if self.side is not Side.CLIENT or self._nonce_c:
            raise RuntimeError("initiate() is called once, by the client")
        self._nonce_c = self._random(NONCE_SIZE)
        self._share_c = self._own_share()
        return CLIENT_HELLO.pack(MAGIC, VERSION, int(self.purpose), self._nonce_c) + self._share_c

    def _own_share(self) -> bytes:
        return self._dh.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def _exchange(self, peer_share: bytes) -> None:
        try:
            self._shared = self._dh.exchange(X25519PublicKey.from_public_bytes(peer_share))
        except ValueError:  # a low-order point: no shared secret
            self._fail(ChannelErrorCode.AUTH_FAILED, "the peer's key share is not usable")

    def _transcript(self) -> bytes:
        return (
            MAGIC
            + bytes((VERSION, int(self.purpose)))
            + self._nonce_c
            + self._share_c
            + self._nonce_s
            + self._share_s
        )

    def _mac(self, label: bytes) -> bytes:
        return hmac.new(self.secret.handshake_key, label + self._transcript(), hashlib.sha256).digest()

    def _keys(self) -> None:
        salt = self._nonce_c + self._nonce_s
        base = _INFO + b" " + bytes((int(self.purpose),))
        ikm = self.secret.key + self._shared
        c2s = AEAD(_hkdf(ikm, salt=salt, info=base + b" c2s"))
        s2c = AEAD(_hkdf(ikm, salt=salt, info=base + b" s2c"))
        self._seal, self._open = (c2s, s2c) if self.side is Side.CLIENT else (s2c, c2s)

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) < size:
            return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _server_hello(self, events: list[ChannelEvent]) -> bool:
        # Reject a wrong magic as soon as the bytes that contradict it arrive.
        head = bytes(self._buffer[: len(MAGIC)])
        if head != MAGIC[: len(head)]:
            self._fail(ChannelErrorCode.BAD_MAGIC, f"not a cluster channel (first bytes {head.hex()})")
        # ... and a version this end does not speak as soon as its byte arrives (the sizes differ).
        if len(self._buffer) > len(MAGIC) and self._buffer[len(MAGIC)] != VERSION:
            version = self._buffer[len(MAGIC)]
            self._fail(ChannelErrorCode.UNSUPPORTED_VERSION, f"channel version {version}, expected {VERSION}")
        message = self._take(CLIENT_HELLO_SIZE)
        if message is None:
            return False
        _, version, purpose, nonce_c = CLIENT_HELLO.unpack_from(message)
        if purpose != int(self.purpose):
            self._fail(ChannelErrorCode.WRONG_PURPOSE, f"purpose {purpose}, expected {int(self.purpose)}")
        self._nonce_c, self._share_c = nonce_c, message[CLIENT_HELLO.size :]
        self._exchange(self._share_c)
        self._nonce_s = self._random(NONCE_SIZE)
        self._share_s = self._own_share()
        events.append(HandshakeBytes(self._nonce_s + self._share_s + self._mac(b"server")))
        self._state = _State.FINISH
        return True

    def _client_hello_answer(self, events: list[ChannelEvent]) -> bool:
        message = self._take(SERVER_HELLO_SIZE)
        if message is None:
            return False
        self._nonce_s = message[:NONCE_SIZE]
        self._share_s = message[NONCE_SIZE : NONCE_SIZE + SHARE_SIZE]
        if not hmac.compare_digest(message[NONCE_SIZE + SHARE_SIZE :], self._mac(b"server")):
            self._fail(ChannelErrorCode.AUTH_FAILED, "the server does not hold the cluster secret")
        self._exchange(self._share_s)
        events.append(HandshakeBytes(self._mac(b"client")))
        self._open_channel(events)
        return True

    def _server_finish(self, events: list[ChannelEvent]) -> bool:
        message = self._take(CLIENT_FINISH_SIZE)
        if message is None:
            return False
        if not hmac.compare_digest(message, self._mac(b"client")):
            self._fail(ChannelErrorCode.AUTH_FAILED, "the client does not hold the cluster secret")
        self._open_channel(events)
        return True

    def _open_channel(self, events: list[ChannelEvent]) -> None:
        self._keys()
        self._state = _State.OPEN
        self._last_record = self._fed_at  # the idle clock starts when the channel opens
        events.append(Established())

    # -- records -----------------------------------------------------------------------------------

    def send(self, plaintext: bytes) -> bytes:
        """One sealed record carrying ``plaintext`` (write it as is)."""
        header, sealed = self.seal(plaintext)
        return header + sealed

    def seal(self, plaintext: bytes | memoryview) -> tuple[bytes, bytes]:
        """:meth:`send`'s record as its two parts, the length header and the sealed plaintext (write
        both in order, e.g. with one ``writelines``: a large record is not copied once more to join
        them)."""
        if self._state is not _State.OPEN or self._seal is None:
            raise ChannelError(ChannelErrorCode.NOT_ESTABLISHED, "send before the handshake completed")
        if len(plaintext) > self.max_plaintext:
            raise ChannelError(
                ChannelErrorCode.RECORD_TOO_LARGE, f"{len(plaintext)} bytes exceed {self.max_plaintext}"
            )
        if self._send_counter > _MAX_COUNTER:
            raise ChannelError(ChannelErrorCode.BAD_RECORD, "record counter exhausted")
        header = RECORD_HEADER.pack(len(plaintext) + TAG_SIZE)
        sealed = self._seal.encrypt(self._send_counter.to_bytes(12, "big"), plaintext, header)
        self._send_counter += 1
        return header, sealed

    def _records(self, data: bytes | bytearray, events: list[ChannelEvent], now: float) -> int:
        """Open every complete record in ``data`` (the buffer, or the bytes just fed when nothing was
        buffered): each is decrypted from a view of ``data``, not copied out first. Returns how many
        bytes of ``data`` they took."""
        assert self._open is not None
        decrypt = self._open.decrypt
        header_size = RECORD_HEADER.size
        limit = self.max_plaintext + TAG_SIZE
        size = len(data)
        pos = 0
        failure: tuple[ChannelErrorCode, str] | None = None
        with memoryview(data) as view:  # released before the buffer is resized
            while size - pos >= header_size:
                (length,) = RECORD_HEADER.unpack_from(data, pos)
                if length < TAG_SIZE or length > limit:
                    failure = (ChannelErrorCode.RECORD_TOO_LARGE, f"record of {length} bytes")
                    break
                end = pos + header_size + length
                if size < end:
                    break
                try:
                    plaintext = decrypt(
                        self._recv_counter.to_bytes(12, "big"),
                        view[pos + header_size : end],
                        view[pos : pos + header_size],
                    )
                except InvalidTag:
                    failure = (ChannelErrorCode.BAD_RECORD, f"record {self._recv_counter} does not open")
                    break
                self._recv_counter += 1
                self._last_record = now
                self._partial_since = None
                events.append(Plaintext(plaintext))
                pos = end
        if failure is not None:
            self._fail(*failure)
        if pos < size and self._partial_since is None:
            self._partial_since = now  # a record begun (or the rest of one) waits for its bytes
        return pos

    def feed(self, data: bytes, now: float) -> list[ChannelEvent]:
        """Take ``data`` from the peer at ``now``; returns what follows from it, in order. Raises
        ChannelError (and stays broken) on anything the protocol does not allow or a passed deadline."""
        if self._error is not None:
            raise self._error
        self.check(now)
        if self.side is Side.CLIENT and not self._nonce_c:
            raise RuntimeError("the client must initiate() first")
        self._fed_at = now
        events: list[ChannelEvent] = []
        if self._state is _State.OPEN:
            buffer = self._buffer
            if buffer:
                buffer += data
                taken = self._records(buffer, events, now)
                del buffer[:taken]
            else:  # the usual case: whole records, opened where they lie
                taken = self._records(data, events, now)
                if taken < len(data):
                    buffer += memoryview(data)[taken:]
            return events
        self._buffer += data
        while True:
            if self._state is _State.HELLO:
                progressed = (
                    self._server_hello(events)
                    if self.side is Side.SERVER
                    else self._client_hello_answer(events)
                )
            elif self._state is _State.FINISH:
                progressed = self._server_finish(events)
            else:  # open: records may follow the handshake in the same bytes
                del self._buffer[: self._records(self._buffer, events, now)]
                return events
            if not progressed:
                return events
