"""Who may open a replication stream (sparrow.replication.streamauth): the master's derivation of
the stream keys, what each node's Ack carries, and the OPEN's proof as the replica checks it. Sans-IO:
no sockets, the channel's handshake driven in memory."""

from __future__ import annotations

import dataclasses

import pytest

from sparrow.cluster.channel import Channel, ClusterSecret, HandshakeBytes, Purpose, Side
from sparrow.cluster.messages import Assignment, Role, StreamKey
from sparrow.replication.protocol import (
    ErrorCode,
    MessageDecoder,
    Open,
    Opened,
    PrimaryStream,
    Refuse,
    ReplicaPositions,
    ReplicaStream,
    ReplicationError,
    VolumeView,
    encode,
)
from sparrow.replication.streamauth import derive_stream_key, stream_keys_for

MASTER = b"M" * 32
VID = "0123456789abcdef0123456789abcdef"
SECRET = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")
#: Volume VID at epoch 3: primary n1, replicas n2 and n3 (n3 also a member holding the secret).
ASSIGNMENT = Assignment(VID, "db", 1 << 20, 512, 3, "n1", "10.0.0.1:3260", ("n1", "n2", "n3"))
K2 = derive_stream_key(MASTER, VID, 3, "n1", "n2")
K3 = derive_stream_key(MASTER, VID, 3, "n1", "n3")


def test_every_stream_has_its_own_key_and_only_the_master_key_derives_it() -> None:
    base = (VID, 3, "n1", "n2")
    variants = [
        (MASTER, "f" * 32, 3, "n1", "n2"),
        (MASTER, VID, 4, "n1", "n2"),
        (MASTER, VID, 3, "n3", "n2"),
        (MASTER, VID, 3, "n1", "n3"),
        (b"N" * 32, *base),
        # Length-prefixed ids: ("n1", "n2") and ("n1n", "2") are different streams.
        (MASTER, VID, 3, "n1n", "2"),
    ]
    keys = {derive_stream_key(*v) for v in variants}
    assert len(keys) == len(variants) and K2 not in keys
    assert derive_stream_key(MASTER, *base) == K2  # derivable again: nothing is stored
    with pytest.raises(ValueError):
        derive_stream_key(b"short", *base)


def test_the_primary_gets_a_key_per_replica_and_a_replica_only_its_own() -> None:
    assert stream_keys_for(MASTER, "n1", [ASSIGNMENT]) == (
        StreamKey(VID, "n2", K2),
        StreamKey(VID, "n3", K3),
    )
    assert stream_keys_for(MASTER, "n2", [ASSIGNMENT]) == (StreamKey(VID, "n2", K2),)
    assert stream_keys_for(MASTER, "n4", [ASSIGNMENT]) == ()
    unplaced = Assignment(VID, "db", 1 << 20, 512, 4, None, None, ("n2",))
    assert stream_keys_for(MASTER, "n2", [unplaced]) == ()


def connected() -> tuple[Channel, Channel]:
    """A client and a server channel with the handshake done (in memory)."""
    client = Channel(SECRET, Side.CLIENT, Purpose.REPLICATION, 0.0)
    server = Channel(SECRET, Side.SERVER, Purpose.REPLICATION, 0.0)
    to_server = client.initiate()
    while not (client.established and server.established):
        to_client = b"".join(e.data for e in server.feed(to_server, 0.0) if isinstance(e, HandshakeBytes))
        to_server = b"".join(e.data for e in client.feed(to_client, 0.0) if isinstance(e, HandshakeBytes))
        if to_server:
            server.feed(to_server, 0.0)
            to_server = b""
    return client, server


def test_both_ends_share_a_binding_that_no_other_connection_has() -> None:
    client, server = connected()
    other, _ = connected()
    assert client.binding == server.binding != other.binding
    with pytest.raises(Exception, match="not_established"):
        _ = Channel(SECRET, Side.SERVER, Purpose.REPLICATION, 0.0).binding


