"""The heartbeat wire codec (docs/cluster.md, "Messages ... on the wire").

A frame is a 4-byte big-endian payload length followed by the payload, one msgpack map::

    {"t": "hello" | "heartbeat" | "ack" | "refusal" | "master_hello", "v": <schema version>,
     <field>: <value>, ...}

Field names are the dataclass field names of ``sparrow.cluster.messages``; enums travel as their
string values, nested records as maps without ``t``/``v`` (they share their message's version),
tuples as arrays, ``None`` as nil.

Sans-IO in the h11 manner: :class:`FrameDecoder` only buffers in :meth:`FrameDecoder.feed` and
parses in :meth:`FrameDecoder.next_message`, which returns a message or ``None`` when it needs more
bytes. Anything wrong with the stream raises :class:`HeartbeatProtocolError` carrying an
:class:`ErrorCode`; the connection is then closed (the decoder stays broken and raises the same
error again). Nothing else escapes the decoder.

Each message type has a schema version (:data:`SCHEMA_VERSIONS`). A decoder accepts a frame whose
version is at most its own (decoders for older versions fill in whatever a later version added)
and rejects a newer one with ``UNSUPPORTED_VERSION``. History:

- ``ack`` v2 adds ``directory`` (an array of ``{volume_id, name, primary_portal}``); a v1 Ack
  decodes with ``directory=()``, and a v1 Ack carrying a ``directory`` field is rejected (BAD_FIELD).
- ``ack`` v3 adds to each assignment its export settings: ``physical_block_size`` (int or nil),
  ``chap`` (nil or ``{user, secret, mutual_user, mutual_secret}``) and ``backing`` (str or nil).
  Assignments of a v1/v2 Ack decode with all three None; a v1/v2 assignment carrying one of them
  is rejected (BAD_FIELD). The frames travel inside the cluster channel
  (``sparrow.cluster.channel``), which encrypts them, CHAP secrets included.
- ``ack`` v4 adds ``deleted`` (an array of ``{volume_id, name}``: tombstones for volumes the node
  reported and the master has deleted); an older Ack decodes with ``deleted=()``, and one carrying
  a ``deleted`` field is rejected (BAD_FIELD).
- ``ack`` v5 adds to each assignment ``in_sync`` (an array of node ids, a subsequence of
  ``replicas``, the primary first) and ``replication_portals`` (an array aligned with
  ``replicas``, each ``host:port`` or nil), both at most ``MAX_COPIES`` long. Assignments of an
  older Ack decode with ``in_sync`` = the primary alone and every replication portal None; an
  older assignment carrying either field is rejected (BAD_FIELD).
- ``ack`` v6 adds ``stream_keys`` (an array of ``{volume_id, replica, key}``, ``key`` 64 hex
  digits: the replication stream keys, docs/replication.md); an older Ack decodes with
  ``stream_keys=()`` (its node then refuses every replication stream, and a primary's OPENs are
  refused), and one carrying the field is rejected (BAD_FIELD).
- ``hello`` v2 adds ``node_key`` (64 hex digits: the node's Ed25519 public key) and ``proof``
  (128 hex digits: its signature over the channel binding, sparrow.cluster.nodeidentity); a v1
  Hello decodes with both None (the master refuses it: ``no_identity``), and one carrying either
  is rejected (BAD_FIELD). ``refusal`` (v1, master -> node) came with it.
- ``master_hello`` (v1, master -> node, the master's first message on every connection):
  ``master_key`` (64 hex digits: the master's Ed25519 public key) and ``proof`` (128 hex digits: its
  signature over the channel binding, sparrow.cluster.masteridentity). A node now requires it
  before anything else, so it refuses an older master (one that sends an Ack or a Refusal first).
- ``ack`` v7 adds to each assignment ``paused`` (a bool: the operator paused the volume), and
  ``discovery_chap`` (nil or ``{user, secret, mutual_user, mutual_secret}``: the cluster's discovery
  CHAP); an older Ack decodes unpaused with no discovery CHAP, and one carrying either field is
  rejected (BAD_FIELD).
- ``heartbeat`` v2 adds to each replica state ``resync_done`` and ``resync_total`` (bytes, a
  SYNCING copy's resync progress); a v1 replica state decodes with both 0, and a v1 one carrying
  either is rejected (BAD_FIELD).
- ``heartbeat`` v3 adds diagnostics: to each observation ``error`` (str or nil: why the node's
  last attempt to act on the volume's assignment failed) and ``unsupported`` (an array of
  ``{opcode, service_action, count, last_initiator}``: SCSI commands answered INVALID COMMAND
  OPERATION CODE), and to the heartbeat ``skipped`` (an array of ``{name, reason}``: volumes not
  loaded at start). An older heartbeat decodes with ``error`` None and both arrays empty, and one
  carrying any of them is rejected (BAD_FIELD).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from sparrow.cluster.messages import (
    NODE_KEY_SIZE,
    PROOF_SIZE,
    STREAM_KEY_SIZE,
    Ack,
    Assignment,
    DeletedVolume,
    DirectoryEntry,
    Health,
    Heartbeat,
    Hello,
    InvalidMessage,
    MasterHello,
    Message,
    Refusal,
    ReplicaState,
    Role,
    SkippedVolume,
    StreamKey,
    SyncState,
    UnsupportedCommand,
    VolumeChap,
    VolumeObservation,
)

#: The largest payload a frame may carry (bytes, excluding the 4-byte length prefix).
MAX_FRAME = 1 << 20
#: The length prefix: unsigned 32-bit big-endian.
HEADER = struct.Struct(">I")
#: msgpack limits for one payload: no string we send is longer than a portal (~262 chars), no map
#: has more than a dozen keys; bin and ext values are never sent.
MAX_STR_LEN = 1024
MAX_ARRAY_LEN = 65536
MAX_MAP_LEN = 32

#: Wire name of each message type.
TYPE_NAMES: dict[type[Any], str] = {
    Hello: "hello",
    Heartbeat: "heartbeat",
    Ack: "ack",
    Refusal: "refusal",
    MasterHello: "master_hello",
}
#: Schema version this codec writes and the newest it reads, per wire type name.
SCHEMA_VERSIONS: dict[str, int] = {"hello": 2, "heartbeat": 3, "ack": 7, "refusal": 1, "master_hello": 1}
#: The first ``hello`` version that carries the node's key and proof.
HELLO_IDENTITY_VERSION = 2
#: The first ``heartbeat`` version whose replica states carry resync progress.
HEARTBEAT_RESYNC_VERSION = 2
#: The first ``heartbeat`` version that carries diagnostics (errors, unsupported commands, skipped).
HEARTBEAT_DIAGNOSTICS_VERSION = 3
#: The first ``ack`` version that carries the volume directory.
ACK_DIRECTORY_VERSION = 2
#: The first ``ack`` version whose assignments carry physical_block_size, chap and backing.
ACK_SETTINGS_VERSION = 3
#: The first ``ack`` version that carries tombstones (``deleted``).
ACK_DELETED_VERSION = 4
#: The first ``ack`` version whose assignments carry in_sync and replication_portals.
ACK_IN_SYNC_VERSION = 5
#: The first ``ack`` version that carries the replication stream keys.
ACK_STREAM_KEYS_VERSION = 6
#: The first ``ack`` version whose assignments carry ``paused``, and that carries ``discovery_chap``.
ACK_PAUSED_VERSION = 7


class ErrorCode(enum.Enum):
    """Why a heartbeat stream was rejected."""

    #: The length prefix announces more than MAX_FRAME bytes (or encode produced that many).
    FRAME_TOO_LARGE = "frame_too_large"
    #: Empty frame, undecodable msgpack, not a map, or ``t``/``v`` missing or of the wrong type.
    MALFORMED = "malformed"
    #: ``t`` names no message type this codec knows.
    UNKNOWN_TYPE = "unknown_type"
    #: ``v`` is newer than this codec's schema version for the type.
    UNSUPPORTED_VERSION = "unsupported_version"
    #: A field is missing, unexpected, of the wrong type or out of range.
    BAD_FIELD = "bad_field"


class HeartbeatProtocolError(Exception):
    """A heartbeat frame that cannot be accepted; ``code`` says why. The connection is closed."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


