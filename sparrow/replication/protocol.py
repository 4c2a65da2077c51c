"""The replication protocol's sans-IO core (docs/replication.md): the message codec and the two
ends of one replication stream, :class:`ReplicaStream` and :class:`PrimaryStream`.

One stream carries one volume from its primary to one replica, inside a cluster channel opened with
``Purpose.REPLICATION`` (``sparrow.cluster.channel``: the peer has proved it holds the cluster
secret, and every record is sealed). The plaintext of the records is a sequence of messages; a
message may span records and a record may hold several.

Every message is a fixed 40-byte header, a fixed body per type, and a raw payload::

    version u8 | type u8 | flags u8 | reserved u8 (0) | body_length u32 | volume_id 16 bytes
    | epoch u64 | seq u64 | body (fixed part by type) | payload

``body_length`` counts the bytes after the header. Integers are big-endian; every field is bounded
(:data:`MAX_PAYLOAD`, ids, epochs and seqs below 2**63, flags by type) and a message that breaks a
bound is a :class:`ReplicationError` carrying its wire :class:`ErrorCode`.

===========  =====================  =========================================================
type         fixed body             payload
===========  =====================  =========================================================
OPEN         session u64,           the primary's node id (ASCII); ``seq`` is the first seq;
             proof 32 bytes         flag REPORT_DIRTY: answer with the replica's dirty map;
                                    ``session``: the primary process's random id; ``proof``:
                                    the stream key's proof bound to this connection
                                    (``sparrow.replication.streamauth``)
WRITE        offset u64             the data (1 .. MAX_PAYLOAD bytes); flag FUA
UNMAP        offset u64, len u32    (none)
WRITE_SAME   offset u64, len u32    one logical block (512 or 4096 bytes)
FLUSH        (none)                 (none)
ACK          durable u64            (none); ``seq`` is the highest seq applied
REFUSE       code u8                the reason, UTF-8, at most MAX_REASON bytes; ``seq``: the
                                    replica's applied seq for that volume and epoch
DIRTY        offset u32, regions    a slice (from byte ``offset``) of the replica's dirty-region
             u32                    bitmap of ``regions`` bits; flag LAST on the final slice
NOP          (none)                 (none): applied as nothing (a region copy meant for another
                                    replica keeps every stream's seqs equal)
CHECKPOINT   upto u64               (none): every copy is in sync and has made every op up to
                                    seq ``upto`` durable: clear the dirty bits written by them
===========  =====================  =========================================================

Version 2 added DIRTY, NOP, CHECKPOINT and the OPEN's REPORT_DIRTY flag (resync,
docs/replication.md). Version 3 added the OPEN's proof: a replica opens a stream only for the
holder of the stream key the master derived for (volume, epoch, primary, replica).
===========  =====================  =========================================================

Primary to replica: OPEN, then WRITE / UNMAP / WRITE_SAME / FLUSH / NOP numbered ``first_seq``,
``first_seq + 1``, ... Replica to primary: ACK (the answer to OPEN, then after every applied
message), or REFUSE and the connection closes; after the OPEN's ACK, the DIRTY slices if the
OPEN asked for them. Seqs are per (volume, epoch) and only grow.

Payloads are not copied on decode: a :class:`Write`'s ``data`` is a ``memoryview`` of the bytes fed
in when the whole message arrived in one piece (the usual case: one record per message).
"""

from __future__ import annotations

import collections
import enum
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn, TypeAlias

from frontend.constructors import positional_constructor
from sparrow.cluster.messages import NODE_ID_PATTERN, VOLUME_ID_PATTERN, Role
from sparrow.replication.streamauth import NO_PROOF, PROOF_SIZE, open_proof, proof_matches

VERSION = 3
HEADER = struct.Struct(">BBBBI16sQQ")
#: The largest payload of one message (a WRITE's data); larger writes are sent as several WRITEs.
MAX_PAYLOAD = 1 << 20
#: The largest UTF-8 reason a REFUSE carries.
MAX_REASON = 512
#: Epochs and seqs are below 2**63 (as everywhere in the cluster messages).
MAX_UINT63 = 2**63 - 1
BLOCK_SIZES = frozenset({512, 4096})
FLAG_FUA = 0x01
#: On OPEN: the replica answers with its dirty-region bitmap (DIRTY messages) after the ACK.
FLAG_REPORT_DIRTY = 0x01
#: On DIRTY: the last slice of the bitmap.
FLAG_LAST = 0x01
#: The most regions a dirty map has (``store.dirtymap.MAX_REGIONS``: 16 TiB of 1 MiB regions).
MAX_DIRTY_REGIONS = 1 << 24
#: The most plain WRITEs one :class:`ApplyWriteRun` carries (Linux's IOV_MAX: one pwritev).
MAX_RUN = 1024
#: The default ack timeout (issue 8: a replica that does not acknowledge within it is lagging).
DEFAULT_ACK_TIMEOUT = 2.0
#: The default window: messages and payload bytes sent and not yet acknowledged.
DEFAULT_WINDOW = 1024
DEFAULT_WINDOW_BYTES = 32 << 20


class MsgType(enum.IntEnum):
    OPEN = 1
    WRITE = 2
    UNMAP = 3
    WRITE_SAME = 4
    FLUSH = 5
    ACK = 6
    REFUSE = 7
    DIRTY = 8
    NOP = 9
    CHECKPOINT = 10


_RANGE = struct.Struct(">QI")
_U64 = struct.Struct(">Q")
_U8 = struct.Struct(">B")
#: The header and a u64 body in one: a WRITE's (offset) and an ACK's (durable seq), packed directly
#: on the hot paths (the same bytes as ``encode``).
_HEADER_U64 = struct.Struct(HEADER.format + "Q")
_SLICE = struct.Struct(">II")
_OPEN = struct.Struct(f">Q{PROOF_SIZE}s")
#: Per type: the fixed body, the payload bounds (min, max) and the flags it may carry.
_LAYOUT: Mapping[MsgType, tuple[struct.Struct | None, int, int, int]] = {
    MsgType.OPEN: (_OPEN, 1, 63, FLAG_REPORT_DIRTY),
    MsgType.WRITE: (_U64, 1, MAX_PAYLOAD, FLAG_FUA),
    MsgType.UNMAP: (_RANGE, 0, 0, 0),
    MsgType.WRITE_SAME: (_RANGE, 512, 4096, 0),
    MsgType.FLUSH: (None, 0, 0, 0),
    MsgType.ACK: (_U64, 0, 0, 0),
    MsgType.REFUSE: (_U8, 0, MAX_REASON, 0),
    MsgType.DIRTY: (_SLICE, 0, MAX_PAYLOAD, FLAG_LAST),
    MsgType.NOP: (None, 0, 0, 0),
    MsgType.CHECKPOINT: (_U64, 0, 0, 0),
}
_MSG_TYPES: Mapping[int, MsgType] = {int(t): t for t in MsgType}
#: Per type: the least and the most bytes after the header (fixed body and payload).
_BODY_BOUNDS: Mapping[MsgType, tuple[int, int]] = {
    kind: ((0 if layout is None else layout.size) + low, (0 if layout is None else layout.size) + high)
    for kind, (layout, low, high, _) in _LAYOUT.items()
}
#: The largest message: header, the largest fixed body, the largest payload.
MAX_MESSAGE = HEADER.size + _RANGE.size + MAX_PAYLOAD
#: A WRITE's bytes besides its payload: the header and the offset.
WRITE_OVERHEAD = _HEADER_U64.size