def replica_n2(binding: bytes | None, key: bytes | None = K2) -> ReplicaStream:
    """n2's end of a stream: it holds ``key`` for (VID, 3) as replica of n1."""
    view = VolumeView(VID, 3, Role.REPLICA, "n1", 1 << 20, 512, stream_key=key)
    stream = ReplicaStream(lambda vid: view if vid == VID else None, ReplicaPositions())
    stream.binding = binding
    return stream


def refusal(stream: ReplicaStream, open_: Open) -> ErrorCode:
    with pytest.raises(ReplicationError) as e:
        stream.feed(encode(open_))
    return e.value.code


def test_the_primary_that_holds_the_key_opens_the_stream() -> None:
    client, server = connected()
    primary = PrimaryStream(VID, 3, "n1", session=9)
    primary.authorize(K2, client.binding)
    [opened] = replica_n2(server.binding).feed(primary.open(0.0))
    assert isinstance(opened, Opened) and primary.feed(opened.ack)[0].applied_seq == 0


def test_a_member_that_is_not_the_primary_is_refused_even_claiming_to_be_it() -> None:
    """n3 holds the cluster secret and a key of its own for this volume and epoch (as a replica);
    neither lets it write into n2's copy as "n1"."""
    client, server = connected()
    claim = Open(VID, 3, 1, "n1")
    assert refusal(replica_n2(server.binding), claim) is ErrorCode.NOT_AUTHORIZED  # no proof
    assert refusal(replica_n2(server.binding), claim.signed(K3, client.binding)) is ErrorCode.NOT_AUTHORIZED
    forged = derive_stream_key(b"guessed master key".ljust(32), VID, 3, "n1", "n2")
    assert (
        refusal(replica_n2(server.binding), claim.signed(forged, client.binding)) is ErrorCode.NOT_AUTHORIZED
    )
    # The key of an earlier epoch (a deposed primary's) proves nothing at this one.
    old = derive_stream_key(MASTER, VID, 2, "n1", "n2")
    assert refusal(replica_n2(server.binding), claim.signed(old, client.binding)) is ErrorCode.NOT_AUTHORIZED


def test_an_open_recorded_on_another_connection_is_refused() -> None:
    first_client, first_server = connected()
    _, second_server = connected()
    recorded = Open(VID, 3, 1, "n1").signed(K2, first_client.binding)
    assert isinstance(replica_n2(first_server.binding).feed(encode(recorded))[0], Opened)
    assert refusal(replica_n2(second_server.binding), recorded) is ErrorCode.NOT_AUTHORIZED


@pytest.mark.parametrize(
    "change",
    [{"first_seq": 2}, {"session": 1}, {"report_dirty": True}, {"epoch": 4}],
)
def test_every_field_of_the_open_is_bound_by_its_proof(change: dict[str, object]) -> None:
    client, server = connected()
    signed = Open(VID, 3, 1, "n1").signed(K2, client.binding)
    changed = dataclasses.replace(signed, **change)  # type: ignore[arg-type]
    view = VolumeView(VID, int(changed.epoch), Role.REPLICA, "n1", 1 << 20, 512, stream_key=K2)
    stream = ReplicaStream(lambda vid: view, ReplicaPositions())
    stream.binding = server.binding
    # The proof is checked before the position: first_seq 2 is not_authorized, not a gap.
    assert refusal(stream, changed) is ErrorCode.NOT_AUTHORIZED


def test_a_replica_without_its_key_or_the_channel_binding_refuses_every_open() -> None:
    client, server = connected()
    signed = Open(VID, 3, 1, "n1").signed(K2, client.binding)
    assert refusal(replica_n2(server.binding, key=None), signed) is ErrorCode.NOT_AUTHORIZED
    assert refusal(replica_n2(None), signed) is ErrorCode.NOT_AUTHORIZED
    # And the refusal goes on the wire with its code.
    stream = replica_n2(server.binding, key=None)
    with pytest.raises(ReplicationError) as e:
        stream.feed(encode(signed))
    decoder = MessageDecoder()
    decoder.feed(stream.refusal(e.value))
    answer = decoder.next_message()
    assert isinstance(answer, Refuse) and answer.code is ErrorCode.NOT_AUTHORIZED