# -- encoding -------------------------------------------------------------------------------------


def _replica_state_to_wire(replica: ReplicaState) -> dict[str, object]:
    return {
        "node_id": replica.node_id,
        "state": replica.state.value,
        "write_position": replica.write_position,
        "resync_done": replica.resync_done,
        "resync_total": replica.resync_total,
    }


def _observation_to_wire(obs: VolumeObservation) -> dict[str, object]:
    return {
        "volume_id": obs.volume_id,
        "epoch": obs.epoch,
        "role": obs.role.value,
        "health": obs.health.value,
        "write_position": obs.write_position,
        "replica_states": [_replica_state_to_wire(r) for r in obs.replica_states],
        "converged": obs.converged,
        "error": obs.error,
        "unsupported": [
            {
                "opcode": u.opcode,
                "service_action": u.service_action,
                "count": u.count,
                "last_initiator": u.last_initiator,
            }
            for u in obs.unsupported
        ],
    }


def _assignment_to_wire(assignment: Assignment) -> dict[str, object]:
    return {
        "volume_id": assignment.volume_id,
        "name": assignment.name,
        "size": assignment.size,
        "block_size": assignment.block_size,
        "epoch": assignment.epoch,
        "primary": assignment.primary,
        "primary_portal": assignment.primary_portal,
        "replicas": list(assignment.replicas),
        "physical_block_size": assignment.physical_block_size,
        "chap": None if assignment.chap is None else _chap_to_wire(assignment.chap),
        "backing": assignment.backing,
        "in_sync": list(assignment.in_sync),
        "replication_portals": list(assignment.replication_portals),
        "paused": assignment.paused,
    }


