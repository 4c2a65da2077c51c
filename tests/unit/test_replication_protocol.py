"""The replication protocol's sans-IO core (sparrow.replication.protocol): the codec, the replica's
and the primary's state machines; no sockets, `now` passed in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparrow.cluster.messages import Role
from sparrow.replication.protocol import (
    HEADER,
    MAX_PAYLOAD,
    MAX_RUN,
    PRIMARY_TRANSITIONS,
    REPLICA_TRANSITIONS,
    Ack,
    Acked,
    ApplyCheckpoint,
    ApplyFlush,
    ApplyNop,
    ApplyUnmap,
    ApplyWrite,
    ApplyWriteRun,
    ApplyWriteSame,
    Checkpoint,
    Dirty,
    DirtyReport,
    ErrorCode,
    Flush,
    Lookup,
    Message,
    MessageDecoder,
    MsgType,
    Nop,
    Open,
    Opened,
    PrimaryInput,
    PrimaryState,
    PrimaryStream,
    Refuse,
    ReplicaPositions,
    ReplicaState,
    ReplicaStream,
    ReplicationError,
    Unmap,
    VolumeView,
    Write,
    WriteSame,
    all_complete,
    dirty_report,
    encode,
    encode_parts,
    encode_write_run,
)
from sparrow.replication.streamauth import derive_stream_key

VID = "0123456789abcdef0123456789abcdef"
OTHER_VID = "f" * 32
SIZE = 1 << 20
#: The stream key the replica holds for (VID, 3), and the channel binding of the test connection.
KEY = derive_stream_key(b"k" * 32, VID, 3, "n1", "n2")
BINDING = b"SPRW\x01\x02" + b"c" * 32 + b"s" * 32
VIEW = VolumeView(VID, 3, Role.REPLICA, "n1", SIZE, 512, stream_key=KEY)


def primary(*args: Any, **kwargs: Any) -> PrimaryStream:
    """A primary's stream that proves KEY on the connection of BINDING."""
    stream = PrimaryStream(*args, **kwargs)
    stream.authorize(KEY, BINDING)
    return stream


def replica_stream(lookup: Lookup, positions: ReplicaPositions) -> ReplicaStream:
    """A replica's stream on the connection of BINDING."""
    stream = ReplicaStream(lookup, positions)
    stream.binding = BINDING
    return stream


def sample_messages() -> list[Message]:
    return [
        Open(VID, 3, 1, "n1").signed(KEY, BINDING),
        Write(VID, 3, 1, 4096, b"a" * 1024, fua=True),
        Write(VID, 3, 2, 0, b"b" * 512),
        Unmap(VID, 3, 3, 512, 1024),
        WriteSame(VID, 3, 4, 0, 8192, b"c" * 512),
        Flush(VID, 3, 5),
        Ack(VID, 3, 5, 4),
        Refuse(VID, 3, 0, ErrorCode.STALE_EPOCH, "epoch 3 is older than 4"),
        Open(VID, 3, 6, "n1", report_dirty=True).signed(KEY, BINDING),
        Nop(VID, 3, 6),
        Dirty(VID, 3, 5, 0, 20, b"\x01\x00\x08", True),
        Checkpoint(VID, 3, 7, 5),
        Open(VID, 3, 8, "n1", session=2**63 - 1).signed(KEY, BINDING),
    ]


def decode_all(data: bytes, *, step: int | None = None) -> list[Message]:
    decoder = MessageDecoder()
    out: list[Message] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        decoder.feed(chunk)
        while (m := decoder.next_message()) is not None:
            out.append(m)
    assert decoder.buffered == 0
    return out


def same(a: Message, b: Message) -> bool:
    return encode(a) == encode(b)


# -- codec -----------------------------------------------------------------------------------------


def test_every_message_round_trips_whole_and_byte_at_a_time() -> None:
    messages = sample_messages()
    stream = b"".join(encode(m) for m in messages)
    for step in (None, 1, 7):
        decoded = decode_all(stream, step=step)
        assert len(decoded) == len(messages)
        assert all(same(a, b) for a, b in zip(decoded, messages, strict=True))


def test_header_is_fixed_and_the_payload_is_not_copied() -> None:
    data = bytes(range(256)) * 4
    head, payload = encode_parts(Write(VID, 3, 9, 512, data))
    assert len(head) == HEADER.size + 8 and payload is data
    decoder = MessageDecoder()
    wire = head + payload
    decoder.feed(wire)
    message = decoder.next_message()
    assert isinstance(message, Write) and isinstance(message.data, memoryview)
    assert message.data.obj is wire  # a slice of the bytes fed in, not a copy
    assert bytes(message.data) == data and message.offset == 512 and message.seq == 9


def mutate(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (mutate(encode(Flush(VID, 3, 1)), 0, 1), ErrorCode.MALFORMED),  # version 1 (before DIRTY, NOP)
        (mutate(encode(Flush(VID, 3, 1)), 1, 99), ErrorCode.UNKNOWN_TYPE),
        (mutate(encode(Flush(VID, 3, 1)), 2, 1), ErrorCode.MALFORMED),  # FUA on a flush
        (mutate(encode(Flush(VID, 3, 1)), 3, 1), ErrorCode.MALFORMED),  # reserved
        (
            mutate(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)), HEADER.size + 8 + 32, ord("N")),
            ErrorCode.MALFORMED,
        ),  # id
        (mutate(encode(Refuse(VID, 3, 0, ErrorCode.GAP, "")), HEADER.size, 200), ErrorCode.MALFORMED),
        (encode(Flush(VID, 3, 1))[:8] + b"\x00" * 32, ErrorCode.MALFORMED),  # epoch 0
        (encode(Ack(VID, 3, 2, 1))[: HEADER.size] + (9).to_bytes(8, "big"), ErrorCode.MALFORMED),
    ],
)
def test_bounds_violations_carry_their_code(wire: bytes, code: ErrorCode) -> None:
    decoder = MessageDecoder()
    decoder.feed(wire)
    with pytest.raises(ReplicationError) as e:
        decoder.next_message()
    assert e.value.code is code
    with pytest.raises(ReplicationError):  # broken for good
        decoder.next_message()


