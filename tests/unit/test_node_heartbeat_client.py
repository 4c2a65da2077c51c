"""sparrow.node.heartbeat_client: the sans-IO heartbeat session and the reconnect backoff."""

from __future__ import annotations

import pytest

from sparrow.cluster.channel import (
    CLIENT_HELLO_SIZE,
    Channel,
    ClusterSecret,
    Established,
    HandshakeBytes,
    Plaintext,
    Purpose,
    Side,
)
from sparrow.cluster.heartbeat import ErrorCode, HeartbeatProtocolError, decode, encode
from sparrow.cluster.lease import LeaseClock
from sparrow.cluster.messages import (
    Ack,
    Assignment,
    Health,
    Heartbeat,
    Hello,
    Role,
    VolumeObservation,
)
from sparrow.node.heartbeat_client import Backoff, HeartbeatClient, HeartbeatSession, default_connect_timeout
from tests.tools import FAKE_MASTER

SECRET = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")

HELLO = Hello("n1", 7, "10.0.0.1:3260", "10.0.0.1:3291", "127.0.0.1:3281", 1 << 40, 1 << 39)
BINDING = b"b" * 160


def open_session(session: HeartbeatSession, binding: bytes = BINDING) -> bytes:
    """A new connection whose master proves FAKE_MASTER's key; the Hello frame the node sends."""
    session.connection_made(binding)
    assert session.master_proof(encode(FAKE_MASTER.hello(binding))) is not None
    return session.hello(HELLO)


def fast_client(port: int) -> HeartbeatClient:
    """A client of a master on loopback ``port`` that heartbeats and reconnects every few ms."""
    return HeartbeatClient(
        ("127.0.0.1", port),
        HeartbeatSession(LeaseClock()),
        secret=SECRET,
        hello=lambda: HELLO,
        observations=lambda now: (),
        on_ack=lambda ack: None,
        interval=0.02,
        backoff=Backoff(initial=0.01, maximum=0.02),
    )
VOL = "ab" * 16
OBS = (VolumeObservation(VOL, 1, Role.PRIMARY, Health.OK, 0, (), True),)
ASSIGNMENT = Assignment(VOL, "vol-a", 1 << 20, 512, 1, "n1", "10.0.0.1:3260", ("n1",))


def test_each_connection_opens_with_the_hello() -> None:
    session = HeartbeatSession(LeaseClock())
    assert decode(open_session(session)) == HELLO
    assert decode(open_session(session)) == HELLO


def test_seq_increases_for_the_whole_process_across_reconnects() -> None:
    session = HeartbeatSession(LeaseClock())
    open_session(session)
    seqs = []
    for i in range(3):
        frame = session.heartbeat(OBS, float(i))
        message = decode(frame)
        assert isinstance(message, Heartbeat) and message.observations == OBS
        seqs.append(message.seq)
    session.connection_lost()
    open_session(session)  # reconnect: seq carries on
    message = decode(session.heartbeat((), 9.0))
    assert isinstance(message, Heartbeat)
    assert [*seqs, message.seq] == [1, 2, 3, 4]
    assert session.seq == 4


def test_the_lease_counts_from_the_send_of_the_acked_heartbeat() -> None:
    lease = LeaseClock()
    session = HeartbeatSession(lease)
    open_session(session)
    session.heartbeat(OBS, 10.0)  # seq 1 sent at 10.0
    session.heartbeat(OBS, 11.0)  # seq 2 sent at 11.0
    [ack] = session.receive(encode(Ack(1, 5.0, (ASSIGNMENT,))))
    assert ack.assignments == (ASSIGNMENT,)
    assert lease.expires_at == 15.0
    assert lease.valid(14.999) and not lease.valid(15.0)
    session.receive(encode(Ack(2, 5.0, ())))
    assert lease.expires_at == 16.0