def _chap_to_wire(chap: VolumeChap) -> dict[str, object]:
    return {
        "user": chap.user,
        "secret": chap.secret,
        "mutual_user": chap.mutual_user,
        "mutual_secret": chap.mutual_secret,
    }


def _directory_entry_to_wire(entry: DirectoryEntry) -> dict[str, object]:
    return {"volume_id": entry.volume_id, "name": entry.name, "primary_portal": entry.primary_portal}


def _to_wire(message: Message) -> dict[str, object]:
    if isinstance(message, Hello):
        return {
            "node_id": message.node_id,
            "incarnation": message.incarnation,
            "iscsi_portal": message.iscsi_portal,
            "replication": message.replication,
            "http": message.http,
            "capacity_bytes": message.capacity_bytes,
            "free_bytes": message.free_bytes,
            "node_key": None if message.node_key is None else message.node_key.hex(),
            "proof": None if message.proof is None else message.proof.hex(),
        }
    if isinstance(message, Refusal):
        return {"reason": message.reason, "detail": message.detail}
    if isinstance(message, MasterHello):
        return {"master_key": message.master_key.hex(), "proof": message.proof.hex()}
    if isinstance(message, Heartbeat):
        return {
            "seq": message.seq,
            "observations": [_observation_to_wire(o) for o in message.observations],
            "skipped": [{"name": v.name, "reason": v.reason} for v in message.skipped],
        }
    return {
        "seq": message.seq,
        "lease_seconds": message.lease_seconds,
        "assignments": [_assignment_to_wire(a) for a in message.assignments],
        "directory": [_directory_entry_to_wire(e) for e in message.directory],
        "deleted": [{"volume_id": d.volume_id, "name": d.name} for d in message.deleted],
        "stream_keys": [
            {"volume_id": k.volume_id, "replica": k.replica, "key": k.key.hex()} for k in message.stream_keys
        ],
        "discovery_chap": None if message.discovery_chap is None else _chap_to_wire(message.discovery_chap),
    }


def encode(message: Message) -> bytes:
    """One frame for ``message``: length prefix + msgpack map at the current schema version.

    Raises ``HeartbeatProtocolError(FRAME_TOO_LARGE)`` if the payload would exceed MAX_FRAME.
    """
    type_name = TYPE_NAMES.get(type(message))
    if type_name is None:
        raise TypeError(f"not a heartbeat message: {type(message).__name__}")
    body: dict[str, object] = {"t": type_name, "v": SCHEMA_VERSIONS[type_name]}
    body.update(_to_wire(message))
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise HeartbeatProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"{type_name} payload of {len(payload)} bytes exceeds {MAX_FRAME}"
        )
    return HEADER.pack(len(payload)) + payload


# -- decoding -------------------------------------------------------------------------------------