def test_an_oversized_length_is_refused_before_the_body_arrives() -> None:
    head = HEADER.pack(1, MsgType.WRITE, 0, 0, 8 + MAX_PAYLOAD + 1, bytes.fromhex(VID), 3, 1)
    decoder = MessageDecoder()
    decoder.feed(head)
    with pytest.raises(ReplicationError) as e:
        decoder.next_message()
    assert e.value.code is ErrorCode.MALFORMED
    flush_with_body = HEADER.pack(1, MsgType.FLUSH, 0, 0, 4096, bytes.fromhex(VID), 3, 1)
    decoder = MessageDecoder()
    decoder.feed(flush_with_body)
    with pytest.raises(ReplicationError):
        decoder.next_message()


def test_message_constructors_check_their_bounds() -> None:
    for build in (
        lambda: Write(VID, 3, 1, 0, b""),
        lambda: Write(VID, 3, 1, 0, b"x" * (MAX_PAYLOAD + 1)),
        lambda: Write("nothex", 3, 1, 0, b"x"),
        lambda: Write(VID, 2**63, 1, 0, b"x"),
        lambda: Unmap(VID, 3, 1, 0, 0),
        lambda: WriteSame(VID, 3, 1, 0, 512, b"x" * 100),
        lambda: Open(VID, 3, 0, "n1"),
        lambda: Ack(VID, 3, 1, 2),
        lambda: Refuse(VID, 3, 0, ErrorCode.GAP, "x" * 600),
    ):
        with pytest.raises(ReplicationError):
            build()


@given(st.binary(max_size=400))
def test_random_bytes_only_raise_the_protocol_error(data: bytes) -> None:
    for stream in (replica_stream(lambda _v: VIEW, ReplicaPositions()), primary(VID, 3, "n1")):
        if isinstance(stream, PrimaryStream):
            stream.open(0.0)
        with contextlib.suppress(ReplicationError):
            stream.feed(data)


@given(st.data())
def test_mutated_streams_only_raise_the_protocol_error(data: st.DataObject) -> None:
    wire = bytearray(
        b"".join(
            encode(m)
            for m in (
                Open(VID, 3, 1, "n1").signed(KEY, BINDING),
                Write(VID, 3, 1, 512, b"a" * 512),
                Unmap(VID, 3, 2, 0, 512),
                WriteSame(VID, 3, 3, 1024, 2048, b"s" * 512),
                Flush(VID, 3, 4),
            )
        )
    )
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    step = data.draw(st.integers(1, 64))
    stream = replica_stream(lambda _v: VIEW, ReplicaPositions())
    try:
        for i in range(0, cut, step):
            for event in stream.feed(bytes(wire[i : min(i + step, cut)])):
                if not isinstance(event, Opened):
                    stream.done(event.seq)
    except ReplicationError:
        pass


# -- the replica -----------------------------------------------------------------------------------


def replica(view: VolumeView | None = VIEW, positions: ReplicaPositions | None = None) -> ReplicaStream:
    return replica_stream(
        lambda vid: view if view is not None and vid == view.volume_id else None,
        positions or ReplicaPositions(),
    )


def refused(stream: ReplicaStream, *messages: Message) -> ErrorCode:
    with pytest.raises(ReplicationError) as e:
        for m in messages:
            stream.feed(encode(m))
    assert stream.state is ReplicaState.CLOSED
    with pytest.raises(ReplicationError):  # closed for good
        stream.feed(encode(Flush(VID, 3, 99)))
    refusal = decode_all(stream.refusal(e.value))[0]
    assert isinstance(refusal, Refuse) and refusal.code is e.value.code
    return e.value.code


def test_replica_opens_applies_in_order_and_acks() -> None:
    stream = replica()
    [opened] = stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    assert isinstance(opened, Opened) and stream.state is ReplicaState.STREAMING
    assert decode_all(opened.ack) == [Ack(VID, 3, 0, 0)]
    wire = b"".join(
        encode(m)
        for m in (
            Write(VID, 3, 1, 512, b"w" * 1024, fua=True),
            Unmap(VID, 3, 2, 0, 512),
            WriteSame(VID, 3, 3, 4096, 4096, b"s" * 512),
            Flush(VID, 3, 4),
        )
    )
    events = [e for i in range(len(wire)) for e in stream.feed(wire[i : i + 1])]  # byte at a time
    assert [type(e) for e in events] == [ApplyWrite, ApplyUnmap, ApplyWriteSame, ApplyFlush]
    write = events[0]
    assert isinstance(write, ApplyWrite) and write.fua and bytes(write.data) == b"w" * 1024
    assert stream.unapplied == 4 and stream.unapplied_bytes == 1024
    assert decode_all(stream.done(1, durable=True)) == [Ack(VID, 3, 1, 1)]
    assert decode_all(stream.done(3)) == [Ack(VID, 3, 3, 1)]
    assert decode_all(stream.done(4, durable=True)) == [Ack(VID, 3, 4, 4)]
    assert stream.unapplied == 0 and stream.unapplied_bytes == 0
    with pytest.raises(RuntimeError):
        stream.done(5)


