"""sparrow.cluster.messages and sparrow.cluster.heartbeat: message checks, framing, the codec."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparrow.cluster import heartbeat
from sparrow.cluster.epoch import Epoch
from sparrow.cluster.heartbeat import (
    HEADER,
    MAX_FRAME,
    ErrorCode,
    FrameDecoder,
    HeartbeatProtocolError,
    decode,
    decode_payload,
    encode,
)
from sparrow.cluster.messages import (
    MAX_REASON_LEN,
    MAX_SKIPPED,
    MAX_UNSUPPORTED,
    Ack,
    Assignment,
    DeletedVolume,
    DirectoryEntry,
    Health,
    Heartbeat,
    Hello,
    InvalidMessage,
    Message,
    ReplicaState,
    Role,
    SkippedVolume,
    StreamKey,
    SyncState,
    UnsupportedCommand,
    VolumeChap,
    VolumeObservation,
    clip,
    split_portal,
)

VOL_A = "0123456789abcdef0123456789abcdef"
VOL_B = "fedcba9876543210fedcba9876543210"
VOL_C = "00112233445566778899aabbccddeeff"
VOL_D = "d0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
VOL_E = "e0e1e2e3e4e5e6e7e8e9eaebecedeeef"

HELLO = Hello(
    node_id="node-1.rack2",
    incarnation=1_700_000_000_000_000_000,
    iscsi_portal="10.0.0.1:3260",
    replication="node-1.example:7000",
    http="[::1]:8080",
    capacity_bytes=2**40,
    free_bytes=2**39,
)
HEARTBEAT = Heartbeat(
    seq=42,
    observations=(
        VolumeObservation(
            volume_id=VOL_A,
            epoch=3,
            role=Role.PRIMARY,
            health=Health.DEGRADED,
            write_position=123456,
            replica_states=(
                ReplicaState("node-2", SyncState.IN_SYNC, 123456),
                ReplicaState("node-3", SyncState.SYNCING, 1000, 5 << 20, 64 << 20),
            ),
            converged=True,
        ),
        VolumeObservation(VOL_B, 0, Role.NONE, Health.OFFLINE, 0, (), False),
    ),
)
EMPTY_HEARTBEAT = Heartbeat(seq=0, observations=())
ACK = Ack(
    seq=42,
    lease_seconds=5.0,
    assignments=(
        Assignment(VOL_A, "db", 1 << 30, 4096, 3, "node-1", "10.0.0.1:3260", ("node-1", "node-2")),
        Assignment(VOL_B, "scratch", 512 * 7, 512, 1, None, None, ("node-3",)),
    ),
    directory=(
        DirectoryEntry(VOL_A, "db", "10.0.0.1:3260"),
        DirectoryEntry(VOL_B, "scratch", None),
        DirectoryEntry(VOL_C, "logs", "[fd00::7]:3261"),
    ),
)
CHAP = VolumeChap("host-a", "initiator-secret", "target", "target-secret")
ACK_SETTINGS = Ack(
    seq=7,
    lease_seconds=5.0,
    assignments=(
        Assignment(
            VOL_A,
            "db",
            1 << 30,
            512,
            3,
            "local",
            "127.0.0.1:3260",
            ("local",),
            physical_block_size=4096,
            chap=CHAP,
            backing="/dev/vdb",
        ),
        Assignment(VOL_B, "one-way", 512 * 7, 512, 1, None, None, (), chap=VolumeChap("u", "s")),
    ),
)
ACK_DELETED = Ack(
    seq=9,
    lease_seconds=5.0,
    assignments=ACK.assignments,
    directory=ACK.directory,
    deleted=(DeletedVolume(VOL_D, "old-db"), DeletedVolume(VOL_E, "db")),  # a name may be reused
)
ACK_IN_SYNC = Ack(
    seq=11,
    lease_seconds=5.0,
    assignments=(
        Assignment(
            VOL_A,
            "db",
            1 << 30,
            4096,
            4,
            "node-1",
            "10.0.0.1:3260",
            ("node-1", "node-2", "node-3"),
            in_sync=("node-1", "node-3"),
            replication_portals=("10.0.0.1:3291", None, "[fd00::3]:3291"),
        ),
    ),
)
ACK_STREAM_KEYS = Ack(
    seq=12,
    lease_seconds=5.0,
    assignments=ACK_IN_SYNC.assignments,
    stream_keys=(StreamKey(VOL_A, "node-2", b"\x02" * 32), StreamKey(VOL_A, "node-3", b"\x03" * 32)),
)
MESSAGES: list[Message] = [
    HELLO,
    ACK_IN_SYNC,
    ACK_STREAM_KEYS,
    HEARTBEAT,
    EMPTY_HEARTBEAT,
    ACK,
    ACK_SETTINGS,
    ACK_DELETED,
    Ack(0, 0.0, ()),
    Ack(1, 1.0, (), (), (DeletedVolume(VOL_A, "db"),)),
]


def frame(body: object) -> bytes:
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def wire(message: Message) -> dict[str, Any]:
    """The decoded msgpack map of ``message``'s frame (to mutate in tests)."""
    data = encode(message)
    body: dict[str, Any] = msgpack.unpackb(data[4:], raw=False)
    return body


def error_of(data: bytes) -> HeartbeatProtocolError:
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(HeartbeatProtocolError) as info:
        decoder.next_message()
    return info.value


# -- messages -------------------------------------------------------------------------------------


def test_assignment_epoch_restores_the_type() -> None:
    assignment = ACK.assignments[0]
    assert assignment.restored_epoch == Epoch.restore(3)
    assert HEARTBEAT.observations[0].restored_epoch == Epoch.restore(3)


def test_assignment_role_of() -> None:
    assignment = ACK.assignments[0]
    assert assignment.role_of("node-1") is Role.PRIMARY
    assert assignment.role_of("node-2") is Role.REPLICA
    assert assignment.role_of("node-9") is Role.NONE
    assert ACK.assignments[1].role_of("node-3") is Role.REPLICA


def test_ack_lease_int_is_normalised_to_float() -> None:
    ack = Ack(1, 5, ())
    assert type(ack.lease_seconds) is float
    assert ack == Ack(1, 5.0, ())


@pytest.mark.parametrize(
    ("portal", "host", "port"),
    [
        ("10.0.0.1:3260", "10.0.0.1", 3260),
        ("node-1.example.com:1", "node-1.example.com", 1),
        ("[fe80::1]:65535", "fe80::1", 65535),
        ("localhost:8080", "localhost", 8080),
    ],
)
def test_split_portal(portal: str, host: str, port: int) -> None:
    assert split_portal(portal) == (host, port)


