"""The cluster channel (sparrow.cluster.channel): handshake, records, deadlines; sans-IO, `now` given."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from sparrow.cluster.channel import (
    AEAD,
    CLIENT_HELLO,
    VERSION,
    Channel,
    ChannelError,
    ChannelErrorCode,
    ChannelEvent,
    ClusterSecret,
    Established,
    HandshakeBytes,
    Plaintext,
    Purpose,
    SecretError,
    Side,
)
from sparrow.clustersecret import ensure_cluster_secret, generate_cluster_secret, load_cluster_secret

SECRET = ClusterSecret.from_text(b"0123456789abcdef0123456789abcdef0123456789abcdef")
OTHER = ClusterSecret.from_text(b"fedcba9876543210fedcba9876543210fedcba9876543210")
#: A client's X25519 key share (any valid public key).
SHARE = bytes([9]) + bytes(31)


def handshake_bytes(events: list[ChannelEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, HandshakeBytes))


def plaintexts(events: list[ChannelEvent]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Plaintext)]


def pair(
    client_secret: ClusterSecret = SECRET, server_secret: ClusterSecret = SECRET, **kwargs: float
) -> tuple[Channel, Channel]:
    client = Channel(client_secret, Side.CLIENT, Purpose.HEARTBEAT, 0.0)
    server = Channel(server_secret, Side.SERVER, Purpose.HEARTBEAT, 0.0, **kwargs)  # type: ignore[arg-type]
    return client, server


def connect(client: Channel, server: Channel, now: float = 0.1) -> None:
    answer = server.feed(client.initiate(), now)
    events = client.feed(handshake_bytes(answer), now)
    assert Established() in events and client.established
    assert server.feed(handshake_bytes(events), now) == [Established()]
    assert server.established


def test_handshake_and_records_both_directions() -> None:
    client, server = pair()
    connect(client, server)
    assert plaintexts(server.feed(client.send(b"hello"), 0.2)) == [b"hello"]
    assert plaintexts(client.feed(server.send(b"ack"), 0.2)) == [b"ack"]
    two = client.send(b"one") + client.send(b"two")
    assert plaintexts(server.feed(two, 0.3)) == [b"one", b"two"]
    assert b"hello" not in client.send(b"hello")


def test_byte_at_a_time() -> None:
    client, server = pair()
    stream = client.initiate()
    events: list[ChannelEvent] = []
    for b in stream:
        events += server.feed(bytes([b]), 0.1)
    answer = handshake_bytes(events)
    client_events: list[ChannelEvent] = []
    for b in answer:
        client_events += client.feed(bytes([b]), 0.1)
    assert client.established
    finish = handshake_bytes(client_events) + client.send(b"x" * 100) + client.send(b"y")
    got: list[ChannelEvent] = []
    for b in finish:
        got += server.feed(bytes([b]), 0.2)
    assert got[0] == Established()
    assert plaintexts(got) == [b"x" * 100, b"y"]


def test_seal_is_send_in_two_parts() -> None:
    """``seal`` gives a record's header and sealed bytes unjoined (written with one writelines);
    the peer opens them as it opens ``send``'s, in order."""
    client, server = pair()
    connect(client, server)
    header, sealed = client.seal(memoryview(b"x" * 1000))
    assert len(header) == 4 and len(sealed) == 1000 + 16
    assert plaintexts(server.feed(header + sealed + client.send(b"next"), 0.2)) == [b"x" * 1000, b"next"]


@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 20000), max_size=8),
)
def test_records_split_anywhere_open_in_order(sizes: list[int], cuts: list[int]) -> None:
    """Records are opened where they lie in the bytes fed (nothing buffered) or in the buffer (a
    partial record before): however the stream is cut, the same plaintexts in order, only the
    incomplete record's bytes kept, and the frame deadline set exactly while one is partial."""
    client, server = pair(frame_timeout=2.0)
    connect(client, server)
    messages = [bytes([i]) * n for i, n in enumerate(sizes)]
    records = [client.send(m) for m in messages]
    stream = b"".join(records)
    ends = [sum(len(r) for r in records[: i + 1]) for i in range(len(records))]
    got: list[bytes] = []
    start = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        if cut < start:
            continue
        got += plaintexts(server.feed(stream[start:cut], 1.0 + cut / 1e5))
        done = max((e for e in ends if e <= cut), default=0)
        assert got == messages[: ends.index(done) + 1 if done else 0]
        assert server.buffered == cut - done
        assert (server.deadline() is not None) == (cut > done)
        start = cut
    assert got == messages and server.buffered == 0