@pytest.mark.parametrize(
    ("view", "open_", "code"),
    [
        (None, Open(VID, 3, 1, "n1").signed(KEY, BINDING), ErrorCode.UNKNOWN_VOLUME),
        (VIEW, Open(OTHER_VID, 3, 1, "n1").signed(KEY, BINDING), ErrorCode.UNKNOWN_VOLUME),
        (VIEW, Open(VID, 2, 1, "n1").signed(KEY, BINDING), ErrorCode.STALE_EPOCH),
        (VIEW, Open(VID, 4, 1, "n1").signed(KEY, BINDING), ErrorCode.NEWER_EPOCH),
        (
            VolumeView(VID, 3, Role.PRIMARY, "n1", SIZE, 512),
            Open(VID, 3, 1, "n1").signed(KEY, BINDING),
            ErrorCode.NOT_REPLICA,
        ),
        (
            VolumeView(VID, 3, Role.NONE, "n1", SIZE, 512),
            Open(VID, 3, 1, "n1").signed(KEY, BINDING),
            ErrorCode.NOT_REPLICA,
        ),
        (VIEW, Open(VID, 3, 1, "n2").signed(KEY, BINDING), ErrorCode.NOT_PRIMARY),
        (
            VolumeView(VID, 3, Role.REPLICA, "n1", SIZE, 512, open=False),
            Open(VID, 3, 1, "n1").signed(KEY, BINDING),
            ErrorCode.UNKNOWN_VOLUME,
        ),
        (VIEW, Open(VID, 3, 2, "n1").signed(KEY, BINDING), ErrorCode.GAP),
    ],
)
def test_replica_refuses_an_open_it_must_not_accept(
    view: VolumeView | None, open_: Open, code: ErrorCode
) -> None:
    assert refused(replica(view), open_) is code


@pytest.mark.parametrize(
    "message",
    [
        Write(VID, 3, 1, 0, b"x" * 512),
        Unmap(VID, 3, 1, 0, 512),
        WriteSame(VID, 3, 1, 0, 512, b"x" * 512),
        Flush(VID, 3, 1),
        Ack(VID, 3, 0, 0),
        Refuse(VID, 3, 0, ErrorCode.GAP, ""),
    ],
)
def test_replica_refuses_anything_before_open(message: Message) -> None:
    assert refused(replica(), message) is ErrorCode.UNEXPECTED


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (Open(VID, 3, 1, "n1").signed(KEY, BINDING), ErrorCode.UNEXPECTED),
        (Ack(VID, 3, 0, 0), ErrorCode.UNEXPECTED),
        (Write(VID, 3, 2, 0, b"x" * 512), ErrorCode.GAP),
        (Write(OTHER_VID, 3, 1, 0, b"x" * 512), ErrorCode.WRONG_STREAM),
        (Write(VID, 2, 1, 0, b"x" * 512), ErrorCode.WRONG_STREAM),
        (Write(VID, 3, 1, 100, b"x" * 512), ErrorCode.OUT_OF_RANGE),
        (Write(VID, 3, 1, SIZE, b"x" * 512), ErrorCode.OUT_OF_RANGE),
        (Write(VID, 3, 1, 0, b"x" * 100), ErrorCode.OUT_OF_RANGE),
        (Unmap(VID, 3, 1, SIZE - 512, 1024), ErrorCode.OUT_OF_RANGE),
        (WriteSame(VID, 3, 1, 0, 4096, b"x" * 4096), ErrorCode.OUT_OF_RANGE),
    ],
)
def test_replica_refuses_a_bad_message_on_an_open_stream(message: Message, code: ErrorCode) -> None:
    stream = replica()
    stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    assert refused(stream, message) is code


def test_replica_refuses_a_repeated_seq() -> None:
    stream = replica()
    stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    stream.feed(encode(Write(VID, 3, 1, 0, b"x" * 512)))
    assert refused(stream, Write(VID, 3, 1, 0, b"x" * 512)) is ErrorCode.REPEAT


def test_a_replica_that_persisted_a_newer_epoch_refuses_the_old_primarys_next_write() -> None:
    views = {VID: VIEW}
    stream = replica_stream(views.get, ReplicaPositions())
    stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    stream.feed(encode(Write(VID, 3, 1, 0, b"x" * 512)))
    views[VID] = VolumeView(VID, 4, Role.REPLICA, "n2", SIZE, 512)
    assert refused(stream, Write(VID, 3, 2, 0, b"y" * 512)) is ErrorCode.STALE_EPOCH
    views[VID] = VolumeView(VID, 4, Role.PRIMARY, "n2", SIZE, 512)
    assert refused(replica(views[VID]), Open(VID, 4, 1, "n2").signed(KEY, BINDING)) is ErrorCode.NOT_REPLICA


def test_the_persisted_role_is_looked_up_once_per_feed_and_again_for_the_next() -> None:
    """The messages of one feed arrive at the same moment: one lookup answers for all of them,
    each still checked against it; the next feed asks again and sees a newer epoch at once."""
    views = {VID: VIEW}
    asked: list[str] = []

    def lookup(volume_id: str) -> VolumeView | None:
        asked.append(volume_id)
        return views.get(volume_id)

    stream = replica_stream(lookup, ReplicaPositions())
    stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    events = stream.feed(b"".join(encode(Write(VID, 3, seq, 0, b"x" * 512)) for seq in (1, 2, 3)))
    assert [e.seq for e in events if isinstance(e, ApplyWriteRun)] == [1, 2, 3] and asked == [VID, VID]
    views[VID] = VolumeView(VID, 4, Role.REPLICA, "n2", SIZE, 512, stream_key=KEY)
    assert refused(stream, Write(VID, 3, 4, 0, b"y" * 512)) is ErrorCode.STALE_EPOCH
    assert len(asked) == 3