@pytest.mark.parametrize(
    "portal",
    [
        "",
        "host",
        ":3260",
        "host:",
        "host:0",
        "host:65536",
        "host:+80",
        "host:80a",
        "-host:80",
        "ho_st:80",
        "host.:80",
        "a..b:80",
        "fe80::1:80",
        "[fe80::1:80",
        "[zz::1]:80",
        "999.1.1.1:80",
        "1.2.3:80",
        "x" * 254 + ":80",
    ],
)
def test_bad_portals_are_rejected(portal: str) -> None:
    with pytest.raises(InvalidMessage):
        split_portal(portal)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ReplicaState("Node", SyncState.IN_SYNC, 0), "node_id"),
        (lambda: ReplicaState("n", "in_sync", 0), "state"),  # type: ignore[arg-type]
        (lambda: ReplicaState("n", SyncState.IN_SYNC, -1), "write_position"),
        (lambda: ReplicaState("n", SyncState.IN_SYNC, 2**64), "write_position"),
        (lambda: ReplicaState("n", SyncState.IN_SYNC, 2**62 + 1), "write_position"),
        (lambda: ReplicaState("n", SyncState.IN_SYNC, True), "write_position"),
        (lambda: VolumeObservation("v1", 1, Role.NONE, Health.OK, 0, (), True), "volume_id"),
        (lambda: VolumeObservation(VOL_A.upper(), 1, Role.NONE, Health.OK, 0, (), True), "volume_id"),
        (lambda: VolumeObservation(VOL_A, 1, Role.NONE, Health.OK, 0, (), 1), "converged"),  # type: ignore[arg-type]
        (lambda: VolumeObservation(VOL_A, 1, Role.NONE, Health.OK, 0, [], True), "replica_states"),  # type: ignore[arg-type]
        (
            lambda: VolumeObservation(
                VOL_A,
                1,
                Role.PRIMARY,
                Health.OK,
                0,
                (ReplicaState("n", SyncState.FAILED, 0), ReplicaState("n", SyncState.IN_SYNC, 0)),
                True,
            ),
            "replica_states",
        ),
        (lambda: Heartbeat(1, (HEARTBEAT.observations[0], HEARTBEAT.observations[0])), "observations"),
        (lambda: Hello("n", 1, "h:1", "h:1", "h:1", -1, 0), "capacity_bytes"),
        (lambda: Hello("n", 1, "h:1", "h", "h:1", 1, 0), "replication"),
        (lambda: Hello("a" * 64, 1, "h:1", "h:1", "h:1", 1, 0), "node_id"),
        (lambda: Ack(1, math.nan, ()), "lease_seconds"),
        (lambda: Ack(1, -1.0, ()), "lease_seconds"),
        (lambda: Ack(1, math.inf, ()), "lease_seconds"),
        (lambda: Ack(1, 1.0, (ACK.assignments[0], ACK.assignments[0])), "assignments"),
        (lambda: Ack(1, 1.0, (), (ACK.directory[0], ACK.directory[0])), "directory"),
        (lambda: Ack(1, 1.0, (), list(ACK.directory)), "directory"),  # type: ignore[arg-type]
        (lambda: Ack(1, 1.0, (), (ACK.assignments[0],)), "directory"),  # type: ignore[arg-type]
        (lambda: Ack(1, 1.0, (), (), (DeletedVolume(VOL_D, "a"), DeletedVolume(VOL_D, "b"))), "deleted"),
        (lambda: Ack(1, 1.0, (ACK.assignments[0],), (), (DeletedVolume(VOL_A, "db"),)), "deleted"),
        (lambda: Ack(1, 1.0, (), (ACK.directory[2],), (DeletedVolume(VOL_C, "logs"),)), "deleted"),
        (lambda: Ack(1, 1.0, (), (), [DeletedVolume(VOL_D, "a")]), "deleted"),  # type: ignore[arg-type]
        (lambda: Ack(1, 1.0, (), (), (ACK.directory[0],)), "deleted"),  # type: ignore[arg-type]
        (lambda: DeletedVolume("v1", "db"), "volume_id"),
        (lambda: DeletedVolume(VOL_A, "Db"), "name"),
        (lambda: DeletedVolume(VOL_A, ""), "name"),
        (lambda: DirectoryEntry("v1", "db", None), "volume_id"),
        (lambda: DirectoryEntry(VOL_A, "Db", None), "name"),
        (lambda: DirectoryEntry(VOL_A, "", None), "name"),
        (lambda: DirectoryEntry(VOL_A, 5, None), "name"),  # type: ignore[arg-type]
        (lambda: DirectoryEntry(VOL_A, "db", "10.0.0.1"), "primary_portal"),
        (lambda: DirectoryEntry(VOL_A, "db", "10.0.0.1:0"), "primary_portal"),
        (lambda: DirectoryEntry(VOL_A, "db", 3260), "primary_portal"),  # type: ignore[arg-type]
        (lambda: Assignment(VOL_A, "Db", 4096, 4096, 1, None, None, ()), "name"),
        (lambda: Assignment(VOL_A, "db", 4096, 1024, 1, None, None, ()), "block_size"),
        (lambda: Assignment(VOL_A, "db", 4000, 512, 1, None, None, ()), "size"),
        (lambda: Assignment(VOL_A, "db", 0, 512, 1, None, None, ()), "size"),
        (lambda: Assignment(VOL_A, "db", 512, 512, 1, None, "h:1", ()), "primary_portal"),
        (lambda: Assignment(VOL_A, "db", 512, 512, 1, "n1", None, ("n1",)), "primary_portal"),
        (lambda: Assignment(VOL_A, "db", 512, 512, 1, "n1", "h:1", ("n2", "n1")), "replicas"),
        (lambda: Assignment(VOL_A, "db", 512, 512, 1, "n1", "h:1", ()), "replicas"),
        (lambda: Assignment(VOL_A, "db", 512, 512, 1, None, None, ("n1", "n1")), "replicas"),
        (lambda: Assignment(VOL_A, "db", 512, 512, 1, None, None, ["n1"]), "replicas"),  # type: ignore[arg-type]
        (lambda: Assignment(VOL_A, "db", 512, 512, 1, None, None, ("N1",)), "replicas[0]"),
    ],
)
def test_invalid_messages_cannot_be_built(build: Any, field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        build()
    assert info.value.field == field


# -- round trips and framing -----------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    data = encode(message)
    assert decode(data) == message
    (length,) = HEADER.unpack_from(data)
    assert length == len(data) - 4


def test_wire_form() -> None:
    body = wire(HEARTBEAT)
    assert body["t"] == "heartbeat"
    assert body["v"] == 3
    assert body["seq"] == 42
    obs = body["observations"][0]
    assert obs["role"] == "primary"
    assert obs["health"] == "degraded"
    assert obs["replica_states"][0] == {
        "node_id": "node-2",
        "state": "in_sync",
        "write_position": 123456,
        "resync_done": 0,
        "resync_total": 0,
    }
    assert obs["replica_states"][1]["resync_done"] == 5 << 20
    assert wire(ACK)["assignments"][1]["primary"] is None
    assert wire(HELLO)["t"] == "hello"
    assert wire(ACK)["t"] == "ack"
    assert wire(ACK)["v"] == 6
    assert wire(ACK)["deleted"] == []
    assert wire(ACK_DELETED)["deleted"] == [
        {"volume_id": VOL_D, "name": "old-db"},
        {"volume_id": VOL_E, "name": "db"},
    ]
    assert wire(ACK)["assignments"][0]["chap"] is None
    assert wire(ACK_SETTINGS)["assignments"][0]["chap"] == {
        "user": "host-a",
        "secret": "initiator-secret",
        "mutual_user": "target",
        "mutual_secret": "target-secret",
    }
    assert wire(ACK_SETTINGS)["assignments"][0]["physical_block_size"] == 4096
    assert wire(ACK_SETTINGS)["assignments"][0]["backing"] == "/dev/vdb"
    assert wire(ACK)["directory"] == [
        {"volume_id": VOL_A, "name": "db", "primary_portal": "10.0.0.1:3260"},
        {"volume_id": VOL_B, "name": "scratch", "primary_portal": None},
        {"volume_id": VOL_C, "name": "logs", "primary_portal": "[fd00::7]:3261"},
    ]


SETTINGS_FIELDS = ("physical_block_size", "chap", "backing")


IN_SYNC_FIELDS = ("in_sync", "replication_portals")


def _v5_ack_body(message: Ack) -> dict[str, Any]:
    """``message`` as a schema v5 master wrote it: no stream keys."""
    body = wire(message)
    body["v"] = 5
    del body["stream_keys"]
    return body


def _v4_ack_body(message: Ack) -> dict[str, Any]:
    """``message`` as a schema v4 master wrote it: assignments without the in-sync set."""
    body = _v5_ack_body(message)
    body["v"] = 4
    for assignment in body["assignments"]:
        for name in IN_SYNC_FIELDS:
            del assignment[name]
    return body


def _v3_ack_body(message: Ack) -> dict[str, Any]:
    """``message`` as a schema v3 master wrote it: no tombstones."""
    body = _v4_ack_body(message)
    body["v"] = 3
    del body["deleted"]
    return body


def _v2_ack_body(message: Ack) -> dict[str, Any]:
    """``message`` as a schema v2 master wrote it: no tombstones, assignments without export settings."""
    body = _v3_ack_body(message)
    body["v"] = 2
    for assignment in body["assignments"]:
        for name in SETTINGS_FIELDS:
            del assignment[name]
    return body


def _v1_ack_body(message: Ack) -> dict[str, Any]:
    """``message`` as a schema v1 master wrote it: no directory, no export settings, no tombstones."""
    body = _v2_ack_body(message)
    body["v"] = 1
    del body["directory"]
    return body


def test_a_v2_ack_decodes_with_no_export_settings() -> None:
    decoded = decode(frame(_v2_ack_body(ACK_SETTINGS)))
    assert isinstance(decoded, Ack)
    settings = [(a.physical_block_size, a.chap, a.backing) for a in decoded.assignments]
    assert settings == [(None, None, None)] * 2
    assert decoded.assignments[0].name == "db" and decoded.assignments[0].size == 1 << 30


@pytest.mark.parametrize("name", SETTINGS_FIELDS)
def test_a_v2_assignment_may_not_carry_export_settings(name: str) -> None:
    body = _v2_ack_body(ACK_SETTINGS)
    body["assignments"][0][name] = None
    error = error_of(frame(body))
    assert error.code is ErrorCode.BAD_FIELD
    assert f"unknown field(s) '{name}'" in error.message


@pytest.mark.parametrize("name", SETTINGS_FIELDS)
def test_a_v3_assignment_must_carry_export_settings(name: str) -> None:
    error = error_of(_drop(["assignments", 0, name], ACK_SETTINGS))
    assert error.code is ErrorCode.BAD_FIELD
    assert error.message == f"assignments[0].{name}: missing"


def test_chap_secrets_stay_out_of_repr() -> None:
    text = repr(ACK_SETTINGS)
    assert "host-a" in text and "target" in text
    assert "secret" not in text.replace("secret=", "").replace("mutual_secret", "")
    assert "initiator-secret" not in text and "target-secret" not in text


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: VolumeChap("", "s"), "user"),
        (lambda: VolumeChap("u", ""), "secret"),
        (lambda: VolumeChap("u", "s" * 1025), "secret"),
        (lambda: VolumeChap("u", "s", "m", None), "mutual_user"),
        (lambda: VolumeChap("u", "s", None, "m"), "mutual_user"),
        (lambda: VolumeChap("u", "same", "t", "same"), "mutual_secret"),
    ],
)
def test_invalid_chap_cannot_be_built(build: Any, field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        build()
    assert info.value.field == field


def test_a_v1_ack_decodes_with_an_empty_directory() -> None:
    decoded = decode(frame(_v1_ack_body(ACK)))
    assert isinstance(decoded, Ack)
    assert decoded.directory == ()
    assert decoded == Ack(ACK.seq, ACK.lease_seconds, ACK.assignments)


def test_a_v1_ack_may_not_carry_a_directory() -> None:
    body = _v1_ack_body(ACK)
    body["directory"] = []
    error = error_of(frame(body))
    assert error.code is ErrorCode.BAD_FIELD
    assert "unknown field(s) 'directory'" in error.message


def test_a_v3_ack_decodes_with_no_tombstones() -> None:
    decoded = decode(frame(_v3_ack_body(ACK_DELETED)))
    assert isinstance(decoded, Ack)
    assert decoded.deleted == ()
    assert decoded == Ack(ACK_DELETED.seq, ACK_DELETED.lease_seconds, ACK.assignments, ACK.directory)
    # Export settings are still read in v3.
    settings = decode(frame(_v3_ack_body(ACK_SETTINGS)))
    assert settings == ACK_SETTINGS


@pytest.mark.parametrize("value", [[], [{"volume_id": VOL_D, "name": "old-db"}]])
@pytest.mark.parametrize("body", [_v3_ack_body, _v2_ack_body, _v1_ack_body], ids=["v3", "v2", "v1"])
def test_an_ack_before_v4_may_not_carry_tombstones(body: Any, value: list[object]) -> None:
    old = body(ACK)
    old["deleted"] = value
    error = error_of(frame(old))
    assert error.code is ErrorCode.BAD_FIELD
    assert error.message == "unknown field(s) 'deleted'"


def test_a_v4_ack_must_carry_its_tombstones() -> None:
    error = error_of(_drop(["deleted"], ACK_DELETED))
    assert error.code is ErrorCode.BAD_FIELD
    assert error.message == "deleted: missing"


def test_a_v2_ack_must_carry_a_directory() -> None:
    error = error_of(_drop(["directory"], ACK))
    assert error.code is ErrorCode.BAD_FIELD
    assert error.message == "directory: missing"


def test_byte_by_byte() -> None:
    stream = b"".join(encode(m) for m in MESSAGES)
    decoder = FrameDecoder()
    out: list[Message] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        message = decoder.next_message()
        if message is not None:
            out.append(message)
            assert decoder.next_message() is None
    assert out == MESSAGES
    assert decoder.buffered == 0


def test_several_frames_in_one_feed_and_a_partial_tail() -> None:
    stream = b"".join(encode(m) for m in MESSAGES)
    tail = encode(HELLO)
    decoder = FrameDecoder()
    decoder.feed(stream + tail[:10])
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    assert out == MESSAGES
    assert decoder.buffered == 10
    decoder.feed(tail[10:])
    assert decoder.next_message() == HELLO
    assert decoder.next_message() is None


def test_nothing_buffered_returns_none() -> None:
    decoder = FrameDecoder()
    assert decoder.next_message() is None
    decoder.feed(b"\x00\x00")
    assert decoder.next_message() is None


def test_decode_wants_exactly_one_frame() -> None:
    with pytest.raises(HeartbeatProtocolError) as info:
        decode(encode(HELLO)[:-1])
    assert info.value.code is ErrorCode.MALFORMED
    with pytest.raises(HeartbeatProtocolError):
        decode(encode(HELLO) + encode(HELLO))


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        encode(ACK.assignments[0])  # type: ignore[arg-type]


# -- errors ---------------------------------------------------------------------------------------


def test_oversized_length_is_rejected_from_the_prefix_alone() -> None:
    error = error_of(HEADER.pack(MAX_FRAME + 1))
    assert error.code is ErrorCode.FRAME_TOO_LARGE
    # A frame of exactly MAX_FRAME is allowed: the decoder waits for its body.
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(MAX_FRAME) + b"\x80")
    assert decoder.next_message() is None