def test_wrong_secret_is_refused_by_both_sides() -> None:
    client, server = pair(client_secret=OTHER)
    answer = server.feed(client.initiate(), 0.1)
    with pytest.raises(ChannelError) as e:
        client.feed(handshake_bytes(answer), 0.1)
    assert e.value.code is ChannelErrorCode.AUTH_FAILED

    # A client that skips checking the server and sends a guessed MAC is refused by the server.
    client, server = pair(server_secret=SECRET, client_secret=OTHER)
    answer = server.feed(client.initiate(), 0.1)
    with pytest.raises(ChannelError) as e:
        server.feed(os.urandom(32), 0.1)
    assert e.value.code is ChannelErrorCode.AUTH_FAILED
    assert not server.established
    with pytest.raises(ChannelError):  # stays broken
        server.feed(b"", 0.1)


def test_plain_heartbeat_frame_is_bad_magic_and_nothing_is_handed_up() -> None:
    _, server = pair()
    with pytest.raises(ChannelError) as e:
        server.feed(b"\x00\x00\x00\x10", 0.1)
    assert e.value.code is ChannelErrorCode.BAD_MAGIC


def test_wrong_purpose_and_version() -> None:
    _, server = pair()
    with pytest.raises(ChannelError) as e:
        server.feed(CLIENT_HELLO.pack(b"SPRW", VERSION, 2, bytes(32)) + SHARE, 0.1)
    assert e.value.code is ChannelErrorCode.WRONG_PURPOSE
    _, server = pair()
    with pytest.raises(ChannelError) as e:
        server.feed(CLIENT_HELLO.pack(b"SPRW", 9, 1, bytes(32)), 0.1)
    assert e.value.code is ChannelErrorCode.UNSUPPORTED_VERSION
    # A version-1 client (no key share) and a version-2 one (ChaCha20-Poly1305 records) are told
    # at once, not left to time out.
    for old in (1, 2):
        _, server = pair()
        with pytest.raises(ChannelError) as e:
            server.feed(b"SPRW" + bytes((old,)), 0.1)
        assert e.value.code is ChannelErrorCode.UNSUPPORTED_VERSION


def test_a_member_that_sees_the_bytes_cannot_open_the_records() -> None:
    """Version 2: the record keys need the connection's X25519 secret, not only the cluster
    secret: a third member that sees every byte and holds the secret derives the keys as version 1
    made them (from the secret and the nonces on the wire) and opens nothing."""
    client, server = pair()
    hello = client.initiate()
    answer = handshake_bytes(server.feed(hello, 0.1))
    server.feed(handshake_bytes(client.feed(answer, 0.1)), 0.1)
    record = client.send(b"a CHAP secret")
    nonces = hello[6 : 6 + 32] + answer[:32]
    info = b"sparrow cluster v1 " + bytes((int(Purpose.HEARTBEAT),)) + b" c2s"
    eve = AEAD(HKDF(hashes.SHA256(), 32, salt=nonces, info=info).derive(SECRET.key))
    with pytest.raises(InvalidTag):
        eve.decrypt(bytes(12), record[4:], record[:4])
    assert plaintexts(server.feed(record, 0.2)) == [b"a CHAP secret"]


def test_a_low_order_key_share_is_refused() -> None:
    _, server = pair()
    with pytest.raises(ChannelError) as e:
        server.feed(CLIENT_HELLO.pack(b"SPRW", VERSION, 1, bytes(32)) + bytes(32), 0.1)
    assert e.value.code is ChannelErrorCode.AUTH_FAILED


def test_replayed_server_answer_fails() -> None:
    client, server = pair()
    answer = handshake_bytes(server.feed(client.initiate(), 0.1))
    client2, _ = pair()
    client2.initiate()  # a fresh nonce: the recorded answer does not verify
    with pytest.raises(ChannelError) as e:
        client2.feed(answer, 0.1)
    assert e.value.code is ChannelErrorCode.AUTH_FAILED