class ErrorCode(enum.IntEnum):
    """Why a stream was refused or broken; the value is the REFUSE message's code on the wire, the
    name (lower case) the ``reason`` label of the refusal metrics."""

    #: Not a message of this protocol: a bad version, a reserved field set, a length out of bounds.
    MALFORMED = 1
    UNKNOWN_TYPE = 2
    #: A message this side may not receive in its state (e.g. a WRITE before OPEN, a second OPEN).
    UNEXPECTED = 3
    #: The replica does not hold the volume (not assigned here, or not open yet).
    UNKNOWN_VOLUME = 4
    #: The sender's epoch is older than the one the replica has persisted: a deposed primary.
    STALE_EPOCH = 5
    #: The sender's epoch is newer than the replica's: it has not heard of it yet (retry later).
    NEWER_EPOCH = 6
    #: The replica's persisted role for the volume is not REPLICA.
    NOT_REPLICA = 7
    #: The sender is not the primary of the replica's persisted assignment.
    NOT_PRIMARY = 8
    #: A message for another volume or epoch than the stream's OPEN.
    WRONG_STREAM = 9
    #: A seq beyond the next one expected (a message was lost).
    GAP = 10
    #: A seq already applied or already seen.
    REPEAT = 11
    #: An offset or length outside the volume or not a multiple of its block size.
    OUT_OF_RANGE = 12
    #: Another stream of this volume and epoch is open on the replica.
    BUSY = 13
    #: An ACK the primary cannot match (beyond what was sent, or going back).
    BAD_ACK = 14
    #: The primary's window is full (a local error; never on the wire).
    WINDOW_FULL = 15
    #: A partial message not completed in time (the asyncio layer's frame timeout).
    TRUNCATED = 16
    #: The peer stopped reading (the asyncio layer's write buffer stayed full).
    NOT_READING = 17
    #: The OPEN does not prove the stream key of (volume, epoch, primary, this replica) on this
    #: connection: not the primary, a replayed OPEN, or a replica not (yet) given the key.
    NOT_AUTHORIZED = 18

    @property
    def reason(self) -> str:
        return self.name.lower()


class ReplicationError(Exception):
    """The stream cannot go on; ``code`` says why (and is what a REFUSE puts on the wire).
    ``remote`` is True when the peer sent the refusal."""

    def __init__(
        self, code: ErrorCode, message: str, *, remote: bool = False, seq: int | None = None
    ) -> None:
        super().__init__(f"{code.reason}: {message}")
        self.code = code
        self.message = message
        self.remote = remote
        #: For a REFUSE: the replica's applied seq for that volume and epoch (where to reopen).
        self.seq = seq


def _fail(code: ErrorCode, message: str) -> NoReturn:
    raise ReplicationError(code, message)


def _check_ids(volume_id: str, epoch: int, seq: int) -> None:
    if not isinstance(volume_id, str) or not VOLUME_ID_PATTERN.fullmatch(volume_id):
        _fail(ErrorCode.MALFORMED, f"volume id {volume_id!r} is not 32 hex digits")
    if not 1 <= epoch <= MAX_UINT63:
        _fail(ErrorCode.MALFORMED, f"epoch {epoch} out of range")
    if not 0 <= seq <= MAX_UINT63:
        _fail(ErrorCode.MALFORMED, f"seq {seq} out of range")


# -- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Open:
    """Primary -> replica: the stream of ``volume_id`` at ``epoch`` from ``primary`` starts at
    ``first_seq``."""

    volume_id: str
    epoch: int
    first_seq: int
    primary: str
    #: Ask the replica for its dirty-region bitmap (a copy being resynced).
    report_dirty: bool = False
    #: The primary process's id (random, below 2**63): a replica clears dirty bits on a
    #: CHECKPOINT only for what it applied from this session.
    session: int = 0
    #: HMAC of the stream key over this connection's binding and the fields above
    #: (``streamauth.open_proof``; :meth:`signed`).
    proof: bytes = field(default=NO_PROOF, repr=False)

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.first_seq)
        if not 0 <= self.session <= MAX_UINT63:
            _fail(ErrorCode.MALFORMED, f"session {self.session} out of range")
        if not isinstance(self.proof, bytes) or len(self.proof) != PROOF_SIZE:
            _fail(ErrorCode.MALFORMED, f"an OPEN's proof is {PROOF_SIZE} bytes")
        if self.first_seq < 1:
            _fail(ErrorCode.MALFORMED, "first seq must be at least 1")
        if not isinstance(self.primary, str) or not NODE_ID_PATTERN.fullmatch(self.primary):
            _fail(ErrorCode.MALFORMED, f"primary {self.primary!r} is not a node id")

    def expected_proof(self, key: bytes, binding: bytes) -> bytes:
        """The proof of ``key`` for this OPEN on the connection of ``binding``."""
        return open_proof(
            key,
            binding,
            volume_id=self.volume_id,
            epoch=self.epoch,
            first_seq=self.first_seq,
            session=self.session,
            flags=FLAG_REPORT_DIRTY if self.report_dirty else 0,
            primary=self.primary,
        )

    def signed(self, key: bytes, binding: bytes) -> Open:
        """This OPEN carrying the proof of ``key`` on the connection of ``binding``."""
        return Open(
            self.volume_id,
            self.epoch,
            self.first_seq,
            self.primary,
            self.report_dirty,
            self.session,
            self.expected_proof(key, binding),
        )


@dataclass(frozen=True, slots=True)
class Write:
    volume_id: str
    epoch: int
    seq: int
    offset: int
    data: bytes | memoryview = field(repr=False)
    fua: bool = False

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)
        if not 1 <= len(self.data) <= MAX_PAYLOAD:
            _fail(ErrorCode.MALFORMED, f"write of {len(self.data)} bytes (1 .. {MAX_PAYLOAD})")
        if not 0 <= self.offset <= MAX_UINT63:
            _fail(ErrorCode.MALFORMED, f"offset {self.offset} out of range")

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class Unmap:
    volume_id: str
    epoch: int
    seq: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)
        _check_range(self.offset, self.length)


@dataclass(frozen=True, slots=True)
class WriteSame:
    """Write ``pattern`` (one logical block) over ``length`` bytes at ``offset``."""

    volume_id: str
    epoch: int
    seq: int
    offset: int
    length: int
    pattern: bytes | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)
        _check_range(self.offset, self.length)
        if len(self.pattern) not in BLOCK_SIZES:
            _fail(ErrorCode.MALFORMED, f"write-same pattern of {len(self.pattern)} bytes (512 or 4096)")


@dataclass(frozen=True, slots=True)
class Flush:
    volume_id: str
    epoch: int
    seq: int

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)


@dataclass(frozen=True, slots=True)
class Ack:
    """Replica -> primary: every message up to ``applied_seq`` is applied, every one up to
    ``durable_seq`` is durable (a FLUSH or FUA write at or below it has completed)."""

    volume_id: str
    epoch: int
    applied_seq: int
    durable_seq: int

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.applied_seq)
        if not 0 <= self.durable_seq <= self.applied_seq:
            _fail(ErrorCode.MALFORMED, f"durable seq {self.durable_seq} beyond applied {self.applied_seq}")


@dataclass(frozen=True, slots=True)
class Refuse:
    """Replica -> primary, before it closes the connection: why (``code``) and a reason."""

    volume_id: str
    epoch: int
    seq: int
    code: ErrorCode
    reason: str

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)
        if not isinstance(self.code, ErrorCode):
            _fail(ErrorCode.MALFORMED, f"refusal code {self.code!r}")
        if len(self.reason.encode()) > MAX_REASON:
            _fail(ErrorCode.MALFORMED, f"refusal reason longer than {MAX_REASON} bytes")


@dataclass(frozen=True, slots=True)
class Nop:
    """Primary -> replica: an operation that changes nothing (it keeps the seqs of every stream of
    the volume equal when a region copy goes to one replica only)."""

    volume_id: str
    epoch: int
    seq: int

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)