def test_encode_refuses_an_oversized_frame() -> None:
    observation = HEARTBEAT.observations[0]
    many = tuple(
        VolumeObservation(
            f"{i:032x}",
            observation.epoch,
            observation.role,
            observation.health,
            observation.write_position,
            observation.replica_states,
            observation.converged,
        )
        for i in range(12000)
    )
    with pytest.raises(HeartbeatProtocolError) as info:
        encode(Heartbeat(1, many))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_errors_are_sticky() -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(0) + encode(HELLO))
    with pytest.raises(HeartbeatProtocolError) as first:
        decoder.next_message()
    decoder.feed(encode(HELLO))
    with pytest.raises(HeartbeatProtocolError) as second:
        decoder.next_message()
    assert second.value is first.value


@pytest.mark.parametrize(
    "data",
    [
        HEADER.pack(0),  # empty frame
        HEADER.pack(1) + b"\xc1",  # never-used msgpack byte
        HEADER.pack(2) + b"\x92\x01",  # truncated array inside the frame
        frame([1, 2]),  # not a map
        frame("hello"),
        frame({"v": 1}),  # no type
        frame({"t": 1, "v": 1}),  # type not a string
        frame({"t": "hello"}),  # no version
        frame({"t": "hello", "v": True}),
        frame({"t": "hello", "v": 0}),
        frame({"t": "hello", "v": "1"}),
        frame({"t": "hello", "v": 1.0}),
        HEADER.pack(3) + b"\xa2\xff\xfe",  # invalid UTF-8 string
        frame({"t": "hello", "v": 1, "x": msgpack.ExtType(5, b"abcd")}),  # ext values are not accepted
        frame({"t": "hello", "v": 1, "x": "y" * 1025}),  # string over MAX_STR_LEN
        frame({"t": "hello", "v": 1, "x": b"bin"}),  # bin values are not accepted
        frame({1: "x", "t": "hello", "v": 1}),  # non-string map key
        HEADER.pack(2) + b"\x80\xc0",  # trailing data after the map, inside the frame
        frame({"t": "hello", "v": 1, **{f"k{i}": 0 for i in range(40)}}),  # map over MAX_MAP_LEN
    ],
)
def test_malformed(data: bytes) -> None:
    assert error_of(data).code is ErrorCode.MALFORMED