@pytest.mark.parametrize("attack", ["replay", "reorder", "tamper", "tamper_length"])
def test_bad_records(attack: str) -> None:
    client, server = pair()
    connect(client, server)
    first, second = client.send(b"first"), client.send(b"second")
    if attack == "replay":
        stream = first + first
    elif attack == "reorder":
        stream = second + first
    elif attack == "tamper":
        stream = first[:-1] + bytes([first[-1] ^ 1])
    else:
        stream = first[:3] + bytes([first[3] + 1]) + first[4:] + b"\x00"
    with pytest.raises(ChannelError) as e:
        server.feed(stream, 0.2)
    assert e.value.code is ChannelErrorCode.BAD_RECORD


def test_record_too_large_before_buffering() -> None:
    client, server = pair(max_plaintext=100)
    connect(client, server)
    with pytest.raises(ChannelError) as e:
        server.feed(b"\xff\xff\xff\xff", 0.2)
    assert e.value.code is ChannelErrorCode.RECORD_TOO_LARGE


def test_send_before_established() -> None:
    client, _ = pair()
    client.initiate()
    with pytest.raises(ChannelError) as e:
        client.send(b"early")
    assert e.value.code is ChannelErrorCode.NOT_ESTABLISHED


def test_handshake_deadline() -> None:
    _, server = pair(handshake_timeout=5.0)
    assert server.deadline() == 5.0
    server.feed(b"SP", 1.0)
    server.check(4.9)
    with pytest.raises(ChannelError) as e:
        server.check(5.0)
    assert e.value.code is ChannelErrorCode.HANDSHAKE_TIMEOUT
    assert server.deadline() is None


def test_truncated_record_deadline_and_idle_deadline() -> None:
    client, server = pair(frame_timeout=2.0, idle_timeout=10.0)
    connect(client, server, now=1.0)
    assert server.deadline() == 11.0
    record = client.send(b"beat")
    server.feed(record[:5], 3.0)
    assert server.deadline() == 5.0
    server.check(4.9)
    with pytest.raises(ChannelError) as e:
        server.check(5.0)
    assert e.value.code is ChannelErrorCode.FRAME_TIMEOUT

    client, server = pair(frame_timeout=2.0, idle_timeout=10.0)
    connect(client, server, now=1.0)
    assert plaintexts(server.feed(client.send(b"beat"), 4.0)) == [b"beat"]
    assert server.deadline() == 14.0
    with pytest.raises(ChannelError) as e:
        server.feed(b"", 14.0)
    assert e.value.code is ChannelErrorCode.IDLE_TIMEOUT


def test_a_secret_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    # What a crash in the middle of an earlier attempt leaves: a partial temporary file, never `path`.
    (tmp_path / f".cluster.secret.{os.getpid()}.tmp").write_bytes(b"01")
    generate_cluster_secret(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.secret"]
    assert len(path.read_bytes().strip()) == 64
    with pytest.raises(FileExistsError):
        generate_cluster_secret(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.secret"]


def test_secret_files(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    with pytest.raises(SecretError, match="does not exist"):
        load_cluster_secret(path)
    generate_cluster_secret(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_cluster_secret(path) == load_cluster_secret(path)
    with pytest.raises(FileExistsError):
        generate_cluster_secret(path)
    assert ensure_cluster_secret(path) == load_cluster_secret(path)
    path.chmod(0o640)
    with pytest.raises(SecretError, match="group or others"):
        load_cluster_secret(path)
    short = tmp_path / "short"
    short.write_text("too short")
    short.chmod(0o600)
    with pytest.raises(SecretError, match="at least 32"):
        load_cluster_secret(short)
    made = ensure_cluster_secret(tmp_path / "new.secret")
    path.chmod(0o600)
    assert made != load_cluster_secret(path)
    assert "key" not in repr(made) or made.key.hex() not in repr(made)


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_channel_errors(data: bytes) -> None:
    _, server = pair()
    with contextlib.suppress(ChannelError):
        server.feed(data, 0.1)
    assert not server.established


@given(st.data())
def test_mutated_streams_only_raise_channel_errors(data: st.DataObject) -> None:
    client, server = pair()
    connect(client, server)
    stream = bytearray(client.send(b"one") + client.send(b"two"))
    index = data.draw(st.integers(0, len(stream) - 1))
    stream[index] ^= data.draw(st.integers(1, 255))
    try:
        events = server.feed(bytes(stream), 0.2)
    except ChannelError:
        return
    # A length prefix made longer: nothing forged comes out, the record waits for its deadline.
    assert plaintexts(events) in ([], [b"one"])
    assert server.buffered and server.deadline() == 0.2 + server.frame_timeout