def test_acks_are_found_in_any_split_of_the_stream() -> None:
    session = HeartbeatSession(LeaseClock())
    open_session(session)
    session.heartbeat(OBS, 0.0)
    session.heartbeat(OBS, 0.5)
    stream = encode(Ack(1, 5.0, (ASSIGNMENT,))) + encode(Ack(2, 5.0, ()))
    got: list[Ack] = []
    for i in range(len(stream)):
        got += session.receive(stream[i : i + 1])
    assert [a.seq for a in got] == [1, 2]


def test_a_stale_or_unknown_ack_is_not_acted_on() -> None:
    lease = LeaseClock()
    session = HeartbeatSession(lease)
    open_session(session)
    session.heartbeat(OBS, 0.0)
    session.heartbeat(OBS, 1.0)
    assert [a.seq for a in session.receive(encode(Ack(2, 5.0, ())))] == [2]
    assert session.receive(encode(Ack(1, 5.0, (ASSIGNMENT,)))) == []  # older than the one applied
    assert session.receive(encode(Ack(99, 5.0, (ASSIGNMENT,)))) == []  # never sent
    assert lease.expires_at == 6.0


def test_a_repeat_of_the_latest_acks_seq_is_acted_on_without_extending_the_lease() -> None:
    """The master pushes a newly published assignment in an Ack repeating the seq it answered
    last: its assignments are acted on, the lease stays what the first Ack made it."""
    lease = LeaseClock()
    session = HeartbeatSession(lease)
    open_session(session)
    session.heartbeat(OBS, 0.0)
    session.heartbeat(OBS, 1.0)
    assert [a.seq for a in session.receive(encode(Ack(1, 5.0, ())))] == [1]
    [pushed] = session.receive(encode(Ack(1, 60.0, (ASSIGNMENT,))))
    assert pushed.assignments == (ASSIGNMENT,)
    assert lease.expires_at == 5.0 and lease.last_acked == 1
    assert [a.seq for a in session.receive(encode(Ack(2, 5.0, ())))] == [2]
    assert lease.expires_at == 6.0
    assert session.receive(encode(Ack(1, 5.0, (ASSIGNMENT,)))) == []  # older than the latest


@pytest.mark.parametrize("frame", [encode(HELLO), encode(Heartbeat(1, ()))])
def test_anything_but_an_ack_from_the_master_is_a_protocol_error(frame: bytes) -> None:
    session = HeartbeatSession(LeaseClock())
    open_session(session)
    with pytest.raises(HeartbeatProtocolError) as info:
        session.receive(frame)
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


def test_garbage_is_a_protocol_error_and_a_new_connection_starts_clean() -> None:
    session = HeartbeatSession(LeaseClock())
    open_session(session)
    with pytest.raises(HeartbeatProtocolError):
        session.receive(b"\x00\x00\x00\x03\xc1\xc1\xc1")
    open_session(session)
    session.heartbeat((), 0.0)
    partial = encode(Ack(1, 5.0, ()))[:-1]
    assert session.receive(partial) == []
    session.connection_lost()  # the half frame goes with the connection
    open_session(session)
    session.heartbeat((), 1.0)
    assert [a.seq for a in session.receive(encode(Ack(2, 5.0, ())))] == [2]


def test_backoff_grows_to_its_cap_with_bounded_jitter() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0, factor=2.0, jitter=0.25)
    assert [backoff.delay(n, 0.0) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert backoff.delay(10_000, 0.0) == 2.0
    assert backoff.delay(3, 0.999) == pytest.approx(0.8 * (1 - 0.25 * 0.999))
    assert all(0.75 * 2.0 < backoff.delay(50, r / 10) <= 2.0 for r in range(10))


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0.0}, {"initial": 3.0, "maximum": 2.0}, {"factor": 0.5}, {"jitter": 1.0}],
)
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