def test_unknown_type() -> None:
    assert error_of(frame({"t": "goodbye", "v": 1})).code is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize("message", [HELLO, HEARTBEAT, ACK], ids=lambda m: type(m).__name__)
def test_newer_version_is_unsupported(message: Message) -> None:
    body = wire(message)
    body["v"] += 1
    body["new_field"] = 1  # what a newer version might add; the version is checked first
    assert error_of(frame(body)).code is ErrorCode.UNSUPPORTED_VERSION


def test_older_versions_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = encode(HELLO)
    monkeypatch.setitem(heartbeat.SCHEMA_VERSIONS, "hello", 2)
    assert decode(v1) == HELLO  # a v1 frame is older than this decoder's v2
    assert wire(HELLO)["v"] == 2  # the encoder writes its own version
    body = wire(HELLO)
    body["v"] = 3
    assert error_of(frame(body)).code is ErrorCode.UNSUPPORTED_VERSION


def _set(path: list[str | int], value: object, base: Message) -> bytes:
    body: Any = wire(base)
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return frame(body)


def _drop(path: list[str | int], base: Message) -> bytes:
    body: Any = wire(base)
    target = body
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return frame(body)


OBS0: list[str | int] = ["observations", 0]
REP0: list[str | int] = [*OBS0, "replica_states", 0]
ASG0: list[str | int] = ["assignments", 0]
DIR0: list[str | int] = ["directory", 0]
DEL0: list[str | int] = ["deleted", 0]
NO_MUTUAL: dict[str, object] = {"mutual_user": None, "mutual_secret": None}


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (_drop(["free_bytes"], HELLO), "free_bytes"),
        (_set(["extra"], 1, HELLO), "unknown field(s) 'extra'"),
        (_set(["node_id"], "Node_1", HELLO), "node_id"),
        (_set(["node_id"], 7, HELLO), "node_id"),
        (_set(["incarnation"], -5, HELLO), "incarnation"),
        (_set(["incarnation"], 1.5, HELLO), "incarnation"),
        (_set(["capacity_bytes"], True, HELLO), "capacity_bytes"),
        # Every number bounded at the edge (issue 7, finding 4: 2**63 overflowed SQLite).
        (_set(["capacity_bytes"], 2**63, HELLO), "capacity_bytes"),
        (_set(["capacity_bytes"], 2**62 + 1, HELLO), "capacity_bytes"),
        (_set(["free_bytes"], 2**62 + 1, HELLO), "free_bytes"),
        (_set(["incarnation"], 2**63, HELLO), "incarnation"),
        (_set(["seq"], 2**63, HEARTBEAT), "seq"),
        (_set([*OBS0, "epoch"], 2**63, HEARTBEAT), "observations[0].epoch"),
        (_set([*OBS0, "write_position"], 2**62 + 1, HEARTBEAT), "observations[0].write_position"),
        (
            _set([*REP0, "write_position"], 2**64 - 1, HEARTBEAT),
            "observations[0].replica_states[0].write_position",
        ),
        (
            _set(
                [*OBS0, "replica_states"],
                [
                    {
                        "node_id": f"n{i}",
                        "state": "in_sync",
                        "write_position": 0,
                        "resync_done": 0,
                        "resync_total": 0,
                    }
                    for i in range(9)
                ],
                HEARTBEAT,
            ),
            "observations[0].replica_states",
        ),
        (_set(["lease_seconds"], 3601.0, ACK), "lease_seconds"),
        (_set([*ASG0, "size"], 2**63, ACK), "assignments[0].size"),
        (_set([*ASG0, "epoch"], 2**63, ACK), "assignments[0].epoch"),
        (_set([*ASG0, "replicas"], ["node-1", *(f"r{i}" for i in range(8))], ACK), "assignments[0].replicas"),
        (_set(["iscsi_portal"], "10.0.0.1", HELLO), "iscsi_portal"),
        (_set(["http"], "host:99999", HELLO), "http"),
        (_set(["seq"], -1, HEARTBEAT), "seq"),
        (_set(["seq"], "1", HEARTBEAT), "seq"),
        (_set(["observations"], {}, HEARTBEAT), "observations"),
        (_set(["observations"], [1], HEARTBEAT), "observations[0]"),
        (_set([*OBS0, "role"], "leader", HEARTBEAT), "observations[0].role"),
        (_set([*OBS0, "role"], 1, HEARTBEAT), "observations[0].role"),
        (_set([*OBS0, "health"], "OK", HEARTBEAT), "observations[0].health"),
        (_set([*OBS0, "epoch"], -1, HEARTBEAT), "observations[0].epoch"),
        (_set([*OBS0, "converged"], 1, HEARTBEAT), "observations[0].converged"),
        (_set([*OBS0, "volume_id"], "abc", HEARTBEAT), "observations[0].volume_id"),
        (_drop([*OBS0, "write_position"], HEARTBEAT), "observations[0].write_position"),
        (_set([*OBS0, "surprise"], 0, HEARTBEAT), "observations[0]: unknown field(s) 'surprise'"),
        (_set([*REP0, "state"], "done", HEARTBEAT), "observations[0].replica_states[0].state"),
        (_set([*REP0, "resync_done"], 2**62 + 1, HEARTBEAT), "observations[0].replica_states[0].resync_done"),
        (_set([*REP0, "resync_done"], 1, HEARTBEAT), "observations[0].replica_states[0].resync_done"),
        (_drop([*REP0, "resync_total"], HEARTBEAT), "observations[0].replica_states[0].resync_total"),
        (_set([*REP0, "write_position"], -1, HEARTBEAT), "observations[0].replica_states[0].write_position"),
        (_set(["lease_seconds"], -0.5, ACK), "lease_seconds"),
        (_set(["lease_seconds"], math.nan, ACK), "lease_seconds"),
        (_set(["lease_seconds"], "5", ACK), "lease_seconds"),
        (_set([*ASG0, "epoch"], -3, ACK), "assignments[0].epoch"),
        (_set([*ASG0, "primary"], "node-2", ACK), "assignments[0].replicas"),
        (_set([*ASG0, "primary_portal"], None, ACK), "assignments[0].primary_portal"),
        (_set([*ASG0, "replicas"], "node-1", ACK), "assignments[0].replicas"),
        (_set([*ASG0, "replicas"], ["node-1", 5], ACK), "assignments[0].replicas[1]"),
        (_set([*ASG0, "block_size"], 1000, ACK), "assignments[0].block_size"),
        (_set([*ASG0, "size"], 4097, ACK), "assignments[0].size"),
        (_set([*ASG0, "physical_block_size"], 512, ACK), "assignments[0].physical_block_size"),
        (_set([*ASG0, "physical_block_size"], 2048, ACK), "assignments[0].physical_block_size"),
        (_set([*ASG0, "backing"], "relative/path", ACK), "assignments[0].backing"),
        (_set([*ASG0, "backing"], "", ACK), "assignments[0].backing"),
        (_set([*ASG0, "chap"], "u:s", ACK), "assignments[0].chap"),
        (_set([*ASG0, "chap"], {"user": "u", "secret": "s"}, ACK), "assignments[0].chap.mutual_user"),
        (
            _set([*ASG0, "chap"], {**NO_MUTUAL, "user": "u", "secret": ""}, ACK),
            "assignments[0].chap.secret",
        ),
        (
            _set([*ASG0, "chap"], {**NO_MUTUAL, "user": "u", "secret": "s", "mutual_user": "t"}, ACK),
            "assignments[0].chap.mutual_user",
        ),
        (_set(["assignments", 1, "volume_id"], VOL_A, ACK), "assignments: a volume appears twice"),
        (_set(["directory"], {}, ACK), "directory"),
        (_set(["directory"], [None], ACK), "directory[0]"),
        (_set(["directory", 2, "volume_id"], VOL_A, ACK), "directory: a volume appears twice"),
        (_set([*DIR0, "volume_id"], "xyz", ACK), "directory[0].volume_id"),
        (_set([*DIR0, "name"], "DB", ACK), "directory[0].name"),
        (_set([*DIR0, "name"], None, ACK), "directory[0].name"),
        (_set([*DIR0, "primary_portal"], "10.0.0.1", ACK), "directory[0].primary_portal"),
        (_set([*DIR0, "primary_portal"], "[::1:3260", ACK), "directory[0].primary_portal"),
        (_set([*DIR0, "primary_portal"], 3260, ACK), "directory[0].primary_portal"),
        (_drop([*DIR0, "primary_portal"], ACK), "directory[0].primary_portal"),
        (_set([*DIR0, "epoch"], 1, ACK), "directory[0]: unknown field(s) 'epoch'"),
        (_set(["deleted"], {}, ACK_DELETED), "deleted"),
        (_set(["deleted"], [VOL_D], ACK_DELETED), "deleted[0]"),
        (_set([*DEL0, "volume_id"], "xyz", ACK_DELETED), "deleted[0].volume_id"),
        (_set([*DEL0, "volume_id"], None, ACK_DELETED), "deleted[0].volume_id"),
        (_set([*DEL0, "name"], "Old", ACK_DELETED), "deleted[0].name"),
        (_drop([*DEL0, "name"], ACK_DELETED), "deleted[0].name: missing"),
        (_set([*DEL0, "epoch"], 1, ACK_DELETED), "deleted[0]: unknown field(s) 'epoch'"),
        (_set(["deleted", 1, "volume_id"], VOL_D, ACK_DELETED), "deleted: a volume appears twice"),
        (
            _set([*DEL0, "volume_id"], VOL_A, ACK_DELETED),  # assigned (and in the directory)
            "deleted: a deleted volume is also assigned or in the directory",
        ),
        (
            _set([*DEL0, "volume_id"], VOL_C, ACK_DELETED),  # in the directory only
            "deleted: a deleted volume is also assigned or in the directory",
        ),
    ],
)
def test_bad_field(data: bytes, where: str) -> None:
    error = error_of(data)
    assert error.code is ErrorCode.BAD_FIELD
    assert error.message == where or error.message.startswith(where + ":"), error.message