def test_plain_writes_come_out_as_runs_of_views_each_checked_as_one_message() -> None:
    """Plain WRITEs that continue each other come out as one run (one pwritev), their payloads
    views of the fed bytes; a gap on the volume, a FUA write or another kind of message ends a run,
    and a run never spans two feeds. Each write still takes its own seq."""
    stream = replica()
    stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    writes = [
        Write(VID, 3, 1, 4096, b"a" * 512),
        Write(VID, 3, 2, 4608, b"b" * 1024),
        Write(VID, 3, 3, 5632, b"c" * 512),
        Write(VID, 3, 4, 0, b"d" * 512),  # not contiguous: a new run
        Write(VID, 3, 5, 512, b"e" * 512, fua=True),  # FUA: on its own, as ApplyWrite
        Write(VID, 3, 6, 1024, b"f" * 512),
        Nop(VID, 3, 7),
        Write(VID, 3, 8, 1536, b"g" * 512),
    ]
    wire = b"".join(encode(m) for m in writes)
    events = stream.feed(wire)
    assert [type(e).__name__ for e in events] == [
        "ApplyWriteRun", "ApplyWriteRun", "ApplyWrite", "ApplyWriteRun", "ApplyNop", "ApplyWriteRun"
    ]  # fmt: skip
    first = events[0]
    assert isinstance(first, ApplyWriteRun)
    assert (first.first_seq, first.seq, first.offset, first.length, first.count) == (1, 3, 4096, 2048, 3)
    assert [bytes(b) for b in first.buffers] == [b"a" * 512, b"b" * 1024, b"c" * 512]
    assert all(isinstance(b, memoryview) and b.obj is wire for b in first.buffers)  # not copied
    assert stream.unapplied == 8 and stream.unapplied_bytes == 512 * 6 + 1024
    assert decode_all(stream.done(3)) == [Ack(VID, 3, 3, 0)]
    assert stream.unapplied == 5 and stream.unapplied_bytes == 512 * 4
    # The same writes split across two feeds: two runs, seqs going on.
    more = [Write(VID, 3, 9, 2048, b"h" * 512), Write(VID, 3, 10, 2560, b"i" * 512)]
    runs = stream.feed(encode(more[0])) + stream.feed(encode(more[1]))
    assert [(r.first_seq, r.seq) for r in runs if isinstance(r, ApplyWriteRun)] == [(9, 9), (10, 10)]


def test_a_run_is_bounded_by_max_run_writes() -> None:
    stream = replica(VolumeView(VID, 3, Role.REPLICA, "n1", 4 << 20, 512, stream_key=KEY))
    stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    count = MAX_RUN + 5
    events = stream.feed(b"".join(encode(Write(VID, 3, i + 1, i * 512, b"x" * 512)) for i in range(count)))
    assert [(e.first_seq, e.seq) for e in events if isinstance(e, ApplyWriteRun)] == [
        (1, MAX_RUN), (MAX_RUN + 1, count)
    ]  # fmt: skip


#: Writes that break one rule each, on the stream VIEW opened at epoch 3 (after the good seq 1).
BAD_WRITES = [
    Write(VID, 3, 3, 0, b"x" * 512),  # a gap
    Write(VID, 3, 1, 0, b"x" * 512),  # a repeat
    Write(VID, 2, 2, 0, b"x" * 512),  # another epoch
    Write(VID, 4, 2, 0, b"x" * 512),
    Write(OTHER_VID, 3, 2, 0, b"x" * 512),  # another volume
    Write(VID, 3, 2, 256, b"x" * 512),  # misaligned
    Write(VID, 3, 2, 0, b"x" * 256),
    Write(VID, 3, 2, SIZE - 512, b"x" * 1024),  # past the end
    Write(VID, 3, 2, SIZE, b"x" * 512),
]


@pytest.mark.parametrize("bad", BAD_WRITES)
@pytest.mark.parametrize("after", [False, True])
def test_the_fused_path_refuses_what_the_general_path_refuses_with_its_code(bad: Write, after: bool) -> None:
    """A bad WRITE alone, or right after a good one in the same run's bytes: the same refusal
    code with the fused decode as one message at a time, and nothing after the good write."""

    def outcome(fused: bool) -> tuple[list[int], ErrorCode]:
        stream = replica()
        stream.fused = fused
        stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
        seqs: list[int] = []
        good = [Write(VID, 3, 1, SIZE - 1024 if bad.offset >= SIZE - 512 else 0, b"g" * 512)]
        if not after:
            seqs += [e.seq for e in stream.feed(encode(good[0]))]
        with pytest.raises(ReplicationError) as e:
            for event in stream.feed(b"".join(encode(m) for m in (good if after else []) + [bad])):
                seqs.append(event.seq)
        if after:
            assert stream.unapplied == 1  # the good write was handed out before the refusal
        return seqs, e.value.code

    assert outcome(True) == outcome(False)