async def test_a_master_that_goes_silent_is_left_and_dialled_again() -> None:
    """After one Ack (lease 0.1 s) the master answers nothing: the client drops the connection
    after its silence limit and connects again, as it would to a master host that vanished."""
    import asyncio

    from sparrow.cluster.heartbeat import FrameDecoder

    connections = 0
    second_connection = asyncio.Event()

    async def silent_after_one_ack(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 2:
            second_connection.set()
        decoder = FrameDecoder()
        channel = Channel(SECRET, Side.SERVER, Purpose.HEARTBEAT, 0.0)
        acked = False
        while data := await reader.read(65536):
            for event in channel.feed(data, 0.0):
                if isinstance(event, HandshakeBytes):
                    writer.write(event.data)
                elif isinstance(event, Established):
                    writer.write(channel.send(encode(FAKE_MASTER.hello(channel.binding))))
                elif isinstance(event, Plaintext):
                    decoder.feed(event.data)
            while (msg := decoder.next_message()) is not None:
                if isinstance(msg, Heartbeat) and not acked and connections == 1:
                    writer.write(channel.send(encode(Ack(msg.seq, 0.1, ()))))
                    acked = True
        writer.close()

    server = await asyncio.start_server(silent_after_one_ack, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = fast_client(port)
    assert client.silence_limit() == 10.0  # before any Ack: twice the default lease
    client.start()
    try:
        async with asyncio.timeout(10):
            await second_connection.wait()
        assert client.acks == 1
        assert client.silence_limit() == pytest.approx(0.2)  # 2 x the 0.1 s lease it was given
        assert client.last_error is not None and "no Ack" in client.last_error
    finally:
        await client.stop()
        server.close()
        await server.wait_closed()


async def test_a_master_without_the_cluster_secret_hears_no_hello() -> None:
    """The node checks the master's proof before it says anything: a master with another secret
    gets the channel's first message and nothing more, and the node keeps retrying."""
    import asyncio


    received: list[bytes] = []
    dialled = 0
    dialled_again = asyncio.Event()
    impostor = ClusterSecret.from_text(b"not-the-cluster-secret-but-32-chars-long")

    async def impostor_master(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dialled
        dialled += 1
        if dialled == 2:  # the first attempt failed: the node tries again
            dialled_again.set()
        channel = Channel(impostor, Side.SERVER, Purpose.HEARTBEAT, 0.0)
        while data := await reader.read(65536):
            received.append(data)
            for event in channel.feed(data, 0.0):
                if isinstance(event, HandshakeBytes):
                    writer.write(event.data)
                elif isinstance(event, Established):
                    writer.write(channel.send(encode(FAKE_MASTER.hello(channel.binding))))
        writer.close()

    server = await asyncio.start_server(impostor_master, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = fast_client(port)
    client.start()
    try:
        async with asyncio.timeout(10):
            await dialled_again.wait()
        assert client.last_error is not None and "auth_failed" in client.last_error
        assert client.acks == 0 and client.connections == 0
        assert all(len(chunk) == CLIENT_HELLO_SIZE for chunk in received)  # only the channel's first message
    finally:
        await client.stop()
        server.close()
        await server.wait_closed()


def test_a_connect_and_handshake_get_two_heartbeats_between_1_and_5_seconds() -> None:
    assert default_connect_timeout(0.25) == 1.0
    assert default_connect_timeout(1.0) == 2.0
    assert default_connect_timeout(10.0) == 5.0
    assert fast_client(1).connect_timeout == 1.0  # interval 0.02


async def test_a_heartbeat_sent_at_once_leaves_the_schedule_as_it_was() -> None:
    """send_now sends one heartbeat early; the next scheduled one still goes out on time (it used
    to be pushed back a whole interval, so the master heard nothing for up to two)."""
    import asyncio

    from sparrow.cluster.heartbeat import FrameDecoder

    arrivals: list[float] = []
    three = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def master(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        channel = Channel(SECRET, Side.SERVER, Purpose.HEARTBEAT, 0.0)
        while data := await reader.read(65536):
            for event in channel.feed(data, 0.0):
                if isinstance(event, HandshakeBytes):
                    writer.write(event.data)
                elif isinstance(event, Established):
                    writer.write(channel.send(encode(FAKE_MASTER.hello(channel.binding))))
                elif isinstance(event, Plaintext):
                    decoder.feed(event.data)
            while (msg := decoder.next_message()) is not None:
                if isinstance(msg, Heartbeat):
                    arrivals.append(loop.time())
                    writer.write(channel.send(encode(Ack(msg.seq, 5.0, ()))))
                    if len(arrivals) == 1:  # 0.1 s into the first interval: one heartbeat now
                        loop.call_later(0.1, client.send_now)
                    if len(arrivals) == 3:
                        three.set()
        writer.close()

    server = await asyncio.start_server(master, "127.0.0.1", 0)
    interval = 1.0
    client = HeartbeatClient(
        ("127.0.0.1", server.sockets[0].getsockname()[1]),
        HeartbeatSession(LeaseClock()),
        secret=SECRET,
        hello=lambda: HELLO,
        observations=lambda now: (),
        on_ack=lambda ack: None,
        interval=interval,
    )
    client.start()
    try:
        async with asyncio.timeout(10):
            await three.wait()
    finally:
        await client.stop()
        server.close()
        await server.wait_closed()
    early, scheduled = arrivals[1] - arrivals[0], arrivals[2] - arrivals[0]
    assert early < 0.5 * interval, arrivals
    assert scheduled < 1.45 * interval, f"the scheduled heartbeat came {scheduled:.2f} s after the first"


def test_a_refusal_from_the_master_ends_the_session_with_its_reason() -> None:
    from sparrow.cluster.messages import Refusal
    from sparrow.node.heartbeat_client import MasterRefused

    session = HeartbeatSession(LeaseClock())
    open_session(session)
    session.heartbeat(OBS, 0.0)
    with pytest.raises(MasterRefused) as e:
        session.receive(encode(Refusal("key_mismatch", "node 'n1' is bound to key ab")))
    assert (e.value.reason, e.value.detail) == ("key_mismatch", "node 'n1' is bound to key ab")


async def test_the_hello_is_signed_for_its_connection_and_a_refusal_is_logged_with_the_nodes_key() -> None:
    """The master checks the Hello's proof against *its* end's channel binding (a proof made for
    another connection would fail), then refuses the node: the client logs the master's reason at
    error level with its own key (what `sparrow node rekey --key` needs) and dials again."""
    import asyncio

    from structlog.testing import capture_logs

    from sparrow.cluster.heartbeat import FrameDecoder
    from sparrow.cluster.messages import Refusal
    from sparrow.cluster.nodeidentity import NodeKey, NodeKeys, key_text

    identity = NodeKey(b"i" * 32)
    admitted: list[bytes] = []
    refused_twice = asyncio.Event()

    async def master(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        channel = Channel(SECRET, Side.SERVER, Purpose.HEARTBEAT, 0.0)
        while data := await reader.read(65536):
            for event in channel.feed(data, 0.0):
                if isinstance(event, HandshakeBytes):
                    writer.write(event.data)
                elif isinstance(event, Established):
                    writer.write(channel.send(encode(FAKE_MASTER.hello(channel.binding))))
                elif isinstance(event, Plaintext):
                    decoder.feed(event.data)
            while (msg := decoder.next_message()) is not None:
                if isinstance(msg, Hello):
                    admitted.append(NodeKeys().admit(msg, channel.binding).key)
                    writer.write(channel.send(encode(Refusal("key_mismatch", "bound to another key"))))
                    writer.write_eof()
                    if len(admitted) == 2:
                        refused_twice.set()
        writer.close()

    server = await asyncio.start_server(master, "127.0.0.1", 0)
    client = fast_client(server.sockets[0].getsockname()[1])
    client.identity = identity
    with capture_logs() as logs:
        client.start()
        try:
            async with asyncio.timeout(10):
                await refused_twice.wait()
        finally:
            await client.stop()
            server.close()
            await server.wait_closed()
    assert admitted[:2] == [identity.public, identity.public] and client.acks == 0
    assert client.last_error == "refused by the master: key_mismatch: bound to another key"
    (line,) = [entry for entry in logs if entry["event"] == "master refused this node"][:1]
    assert line["log_level"] == "error" and line["reason"] == "key_mismatch"
    assert line["node_key"] == key_text(identity.public)