def test_list_counts_are_bounded() -> None:
    obs = tuple(VolumeObservation(f"{i:032x}", 1, Role.NONE, Health.OK, 0, (), True) for i in range(16385))
    with pytest.raises(InvalidMessage, match="observations: 16385 items"):
        Heartbeat(1, obs)
    Heartbeat(1, obs[:16384])


def test_decode_payload_rejects_garbage() -> None:
    with pytest.raises(HeartbeatProtocolError) as info:
        decode_payload(b"")
    assert info.value.code is ErrorCode.MALFORMED


# -- properties -----------------------------------------------------------------------------------

node_ids = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,62}", fullmatch=True)
volume_ids = st.uuids(version=4).map(lambda u: u.hex)
uints = st.integers(0, 2**63 - 1)
byte_counts = st.integers(0, 2**62)
labels = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda h: not h.replace(".", "").isdigit()),
)
portals = st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(1, 65535))
replica_states = st.builds(ReplicaState, node_ids, st.sampled_from(SyncState), byte_counts)
observations = st.builds(
    VolumeObservation,
    volume_ids,
    uints,
    st.sampled_from(Role),
    st.sampled_from(Health),
    byte_counts,
    st.lists(replica_states, max_size=3, unique_by=lambda r: r.node_id).map(tuple),
    st.booleans(),
)