_E = TypeVar("_E", bound=enum.Enum)
_T = TypeVar("_T")


def _bad(where: str, reason: str) -> HeartbeatProtocolError:
    return HeartbeatProtocolError(ErrorCode.BAD_FIELD, f"{where}: {reason}" if where else reason)


class _Fields:
    """The fields of one wire map: each is taken exactly once; leftovers are an error."""

    def __init__(self, where: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise _bad(where, f"expected a map, got {type(raw).__name__}")
        self.where = where
        self._fields: dict[object, object] = dict(raw)

    def _path(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def take(self, name: str) -> object:
        if name not in self._fields:
            raise _bad(self._path(name), "missing")
        return self._fields.pop(name)

    def take_list(self, name: str) -> list[object]:
        value = self.take(name)
        if not isinstance(value, list):
            raise _bad(self._path(name), f"expected an array, got {type(value).__name__}")
        return value

    def take_enum(self, name: str, kind: type[_E]) -> _E:
        value = self.take(name)
        if not isinstance(value, str):
            raise _bad(self._path(name), f"expected a string, got {type(value).__name__}")
        try:
            return kind(value)
        except ValueError:
            raise _bad(self._path(name), f"unknown {kind.__name__} {value!r}") from None

    def build(self, kind: Callable[..., _T], **values: object) -> _T:
        """Check nothing is left over, then construct ``kind`` (its checks become BAD_FIELD)."""
        if self._fields:
            unknown = ", ".join(sorted(repr(k) for k in self._fields))
            raise _bad(self.where, f"unknown field(s) {unknown}")
        try:
            return kind(**values)
        except InvalidMessage as exc:
            raise _bad(self._path(exc.field), exc.reason) from None


def _replica_state_from_wire(where: str, raw: object, version: int) -> ReplicaState:
    f = _Fields(where, raw)
    values: dict[str, object] = {
        "node_id": f.take("node_id"),
        "state": f.take_enum("state", SyncState),
        "write_position": f.take("write_position"),
    }
    if version >= HEARTBEAT_RESYNC_VERSION:
        values["resync_done"] = f.take("resync_done")
        values["resync_total"] = f.take("resync_total")
    return f.build(ReplicaState, **values)


def _observation_from_wire(where: str, raw: object, version: int) -> VolumeObservation:
    f = _Fields(where, raw)
    values: dict[str, object] = {
        "volume_id": f.take("volume_id"),
        "epoch": f.take("epoch"),
        "role": f.take_enum("role", Role),
        "health": f.take_enum("health", Health),
        "write_position": f.take("write_position"),
        "replica_states": tuple(
            _replica_state_from_wire(f"{where}.replica_states[{i}]", r, version)
            for i, r in enumerate(f.take_list("replica_states"))
        ),
        "converged": f.take("converged"),
    }
    if version >= HEARTBEAT_DIAGNOSTICS_VERSION:
        values["error"] = f.take("error")
        values["unsupported"] = tuple(
            _unsupported_from_wire(f"{where}.unsupported[{i}]", u)
            for i, u in enumerate(f.take_list("unsupported"))
        )
    return f.build(VolumeObservation, **values)


def _unsupported_from_wire(where: str, raw: object) -> UnsupportedCommand:
    f = _Fields(where, raw)
    return f.build(
        UnsupportedCommand,
        opcode=f.take("opcode"),
        service_action=f.take("service_action"),
        count=f.take("count"),
        last_initiator=f.take("last_initiator"),
    )


def _skipped_from_wire(where: str, raw: object) -> SkippedVolume:
    f = _Fields(where, raw)
    return f.build(SkippedVolume, name=f.take("name"), reason=f.take("reason"))


def _assignment_from_wire(where: str, raw: object, version: int) -> Assignment:
    f = _Fields(where, raw)
    values: dict[str, object] = {
        "volume_id": f.take("volume_id"),
        "name": f.take("name"),
        "size": f.take("size"),
        "block_size": f.take("block_size"),
        "epoch": f.take("epoch"),
        "primary": f.take("primary"),
        "primary_portal": f.take("primary_portal"),
        "replicas": tuple(f.take_list("replicas")),
    }
    if version >= ACK_SETTINGS_VERSION:
        values["physical_block_size"] = f.take("physical_block_size")
        chap = f.take("chap")
        values["chap"] = None if chap is None else _chap_from_wire(f"{where}.chap", chap)
        values["backing"] = f.take("backing")
    if version >= ACK_IN_SYNC_VERSION:
        values["in_sync"] = tuple(f.take_list("in_sync"))
        values["replication_portals"] = tuple(f.take_list("replication_portals"))
    if version >= ACK_PAUSED_VERSION:
        values["paused"] = f.take("paused")
    return f.build(Assignment, **values)


def _chap_from_wire(where: str, raw: object) -> VolumeChap:
    f = _Fields(where, raw)
    return f.build(
        VolumeChap,
        user=f.take("user"),
        secret=f.take("secret"),
        mutual_user=f.take("mutual_user"),
        mutual_secret=f.take("mutual_secret"),
    )


def _directory_entry_from_wire(where: str, raw: object) -> DirectoryEntry:
    f = _Fields(where, raw)
    return f.build(
        DirectoryEntry,
        volume_id=f.take("volume_id"),
        name=f.take("name"),
        primary_portal=f.take("primary_portal"),
    )


def _hello_from_wire(f: _Fields, version: int) -> Hello:
    values: dict[str, object] = {
        "node_id": f.take("node_id"),
        "incarnation": f.take("incarnation"),
        "iscsi_portal": f.take("iscsi_portal"),
        "replication": f.take("replication"),
        "http": f.take("http"),
        "capacity_bytes": f.take("capacity_bytes"),
        "free_bytes": f.take("free_bytes"),
    }
    if version >= HELLO_IDENTITY_VERSION:
        values["node_key"] = _hex_or_none("node_key", f.take("node_key"), NODE_KEY_SIZE)
        values["proof"] = _hex_or_none("proof", f.take("proof"), PROOF_SIZE)
    return f.build(Hello, **values)


def _hex_or_none(where: str, text: object, size: int) -> bytes | None:
    """``size`` bytes written as ``2 * size`` hex digits, or nil."""
    if text is None:
        return None
    if not isinstance(text, str) or len(text) != 2 * size:
        raise _bad(where, f"expected {2 * size} hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise _bad(where, "not hex") from None


def _refusal_from_wire(f: _Fields, version: int) -> Refusal:
    return f.build(Refusal, reason=f.take("reason"), detail=f.take("detail"))


def _master_hello_from_wire(f: _Fields, version: int) -> MasterHello:
    key = _hex_or_none("master_key", f.take("master_key"), NODE_KEY_SIZE)
    proof = _hex_or_none("proof", f.take("proof"), PROOF_SIZE)
    if key is None or proof is None:
        raise _bad("", "a master_hello needs master_key and proof")
    return f.build(MasterHello, master_key=key, proof=proof)


def _heartbeat_from_wire(f: _Fields, version: int) -> Heartbeat:
    seq = f.take("seq")
    observations = tuple(
        _observation_from_wire(f"observations[{i}]", o, version)
        for i, o in enumerate(f.take_list("observations"))
    )
    skipped: tuple[SkippedVolume, ...] = ()
    if version >= HEARTBEAT_DIAGNOSTICS_VERSION:
        skipped = tuple(_skipped_from_wire(f"skipped[{i}]", v) for i, v in enumerate(f.take_list("skipped")))
    return f.build(Heartbeat, seq=seq, observations=observations, skipped=skipped)


def _ack_from_wire(f: _Fields, version: int) -> Ack:
    seq = f.take("seq")
    lease_seconds = f.take("lease_seconds")
    assignments = tuple(
        _assignment_from_wire(f"assignments[{i}]", a, version)
        for i, a in enumerate(f.take_list("assignments"))
    )
    directory: tuple[DirectoryEntry, ...] = ()
    if version >= ACK_DIRECTORY_VERSION:
        directory = tuple(
            _directory_entry_from_wire(f"directory[{i}]", e) for i, e in enumerate(f.take_list("directory"))
        )
    deleted: tuple[DeletedVolume, ...] = ()
    if version >= ACK_DELETED_VERSION:
        deleted = tuple(_deleted_from_wire(f"deleted[{i}]", d) for i, d in enumerate(f.take_list("deleted")))
    stream_keys: tuple[StreamKey, ...] = ()
    if version >= ACK_STREAM_KEYS_VERSION:
        stream_keys = tuple(
            _stream_key_from_wire(f"stream_keys[{i}]", k) for i, k in enumerate(f.take_list("stream_keys"))
        )
    discovery_chap: VolumeChap | None = None
    if version >= ACK_PAUSED_VERSION:
        raw = f.take("discovery_chap")
        discovery_chap = None if raw is None else _chap_from_wire("discovery_chap", raw)
    return f.build(
        Ack,
        seq=seq,
        lease_seconds=lease_seconds,
        assignments=assignments,
        directory=directory,
        deleted=deleted,
        stream_keys=stream_keys,
        discovery_chap=discovery_chap,
    )


def _stream_key_from_wire(where: str, raw: object) -> StreamKey:
    f = _Fields(where, raw)
    volume_id, replica, text = f.take("volume_id"), f.take("replica"), f.take("key")
    if not isinstance(text, str) or len(text) != 2 * STREAM_KEY_SIZE:
        raise _bad(f"{where}.key", f"expected {2 * STREAM_KEY_SIZE} hex digits")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise _bad(f"{where}.key", "not hex") from None
    return f.build(StreamKey, volume_id=volume_id, replica=replica, key=key)


def _deleted_from_wire(where: str, raw: object) -> DeletedVolume:
    f = _Fields(where, raw)
    return f.build(DeletedVolume, volume_id=f.take("volume_id"), name=f.take("name"))


#: Decoder per wire type name; each gets the frame's (supported) version, so that when a version
#: adds a field the decoder can default it for older frames.
_DECODERS: dict[str, Callable[[_Fields, int], Message]] = {
    "hello": _hello_from_wire,
    "heartbeat": _heartbeat_from_wire,
    "ack": _ack_from_wire,
    "refusal": _refusal_from_wire,
    "master_hello": _master_hello_from_wire,
}


def decode_payload(payload: bytes) -> Message:
    """Decode one frame's payload (without the length prefix) and validate every field."""
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR_LEN,
            max_bin_len=0,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack signals bad input with several ValueError/TypeError kinds
        raise HeartbeatProtocolError(ErrorCode.MALFORMED, f"undecodable msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise HeartbeatProtocolError(ErrorCode.MALFORMED, f"payload is a {type(body).__name__}, not a map")
    type_name = body.pop("t", None)
    version = body.pop("v", None)
    if not isinstance(type_name, str):
        raise HeartbeatProtocolError(ErrorCode.MALFORMED, "missing or non-string message type 't'")
    if type(version) is not int or version < 1:
        raise HeartbeatProtocolError(ErrorCode.MALFORMED, f"bad schema version 'v': {version!r}")
    decoder = _DECODERS.get(type_name)
    if decoder is None:
        raise HeartbeatProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {type_name!r}")
    supported = SCHEMA_VERSIONS[type_name]
    if version > supported:
        raise HeartbeatProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"{type_name} version {version} is newer than {supported}"
        )
    return decoder(_Fields("", body), version)


class FrameDecoder:
    """Splits a byte stream into frames and decodes them (h11 style).

    ``feed`` only buffers; ``next_message`` returns the next message or ``None`` when a whole
    frame is not buffered yet. Call ``next_message`` until it returns ``None`` after every feed.
    A length prefix over MAX_FRAME is rejected as soon as the prefix is seen, before buffering the
    body. After an error the decoder is dead: every later ``next_message`` raises the same error.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: HeartbeatProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (non-zero at EOF means a truncated frame)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Buffer ``data``; nothing is parsed here."""
        if self._error is None:
            self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except HeartbeatProtocolError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _next(self) -> Message | None:
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME:
            raise HeartbeatProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes exceeds {MAX_FRAME}"
            )
        if length == 0:
            raise HeartbeatProtocolError(ErrorCode.MALFORMED, "empty frame")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return decode_payload(payload)


def decode(frame: bytes) -> Message:
    """Decode exactly one whole frame (length prefix included); for tests and one-shot use."""
    decoder = FrameDecoder()
    decoder.feed(frame)
    message = decoder.next_message()
    if message is None or decoder.buffered:
        raise HeartbeatProtocolError(ErrorCode.MALFORMED, "not exactly one frame")
    return message