@given(st.data())
def test_fused_and_general_paths_agree_on_mutated_write_streams(data: st.DataObject) -> None:
    """Runs of writes, mutated and cut at random: the fused path hands out the same writes (seq,
    offset, bytes) and refuses with the same code as the general path, one message at a time."""
    messages: list[Message] = [Open(VID, 3, 1, "n1").signed(KEY, BINDING)]
    offset = data.draw(st.sampled_from([0, 512, 4096]))
    for seq in range(1, data.draw(st.integers(1, 12)) + 1):
        length = data.draw(st.sampled_from([512, 1024, 4096]))
        fua = data.draw(st.integers(0, 9)) == 0
        if data.draw(st.integers(0, 5)) == 0:
            offset = data.draw(st.integers(0, SIZE // 512 - 8)) * 512  # a jump
        messages.append(Write(VID, 3, seq, offset, bytes([seq]) * length, fua=fua))
        offset += length
    wire = bytearray(b"".join(encode(m) for m in messages))
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(HEADER.size + 1, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    step = data.draw(st.integers(1, len(wire)))

    def outcome(fused: bool) -> tuple[list[tuple[int, int, bytes]], ErrorCode | None]:
        stream = replica()
        stream.fused = fused
        out: list[tuple[int, int, bytes]] = []
        try:
            for i in range(0, len(wire), step):
                for event in stream.feed(bytes(wire[i : i + step])):
                    if isinstance(event, ApplyWriteRun):
                        pos = event.offset
                        for seq, buf in enumerate(event.buffers, event.first_seq):
                            out.append((seq, pos, bytes(buf)))
                            pos += len(buf)
                    elif isinstance(event, ApplyWrite):
                        out.append((event.seq, event.offset, bytes(event.data)))
        except ReplicationError as e:
            return out, e.code
        return out, None

    assert outcome(True) == outcome(False)


@given(st.data())
def test_fused_and_general_paths_agree_on_mutated_ack_streams(data: st.DataObject) -> None:
    """ACKs of a streaming primary's writes, FUA writes and flushes, in any order, mutated and cut
    at random: the primary's ACK fast path gives the same events, positions and window, and
    refuses with the same code, as the decoder and the general checks."""
    ops = data.draw(st.lists(st.sampled_from(["write", "flush", "fua"]), min_size=1, max_size=8))
    acks: list[bytearray] = []
    for _ in range(data.draw(st.integers(1, 8))):
        applied = data.draw(st.integers(0, len(ops) + 1))
        epoch = data.draw(st.sampled_from([3, 3, 3, 2, 4]))
        acks.append(bytearray(encode(Ack(VID, epoch, applied, data.draw(st.integers(0, applied))))))
    for _ in range(data.draw(st.integers(0, 3))):
        ack = acks[data.draw(st.integers(0, len(acks) - 1))]
        ack[data.draw(st.integers(0, len(ack) - 1))] = data.draw(st.integers(0, 255))
    records = [bytes(a) for a in acks]  # one ACK per record, as a replica sends them ...
    if data.draw(st.booleans()):  # ... or the bytes cut anywhere
        wire = b"".join(records)
        step = data.draw(st.integers(1, len(wire)))
        records = [wire[i : i + step] for i in range(0, len(wire), step)]

    def outcome(fused: bool) -> tuple[list[Acked | DirtyReport], ErrorCode | None, tuple[object, ...]]:
        p = opened_primary()
        p.fused = fused
        p.feed(encode(Ack(VID, 3, 0, 0)))  # the OPEN's answer: streaming
        for i, op in enumerate(ops):
            if op == "flush":
                p.flush(float(i))
            else:
                p.write(i * 512, b"x" * 512, float(i), fua=op == "fua")
        events: list[Acked | DirtyReport] = []
        code = None
        try:
            for record in records:
                events += p.feed(record)
        except ReplicationError as e:
            code = e.code
        position = (p.applied_seq, p.durable_seq, p.in_flight, p.in_flight_bytes, p.state, p.deadline())
        return events, code, position

    assert outcome(True) == outcome(False)


def test_a_streaming_primary_takes_a_lone_ack_without_its_decoder() -> None:
    """The fast path is the one taken for the usual record (one ACK), and only when streaming."""
    p = opened_primary()
    p.feed(encode(Ack(VID, 3, 0, 0)))
    p.write(0, b"x" * 512, 0.0)

    class Unused(MessageDecoder):
        def feed(self, data: bytes) -> None:
            raise AssertionError("the decoder was used")

    p.decoder = Unused()
    assert p.feed(encode(Ack(VID, 3, 1, 0))) == [Acked(1, 0)]
    assert p.in_flight == 0 and p.applied_seq == 1


def test_the_hot_paths_encode_what_the_codec_encodes() -> None:
    """PrimaryStream.write and the replica's ACK pack their bytes directly: the same bytes as
    ``encode`` of the message, and a write out of bounds is refused as the message would be."""
    p = opened_primary()
    for offset, data, fua in ((0, b"a" * 512, False), (1 << 40, b"b" * 4096, True)):
        seq, wire = p.write(offset, memoryview(data), 0.0, fua=fua)
        assert wire == encode(Write(VID, 3, seq, offset, data, fua))
    with pytest.raises(ReplicationError) as e:
        p.write(0, b"", 0.0)
    assert e.value.code is ErrorCode.MALFORMED and p.last_seq == 2
    stream = replica()
    stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    stream.feed(encode(Write(VID, 3, 1, 0, b"x" * 512)) + encode(Flush(VID, 3, 2)))
    assert stream.done(1) == encode(Ack(VID, 3, 1, 0))
    assert stream.done(2, durable=True) == encode(Ack(VID, 3, 2, 2))


def test_a_new_stream_of_the_same_epoch_goes_on_from_the_replicas_position() -> None:
    positions = ReplicaPositions()
    first = replica(positions=positions)
    first.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    first.feed(encode(Write(VID, 3, 1, 0, b"x" * 512)) + encode(Flush(VID, 3, 2)))
    first.done(1)
    first.done(2, durable=True)
    assert refused(replica(positions=positions), Open(VID, 3, 3, "n1").signed(KEY, BINDING)) is ErrorCode.BUSY
    first.close()
    assert (
        refused(replica(positions=positions), Open(VID, 3, 2, "n1").signed(KEY, BINDING)) is ErrorCode.REPEAT
    )
    late = replica(positions=positions)
    with pytest.raises(ReplicationError) as e:
        late.feed(encode(Open(VID, 3, 7, "n1").signed(KEY, BINDING)))
    # The refusal tells the primary where a new stream must start.
    assert decode_all(late.refusal(e.value)) == [Refuse(VID, 3, 2, ErrorCode.GAP, e.value.message)]
    assert refused(replica(positions=positions), Open(VID, 3, 4, "n1").signed(KEY, BINDING)) is ErrorCode.GAP
    again = replica(positions=positions)
    [opened] = again.feed(encode(Open(VID, 3, 3, "n1").signed(KEY, BINDING)))
    assert isinstance(opened, Opened) and decode_all(opened.ack) == [Ack(VID, 3, 2, 2)]
    # A newer epoch starts at 1 again and forgets the old positions.
    views = {VID: VolumeView(VID, 4, Role.REPLICA, "n1", SIZE, 512, stream_key=KEY)}
    again.close()
    newer = replica_stream(views.get, positions)
    newer.feed(encode(Open(VID, 4, 1, "n1").signed(KEY, BINDING)))
    assert positions.get(VID, 3) == (0, 0)


@pytest.mark.parametrize("state", list(ReplicaState))
@pytest.mark.parametrize("kind", list(MsgType))
def test_replica_transitions_follow_the_table(state: ReplicaState, kind: MsgType) -> None:
    stream = replica()
    if state is not ReplicaState.AWAIT_OPEN:
        stream.feed(encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)))
    if state is ReplicaState.CLOSED:
        stream.close()
    message = {m.__class__: m for m in sample_messages()}
    by_kind: dict[MsgType, Message] = {
        MsgType.OPEN: Open(VID, 3, 1, "n1").signed(KEY, BINDING),
        MsgType.WRITE: Write(VID, 3, 1, 0, b"x" * 512),
        MsgType.UNMAP: Unmap(VID, 3, 1, 0, 512),
        MsgType.WRITE_SAME: WriteSame(VID, 3, 1, 0, 512, b"x" * 512),
        MsgType.FLUSH: Flush(VID, 3, 1),
        MsgType.ACK: message[Ack],
        MsgType.REFUSE: message[Refuse],
        MsgType.DIRTY: message[Dirty],
        MsgType.NOP: Nop(VID, 3, 1),
        MsgType.CHECKPOINT: Checkpoint(VID, 3, 1, 0),
    }
    after = REPLICA_TRANSITIONS.get((state, kind))
    if after is None:
        with pytest.raises(ReplicationError):
            stream.feed(encode(by_kind[kind]))
        assert stream.state is ReplicaState.CLOSED
    else:
        assert stream.feed(encode(by_kind[kind]))
        assert stream.state is after


# -- the primary -----------------------------------------------------------------------------------


def ack(applied: int, durable: int = 0) -> bytes:
    return encode(Ack(VID, 3, applied, durable))


def opened_primary(**kwargs: object) -> PrimaryStream:
    p = primary(VID, 3, "n1", **kwargs)  # type: ignore[arg-type]
    assert decode_all(p.open(0.0)) == [Open(VID, 3, 1, "n1").signed(KEY, BINDING)]
    return p


def test_primary_numbers_pipelines_and_matches_acks() -> None:
    p = opened_primary()
    assert p.state is PrimaryState.OPENING
    sent = [
        p.write(0, b"a" * 512, 0.1),
        p.write(512, b"b" * 512, 0.2, fua=True),
        p.unmap(1024, 512, 0.3),
        p.write_same(2048, 1024, b"s" * 512, 0.4),
        p.flush(0.5),
    ]
    assert [seq for seq, _ in sent] == [1, 2, 3, 4, 5] and p.in_flight == 5  # pipelined before any ack
    decoded = decode_all(b"".join(w for _, w in sent))
    assert [type(m) for m in decoded] == [Write, Write, Unmap, WriteSame, Flush]
    assert p.feed(ack(0)) == [Acked(0, 0)] and p.state is PrimaryState.STREAMING
    assert p.feed(ack(1) + ack(3)) == [Acked(1, 0), Acked(3, 0)]
    # seq 2 is FUA: it stays in flight until durable, so the window and the lag clock keep it.
    assert p.complete(3) and not p.complete(2, durable=True) and p.in_flight == 4
    assert p.deadline() == 0.2 + 2.0
    p.feed(ack(5, 5))
    assert p.in_flight == 0 and p.in_flight_bytes == 0 and p.complete(5, durable=True)
    assert p.deadline() is None


def test_primary_reports_a_lagging_replica_by_now() -> None:
    p = opened_primary(ack_timeout=2.0)
    assert p.deadline() == 2.0 and not p.lagging(1.99) and p.lagging(2.0)  # the OPEN's answer
    p.feed(ack(0))
    assert p.deadline() is None and not p.lagging(100.0)
    p.write(0, b"a" * 512, 10.0)
    p.write(512, b"a" * 512, 11.0)
    assert not p.lagging(11.9) and p.lagging(12.0)
    p.feed(ack(1))
    assert p.deadline() == 13.0 and not p.lagging(12.5) and p.lagging(13.0)


def test_primary_window_is_bounded() -> None:
    p = opened_primary(window=2)
    p.write(0, b"a" * 512, 0.0)
    p.write(0, b"a" * 512, 0.0)
    assert not p.can_send()
    with pytest.raises(ReplicationError) as e:
        p.write(0, b"a" * 512, 0.0)
    assert e.value.code is ErrorCode.WINDOW_FULL and p.last_seq == 2
    p.feed(ack(0) + ack(1))
    assert p.can_send(512)
    q = opened_primary(window_bytes=MAX_PAYLOAD)
    q.write(0, b"a" * MAX_PAYLOAD, 0.0)
    assert not q.can_send(1) and q.can_send(0)


def test_a_write_run_is_the_writes_encoded_back_to_back_and_sendable_on_any_stream_at_its_seq() -> None:
    writes = [(0, b"a" * 512), (4096, memoryview(b"b" * 4096)), (512, b"c")]
    run = encode_write_run(VID, 3, 1, writes)
    assert run.data == b"".join(encode(Write(VID, 3, 1 + i, o, d)) for i, (o, d) in enumerate(writes))
    assert (run.count, run.size) == (3, 512 + 4096 + 1)
    first, second = opened_primary(), opened_primary()
    assert first.send_run(run, 5.0) is run.data and second.send_run(run, 5.0) is run.data  # encoded once
    for p in (first, second):
        assert (p.last_seq, p.in_flight, p.in_flight_bytes) == (3, 3, run.size)
        assert p.deadline() == 7.0
        p.feed(ack(0) + ack(2))
        assert p.in_flight == 3 and p.lagging(7.0)  # the run's share returns with its last WRITE
        p.feed(ack(3))
        assert (p.in_flight, p.in_flight_bytes, p.deadline()) == (0, 0, None)


def test_a_write_run_is_refused_off_its_stream_or_beyond_the_window() -> None:
    run = encode_write_run(VID, 3, 1, [(0, b"a" * 512), (512, b"b" * 512)])
    for stream, code in (
        (primary(VID, 3, "n1", first_seq=5), ErrorCode.WRONG_STREAM),  # another seq
        (primary(VID, 4, "n1"), ErrorCode.WRONG_STREAM),  # another epoch
        (primary(OTHER_VID, 3, "n1"), ErrorCode.WRONG_STREAM),
        (primary(VID, 3, "n1", window=1), ErrorCode.WINDOW_FULL),
    ):
        stream.open(0.0)
        with pytest.raises(ReplicationError) as e:
            stream.send_run(run, 0.0)
        assert e.value.code is code and stream.in_flight == 0
    with pytest.raises(ReplicationError) as e:
        encode_write_run(VID, 3, 1, [(0, b"a"), (512, b"")])
    assert e.value.code is ErrorCode.MALFORMED
    with pytest.raises(ReplicationError):
        encode_write_run(VID, 3, 1, [(i * MAX_PAYLOAD, b"a" * MAX_PAYLOAD) for i in range(2)])  # one record


@pytest.mark.parametrize(
    ("answers", "code"),
    [
        ([ack(1)], ErrorCode.BAD_ACK),  # the OPEN's answer must be first_seq - 1
        ([ack(0), ack(3)], ErrorCode.BAD_ACK),  # beyond what was sent
        ([ack(0), ack(2), ack(1)], ErrorCode.BAD_ACK),  # backwards
        ([encode(Ack(OTHER_VID, 3, 0, 0))], ErrorCode.WRONG_STREAM),
        ([encode(Ack(VID, 2, 0, 0))], ErrorCode.WRONG_STREAM),
        ([encode(Write(VID, 3, 1, 0, b"x"))], ErrorCode.UNEXPECTED),
        ([ack(0), encode(Refuse(VID, 3, 0, ErrorCode.STALE_EPOCH, "deposed"))], ErrorCode.STALE_EPOCH),
    ],
)
def test_primary_refuses_what_it_cannot_match(answers: list[bytes], code: ErrorCode) -> None:
    p = opened_primary()
    p.write(0, b"a" * 512, 0.0)
    p.write(0, b"a" * 512, 0.0)
    with pytest.raises(ReplicationError) as e:
        for a in answers:
            p.feed(a)
    assert e.value.code is code and e.value.remote is (code is ErrorCode.STALE_EPOCH)
    assert p.state is PrimaryState.FAILED
    with pytest.raises(ReplicationError):
        p.write(0, b"a" * 512, 0.0)


def test_primary_sends_nothing_before_open_and_opens_once() -> None:
    p = primary(VID, 3, "n1")
    with pytest.raises(ReplicationError) as e:
        p.write(0, b"a", 0.0)
    assert e.value.code is ErrorCode.UNEXPECTED and p.last_seq == 0
    p.open(0.0)
    with pytest.raises(ReplicationError):
        p.open(0.0)


@pytest.mark.parametrize("state", [PrimaryState.NEW, PrimaryState.OPENING, PrimaryState.STREAMING])
@pytest.mark.parametrize("event", list(PrimaryInput))
def test_primary_transitions_follow_the_table(state: PrimaryState, event: PrimaryInput) -> None:
    p = primary(VID, 3, "n1", report_dirty=True)
    if state is not PrimaryState.NEW:
        p.open(0.0)
    if state is PrimaryState.STREAMING:
        p.feed(ack(0))
    actions: dict[PrimaryInput, Callable[[], object]] = {
        PrimaryInput.SEND_OPEN: lambda: p.open(0.0),
        PrimaryInput.SEND_OPERATION: lambda: p.flush(0.0),
        PrimaryInput.RECV_ACK: lambda: p.feed(ack(0)),
        PrimaryInput.RECV_REFUSE: lambda: p.feed(encode(Refuse(VID, 3, 0, ErrorCode.BUSY, ""))),
        PrimaryInput.RECV_DIRTY: lambda: p.feed(encode(Dirty(VID, 3, 0, 0, 8, b"\x01", True))),
    }
    after = PRIMARY_TRANSITIONS.get((state, event))
    if after is None or after is PrimaryState.FAILED:
        with pytest.raises(ReplicationError):
            actions[event]()
        if after is PrimaryState.FAILED:
            assert p.state is PrimaryState.FAILED
    else:
        actions[event]()
        assert p.state is after


def test_primary_to_replica_end_to_end_and_the_acknowledgement_rule() -> None:
    stores = {"n2": bytearray(SIZE), "n3": bytearray(SIZE)}
    primaries = {n: primary(VID, 3, "n1") for n in stores}
    replicas = {n: replica() for n in stores}
    wires = {n: primaries[n].open(0.0) for n in stores}
    for n in stores:
        wires[n] += primaries[n].write(4096, b"\x01" * 4096, 0.0)[1] + primaries[n].flush(0.0)[1]
    for n in stores:
        for event in replicas[n].feed(wires[n]):
            if isinstance(event, Opened):
                primaries[n].feed(event.ack)
            elif isinstance(event, ApplyWriteRun):
                stores[n][event.offset : event.offset + event.length] = b"".join(event.buffers)
                primaries[n].feed(replicas[n].done(event.seq))
            elif n == "n2":  # only n2 completes the flush
                primaries[n].feed(replicas[n].done(event.seq, durable=True))
    assert all_complete(primaries, 1) and not all_complete(primaries, 2, durable=True)
    assert primaries["n2"].complete(2, durable=True)
    assert stores["n2"] == stores["n3"] and stores["n2"][4096:8192] == b"\x01" * 4096


# -- resync: the replica's dirty map, NOPs ---------------------------------------------------------


def test_the_dirty_map_answers_an_open_that_asks_for_it_in_slices() -> None:
    stream = replica()
    [opened] = stream.feed(encode(Open(VID, 3, 1, "n1", report_dirty=True).signed(KEY, BINDING)))
    assert isinstance(opened, Opened) and opened.report_dirty
    bitmap = bytes(range(256)) * 5000  # 1.28 MB: two slices
    regions = len(bitmap) * 8
    wire = dirty_report(VID, 3, 0, regions, bitmap)
    assert len(wire) == 2 and all(len(w) <= HEADER.size + 8 + MAX_PAYLOAD for w in wire)
    p = primary(VID, 3, "n1", report_dirty=True)
    p.open(0.0)
    joined = opened.ack + b"".join(wire)
    events: list[object] = []
    for i in range(0, len(joined), 65536):  # in pieces, like records
        events += p.feed(joined[i : i + 65536])
    assert events == [Acked(0, 0), DirtyReport(regions, bitmap)]


def test_dirty_slices_are_checked() -> None:
    with pytest.raises(ReplicationError) as e:
        Dirty(VID, 3, 0, 0, 8, b"\x01\x02", True)  # longer than the bitmap
    assert e.value.code is ErrorCode.MALFORMED
    with pytest.raises(ReplicationError):
        Dirty(VID, 3, 0, 0, 16, b"\x01", True)  # last, but the bitmap is not complete
    with pytest.raises(ReplicationError):
        Dirty(VID, 3, 0, 0, 0, b"", True)  # no regions
    # Unasked for: refused.
    p = primary(VID, 3, "n1")
    p.open(0.0)
    p.feed(ack(0))
    with pytest.raises(ReplicationError) as e:
        p.feed(encode(Dirty(VID, 3, 0, 0, 8, b"\x01", True)))
    assert e.value.code is ErrorCode.UNEXPECTED
    # A slice out of order.
    p = primary(VID, 3, "n1", report_dirty=True)
    p.open(0.0)
    p.feed(ack(0))
    with pytest.raises(ReplicationError) as e:
        p.feed(encode(Dirty(VID, 3, 0, 1, 16, b"\x01", True)))
    assert e.value.code is ErrorCode.MALFORMED


def test_a_nop_takes_a_seq_and_changes_nothing() -> None:
    p = primary(VID, 3, "n1")
    stream = replica()
    wire = p.open(0.0) + p.write(0, b"x" * 512, 0.0)[1] + p.nop(0.0)[1]
    events = stream.feed(wire)
    assert [type(e).__name__ for e in events] == ["Opened", "ApplyWriteRun", "ApplyNop"]
    assert events[2] == ApplyNop(2)
    opened = events[0]
    assert isinstance(opened, Opened)
    p.feed(opened.ack)
    stream.done(1)
    assert p.feed(stream.done(2)) == [Acked(2, 0)]


def test_a_checkpoint_is_applied_in_order_and_clamped_to_the_stream() -> None:
    p = primary(VID, 3, "n1", first_seq=5)  # seqs 1..4 came in earlier streams of the epoch
    with pytest.raises(ReplicationError):
        Checkpoint(VID, 3, 2, 2)  # up to itself or later
    p.open(0.0)
    _, wire = p.checkpoint(2, 0.0)
    (message,) = decode_all(wire)
    assert message == Checkpoint(VID, 3, 5, 2)
    _, wire = p.checkpoint(9, 0.0)
    (message,) = decode_all(wire)
    assert message == Checkpoint(VID, 3, 6, 5)  # clamped below its own seq
    events = replica().feed(
        encode(Open(VID, 3, 1, "n1").signed(KEY, BINDING)) + encode(Checkpoint(VID, 3, 1, 0))
    )
    assert events[1] == ApplyCheckpoint(1, 0)