@st.composite
def assignments(draw: st.DrawFn) -> Assignment:
    block_size = draw(st.sampled_from([512, 4096]))
    replicas = tuple(draw(st.lists(node_ids, max_size=4, unique=True)))
    with_primary = bool(replicas) and draw(st.booleans())
    return Assignment(
        volume_id=draw(volume_ids),
        name=draw(node_ids),
        size=block_size * draw(st.integers(1, 2**40)),
        block_size=block_size,
        epoch=draw(uints),
        primary=replicas[0] if with_primary else None,
        primary_portal=draw(portals) if with_primary else None,
        replicas=replicas,
        physical_block_size=draw(st.sampled_from([None, 4096] if block_size == 4096 else [None, 512, 4096])),
        chap=draw(st.none() | st.builds(VolumeChap, st.text(min_size=1, max_size=20), st.just("s3cret"))),
        backing=draw(st.none() | st.just("/dev/disk/by-id/x")),
    )


directory_entries = st.builds(DirectoryEntry, volume_ids, node_ids, st.none() | portals)

deleted_volumes = st.builds(DeletedVolume, volume_ids, node_ids)


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    """An Ack whose tombstones name no volume that is also assigned or in the directory."""
    assigned = tuple(draw(st.lists(assignments(), max_size=4, unique_by=lambda a: a.volume_id)))
    directory = tuple(draw(st.lists(directory_entries, max_size=4, unique_by=lambda e: e.volume_id)))
    live = {a.volume_id for a in assigned} | {e.volume_id for e in directory}
    deleted = draw(
        st.lists(
            deleted_volumes.filter(lambda d: d.volume_id not in live),
            max_size=4,
            unique_by=lambda d: d.volume_id,
        )
    )
    return Ack(
        draw(uints),
        draw(st.floats(0, 3600, allow_nan=False, allow_infinity=False)),
        assigned,
        directory,
        tuple(deleted),
    )


messages = st.one_of(
    st.builds(Hello, node_ids, uints, portals, portals, portals, byte_counts, byte_counts),
    st.builds(
        Heartbeat, uints, st.lists(observations, max_size=4, unique_by=lambda o: o.volume_id).map(tuple)
    ),
    acks(),
)


