"""The master's heartbeat protocol (sparrow.master.heartbeat_server), driven with a fake transport
and an injected clock: no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from sparrow.cluster.authority import AuthorityStore, VolumeRecord
from sparrow.cluster.channel import Channel, ClusterSecret, HandshakeBytes, Plaintext, Purpose, Side
from sparrow.cluster.heartbeat import FrameDecoder, encode
from sparrow.cluster.lease import LeaseConfig
from sparrow.cluster.messages import (
    Ack,
    DeletedVolume,
    DirectoryEntry,
    Health,
    Heartbeat,
    Hello,
    Refusal,
    Role,
    StreamKey,
    VolumeObservation,
)
from sparrow.cluster.nodeidentity import AdmissionPolicy, NodeKey, NodeKeys, key_text
from sparrow.master.control import ControlLoop, restore
from sparrow.master.heartbeat_server import (
    LIVE_INCARNATION,
    MAX_HEARTBEATS_PER_SECOND,
    MAX_WRITE_BUFFER,
    HeartbeatServer,
    NodeConnection,
    volume_directory,
)
from sparrow.replication.streamauth import derive_stream_key

MiB = 1 << 20
TIMING = LeaseConfig()
SECRET = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")
WRONG = ClusterSecret.from_text(b"another-secret-of-at-least-32-characters!")


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.buffer_size = 0
        #: The node's end of the channel, once the handshake is done (acks() opens the records).
        self.client: Channel | None = None
        self._read = 0
        self._plain = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def acks(self) -> list[Ack]:
        messages = self.messages()
        assert all(isinstance(m, Ack) for m in messages), messages
        return [m for m in messages if isinstance(m, Ack)]

    def messages(self) -> list[Ack | Refusal]:
        """Everything the master sent, opened and decoded."""
        if self.client is not None:
            new, self._read = bytes(self.written[self._read :]), len(self.written)
            self._plain += b"".join(e.data for e in self.client.feed(new, 0.0) if isinstance(e, Plaintext))
        decoder = FrameDecoder()
        decoder.feed(bytes(self._plain))
        out: list[Ack | Refusal] = []
        while (message := decoder.next_message()) is not None:
            assert isinstance(message, Ack | Refusal)
            out.append(message)
        return out


class Clock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuthorityStore]:
    s = AuthorityStore.open_in(tmp_path)
    yield s
    s.close()


class Link:
    """The master's connection as a node with the cluster secret drives it: every
    ``data_received`` is sealed in one channel record first."""

    def __init__(self, conn: NodeConnection, client: Channel) -> None:
        self.conn = conn
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(self.client.send(data))

    def hello(self, hello: Hello) -> bytes:
        """``hello``'s frame, signed by its node's key (:func:`key`) for this connection."""
        return encode(key(hello.node_id).sign_hello(hello, self.client.binding))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class Harness:
    def __init__(self, store: AuthorityStore, **server: Any) -> None:
        self.store = store
        self.clock = Clock()
        self.control: ControlLoop = restore(store, TIMING, self.clock())
        self.hellos: list[Hello] = []
        self.heartbeats = 0
        self.errors: list[str] = []
        self.refused: list[str] = []
        self.server = HeartbeatServer(
            self.control,
            secret=SECRET,
            on_refused=self.refused.append,
            **server,
            lease_seconds=TIMING.lease_seconds,
            clock=self.clock,
            on_hello=self.on_hello,
            on_heartbeat=self.on_heartbeat,
            on_protocol_error=self.errors.append,
        )

    def on_hello(self, hello: Hello, approve: bool = False) -> None:
        self.hellos.append(hello)
        self.store.upsert_hello(hello, seen_at=1.0, approve=approve)  # the daemon: in a worker thread

    def on_heartbeat(self) -> None:
        self.heartbeats += 1

    def raw(self) -> tuple[NodeConnection, FakeTransport]:
        """A TCP connection, before any handshake."""
        conn = self.server.protocol()
        transport = FakeTransport()
        conn.connection_made(transport)
        return conn, transport

    def connect(self, secret: ClusterSecret = SECRET) -> tuple[Link, FakeTransport]:
        """A connection that has completed the channel handshake with ``secret``."""
        conn, transport = self.raw()
        client = Channel(secret, Side.CLIENT, Purpose.HEARTBEAT, 0.0)
        conn.data_received(client.initiate())
        events = client.feed(bytes(transport.written), 0.0)
        conn.data_received(b"".join(e.data for e in events if isinstance(e, HandshakeBytes)))
        assert conn.channel.established
        transport._read, transport.client = len(transport.written), client
        return Link(conn, client), transport


def key(node_id: str) -> NodeKey:
    """The key of the node ``node_id`` in these tests (the same for every connection)."""
    return NodeKey(hashlib.sha256(node_id.encode()).digest())


def hello(node_id: str = "n1", incarnation: int = 7) -> Hello:
    """A Hello carrying its node's public key (:meth:`Link.hello` adds the proof)."""
    return Hello(
        node_id,
        incarnation,
        "192.0.2.7:3260",
        "192.0.2.7:7000",
        "192.0.2.7:8080",
        1 << 40,
        1 << 30,
        node_key=key(node_id).public,
    )