@dataclass(frozen=True, slots=True)
class Dirty:
    """Replica -> primary, after the ACK of an OPEN with REPORT_DIRTY: bytes ``offset`` ..
    ``offset + len(bitmap)`` of its dirty-region bitmap of ``regions`` bits (``last``: the final
    slice). ``seq`` is the replica's applied seq."""

    volume_id: str
    epoch: int
    seq: int
    offset: int
    regions: int
    bitmap: bytes | memoryview = field(repr=False)
    last: bool

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)
        if not 1 <= self.regions <= MAX_DIRTY_REGIONS:
            _fail(ErrorCode.MALFORMED, f"dirty map of {self.regions} regions (1 .. {MAX_DIRTY_REGIONS})")
        size = -(-self.regions // 8)
        if not 0 <= self.offset <= size or self.offset + len(self.bitmap) > size:
            _fail(ErrorCode.MALFORMED, f"dirty slice of {len(self.bitmap)} bytes at {self.offset} of {size}")
        if self.last and self.offset + len(self.bitmap) != size:
            _fail(ErrorCode.MALFORMED, "the last dirty slice does not end the bitmap")


def dirty_report(volume_id: str, epoch: int, seq: int, regions: int, bitmap: bytes) -> list[bytes]:
    """The DIRTY messages carrying ``bitmap`` (``regions`` bits), in slices of at most
    MAX_PAYLOAD bytes."""
    out = []
    offset = 0
    while True:
        chunk = bitmap[offset : offset + MAX_PAYLOAD]
        last = offset + len(chunk) >= len(bitmap)
        out.append(encode(Dirty(volume_id, epoch, seq, offset, regions, chunk, last)))
        if last:
            return out
        offset += len(chunk)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Primary -> replica: every copy of the volume is in sync and has made every op up to seq
    ``upto`` (< ``seq``) durable; the replica may clear the dirty bits only those ops set."""

    volume_id: str
    epoch: int
    seq: int
    upto: int

    def __post_init__(self) -> None:
        _check_ids(self.volume_id, self.epoch, self.seq)
        if not 0 <= self.upto < self.seq:
            _fail(ErrorCode.MALFORMED, f"checkpoint up to {self.upto} at seq {self.seq}")


Operation: TypeAlias = Write | Unmap | WriteSame | Flush | Nop | Checkpoint
Message: TypeAlias = Open | Write | Unmap | WriteSame | Flush | Ack | Refuse | Dirty | Nop | Checkpoint
_TYPE_OF: Mapping[type, MsgType] = {
    Open: MsgType.OPEN,
    Write: MsgType.WRITE,
    Unmap: MsgType.UNMAP,
    WriteSame: MsgType.WRITE_SAME,
    Flush: MsgType.FLUSH,
    Ack: MsgType.ACK,
    Refuse: MsgType.REFUSE,
    Dirty: MsgType.DIRTY,
    Nop: MsgType.NOP,
    Checkpoint: MsgType.CHECKPOINT,
}


#: The hot path builds these with their bounds already checked by the decoder (``_next``), skipping
#: ``__post_init__`` (frontend.constructors).
_make_write = positional_constructor(Write)
_make_ack = positional_constructor(Ack)


def _check_range(offset: int, length: int) -> None:
    if not 0 <= offset <= MAX_UINT63:
        _fail(ErrorCode.MALFORMED, f"offset {offset} out of range")
    if not 1 <= length <= 0xFFFFFFFF:
        _fail(ErrorCode.MALFORMED, f"length {length} out of range")


# -- the codec -------------------------------------------------------------------------------------


def encode_parts(message: Message) -> tuple[bytes, bytes | memoryview]:
    """The header and fixed body, and the payload (not copied)."""
    kind = _TYPE_OF[type(message)]
    flags = 0
    payload: bytes | memoryview = b""
    body = b""
    seq: int
    if isinstance(message, Open):
        seq, body = message.first_seq, _OPEN.pack(message.session, message.proof)
        payload = message.primary.encode("ascii")
        flags = FLAG_REPORT_DIRTY if message.report_dirty else 0
    elif isinstance(message, Write):
        seq, body, payload = message.seq, _U64.pack(message.offset), message.data
        flags = FLAG_FUA if message.fua else 0
    elif isinstance(message, Unmap):
        seq, body = message.seq, _RANGE.pack(message.offset, message.length)
    elif isinstance(message, WriteSame):
        seq, body, payload = message.seq, _RANGE.pack(message.offset, message.length), message.pattern
    elif isinstance(message, Flush | Nop):
        seq = message.seq
    elif isinstance(message, Checkpoint):
        seq, body = message.seq, _U64.pack(message.upto)
    elif isinstance(message, Dirty):
        seq, body, payload = message.seq, _SLICE.pack(message.offset, message.regions), message.bitmap
        flags = FLAG_LAST if message.last else 0
    elif isinstance(message, Ack):
        seq, body = message.applied_seq, _U64.pack(message.durable_seq)
    else:
        seq, body, payload = message.seq, _U8.pack(int(message.code)), message.reason.encode()
    head = HEADER.pack(
        VERSION,
        kind,
        flags,
        0,
        len(body) + len(payload),
        bytes.fromhex(message.volume_id),
        message.epoch,
        seq,
    )
    return head + body, payload


def encode(message: Message) -> bytes:
    """One message as bytes (the payload copied once, into the result)."""
    head, payload = encode_parts(message)
    return head + payload if payload else head


def _decode(kind: MsgType, flags: int, volume_id: str, epoch: int, seq: int, body: memoryview) -> Message:
    layout, low, high, allowed = _LAYOUT[kind]
    if flags & ~allowed:
        _fail(ErrorCode.MALFORMED, f"flags {flags:#x} on {kind.name}")
    fixed = 0 if layout is None else layout.size
    if not fixed + low <= len(body) <= fixed + high:
        _fail(ErrorCode.MALFORMED, f"{kind.name} with a body of {len(body)} bytes")
    payload = body[fixed:]
    if kind is MsgType.WRITE or kind is MsgType.ACK:
        # The hot messages: every field bounded here, then built without __post_init__ (the
        # volume id is 16 raw bytes, the payload size was checked against the layout above).
        if not 1 <= epoch <= MAX_UINT63 or seq > MAX_UINT63:
            _check_ids(volume_id, epoch, seq)  # raises with the field named
        (value,) = _U64.unpack_from(body)
        if kind is MsgType.ACK:
            if value > seq:
                _fail(ErrorCode.MALFORMED, f"durable seq {value} beyond applied {seq}")
            return _make_ack(volume_id, epoch, seq, value)
        if value > MAX_UINT63:
            _fail(ErrorCode.MALFORMED, f"offset {value} out of range")
        return _make_write(volume_id, epoch, seq, value, payload, bool(flags & FLAG_FUA))
    if kind is MsgType.OPEN:
        try:
            primary = bytes(payload).decode("ascii")
        except UnicodeDecodeError:
            _fail(ErrorCode.MALFORMED, "primary node id is not ASCII")
        session, proof = _OPEN.unpack_from(body)
        return Open(volume_id, epoch, seq, primary, bool(flags & FLAG_REPORT_DIRTY), session, proof)
    if kind is MsgType.UNMAP:
        return Unmap(volume_id, epoch, seq, *_RANGE.unpack_from(body))
    if kind is MsgType.WRITE_SAME:
        offset, length = _RANGE.unpack_from(body)
        return WriteSame(volume_id, epoch, seq, offset, length, payload)
    if kind is MsgType.FLUSH:
        return Flush(volume_id, epoch, seq)
    if kind is MsgType.NOP:
        return Nop(volume_id, epoch, seq)
    if kind is MsgType.CHECKPOINT:
        (upto,) = _U64.unpack_from(body)
        return Checkpoint(volume_id, epoch, seq, upto)
    if kind is MsgType.DIRTY:
        offset, regions = _SLICE.unpack_from(body)
        return Dirty(volume_id, epoch, seq, offset, regions, payload, bool(flags & FLAG_LAST))
    (code,) = _U8.unpack_from(body)
    if code not in ErrorCode._value2member_map_:
        _fail(ErrorCode.MALFORMED, f"unknown refusal code {code}")
    try:
        reason = bytes(payload).decode()
    except UnicodeDecodeError:
        _fail(ErrorCode.MALFORMED, "refusal reason is not UTF-8")
    return Refuse(volume_id, epoch, seq, ErrorCode(code), reason)


class MessageDecoder:
    """Frames messages out of a byte stream (the channel's plaintexts, in order).

    :meth:`feed` buffers (at most one partial message: :data:`MAX_MESSAGE` bytes, since the header
    is checked as soon as it is complete); :meth:`next_message` returns a message or None when more
    bytes are needed, and raises :class:`ReplicationError` for bytes that are not a message. Once
    it has raised, it raises the same error again.
    """

    def __init__(self) -> None:
        self._buf: bytes = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._error: ReplicationError | None = None
        #: The last volume id seen, raw and as hex (one stream carries one volume).
        self._raw_id = b""
        self._hex_id = ""

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if not data:
            return
        if self._pos >= len(self._buf):
            self._buf, self._pos = bytes(data), 0  # no copy for bytes
        else:
            self._buf, self._pos = self._buf[self._pos :] + data, 0
        self._view = memoryview(self._buf)

    def next_message(self) -> Message | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ReplicationError as e:
            self._error = e
            self._buf, self._pos = b"", 0
            raise

    def _next(self) -> Message | None:
        pos = self._pos
        if len(self._buf) - pos < HEADER.size:
            return None
        version, kind, flags, reserved, length, raw_id, epoch, seq = HEADER.unpack_from(self._buf, pos)
        if version != VERSION:
            _fail(ErrorCode.MALFORMED, f"version {version}, expected {VERSION}")
        msg_type = _MSG_TYPES.get(kind)
        if msg_type is None:
            _fail(ErrorCode.UNKNOWN_TYPE, f"message type {kind}")
        if reserved:
            _fail(ErrorCode.MALFORMED, "reserved byte set")
        low, high = _BODY_BOUNDS[msg_type]
        if not low <= length <= high:  # checked before waiting for the body
            _fail(ErrorCode.MALFORMED, f"{msg_type.name} with a body of {length} bytes")
        end = pos + HEADER.size + length
        if end > len(self._buf):
            return None
        body = self._view[pos + HEADER.size : end]
        self._pos = end
        if raw_id != self._raw_id:
            self._raw_id, self._hex_id = raw_id, raw_id.hex()
        return _decode(msg_type, flags, self._hex_id, epoch, seq, body)

    def write_run(
        self, raw_id: bytes, epoch: int, seq: int, bounds: Callable[[], tuple[int, int]]
    ) -> ApplyWriteRun | None:
        """The plain WRITEs at the head of the buffer that carry ``raw_id``, ``epoch`` and the seqs
        from ``seq`` on, and continue each other on the volume, as one run (taken off the buffer),
        or None when the head is not such a WRITE (or not complete): :meth:`next_message` then
        decodes it. The replica's hot path: the decode and the stream's checks fused, per message
        one ``unpack_from`` and a payload view, no message object. ``bounds()`` gives the volume's
        (block size, size); it is asked once, before the first WRITE is taken (it may raise: the
        refusal the stream owes that WRITE). A WRITE that breaks a bound ends the run, and
        :meth:`next_message` refuses it with the general path's error."""
        buf = self._buf
        pos = self._pos
        stop = len(buf)
        view = self._view
        unpack = _HEADER_U64.unpack_from
        head = _HEADER_U64.size
        buffers: list[memoryview] = []
        first_seq = seq
        start = end_offset = block_size = size = 0
        while stop - pos >= head:
            version, kind, flags, reserved, length, raw, e, s, offset = unpack(buf, pos)
            end = pos + HEADER.size + length
            data = length - 8
            if (
                kind != _WRITE
                or version != VERSION
                or flags
                or reserved
                or not 0 < data <= MAX_PAYLOAD
                or end > stop
                or raw != raw_id
                or e != epoch
                or s != seq
            ):
                break
            if not buffers:
                block_size, size = bounds()
                if offset % block_size:
                    break
                start = offset
            elif offset != end_offset or len(buffers) >= MAX_RUN:
                break
            if data % block_size or offset + data > size:
                break
            buffers.append(view[pos + head : end])
            end_offset = offset + data
            pos = end
            seq += 1
        if not buffers:
            return None
        self._pos = pos
        return _make_write_run(first_seq, seq - 1, start, buffers, end_offset - start)


# -- the replica's end -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeView:
    """What the replica node has persisted for a volume (``sparrow.cluster.nodestate.VolumeRole``),
    and whether its local store is open; the stream checks every message against it."""

    volume_id: str
    epoch: int
    role: Role
    primary: str | None
    size: int
    block_size: int
    open: bool = True
    #: The stream key this node was given for (volume, ``epoch``) as a replica (the latest Ack's
    #: ``stream_keys``; None: none, so every OPEN is refused NOT_AUTHORIZED).
    stream_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ApplyWrite:
    seq: int
    offset: int
    data: bytes | memoryview = field(repr=False)
    fua: bool


@dataclass(frozen=True, slots=True)
class ApplyWriteRun:
    """Plain WRITEs (no FUA) ``first_seq`` .. ``seq`` whose data continue each other on the volume
    from ``offset``: ``buffers`` (views of the received bytes), ``length`` bytes in all. Applied
    together (one pwritev) and reported done at ``seq``. A replica stream hands out every plain
    WRITE in one (:meth:`MessageDecoder.write_run`); a run ends with the record it came in, at a
    non-contiguous offset, a message of another kind, or :data:`MAX_RUN` writes."""

    first_seq: int
    seq: int
    offset: int
    buffers: list[memoryview] = field(repr=False)
    length: int

    @property
    def count(self) -> int:
        return self.seq - self.first_seq + 1


@dataclass(frozen=True, slots=True)
class ApplyUnmap:
    seq: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ApplyWriteSame:
    seq: int
    offset: int
    length: int
    pattern: bytes | memoryview = field(repr=False)


@dataclass(frozen=True, slots=True)
class ApplyFlush:
    seq: int


@dataclass(frozen=True, slots=True)
class ApplyNop:
    seq: int


@dataclass(frozen=True, slots=True)
class ApplyCheckpoint:
    """Clear the dirty bits set by this stream's ops up to seq ``upto`` (all durable everywhere)."""

    seq: int
    upto: int


Apply: TypeAlias = (
    ApplyWrite | ApplyWriteRun | ApplyUnmap | ApplyWriteSame | ApplyFlush | ApplyNop | ApplyCheckpoint
)
_make_apply_write = positional_constructor(ApplyWrite)
_make_write_run = positional_constructor(ApplyWriteRun)
_WRITE = int(MsgType.WRITE)
#: The replica's messages (never received by a replica).
_REPLIES = (Ack, Refuse, Dirty)


@dataclass(frozen=True, slots=True)
class Opened:
    """The stream is open; write ``ack`` (the answer to OPEN: the position already reached)."""

    volume_id: str
    epoch: int
    ack: bytes
    #: The OPEN asked for the replica's dirty map (send :func:`dirty_report` after ``ack``).
    report_dirty: bool = False
    #: The primary process's session id (the OPEN's).
    session: int = 0


ReplicaEvent: TypeAlias = Opened | Apply


class ReplicaState(enum.Enum):
    AWAIT_OPEN = "await_open"
    STREAMING = "streaming"
    CLOSED = "closed"

    #: Members are singletons: hash by identity (C) rather than Enum's hash of the name (Python),
    #: since every message looks its transition up.
    __hash__ = object.__hash__


#: The replica's transitions: (state, message type received) -> next state. A message type not
#: listed for a state is refused with UNEXPECTED.
REPLICA_TRANSITIONS: Mapping[tuple[ReplicaState, MsgType], ReplicaState] = {
    (ReplicaState.AWAIT_OPEN, MsgType.OPEN): ReplicaState.STREAMING,
    (ReplicaState.STREAMING, MsgType.WRITE): ReplicaState.STREAMING,
    (ReplicaState.STREAMING, MsgType.UNMAP): ReplicaState.STREAMING,
    (ReplicaState.STREAMING, MsgType.WRITE_SAME): ReplicaState.STREAMING,
    (ReplicaState.STREAMING, MsgType.FLUSH): ReplicaState.STREAMING,
    (ReplicaState.STREAMING, MsgType.NOP): ReplicaState.STREAMING,
    (ReplicaState.STREAMING, MsgType.CHECKPOINT): ReplicaState.STREAMING,
}


@dataclass(slots=True)
class _Position:
    applied: int = 0
    durable: int = 0
    #: The stream that holds the (volume, epoch) now, if any.
    owner: object | None = None


class ReplicaPositions:
    """In memory, per (volume, epoch): how far this node's replica has applied and made durable
    the primary's stream, and which stream holds it. A new stream of the same epoch must go on from
    there (a node restart forgets it: the primary's next OPEN past seq 1 is then a GAP)."""

    def __init__(self) -> None:
        self._positions: dict[tuple[str, int], _Position] = {}

    def get(self, volume_id: str, epoch: int) -> tuple[int, int]:
        p = self._positions.get((volume_id, epoch))
        return (0, 0) if p is None else (p.applied, p.durable)

    def claim(self, volume_id: str, epoch: int, owner: object) -> _Position:
        # Older epochs of the volume are of no use any more.
        for key in [k for k in self._positions if k[0] == volume_id and k[1] < epoch]:
            if self._positions[key].owner is None:
                del self._positions[key]
        p = self._positions.setdefault((volume_id, epoch), _Position())
        if p.owner is not None and p.owner is not owner:
            _fail(ErrorCode.BUSY, f"another stream of volume {volume_id} at epoch {epoch} is open")
        p.owner = owner
        return p

    def release(self, owner: object) -> None:
        for p in self._positions.values():
            if p.owner is owner:
                p.owner = None


Lookup: TypeAlias = Callable[[str], VolumeView | None]


class ReplicaStream:
    """The replica's end of one stream (sans-IO; see the module docstring).

    ``lookup(volume_id)`` returns what the node has persisted for the volume now; it is asked on
    OPEN and again for every message, so a replica that has moved to a newer epoch refuses the next
    message of the old primary. :meth:`feed` returns :class:`Opened` and the apply actions, in seq
    order; the caller applies them in that order and reports each with :meth:`done`, which returns
    the ACK to write. Any refusal raises :class:`ReplicationError` (:meth:`refusal` gives the
    REFUSE message to send before closing); from then on the stream is closed.
    """

    #: Plain WRITEs decoded and checked in one step, as runs (:meth:`_write_run`); False: one
    #: message at a time through the general path (the tests' reference: both accept and refuse
    #: the same messages).
    fused: ClassVar[bool] = True

    def __init__(self, lookup: Lookup, positions: ReplicaPositions) -> None:
        self.lookup = lookup
        self.positions = positions
        #: The connection's channel binding (``Channel.binding``), set once the channel is up; an
        #: OPEN before it is refused NOT_AUTHORIZED.
        self.binding: bytes | None = None
        self.state = ReplicaState.AWAIT_OPEN
        self.decoder = MessageDecoder()
        self.volume_id: str | None = None
        self.epoch = 0
        self.primary: str | None = None
        #: The seq the next operation must carry.
        self.next_seq = 0
        #: Applies handed out and not yet reported done: (seq, payload bytes, messages); a run's
        #: entry carries its last seq.
        self._pending: collections.deque[tuple[int, int, int]] = collections.deque()
        self.unapplied_bytes = 0
        self._unapplied = 0
        self._position: _Position | None = None
        self._error: ReplicationError | None = None
        #: The volume and epoch of the last message received (for a refusal before OPEN).
        self._last: tuple[str, int] = ("0" * 32, 1)
        #: What ``lookup`` answered during the current :meth:`feed` (volume id, view): the messages
        #: of one feed arrive at the same moment, and nothing can persist a new role in between.
        self._looked_up: tuple[str, VolumeView | None] | None = None
        #: The stream's volume id as on the wire (set at OPEN), and whether an ACK was built yet.
        self._raw_id: bytes | None = None
        self._acked = False

    @property
    def unapplied(self) -> int:
        """Messages handed out and not yet reported done."""
        return self._unapplied

    @property
    def applied_seq(self) -> int:
        return 0 if self._position is None else self._position.applied

    @property
    def durable_seq(self) -> int:
        return 0 if self._position is None else self._position.durable

    def feed(self, data: bytes) -> list[ReplicaEvent]:
        """Bytes from the primary (channel plaintext) -> the events they complete."""
        if self._error is not None:
            raise self._error
        events: list[ReplicaEvent] = []
        self._looked_up = None
        decoder = self.decoder
        try:
            decoder.feed(data)
            while True:
                if self.state is ReplicaState.STREAMING and self.fused:
                    run = self._write_run()
                    if run is not None:
                        events.append(run)
                        continue
                message = decoder.next_message()
                if message is None:
                    break
                events.append(self._receive(message))
        except ReplicationError as e:
            self._close(e)
            raise
        finally:
            self._looked_up = None
        return events

    def _close(self, error: ReplicationError) -> None:
        # The (volume, epoch) stays held: applies already handed out may still report done().
        self._error = error
        self.state = ReplicaState.CLOSED

    def close(self) -> None:
        """The connection is gone and no apply is running any more: release the (volume, epoch)
        for the next stream."""
        if self.state is not ReplicaState.CLOSED:
            self.state = ReplicaState.CLOSED
            self._error = ReplicationError(ErrorCode.UNEXPECTED, "stream closed")
        self.positions.release(self)

    def refusal(self, error: ReplicationError) -> bytes:
        """The REFUSE message for ``error`` (send it, then close): the volume and epoch of the
        stream (or of the message refused before one opened), and as ``seq`` how far this replica
        has applied that (volume, epoch), so a primary knows where a new stream must start."""
        volume_id, epoch = (self.volume_id, self.epoch) if self.volume_id is not None else self._last
        applied, _ = self.positions.get(volume_id, epoch)
        reason = error.message.encode()[:MAX_REASON].decode(errors="ignore")
        return encode(Refuse(volume_id, max(epoch, 1), applied, error.code, reason))

    def _receive(self, message: Message) -> ReplicaEvent:
        self._last = (message.volume_id, message.epoch)
        kind = _TYPE_OF[type(message)]
        after = REPLICA_TRANSITIONS.get((self.state, kind))
        if after is None:
            _fail(ErrorCode.UNEXPECTED, f"{kind.name} in state {self.state.value}")
        if isinstance(message, Open):
            event: ReplicaEvent = self._open(message)
        else:
            assert not isinstance(message, _REPLIES)  # not in the table
            event = self._operation(message)
        self.state = after
        return event

    def _write_run(self) -> ApplyWriteRun | None:
        """The plain WRITEs at the head of the input, checked as :meth:`_operation` checks one
        (``MessageDecoder.write_run``: this stream's volume, epoch and next seqs, the persisted
        role asked first, the volume's bounds), as one run; None when the head is anything else."""
        assert self.volume_id is not None and self.primary is not None and self._raw_id is not None
        volume_id, primary = self.volume_id, self.primary

        def bounds() -> tuple[int, int]:
            view = self._view(volume_id, self.epoch, primary)
            return view.block_size, view.size

        run = self.decoder.write_run(self._raw_id, self.epoch, self.next_seq, bounds)
        if run is None:
            return None
        count = run.seq - run.first_seq + 1
        self.next_seq = run.seq + 1
        self._pending.append((run.seq, run.length, count))
        self._unapplied += count
        self.unapplied_bytes += run.length
        return run

    def _view(self, volume_id: str, epoch: int, primary: str) -> VolumeView:
        looked_up = self._looked_up
        if looked_up is not None and looked_up[0] == volume_id:
            view = looked_up[1]
        else:
            view = self.lookup(volume_id)
            self._looked_up = (volume_id, view)
        if view is None:
            _fail(ErrorCode.UNKNOWN_VOLUME, f"volume {volume_id} is not assigned to this node")
        if epoch < view.epoch:
            _fail(ErrorCode.STALE_EPOCH, f"epoch {epoch} is older than the persisted epoch {view.epoch}")
        if epoch > view.epoch:
            _fail(ErrorCode.NEWER_EPOCH, f"epoch {epoch} is newer than the persisted epoch {view.epoch}")
        if view.role is not Role.REPLICA:
            _fail(ErrorCode.NOT_REPLICA, f"this node's role for volume {volume_id} is {view.role.name}")
        if view.primary != primary:
            _fail(
                ErrorCode.NOT_PRIMARY, f"{primary!r} is not the primary ({view.primary!r}) at epoch {epoch}"
            )
        if not view.open:
            _fail(ErrorCode.UNKNOWN_VOLUME, f"volume {volume_id} is not open on this node yet")
        return view

    def _open(self, message: Open) -> Opened:
        view = self._view(message.volume_id, message.epoch, message.primary)
        if view.stream_key is None:
            _fail(
                ErrorCode.NOT_AUTHORIZED,
                f"no stream key for volume {message.volume_id} at epoch {view.epoch}",
            )
        if self.binding is None:
            _fail(ErrorCode.NOT_AUTHORIZED, "no channel binding")
        if not proof_matches(message.expected_proof(view.stream_key, self.binding), message.proof):
            _fail(
                ErrorCode.NOT_AUTHORIZED,
                f"the OPEN does not prove the stream key of {message.primary!r} at epoch {view.epoch}",
            )
        applied, _ = self.positions.get(message.volume_id, message.epoch)
        if message.first_seq > applied + 1:
            _fail(ErrorCode.GAP, f"first seq {message.first_seq}, this replica has applied {applied}")
        if message.first_seq <= applied:
            _fail(ErrorCode.REPEAT, f"first seq {message.first_seq}, this replica has applied {applied}")
        self._position = self.positions.claim(message.volume_id, message.epoch, self)
        self.volume_id, self.epoch, self.primary = message.volume_id, message.epoch, message.primary
        self._raw_id = bytes.fromhex(message.volume_id)
        self.next_seq = message.first_seq
        return Opened(message.volume_id, message.epoch, self._ack(), message.report_dirty, message.session)

    def _operation(self, message: Operation) -> Apply:
        assert self.volume_id is not None and self.primary is not None
        if message.volume_id != self.volume_id or message.epoch != self.epoch:
            _fail(
                ErrorCode.WRONG_STREAM,
                f"message for {message.volume_id} at epoch {message.epoch} on the stream of "
                f"{self.volume_id} at epoch {self.epoch}",
            )
        view = self._view(message.volume_id, message.epoch, self.primary)
        if message.seq > self.next_seq:
            _fail(ErrorCode.GAP, f"seq {message.seq}, expected {self.next_seq}")
        if message.seq < self.next_seq:
            _fail(ErrorCode.REPEAT, f"seq {message.seq}, expected {self.next_seq}")
        size = 0
        if not isinstance(message, Flush | Nop | Checkpoint):
            bs = view.block_size
            length = len(message.data) if isinstance(message, Write) else message.length
            if message.offset % bs or length % bs or message.offset + length > view.size:
                _fail(
                    ErrorCode.OUT_OF_RANGE,
                    f"{length} bytes at offset {message.offset} (volume of {view.size} bytes, "
                    f"blocks of {bs})",
                )
            if isinstance(message, WriteSame) and len(message.pattern) != bs:
                _fail(
                    ErrorCode.OUT_OF_RANGE,
                    f"write-same pattern of {len(message.pattern)} bytes, blocks of {bs}",
                )
        apply: Apply
        if isinstance(message, Write):
            apply = _make_apply_write(message.seq, message.offset, message.data, message.fua)
            size = len(message.data)
        elif isinstance(message, Unmap):
            apply = ApplyUnmap(message.seq, message.offset, message.length)
        elif isinstance(message, WriteSame):
            apply = ApplyWriteSame(message.seq, message.offset, message.length, message.pattern)
        elif isinstance(message, Nop):
            apply = ApplyNop(message.seq)
        elif isinstance(message, Checkpoint):
            apply = ApplyCheckpoint(message.seq, message.upto)
        else:
            apply = ApplyFlush(message.seq)
        self.next_seq += 1
        self._pending.append((message.seq, size, 1))
        self._unapplied += 1
        self.unapplied_bytes += size
        return apply

    def done(self, seq: int, *, durable: bool = False) -> bytes:
        """Every apply up to ``seq`` has completed (``durable``: and everything up to it is on
        stable storage, after a flush); returns the ACK to send."""
        if self._position is None or self.volume_id is None:
            raise RuntimeError("done() before the stream was opened")
        if not self._pending or seq < self._pending[0][0] or seq >= self.next_seq:
            raise RuntimeError(f"done({seq}) matches no pending apply")
        while self._pending and self._pending[0][0] <= seq:
            _, size, count = self._pending.popleft()
            self.unapplied_bytes -= size
            self._unapplied -= count
        self._position.applied = seq
        if durable:
            self._position.durable = seq
        return self._ack()

    def _ack(self) -> bytes:
        assert self.volume_id is not None and self._raw_id is not None
        if not self._acked:
            Ack(self.volume_id, self.epoch, self.applied_seq, self.durable_seq)  # the bounds, once
            self._acked = True
        # encode(Ack(...)), packed directly: seqs only grow from values already checked.
        return _HEADER_U64.pack(
            VERSION, MsgType.ACK, 0, 0, 8, self._raw_id, self.epoch, self.applied_seq, self.durable_seq
        )


# -- the primary's end -----------------------------------------------------------------------------


class PrimaryState(enum.Enum):
    NEW = "new"
    #: OPEN sent, its ACK not yet received (operations may already follow it: pipelined).
    OPENING = "opening"
    STREAMING = "streaming"
    FAILED = "failed"

    __hash__ = object.__hash__  # as ReplicaState's


class PrimaryInput(enum.Enum):
    SEND_OPEN = "send_open"
    SEND_OPERATION = "send_operation"
    RECV_ACK = "recv_ack"
    RECV_REFUSE = "recv_refuse"
    RECV_DIRTY = "recv_dirty"

    __hash__ = object.__hash__  # as ReplicaState's


#: The primary's transitions; an input not listed for a state is an error (UNEXPECTED).
PRIMARY_TRANSITIONS: Mapping[tuple[PrimaryState, PrimaryInput], PrimaryState] = {
    (PrimaryState.NEW, PrimaryInput.SEND_OPEN): PrimaryState.OPENING,
    (PrimaryState.OPENING, PrimaryInput.SEND_OPERATION): PrimaryState.OPENING,
    (PrimaryState.OPENING, PrimaryInput.RECV_ACK): PrimaryState.STREAMING,
    (PrimaryState.OPENING, PrimaryInput.RECV_REFUSE): PrimaryState.FAILED,
    (PrimaryState.STREAMING, PrimaryInput.SEND_OPERATION): PrimaryState.STREAMING,
    (PrimaryState.STREAMING, PrimaryInput.RECV_ACK): PrimaryState.STREAMING,
    (PrimaryState.STREAMING, PrimaryInput.RECV_REFUSE): PrimaryState.FAILED,
    (PrimaryState.STREAMING, PrimaryInput.RECV_DIRTY): PrimaryState.STREAMING,
}


#: The states a sent operation leaves as they are (derived from the table; a tuple: identity tests).
_KEEP_ON_SEND: tuple[PrimaryState, ...] = tuple(
    state
    for (state, event), after in PRIMARY_TRANSITIONS.items()
    if event is PrimaryInput.SEND_OPERATION and after is state
)


@dataclass(frozen=True, slots=True)
class Acked:
    """The replica's position moved: everything up to ``applied_seq`` applied, up to
    ``durable_seq`` durable. An initiator's write with seq s may complete (as far as this replica
    is concerned) once ``applied_seq >= s``; a flush or FUA write once ``durable_seq >= s``."""

    applied_seq: int
    durable_seq: int


#: The primary's ACK fast path (``PrimaryStream._ack_now``): an ACK's size on the wire, its type,
#: and ``Acked`` built without the frozen ``__init__``.
_ACK_SIZE = _HEADER_U64.size
_ACK = int(MsgType.ACK)
_make_acked = positional_constructor(Acked)


@dataclass(frozen=True, slots=True)
class DirtyReport:
    """The replica's dirty-region bitmap (all its DIRTY slices), answering an OPEN with
    REPORT_DIRTY: ``regions`` bits in ``bitmap`` (``store.dirtymap.DirtyBitmap.from_bytes``)."""

    regions: int
    bitmap: bytes = field(repr=False)


@dataclass(slots=True)
class _InFlight:
    """Messages sent together and not yet all acknowledged: up to ``seq``, ``count`` of them (a
    :class:`WriteRun` is one entry), ``size`` payload bytes."""

    seq: int
    sent_at: float
    size: int
    durable: bool
    count: int = 1


@dataclass(frozen=True, slots=True)
class WriteRun:
    """Plain WRITE messages numbered ``first_seq`` .. ``first_seq + count - 1`` of one volume and
    epoch, encoded once (:func:`encode_write_run`): the same bytes go on every stream whose next seq
    is ``first_seq`` (:meth:`PrimaryStream.send_run`); each stream still seals them with its own
    channel. ``data`` is at most :data:`MAX_MESSAGE` bytes, so it fits one record."""

    raw_volume_id: bytes
    epoch: int
    first_seq: int
    count: int
    #: Payload bytes (what the window counts).
    size: int
    data: bytes = field(repr=False)


def encode_write_run(
    volume_id: str, epoch: int, first_seq: int, writes: Sequence[tuple[int, bytes | memoryview]]
) -> WriteRun:
    """Encode ``writes`` ((offset, data) each) as WRITEs numbered from ``first_seq``: the bytes
    :func:`encode` gives for each, back to back; every bound checked as ``Write`` checks it."""
    _check_ids(volume_id, epoch, first_seq)
    if not writes or first_seq + len(writes) - 1 > MAX_UINT63:
        _fail(ErrorCode.MALFORMED, f"a run of {len(writes)} writes from seq {first_seq}")
    raw = bytes.fromhex(volume_id)
    pack = _HEADER_U64.pack
    parts: list[bytes | memoryview] = []
    seq = first_seq
    size = 0
    for offset, data in writes:
        n = len(data)
        if not 1 <= n <= MAX_PAYLOAD or not 0 <= offset <= MAX_UINT63:
            Write(volume_id, epoch, seq, offset, data)  # raises with the bound named
        parts.append(pack(VERSION, MsgType.WRITE, 0, 0, 8 + n, raw, epoch, seq, offset))
        parts.append(data)
        size += n
        seq += 1
    data = b"".join(parts)
    if len(data) > MAX_MESSAGE:
        _fail(ErrorCode.MALFORMED, f"a run of {len(data)} bytes exceeds one record ({MAX_MESSAGE})")
    return WriteRun(raw, epoch, first_seq, len(writes), size, data)


class PrimaryStream:
    """The primary's end of one stream to one replica (sans-IO; see the module docstring).

    Operations are numbered from ``first_seq`` and may be sent while earlier ones are unacknowledged,
    up to ``window`` messages and ``window_bytes`` payload bytes (:meth:`can_send`). :meth:`feed`
    matches the replica's ACKs (:class:`Acked`) and raises :class:`ReplicationError` for a REFUSE
    (``remote=True``) or an ACK it cannot match. :meth:`lagging` is True once the oldest message
    not yet acknowledged (applied, or durable for a flush or FUA write) was sent ``ack_timeout`` or
    more before ``now``; :meth:`deadline` is when that will be.
    """

    #: A record holding exactly one ACK that a streaming stream takes as it is (the usual case:
    #: a replica seals each ACK alone) is checked and applied in one step (:meth:`_ack_now`);
    #: False: through the decoder and the general checks (the tests' reference: both accept and
    #: refuse the same ACKs).
    fused: ClassVar[bool] = True

    def __init__(
        self,
        volume_id: str,
        epoch: int,
        primary: str,
        *,
        first_seq: int = 1,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        report_dirty: bool = False,
        session: int = 0,
    ) -> None:
        if window < 1 or window_bytes < MAX_PAYLOAD or not ack_timeout > 0:
            raise ValueError("window >= 1, window_bytes >= MAX_PAYLOAD and ack_timeout > 0 are required")
        Open(volume_id, epoch, first_seq, primary)  # the same bounds as on the wire
        self.volume_id = volume_id
        self.epoch = epoch
        self.primary = primary
        self.first_seq = first_seq
        self.window = window
        self.window_bytes = window_bytes
        self.ack_timeout = ack_timeout
        self.state = PrimaryState.NEW
        self.decoder = MessageDecoder()
        #: The seq of the last operation sent (first_seq - 1 before any).
        self.last_seq = first_seq - 1
        self.applied_seq = first_seq - 1
        self.durable_seq = 0
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._in_flight_count = 0
        self._in_flight_bytes = 0
        self._open_sent_at: float | None = None
        self._error: ReplicationError | None = None
        self._raw_id = bytes.fromhex(volume_id)
        self.report_dirty = report_dirty
        self.session = session
        #: The stream key and the connection's binding the OPEN proves (:meth:`authorize`).
        self._auth: tuple[bytes, bytes] | None = None
        #: The DIRTY slices received so far (their bitmap bytes) and the region count they carry.
        self._dirty = bytearray()
        self._dirty_regions = 0
        self._dirty_done = not report_dirty

    def _move(self, event: PrimaryInput) -> None:
        after = PRIMARY_TRANSITIONS.get((self.state, event))
        if after is None:
            if self._error is not None:
                raise self._error
            _fail(ErrorCode.UNEXPECTED, f"{event.value} in state {self.state.value}")
        self.state = after

    # -- sending -----------------------------------------------------------------------------------

    def authorize(self, key: bytes, binding: bytes) -> None:
        """The OPEN will prove ``key`` (the stream key for this replica) on the connection of
        ``binding`` (``Channel.binding``). Without it the OPEN carries no proof and is refused."""
        self._auth = (key, binding)

    def open(self, now: float) -> bytes:
        self._move(PrimaryInput.SEND_OPEN)
        self._open_sent_at = now
        message = Open(
            self.volume_id, self.epoch, self.first_seq, self.primary, self.report_dirty, self.session
        )
        return encode(message if self._auth is None else message.signed(*self._auth))

    @property
    def in_flight(self) -> int:
        return self._in_flight_count

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight_bytes

    def can_send(self, size: int = 0) -> bool:
        """True if an operation with ``size`` payload bytes fits in the window now."""
        return self._in_flight_count < self.window and self._in_flight_bytes + size <= self.window_bytes

    def room(self) -> tuple[int, int]:
        """How many more messages, and payload bytes, the window takes now."""
        return self.window - self._in_flight_count, self.window_bytes - self._in_flight_bytes

    def send_run(self, run: WriteRun, now: float) -> bytes:
        """Send ``run`` as this stream's next messages: its bytes (seal and send them as they are).
        It must be of this stream's volume and epoch and start at its next seq, and fit the window
        (else ``ReplicationError``, nothing changed). The run is one in-flight entry: its window
        share returns when its last WRITE is acknowledged."""
        if run.raw_volume_id != self._raw_id or run.epoch != self.epoch or run.first_seq != self.last_seq + 1:
            _fail(
                ErrorCode.WRONG_STREAM,
                f"a run from seq {run.first_seq}; this stream's next is {self.last_seq + 1}",
            )
        if (
            self._in_flight_count + run.count > self.window
            or self._in_flight_bytes + run.size > self.window_bytes
        ):
            raise ReplicationError(
                ErrorCode.WINDOW_FULL, f"{self.in_flight} messages, {self.in_flight_bytes} bytes in flight"
            )
        if self.state not in _KEEP_ON_SEND:
            self._move(PrimaryInput.SEND_OPERATION)
        self.last_seq += run.count
        self._in_flight.append(_InFlight(self.last_seq, now, run.size, False, run.count))
        self._in_flight_count += run.count
        self._in_flight_bytes += run.size
        return run.data

    def _send(
        self, build: Callable[[int], Operation], size: int, durable: bool, now: float
    ) -> tuple[int, bytes]:
        if not self.can_send(size):
            raise ReplicationError(
                ErrorCode.WINDOW_FULL, f"{self.in_flight} messages, {self.in_flight_bytes} bytes in flight"
            )
        seq = self.last_seq + 1
        message = build(seq)  # checks the bounds before anything changes
        self._move(PrimaryInput.SEND_OPERATION)
        self.last_seq = seq
        self._in_flight.append(_InFlight(seq, now, size, durable))
        self._in_flight_count += 1
        self._in_flight_bytes += size
        return seq, encode(message)

    def write(
        self, offset: int, data: bytes | memoryview, now: float, *, fua: bool = False
    ) -> tuple[int, bytes]:
        """Number and encode a WRITE; returns (seq, bytes to seal and send). The hot path: the
        bounds of ``Write`` checked inline, the header packed directly (the bytes ``encode`` gives)."""
        size = len(data)
        seq = self.last_seq + 1
        if not (1 <= size <= MAX_PAYLOAD and 0 <= offset <= MAX_UINT63 and seq <= MAX_UINT63):
            return self._send(
                lambda s: Write(self.volume_id, self.epoch, s, offset, data, fua), size, fua, now
            )  # raises with the bound named
        if self._in_flight_count >= self.window or self._in_flight_bytes + size > self.window_bytes:
            raise ReplicationError(
                ErrorCode.WINDOW_FULL, f"{self.in_flight} messages, {self.in_flight_bytes} bytes in flight"
            )
        if self.state not in _KEEP_ON_SEND:
            self._move(PrimaryInput.SEND_OPERATION)
        self.last_seq = seq
        self._in_flight.append(_InFlight(seq, now, size, fua))
        self._in_flight_count += 1
        self._in_flight_bytes += size
        head = _HEADER_U64.pack(
            VERSION, MsgType.WRITE, FLAG_FUA if fua else 0, 0, 8 + size, self._raw_id, self.epoch, seq, offset
        )
        return seq, head + data

    def unmap(self, offset: int, length: int, now: float) -> tuple[int, bytes]:
        return self._send(lambda s: Unmap(self.volume_id, self.epoch, s, offset, length), 0, False, now)

    def write_same(self, offset: int, length: int, pattern: bytes, now: float) -> tuple[int, bytes]:
        return self._send(
            lambda s: WriteSame(self.volume_id, self.epoch, s, offset, length, pattern),
            len(pattern),
            False,
            now,
        )

    def flush(self, now: float) -> tuple[int, bytes]:
        return self._send(lambda s: Flush(self.volume_id, self.epoch, s), 0, True, now)

    def nop(self, now: float) -> tuple[int, bytes]:
        return self._send(lambda s: Nop(self.volume_id, self.epoch, s), 0, False, now)

    def checkpoint(self, upto: int, now: float) -> tuple[int, bytes]:
        """A CHECKPOINT up to seq ``upto`` of this stream (clamped to what this stream numbered:
        a stream that began after it has nothing of it to clear)."""
        return self._send(
            lambda s: Checkpoint(self.volume_id, self.epoch, s, max(0, min(upto, s - 1))), 0, False, now
        )

    # -- receiving ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Acked | DirtyReport]:
        """Bytes from the replica -> the ACKs they complete, in order (and the replica's dirty
        map once its last DIRTY slice is in, if the OPEN asked for it)."""
        if self._error is not None:
            raise self._error
        if len(data) == _ACK_SIZE and self.fused and self.state is PrimaryState.STREAMING:
            acked = self._ack_now(data)
            if acked is not None:
                return [acked]
        events: list[Acked | DirtyReport] = []
        try:
            self.decoder.feed(data)
            while (message := self.decoder.next_message()) is not None:
                if isinstance(message, Dirty):
                    report = self._dirty_slice(message)
                    if report is not None:
                        events.append(report)
                    continue
                events.append(self._receive(message))
        except ReplicationError as e:
            self._error = e
            self.state = PrimaryState.FAILED
            raise
        return events

    def _ack_now(self, data: bytes) -> Acked | None:
        """``data`` as one ACK of this stream that :meth:`_receive` would accept, applied; None,
        having changed nothing, for anything else (the general path then decodes it, and refuses
        what it refuses). Nothing is buffered before it: the decoder holds a whole message or
        none at the end of every feed of records of whole messages, and is checked."""
        if self.decoder.buffered:
            return None
        version, kind, flags, reserved, length, raw, epoch, seq, durable = _HEADER_U64.unpack_from(data)
        if (
            kind != _ACK
            or version != VERSION
            or flags
            or reserved
            or length != 8
            or raw != self._raw_id
            or epoch != self.epoch
            or not self.applied_seq <= seq <= self.last_seq
            or not self.durable_seq <= durable <= seq
        ):
            return None
        self.applied_seq, self.durable_seq = seq, durable
        self._open_sent_at = None
        in_flight = self._in_flight
        while in_flight:
            head = in_flight[0]
            if head.seq > seq or (head.durable and head.seq > durable):
                break
            in_flight.popleft()
            self._in_flight_count -= head.count
            self._in_flight_bytes -= head.size
        return _make_acked(seq, durable)

    def _dirty_slice(self, message: Dirty) -> DirtyReport | None:
        if message.volume_id != self.volume_id or message.epoch != self.epoch:
            _fail(ErrorCode.WRONG_STREAM, f"DIRTY for {message.volume_id} at epoch {message.epoch}")
        if self._dirty_done:
            _fail(ErrorCode.UNEXPECTED, "a DIRTY slice that was not asked for")
        self._move(PrimaryInput.RECV_DIRTY)  # only after the OPEN's ACK
        if message.offset != len(self._dirty) or (self._dirty and message.regions != self._dirty_regions):
            _fail(ErrorCode.MALFORMED, f"DIRTY slice at {message.offset}, expected {len(self._dirty)}")
        self._dirty_regions = message.regions
        self._dirty += message.bitmap
        if not message.last:
            return None
        self._dirty_done = True
        report = DirtyReport(self._dirty_regions, bytes(self._dirty))
        self._dirty = bytearray()
        return report

    def _receive(self, message: Message) -> Acked:
        if isinstance(message, Refuse):
            self._move(PrimaryInput.RECV_REFUSE)
            raise ReplicationError(message.code, message.reason, remote=True, seq=message.seq)
        if not isinstance(message, Ack):
            _fail(ErrorCode.UNEXPECTED, f"a replica sent {type(message).__name__}")
        if message.volume_id != self.volume_id or message.epoch != self.epoch:
            _fail(ErrorCode.WRONG_STREAM, f"ACK for {message.volume_id} at epoch {message.epoch}")
        opening = self.state is PrimaryState.OPENING
        self._move(PrimaryInput.RECV_ACK)
        if opening and message.applied_seq != self.first_seq - 1:
            _fail(
                ErrorCode.BAD_ACK,
                f"the OPEN was answered at seq {message.applied_seq}, not {self.first_seq - 1}",
            )
        if message.applied_seq > self.last_seq:
            _fail(ErrorCode.BAD_ACK, f"ACK of seq {message.applied_seq}, only {self.last_seq} sent")
        if message.applied_seq < self.applied_seq or message.durable_seq < self.durable_seq:
            _fail(ErrorCode.BAD_ACK, f"ACK went back to ({message.applied_seq}, {message.durable_seq})")
        self.applied_seq, self.durable_seq = message.applied_seq, message.durable_seq
        self._open_sent_at = None
        while self._in_flight:
            head = self._in_flight[0]
            if head.seq > self.applied_seq or (head.durable and head.seq > self.durable_seq):
                break
            self._in_flight.popleft()
            self._in_flight_count -= head.count
            self._in_flight_bytes -= head.size
        return Acked(self.applied_seq, self.durable_seq)

    # -- completion and lag ------------------------------------------------------------------------

    def complete(self, seq: int, *, durable: bool = False) -> bool:
        """True once the replica has acknowledged ``seq`` (made it durable, with ``durable``)."""
        return (self.durable_seq if durable else self.applied_seq) >= seq

    def deadline(self) -> float | None:
        """When :meth:`lagging` turns True unless an ACK arrives first (None: nothing outstanding)."""
        oldest = self._in_flight[0].sent_at if self._in_flight else self._open_sent_at
        return None if oldest is None else oldest + self.ack_timeout

    def lagging(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline


def all_complete(streams: Mapping[str, PrimaryStream], seq: int, *, durable: bool = False) -> bool:
    """True once every stream in ``streams`` (the in-sync replicas, by node id) has acknowledged
    ``seq``: the acknowledgement rule's replica half (docs/replication.md)."""
    return all(s.complete(seq, durable=durable) for s in streams.values())