@given(st.lists(messages, min_size=1, max_size=4), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_random_messages_round_trip_exactly(batch: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = FrameDecoder()
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        while (message := decoder.next_message()) is not None:
            out.append(message)
    assert out == batch
    assert decoder.buffered == 0


def _drain(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    try:
        while decoder.next_message() is not None:
            pass
    except HeartbeatProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    _drain(data)


@given(st.binary(max_size=512))
def test_random_payloads_only_raise_protocol_errors(payload: bytes) -> None:
    _drain(HEADER.pack(len(payload)) + payload)


@given(messages, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_only_raise_protocol_errors(message: Message, data: st.DataObject) -> None:
    frame_bytes = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(frame_bytes) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            frame_bytes[position] = data.draw(st.integers(0, 255))
        elif action == "insert":
            frame_bytes.insert(position, data.draw(st.integers(0, 255)))
        elif len(frame_bytes) > 1:
            del frame_bytes[position]
    # Keep the length prefix honest half the time so the payload decoder is exercised too.
    if data.draw(st.booleans()) and len(frame_bytes) >= 4:
        frame_bytes[:4] = HEADER.pack(len(frame_bytes) - 4)
    _drain(bytes(frame_bytes))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@given(messages, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_wrong_field_values_only_raise_protocol_errors(message: Message, data: st.DataObject) -> None:
    """Well-formed msgpack with valid t/v but arbitrary values in the fields (deep in nested maps too)."""
    body: Any = wire(message)
    target = body
    while True:  # walk into a random nested map or array
        children = [k for k, v in (target.items() if isinstance(target, dict) else enumerate(target))]
        children = [k for k in children if k not in ("t", "v")]
        if not children:
            break
        key = data.draw(st.sampled_from(children))
        child = target[key]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            target = child
            continue
        target[key] = data.draw(msgpack_values)
        break
    try:
        decoded = decode(frame(body))
    except HeartbeatProtocolError:
        return
    # If it decoded, it is a valid message that survives another round trip.
    assert decode(encode(decoded)) == decoded


# -- ack v5: the in-sync set and the replication portals ------------------------------------------


def test_v5_wire_form_of_the_in_sync_set() -> None:
    (assignment,) = wire(ACK_IN_SYNC)["assignments"]
    assert assignment["in_sync"] == ["node-1", "node-3"]
    assert assignment["replication_portals"] == ["10.0.0.1:3291", None, "[fd00::3]:3291"]
    assert decode(encode(ACK_IN_SYNC)) == ACK_IN_SYNC
    assert ACK_IN_SYNC.assignments[0].replication_portal("node-3") == "[fd00::3]:3291"
    assert ACK_IN_SYNC.assignments[0].replication_portal("node-9") is None


@pytest.mark.parametrize("body", [_v4_ack_body, _v3_ack_body, _v2_ack_body, _v1_ack_body])
def test_an_ack_before_v5_decodes_with_the_primary_alone_in_sync(body: Any) -> None:
    """An older master recorded no in-sync set: only the primary is known to hold the data."""
    decoded = decode(frame(body(ACK_IN_SYNC)))
    assert isinstance(decoded, Ack)
    (assignment,) = decoded.assignments
    assert assignment.in_sync == ("node-1",)
    assert assignment.replication_portals == (None, None, None)
    unassigned = decode(frame(body(ACK)))
    assert isinstance(unassigned, Ack)
    assert [a.in_sync for a in unassigned.assignments] == [("node-1",), ()]


@pytest.mark.parametrize("name", IN_SYNC_FIELDS)
def test_a_v4_assignment_may_not_carry_the_in_sync_set(name: str) -> None:
    body = _v4_ack_body(ACK_IN_SYNC)
    body["assignments"][0][name] = []
    error = error_of(frame(body))
    assert error.code is ErrorCode.BAD_FIELD
    assert f"unknown field(s) '{name}'" in error.message


@pytest.mark.parametrize("name", IN_SYNC_FIELDS)
def test_a_v5_assignment_must_carry_the_in_sync_set(name: str) -> None:
    error = error_of(_drop(["assignments", 0, name], ACK_IN_SYNC))
    assert error.code is ErrorCode.BAD_FIELD
    assert error.message == f"assignments[0].{name}: missing"


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("in_sync", ["node-1", "node-9"], "assignments[0].in_sync"),  # holds no copy
        ("in_sync", ["node-3", "node-1"], "assignments[0].in_sync"),  # primary not first / order
        ("in_sync", ["node-1", "node-1"], "assignments[0].in_sync"),  # twice
        ("in_sync", ["node-2"], "assignments[0].in_sync"),  # without the primary
        ("in_sync", ["node-1"] * 9, "assignments[0].in_sync"),  # more than MAX_COPIES
        ("in_sync", ["node-1", 7], "assignments[0].in_sync[1]"),
        ("in_sync", "node-1", "assignments[0].in_sync"),
        ("replication_portals", ["10.0.0.1:3291"], "assignments[0].replication_portals"),  # not aligned
        ("replication_portals", ["10.0.0.1:3291", None, "nope"], "assignments[0].replication_portals[2]"),
        ("replication_portals", ["10.0.0.1:99999", None, None], "assignments[0].replication_portals[0]"),
        ("replication_portals", [None, None, 3291], "assignments[0].replication_portals[2]"),
    ],
)
def test_a_bad_in_sync_set_or_replication_portal_is_refused(name: str, value: object, field: str) -> None:
    body = wire(ACK_IN_SYNC)
    body["assignments"][0][name] = value
    error = error_of(frame(body))
    assert error.code is ErrorCode.BAD_FIELD
    assert error.message.startswith(f"{field}:"), error.message


def test_an_assignment_without_a_primary_has_nobody_in_sync() -> None:
    with pytest.raises(InvalidMessage) as info:
        Assignment(VOL_B, "scratch", 512, 512, 1, None, None, ("node-3",), in_sync=("node-3",))
    assert info.value.field == "in_sync"
    assert Assignment(VOL_B, "scratch", 512, 512, 1, None, None, ("node-3",)).in_sync == ()


def _without_diagnostics(body: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat's wire map as a v2 node wrote it (no error, unsupported, skipped)."""
    del body["skipped"]
    for observation in body["observations"]:
        del observation["error"], observation["unsupported"]
    return body


def test_a_v1_heartbeat_decodes_without_resync_progress_and_may_not_carry_it() -> None:
    body = _without_diagnostics(wire(HEARTBEAT))
    body["v"] = 1
    for observation in body["observations"]:
        for state in observation["replica_states"]:
            del state["resync_done"], state["resync_total"]
    decoded = decode(frame(body))
    assert isinstance(decoded, Heartbeat)
    assert decoded.observations[0].replica_states[1] == ReplicaState("node-3", SyncState.SYNCING, 1000)
    body["observations"][0]["replica_states"][0]["resync_done"] = 0
    with pytest.raises(HeartbeatProtocolError) as e:
        decode(frame(body))
    assert e.value.code is ErrorCode.BAD_FIELD


# -- ack v6: replication stream keys ---------------------------------------------------------------


def test_stream_keys_travel_as_hex_and_stay_out_of_repr() -> None:
    body = wire(ACK_STREAM_KEYS)
    assert body["stream_keys"] == [
        {"volume_id": VOL_A, "replica": "node-2", "key": "02" * 32},
        {"volume_id": VOL_A, "replica": "node-3", "key": "03" * 32},
    ]
    assert decode(encode(ACK_STREAM_KEYS)) == ACK_STREAM_KEYS
    assert "0202" not in repr(ACK_STREAM_KEYS) and "\\x02" not in repr(ACK_STREAM_KEYS)


def test_an_ack_before_v6_decodes_with_no_stream_keys_and_may_not_carry_them() -> None:
    decoded = decode(frame(_v5_ack_body(ACK_STREAM_KEYS)))
    assert isinstance(decoded, Ack) and decoded.stream_keys == ()
    old = _v5_ack_body(ACK_STREAM_KEYS)
    old["stream_keys"] = []
    error = error_of(frame(old))
    assert error.code is ErrorCode.BAD_FIELD and error.message == "unknown field(s) 'stream_keys'"
    error = error_of(_drop(["stream_keys"], ACK_STREAM_KEYS))
    assert error.code is ErrorCode.BAD_FIELD and error.message == "stream_keys: missing"


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("02" * 31, "stream_keys[0].key"),
        ("zz" * 32, "stream_keys[0].key"),
        (2, "stream_keys[0].key"),
    ],
)
def test_a_stream_key_is_64_hex_digits(key: object, where: str) -> None:
    body = wire(ACK_STREAM_KEYS)
    body["stream_keys"][0]["key"] = key
    error = error_of(frame(body))
    assert error.code is ErrorCode.BAD_FIELD and error.message.startswith(where)


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ((StreamKey(VOL_B, "node-2", bytes(32)),), "names no replica"),  # not assigned in the Ack
        ((StreamKey(VOL_A, "node-1", bytes(32)),), "names no replica"),  # the primary itself
        ((StreamKey(VOL_A, "node-9", bytes(32)),), "names no replica"),  # holds no copy
        ((StreamKey(VOL_A, "node-2", bytes(32)),) * 2, "appears twice"),
    ],
)
def test_stream_keys_name_replicas_of_the_acks_assignments(keys: tuple[StreamKey, ...], reason: str) -> None:
    with pytest.raises(InvalidMessage) as e:
        Ack(1, 1.0, ACK_IN_SYNC.assignments, stream_keys=keys)
    assert reason in str(e.value)
    with pytest.raises(InvalidMessage):
        StreamKey(VOL_A, "node-2", bytes(31))