def heartbeat(seq: int, *obs: VolumeObservation) -> Heartbeat:
    return Heartbeat(seq=seq, observations=obs)


def add_volume(store: AuthorityStore) -> VolumeRecord:
    return store.add_volume("vol1", size=64 * MiB, block_size=512, replicas=1, created_at=1.0)


def test_every_heartbeat_gets_an_ack_with_the_lease_and_the_grant_is_recorded(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, transport = h.connect()
    conn.data_received(conn.hello(hello()))
    assert transport.acks() == []  # Hello is not answered
    assert h.hellos == [hello()]
    assert h.control.observations.hello("n1") == hello()
    assert h.control.leases.expires_at("n1") is None

    h.clock.now = 51.0
    conn.data_received(encode(heartbeat(1)))
    (ack,) = transport.acks()
    assert ack == Ack(seq=1, lease_seconds=TIMING.lease_seconds, assignments=())
    assert h.control.leases.expires_at("n1") == 51.0 + TIMING.lease_seconds
    assert h.control.observations.alive("n1", 51.0)
    assert h.heartbeats == 1


def test_the_ack_carries_the_assignments_naming_the_node(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, transport = h.connect()
    conn.data_received(conn.hello(hello()) + encode(heartbeat(1)))
    vol = add_volume(store)
    (assignment,) = h.control.step(52.0).published

    other, other_transport = h.connect()
    other.data_received(other.hello(hello("n2")) + encode(heartbeat(1)))

    h.clock.now = 53.0
    obs = VolumeObservation(vol.volume_id, 1, Role.PRIMARY, Health.OK, 0, (), True)
    conn.data_received(encode(heartbeat(2, obs)))
    acks = transport.acks()
    assert [a.seq for a in acks] == [1, 2]
    assert acks[1].assignments == (assignment,)
    assert assignment.primary == "n1" and assignment.epoch == 1
    assert assignment.primary_portal == "192.0.2.7:3260"
    assert h.control.observations.observation("n1", vol.volume_id) == obs
    assert [a.assignments for a in other_transport.acks()] == [()]  # n2 is named by nothing


def test_a_publish_is_pushed_in_an_ack_repeating_the_last_seq_without_a_grant(store: AuthorityStore) -> None:
    """Issue 8's failover time: a new assignment reaches every connected node at once, not at its
    next heartbeat, in an Ack that repeats its last seq; the master records no lease for it."""
    h = Harness(store)
    conn, transport = h.connect()
    conn.data_received(conn.hello(hello()) + encode(heartbeat(1)))
    quiet, quiet_transport = h.connect()
    quiet.data_received(quiet.hello(hello("n2")))  # no heartbeat yet: nothing to repeat
    granted = h.control.leases.expires_at("n1")
    add_volume(store)
    (assignment,) = h.control.step(52.0).published
    h.clock.now = 53.0
    h.server.push_assignments()
    acks = transport.acks()
    assert [a.seq for a in acks] == [1, 1]
    assert acks[1].assignments == (assignment,)
    assert [e.primary_portal for e in acks[1].directory] == ["192.0.2.7:3260"]
    assert h.control.leases.expires_at("n1") == granted  # no grant: the node extends nothing
    assert conn.pushes_sent == 1 and conn.acks_sent == 1
    assert quiet_transport.acks() == []


def test_every_ack_carries_the_directory_of_every_live_volume(store: AuthorityStore) -> None:
    h = Harness(store)
    n1, t1 = h.connect()
    n1.data_received(n1.hello(hello("n1")) + encode(heartbeat(1)))
    n2, t2 = h.connect()
    other = Hello("n2", 1, "192.0.2.8:3261", "192.0.2.8:7000", "192.0.2.8:8080", 1 << 40, 1 << 20)
    n2.data_received(n2.hello(other) + encode(heartbeat(1)))
    assert [a.directory for a in t1.acks() + t2.acks()] == [(), ()]  # no volume yet

    first = add_volume(store)
    h.control.apply_snapshot(h.control.read_authority(), 51.0)  # known, not placed yet
    n2.data_received(encode(heartbeat(2)))
    assert t2.acks()[-1].directory == (DirectoryEntry(first.volume_id, "vol1", None),)

    (placed,) = h.control.step(52.0).published
    assert placed.primary == "n1"  # the most free capacity
    second = store.add_volume("vol2", size=64 * MiB, block_size=512, replicas=1, created_at=2.0)
    h.control.volume_added(second)  # recorded through the API, placed at the next step
    n1.data_received(encode(heartbeat(2)))
    n2.data_received(encode(heartbeat(3)))
    expected = tuple(
        sorted(
            (
                DirectoryEntry(first.volume_id, "vol1", "192.0.2.7:3260"),
                DirectoryEntry(second.volume_id, "vol2", None),
            ),
            key=lambda e: e.volume_id,
        )
    )
    ack1, ack2 = t1.acks()[-1], t2.acks()[-1]
    assert ack1.directory == ack2.directory == expected == volume_directory(h.control)
    assert ack1.assignments == (placed,) and ack2.assignments == ()  # assignments stay per node

    h.control.volume_deleted(first.volume_id)
    n2.data_received(encode(heartbeat(4)))
    assert t2.acks()[-1].directory == (DirectoryEntry(second.volume_id, "vol2", None),)


def test_bytes_split_anywhere_give_the_same_acks(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, transport = h.connect()
    stream = conn.hello(hello()) + encode(heartbeat(1)) + encode(heartbeat(2))
    for i in range(len(stream)):
        conn.data_received(stream[i : i + 1])
    assert [a.seq for a in transport.acks()] == [1, 2]
    assert not transport.closing


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (encode(heartbeat(1)), "refused"),  # Heartbeat before Hello
        (encode(Ack(seq=1, lease_seconds=5.0, assignments=())), "refused"),  # wrong direction
        (None, "refused"),  # another node on this connection (the frames need the link's binding)
        (b"\x00\x00\x00\x03abc", "malformed"),
        (b"\xff\xff\xff\xff", "frame_too_large"),
    ],
)
def test_a_protocol_error_closes_the_connection_without_an_ack(
    store: AuthorityStore, frames: bytes | None, code: str
) -> None:
    h = Harness(store)
    conn, transport = h.connect()
    if frames is None:
        frames = conn.hello(hello()) + conn.hello(hello("n2"))
    conn.data_received(frames + encode(heartbeat(9)))
    assert transport.aborted
    assert transport.acks() == []
    assert h.errors == [code]
    assert conn.closed_reason
    conn.data_received(encode(heartbeat(10)))  # anything after the error is ignored
    assert transport.acks() == []


def test_a_reconnect_with_a_new_incarnation_forgets_old_observations(store: AuthorityStore) -> None:
    h = Harness(store)
    vol = add_volume(store)
    conn, _ = h.connect()
    obs = VolumeObservation(vol.volume_id, 1, Role.PRIMARY, Health.OK, 0, (), True)
    conn.data_received(conn.hello(hello(incarnation=1)) + encode(heartbeat(1, obs)))
    conn.connection_lost(None)
    assert conn.conn not in h.server.connections

    again, transport = h.connect()
    again.data_received(again.hello(hello(incarnation=2)))
    assert h.control.observations.observation("n1", vol.volume_id) is None
    again.data_received(encode(heartbeat(2)))
    assert [a.seq for a in transport.acks()] == [2]


def test_a_node_that_does_not_read_its_acks_is_disconnected(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, transport = h.connect()
    conn.data_received(conn.hello(hello()))
    transport.buffer_size = MAX_WRITE_BUFFER + 1
    conn.data_received(encode(heartbeat(1)))
    assert transport.aborted
    assert h.errors == ["not_reading"]
    assert h.control.leases.expires_at("n1") is None  # an Ack that may never arrive grants nothing


def test_an_ack_answering_a_report_of_a_deleted_volume_carries_its_tombstone(store: AuthorityStore) -> None:
    h = Harness(store)
    n1, t1 = h.connect()
    n1.data_received(n1.hello(hello("n1")) + encode(heartbeat(1)))
    doomed = add_volume(store)
    kept = store.add_volume("vol2", size=64 * MiB, block_size=512, replicas=1, created_at=2.0)
    (first, second) = sorted(h.control.step(52.0).published, key=lambda a: a.volume_id)
    assert first.primary == second.primary == "n1"
    obs = {
        v: VolumeObservation(v, 1, Role.PRIMARY, Health.OK, 0, (), True)
        for v in (doomed.volume_id, kept.volume_id)
    }
    n1.data_received(encode(heartbeat(2, *obs.values())))
    assert t1.acks()[-1].deleted == ()  # nothing deleted yet

    store.delete_volume(doomed.volume_id, deleted_at=3.0)
    h.control.volume_deleted(doomed.volume_id, doomed.name)
    n1.data_received(encode(heartbeat(3, *obs.values())))
    ack = t1.acks()[-1]
    assert ack.seq == 3
    assert ack.deleted == (DeletedVolume(doomed.volume_id, "vol1"),)
    # The rest of the Ack goes on as before, without the deleted volume.
    assert [a.volume_id for a in ack.assignments] == [kept.volume_id]
    assert [e.volume_id for e in ack.directory] == [kept.volume_id]
    assert h.control.leases.expires_at("n1") == h.clock.now + TIMING.lease_seconds

    # A node that does not report the volume hears nothing of it; nor does n1 once it stops.
    n2, t2 = h.connect()
    n2.data_received(n2.hello(hello("n2")) + encode(heartbeat(1, obs[kept.volume_id])))
    assert [a.deleted for a in t2.acks()] == [()]
    n1.data_received(encode(heartbeat(4, obs[kept.volume_id])))
    assert t1.acks()[-1].deleted == ()
    # ... and gets it again while it still reports it (the node may have missed an Ack).
    n2.data_received(encode(heartbeat(2, obs[doomed.volume_id])))
    assert t2.acks()[-1].deleted == (DeletedVolume(doomed.volume_id, "vol1"),)


def test_a_restarted_master_still_sends_the_tombstones(store: AuthorityStore) -> None:
    vol = add_volume(store)
    store.delete_volume(vol.volume_id, deleted_at=2.0)
    h = Harness(store)  # restores from the authority: the delete happened before this master started
    conn, transport = h.connect()
    obs = VolumeObservation(vol.volume_id, 1, Role.PRIMARY, Health.OK, 0, (), True)
    conn.data_received(conn.hello(hello()) + encode(heartbeat(1, obs)))
    (ack,) = transport.acks()
    assert ack == Ack(1, TIMING.lease_seconds, (), (), (DeletedVolume(vol.volume_id, "vol1"),))
    assert not transport.closing


async def test_close_closes_every_connection(store: AuthorityStore) -> None:
    h = Harness(store)
    conns = [h.connect() for _ in range(3)]
    await h.server.close()
    assert all(t.closing for _, t in conns)


# -- the cluster channel and the limits of the heartbeat port (issue 7) ---------------------------


def test_a_plain_heartbeat_frame_without_the_handshake_is_refused_and_counted(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, transport = h.raw()
    conn.data_received(encode(hello()) + encode(heartbeat(1)))
    assert transport.aborted and transport.written == b""
    assert h.refused == ["bad_magic"]
    assert h.hellos == [] and not h.control.observations.known("n1")


def test_a_node_with_the_wrong_secret_is_refused(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, transport = h.raw()
    client = Channel(WRONG, Side.CLIENT, Purpose.HEARTBEAT, 0.0)
    conn.data_received(client.initiate())
    # The client sees the master cannot prove the secret it holds; a rogue sends a MAC anyway.
    conn.data_received(bytes(32))
    assert transport.aborted
    assert h.refused == ["auth_failed"]
    assert not h.control.observations.known("n1")


def test_a_peer_that_gives_up_in_the_handshake_is_counted(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, _ = h.raw()
    client = Channel(WRONG, Side.CLIENT, Purpose.HEARTBEAT, 0.0)
    conn.data_received(client.initiate())
    conn.connection_lost(None)  # the node saw the master's proof fail and left
    assert h.refused == ["handshake_abandoned"]
    assert h.server.handshaking == 0
    link, _ = h.connect()
    link.connection_lost(None)  # an authenticated connection that ends is no refusal
    assert h.refused == ["handshake_abandoned"]


def test_the_handshake_must_complete_in_time(store: AuthorityStore) -> None:
    h = Harness(store, handshake_timeout=5.0)
    conn, transport = h.raw()
    conn.data_received(b"SPR")
    assert conn.deadline() == 55.0
    h.clock.now = 54.9
    conn.check_deadline()
    assert not transport.closing
    h.clock.now = 55.0
    conn.check_deadline()
    assert transport.aborted and h.refused == ["handshake_timeout"]


def test_connections_past_the_handshake_cap_are_closed_at_once(store: AuthorityStore) -> None:
    h = Harness(store, max_handshaking=2)
    pending = [h.raw() for _ in range(2)]
    assert not any(t.closing for _, t in pending)
    _, third = h.raw()
    assert third.aborted and h.refused == ["handshake_cap"]
    pending[0][0].connection_lost(None)  # one leaves the handshake: room for one more
    _, fourth = h.raw()
    assert not fourth.closing
    _, fifth = h.raw()
    assert fifth.aborted and h.refused == ["handshake_cap", "handshake_abandoned", "handshake_cap"]


def test_an_authenticated_connection_leaves_the_handshake_count(store: AuthorityStore) -> None:
    h = Harness(store, max_handshaking=1)
    for _ in range(3):
        link, transport = h.connect()
        assert not transport.closing and link.conn.channel.established
    assert h.server.handshaking == 0


def test_a_truncated_heartbeat_frame_is_closed_after_the_frame_timeout(store: AuthorityStore) -> None:
    h = Harness(store, frame_timeout=2.0)
    link, transport = h.connect()
    link.data_received(link.hello(hello()))
    link.data_received(encode(heartbeat(1))[:-3])  # a whole record holding part of a frame
    assert link.deadline() == 52.0
    h.clock.now = 52.0
    link.check_deadline()
    assert transport.aborted and h.errors == ["frame_timeout"]


def test_a_truncated_record_is_closed_after_the_frame_timeout(store: AuthorityStore) -> None:
    h = Harness(store, frame_timeout=2.0)
    link, transport = h.connect()
    link.conn.data_received(link.client.send(link.hello(hello()))[:-1])
    h.clock.now = 52.0
    link.check_deadline()
    assert transport.aborted and h.errors == ["frame_timeout"]


def test_a_silent_authenticated_connection_is_closed_after_dead_after(store: AuthorityStore) -> None:
    h = Harness(store)
    link, transport = h.connect()
    link.data_received(link.hello(hello()) + encode(heartbeat(1)))
    assert link.deadline() == 50.0 + TIMING.dead_after
    h.clock.now = 50.0 + TIMING.dead_after
    link.check_deadline()
    assert transport.aborted and h.errors == ["idle_timeout"]


def test_a_second_live_incarnation_of_a_node_is_refused_until_the_first_is_gone(
    store: AuthorityStore,
) -> None:
    h = Harness(store)
    real, real_t = h.connect()
    real.data_received(real.hello(hello(incarnation=1)) + encode(heartbeat(1)))

    rogue, rogue_t = h.connect()
    rogue.data_received(rogue.hello(hello(incarnation=2)) + encode(heartbeat(1)))
    (refusal,) = rogue_t.messages()  # no Ack: told why, then closed
    assert rogue_t.closing and isinstance(refusal, Refusal) and refusal.reason == LIVE_INCARNATION
    assert h.refused == [LIVE_INCARNATION]
    assert h.control.observations.hello("n1") == hello(incarnation=1)  # nothing of it recorded
    h.clock.now = 51.0
    real.data_received(encode(heartbeat(2)))
    assert [a.seq for a in real_t.acks()] == [1, 2] and not real_t.closing

    # Silent past dead_after (a host that vanished): the new incarnation is admitted.
    h.clock.now = 51.0 + TIMING.dead_after
    late, late_t = h.connect()
    late.data_received(late.hello(hello(incarnation=3)) + encode(heartbeat(3)))
    assert not late_t.closing and [a.seq for a in late_t.acks()] == [3]

    # A restart (the old connection closed): admitted at once.
    late.connection_lost(None)
    again, again_t = h.connect()
    again.data_received(again.hello(hello(incarnation=4)) + encode(heartbeat(4)))
    assert not again_t.closing and [a.seq for a in again_t.acks()] == [4]
    assert h.refused == [LIVE_INCARNATION]


def test_acks_carry_the_stream_keys_the_primary_and_each_replica_need(store: AuthorityStore) -> None:
    """docs/replication.md, "Who may open a stream": the primary gets a key per replica, a replica
    only its own, in answers and in pushes; a node named by nothing gets none."""
    master_key = b"K" * 32
    h = Harness(store, master_key=master_key)
    links = {}
    for node in ("n1", "n2", "n3"):
        conn, transport = h.connect()
        conn.data_received(conn.hello(hello(node)) + encode(heartbeat(1)))
        links[node] = (conn, transport)
    store.add_volume("vol1", size=64 * MiB, block_size=512, replicas=2, created_at=1.0)
    (assignment,) = h.control.step(52.0).published
    assert assignment.primary is not None
    (replica,) = [n for n in assignment.replicas if n != assignment.primary]
    (bystander,) = {"n1", "n2", "n3"} - set(assignment.replicas)
    key = derive_stream_key(master_key, assignment.volume_id, assignment.epoch, assignment.primary, replica)
    h.server.push_assignments()
    for node in links:
        links[node][0].data_received(encode(heartbeat(2)))
    want = {
        assignment.primary: (StreamKey(assignment.volume_id, replica, key),),
        replica: (StreamKey(assignment.volume_id, replica, key),),
        bystander: (),
    }
    for node, (_, transport) in links.items():
        pushed, answered = transport.acks()[1:]
        assert pushed.stream_keys == answered.stream_keys == want[node], node
    # Without a master key (a unit harness) no key is handed out.
    assert Harness(store).server.stream_keys(assignment.primary, (assignment,)) == ()


# -- node identity (docs/cluster.md, "Node identity") -------------------------------------------------


def test_a_member_saying_hello_as_a_bound_node_with_its_own_key_is_refused(store: AuthorityStore) -> None:
    """The attacker holds the cluster secret (its handshake succeeds) and says Hello as n1, which
    is dead (no live incarnation protects it), proving its own key: refused with a Refusal naming
    why, counted, no Ack (so no assignment, no lease, no stream key); n1's record and binding stay,
    and n1 itself, back with its own key, is admitted."""
    h = Harness(store, master_key=b"K" * 32)
    real, _ = h.connect()
    real.data_received(real.hello(hello(incarnation=1)) + encode(heartbeat(1)))
    store.add_volume("vol1", size=64 * MiB, block_size=512, replicas=1, created_at=1.0)
    (assignment,) = h.control.step(52.0).published
    assert assignment.primary == "n1"
    real.connection_lost(None)  # n1 is killed: its connection closes at once
    recorded = h.control.observations.hello("n1")

    attacker = NodeKey(b"A" * 32)
    rogue, rogue_t = h.connect()
    forged = attacker.sign_hello(hello(incarnation=99), rogue.client.binding)
    forged = dataclasses.replace(forged, iscsi_portal="192.0.2.66:3260")
    rogue.data_received(encode(forged) + encode(heartbeat(1)))
    (refusal,) = rogue_t.messages()
    assert isinstance(refusal, Refusal) and refusal.reason == "key_mismatch"
    assert key_text(attacker.public) in refusal.detail and "sparrow node rekey n1" in refusal.detail
    assert rogue_t.closing and h.refused == ["key_mismatch"]
    assert h.control.observations.hello("n1") == recorded  # nothing of it recorded
    assert h.hellos[-1].incarnation == 1 and store.node_keys() == {"n1": key("n1").public}
    assert h.server.node_keys.key("n1") == key("n1").public

    back, back_t = h.connect()
    back.data_received(back.hello(hello(incarnation=2)) + encode(heartbeat(2)))
    (ack,) = back_t.acks()
    assert ack.assignments == (assignment,)


def test_a_proof_replayed_from_another_connection_or_missing_is_refused(store: AuthorityStore) -> None:
    h = Harness(store)
    first, _ = h.connect()
    recorded = first.hello(hello())  # a member on the path captured it (inside its own channel)
    second, second_t = h.connect()
    second.data_received(recorded + encode(heartbeat(1)))
    third, third_t = h.connect()
    third.data_received(encode(hello("n2")) + encode(heartbeat(1)))  # no proof: a v1 node
    reasons = [m.reason for t in (second_t, third_t) for m in t.messages() if isinstance(m, Refusal)]
    assert reasons == h.refused == ["bad_proof", "no_identity"]
    assert not h.control.observations.known("n1") and not h.control.observations.known("n2")
    assert store.node_keys() == {} and len(h.server.node_keys) == 0


def test_the_first_hello_binds_its_key_and_the_operator_can_rebind_it(store: AuthorityStore) -> None:
    h = Harness(store)
    conn, _ = h.connect()
    conn.data_received(conn.hello(hello()) + encode(heartbeat(1)))
    assert store.node_keys() == {"n1": key("n1").public}  # recorded with the node (upsert_hello)
    conn.connection_lost(None)
    # The node's disk is replaced: a new key is refused until the operator pins it.
    new = NodeKey(b"N" * 32)
    link, link_t = h.connect()
    link.data_received(encode(new.sign_hello(hello(incarnation=8), link.client.binding)))
    assert [m.reason for m in link_t.messages() if isinstance(m, Refusal)] == ["key_mismatch"]
    h.server.node_keys.rebind("n1", new.public)  # what `sparrow node rekey n1 --key ...` does
    again, again_t = h.connect()
    signed = new.sign_hello(hello(incarnation=9), again.client.binding)
    again.data_received(encode(signed) + encode(heartbeat(2)))
    assert [a.seq for a in again_t.acks()] == [2]
    assert store.node_keys() == {"n1": new.public}


def test_a_member_flooding_heartbeats_is_disconnected_and_a_node_at_its_pace_never_is(
    store: AuthorityStore,
) -> None:
    # Each heartbeat costs the master an Ack with every live volume's directory entry (~0.5 ms
    # with 200 volumes): a member sending them as fast as it can would starve the event loop
    # that grants every other node's lease.
    h = Harness(store)
    flood, flood_t = h.connect()
    flood.data_received(flood.hello(hello()))
    burst = MAX_HEARTBEATS_PER_SECOND
    flood.data_received(b"".join(encode(heartbeat(seq)) for seq in range(1, burst + 1)))
    assert len(flood_t.acks()) == burst and not flood_t.aborted  # a burst is answered
    flood.data_received(encode(heartbeat(burst + 1)))
    assert flood_t.aborted and len(flood_t.acks()) == burst and h.errors == ["refused"]
    # A node at many times the fastest pace the tests use (4/s), with bursts of early ones.
    node, node_t = h.connect()
    node.data_received(node.hello(hello("n2")))
    seq = 0
    for _ in range(50):
        h.clock.now += 1.0
        for _ in range(burst // 2):
            seq += 1
            node.data_received(encode(heartbeat(seq)))
    assert len(node_t.acks()) == seq and not node_t.aborted


def test_a_connection_admitted_under_a_key_the_operator_rebound_gets_no_more_acks(
    store: AuthorityStore,
) -> None:
    # `sparrow node rekey` refuses a live node, but a connection admitted before (a node silent
    # past dead_after whose connection the idle timer has not closed yet, or one whose Hello
    # landed while the rekey was being recorded) must not go on as the node under the old key.
    h = Harness(store)
    old, old_t = h.connect()
    old.data_received(old.hello(hello()) + encode(heartbeat(1)))
    assert [a.seq for a in old_t.acks()] == [1]
    h.server.node_keys.rebind("n1", NodeKey(b"N" * 32).public)  # what the rekey route does
    old.push()  # a publish: nothing for it (no assignment, no stream key)
    assert [type(m).__name__ for m in old_t.messages()] == ["Ack"]
    old.data_received(encode(heartbeat(2)))
    sent = old_t.messages()
    assert [type(m).__name__ for m in sent] == ["Ack", "Refusal"] and old.closed_reason
    assert isinstance(sent[1], Refusal) and sent[1].reason == "key_mismatch"
    assert h.refused == ["key_mismatch"]


def test_the_master_proves_its_key_first_on_every_connection(store: AuthorityStore) -> None:
    """As soon as the channel is open, before any Hello, the master sends its MasterHello: its
    identity key and a proof over *this* connection's binding, which the node's pin admits (and
    which fails on another connection: docs/cluster.md, "Master identity")."""
    from sparrow.cluster.heartbeat import decode
    from sparrow.cluster.masteridentity import MasterIdentity, MasterNotProven, MasterPin
    from sparrow.cluster.messages import MasterHello

    identity = MasterIdentity.derive(b"M" * 32)
    h = Harness(store, identity=identity)

    def open_one() -> tuple[MasterHello, bytes]:
        conn, transport = h.raw()
        client = Channel(SECRET, Side.CLIENT, Purpose.HEARTBEAT, 0.0)
        conn.data_received(client.initiate())
        events = client.feed(bytes(transport.written), 0.0)
        sent = len(transport.written)
        conn.data_received(b"".join(e.data for e in events if isinstance(e, HandshakeBytes)))
        plain = b"".join(
            e.data for e in client.feed(bytes(transport.written[sent:]), 0.0) if isinstance(e, Plaintext)
        )
        first = decode(plain)  # exactly one frame, and no Hello was sent yet
        assert isinstance(first, MasterHello)
        return first, client.binding

    first, binding = open_one()
    second, other_binding = open_one()
    pin = MasterPin(identity.public)
    assert pin.admit(first, binding).key == identity.public
    assert pin.admit(second, other_binding).key == identity.public
    with pytest.raises(MasterNotProven):
        pin.admit(first, other_binding)  # a proof is for its own connection only
    assert h.hellos == [] and h.refused == []


def test_a_pending_node_is_heard_but_gets_nothing_until_approved(store: AuthorityStore) -> None:
    """Under the approve policy a node id's first key leaves it pending: its heartbeats keep it
    alive, but its volume reports are dropped, its Acks carry no assignment, directory, stream key
    or discovery CHAP, nothing is pushed to it and the controller places nothing on it; logged
    once. Approved, its next heartbeat gets its assignments."""
    h = Harness(store)
    h.control.node_keys = h.server.node_keys = NodeKeys(policy=AdmissionPolicy.APPROVE)
    h.control.node_keys.approve("n1", key("n1").public)  # an approved member
    member, _ = h.connect()
    member.data_received(member.hello(hello()) + encode(heartbeat(1)))
    vol = add_volume(store)
    (assignment,) = h.control.step(52.0).published
    assert assignment.primary == "n1"

    claim = VolumeObservation(vol.volume_id, 1, Role.REPLICA, Health.OK, 0, (), True)
    with structlog.testing.capture_logs() as logs:
        first, _ = h.connect()
        first.data_received(first.hello(hello("n9")))
        rogue, rogue_t = h.connect()  # says Hello again with the same key: not logged again
        rogue.data_received(rogue.hello(hello("n9")) + encode(heartbeat(1, claim)))
    awaiting = [e for e in logs if e["event"] == "node awaiting approval"]
    assert len(awaiting) == 1 and awaiting[0]["log_level"] == "warning"
    assert (awaiting[0]["node"], awaiting[0]["node_key"]) == ("n9", key("n9").public.hex())
    assert h.control.node_keys.pending() == {"n9"}
    (ack,) = rogue_t.acks()
    assert ack == Ack(seq=1, lease_seconds=TIMING.lease_seconds, assignments=())
    assert h.control.observations.alive("n9", h.clock())
    assert h.control.observations.observation("n9", vol.volume_id) is None  # its word not taken
    assert h.control.leases.expires_at("n9") is None
    h.server.push_assignments()
    assert len(rogue_t.acks()) == 1  # nothing pushed
    assert store.node_keys()["n9"] == key("n9").public and store.approvals() == {}  # recorded, pending

    store.add_volume("vol2", size=64 * MiB, block_size=512, replicas=2, created_at=2.0)
    assert h.control.step(53.0).published == ()  # two copies, one approved node: not placed on n9
    h.control.node_keys.approve("n9")
    (two,) = h.control.step(54.0).published
    assert set(two.replicas) == {"n1", "n9"}
    rogue.data_received(encode(heartbeat(2)))
    assert rogue_t.acks()[-1].assignments == (two,)