# -- heartbeat v3: diagnostics ----------------------------------------------------------------------

HEARTBEAT_DIAGNOSTICS = Heartbeat(
    seq=7,
    observations=(
        VolumeObservation(
            VOL_A,
            2,
            Role.PRIMARY,
            Health.OK,
            0,
            (),
            False,
            error="VolumeExists: volume 'db' exists",
            unsupported=(
                UnsupportedCommand(0xC1, None, 3, "iqn.2026-01.test:a"),
                UnsupportedCommand(0x9E, 0x1F, 1, "iqn.2026-01.test:b"),
            ),
        ),
    ),
    skipped=(SkippedVolume("old", "corrupt record: bad checksum"),),
)


def test_a_v3_heartbeat_carries_errors_unsupported_commands_and_skipped_volumes() -> None:
    assert decode(encode(HEARTBEAT_DIAGNOSTICS)) == HEARTBEAT_DIAGNOSTICS
    body = wire(HEARTBEAT_DIAGNOSTICS)
    assert body["v"] == 3
    assert body["skipped"] == [{"name": "old", "reason": "corrupt record: bad checksum"}]
    assert body["observations"][0]["unsupported"][1] == {
        "opcode": 0x9E,
        "service_action": 0x1F,
        "count": 1,
        "last_initiator": "iqn.2026-01.test:b",
    }


def test_a_v2_heartbeat_decodes_without_diagnostics_and_may_not_carry_them() -> None:
    body = _without_diagnostics(wire(HEARTBEAT_DIAGNOSTICS))
    body["v"] = 2
    decoded = decode(frame(body))
    assert isinstance(decoded, Heartbeat)
    assert decoded.skipped == ()
    assert decoded.observations[0].error is None and decoded.observations[0].unsupported == ()
    for key, where in (
        ("skipped", body),
        ("error", body["observations"][0]),
        ("unsupported", body["observations"][0]),
    ):
        carrying = _without_diagnostics(wire(HEARTBEAT_DIAGNOSTICS))
        carrying["v"] = 2
        target = carrying if where is body else carrying["observations"][0]
        target[key] = [] if key != "error" else None
        assert error_of(frame(carrying)).code is ErrorCode.BAD_FIELD, key


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: UnsupportedCommand(256, None, 1, "i"), "opcode"),
        (lambda: UnsupportedCommand(0xC1, -1, 1, "i"), "service_action"),
        (lambda: UnsupportedCommand(0xC1, None, 0, "i"), "count"),
        (lambda: UnsupportedCommand(0xC1, None, 1, "i" * 224), "last_initiator"),
        (lambda: SkippedVolume("", "why"), "name"),
        (lambda: SkippedVolume("db", ""), "reason"),
        (lambda: SkippedVolume("db", "x" * 513), "reason"),
        (lambda: VolumeObservation(VOL_A, 1, Role.NONE, Health.OK, 0, (), True, error=""), "error"),
        (
            lambda: VolumeObservation(
                VOL_A,
                1,
                Role.NONE,
                Health.OK,
                0,
                (),
                True,
                unsupported=tuple(UnsupportedCommand(op, None, 1, "i") for op in range(MAX_UNSUPPORTED + 1)),
            ),
            "unsupported",
        ),
        (
            lambda: VolumeObservation(
                VOL_A,
                1,
                Role.NONE,
                Health.OK,
                0,
                (),
                True,
                unsupported=(UnsupportedCommand(1, None, 1, "i"),) * 2,
            ),
            "unsupported",
        ),
        (
            lambda: Heartbeat(1, (), tuple(SkippedVolume(f"v{i}", "x") for i in range(MAX_SKIPPED + 1))),
            "skipped",
        ),
    ],
)
def test_diagnostics_are_bounded(build: Any, field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        build()
    assert info.value.field == field


def test_clip_cuts_long_reasons_to_what_the_wire_allows() -> None:
    assert clip("short") == "short"
    cut = clip("x" * 2000)
    assert len(cut) == MAX_REASON_LEN and cut.endswith("\u2026")
    SkippedVolume("db", cut)  # fits
