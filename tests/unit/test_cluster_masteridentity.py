"""sparrow.cluster.masteridentity: the master proves its key over the channel binding; the node
admits only the key it pinned (or pins the first one). Sans-IO: bindings are bytes, no sockets."""

from __future__ import annotations

import msgpack
import pytest

from sparrow.cluster.channel import Channel, ClusterSecret, Established, HandshakeBytes, Purpose, Side
from sparrow.cluster.heartbeat import HEADER, ErrorCode, HeartbeatProtocolError, decode, encode
from sparrow.cluster.lease import LeaseClock
from sparrow.cluster.masteridentity import (
    MasterCode,
    MasterIdentity,
    MasterNotProven,
    MasterPin,
    parse_master_key,
    proof_message,
    verify,
)
from sparrow.cluster.messages import Ack, Hello, InvalidMessage, MasterHello, Refusal
from sparrow.cluster.nodeidentity import NodeKey, key_text
from sparrow.node.heartbeat_client import HeartbeatSession

MASTER = MasterIdentity.derive(b"M" * 32)
ROGUE = MasterIdentity.derive(b"R" * 32)
BINDING = b"binding of this connection".ljust(160, b".")
OTHER_BINDING = b"binding of another connection".ljust(160, b".")
HELLO = Hello("n1", 7, "10.0.0.1:3260", "10.0.0.1:3291", "127.0.0.1:3281", 1 << 40, 1 << 39)


def test_the_identity_is_derived_from_the_master_key_alone() -> None:
    assert MasterIdentity.derive(b"M" * 32).public == MASTER.public
    assert ROGUE.public != MASTER.public
    assert MasterIdentity.derive(b"M" * 32).seed != b"M" * 32  # derived, not the key itself
    assert "seed" not in repr(MASTER) and MASTER.seed.hex() not in repr(MASTER)
    with pytest.raises(ValueError):
        MasterIdentity.derive(b"short")


def test_a_proof_for_this_binding_admits_and_pins_on_first_use() -> None:
    pin = MasterPin()
    admitted = pin.admit(MASTER.hello(BINDING), BINDING)
    assert admitted.key == MASTER.public and admitted.first_use
    assert pin.pinned == MASTER.public
    again = pin.admit(MASTER.hello(OTHER_BINDING), OTHER_BINDING)  # its next connection
    assert again.key == MASTER.public and not again.first_use


def test_another_key_than_the_pinned_one_is_refused_naming_both() -> None:
    pin = MasterPin(MASTER.public)
    with pytest.raises(MasterNotProven) as e:
        pin.admit(ROGUE.hello(BINDING), BINDING)  # a member with its own key: a valid proof
    assert e.value.code is MasterCode.KEY_MISMATCH and e.value.offered == ROGUE.public
    assert key_text(MASTER.public) in str(e.value) and key_text(ROGUE.public) in str(e.value)
    assert "sparrow master key" in str(e.value) and "--master-key" in str(e.value)
    assert pin.pinned == MASTER.public  # unchanged


def test_a_proof_made_for_another_connection_is_refused() -> None:
    """A member in the middle runs its own handshake with the node (another binding) and relays
    the real master's proof: it does not verify."""
    pin = MasterPin(MASTER.public)
    with pytest.raises(MasterNotProven) as e:
        pin.admit(MASTER.hello(OTHER_BINDING), BINDING)
    assert e.value.code is MasterCode.BAD_PROOF
    fresh = MasterPin()  # nor is it pinned on first use
    with pytest.raises(MasterNotProven):
        fresh.admit(MASTER.hello(OTHER_BINDING), BINDING)
    assert fresh.pinned is None


def test_a_forged_or_borrowed_proof_is_refused() -> None:
    real = MASTER.hello(BINDING)
    pin = MasterPin(MASTER.public)
    # the real key with the rogue's signature over the same binding
    forged = MasterHello(MASTER.public, ROGUE.hello(BINDING).proof)
    with pytest.raises(MasterNotProven) as e:
        pin.admit(forged, BINDING)
    assert e.value.code is MasterCode.BAD_PROOF
    # a node's Hello proof over the binding is no master proof (another label)
    node = NodeKey(b"n" * 32)
    node_proof = node.prove(BINDING, "n1", 7)
    with pytest.raises(MasterNotProven):
        pin.admit(MasterHello(node.public, node_proof), BINDING)
    # a flipped bit
    flipped = bytes([real.proof[0] ^ 1]) + real.proof[1:]
    with pytest.raises(MasterNotProven):
        pin.admit(MasterHello(MASTER.public, flipped), BINDING)
    assert proof_message(BINDING).startswith(b"sparrow master hello v1\0")


@pytest.mark.parametrize(
    "first",
    [Ack(0, 5.0, ()), Refusal("key_mismatch", "no"), HELLO],
    ids=["ack", "refusal", "hello"],
)
def test_no_proof_first_is_refused_and_nothing_is_pinned(first: Ack | Refusal | Hello) -> None:
    pin = MasterPin()
    with pytest.raises(MasterNotProven) as e:
        pin.admit(first, BINDING)
    assert e.value.code is MasterCode.NO_PROOF and e.value.offered is None
    assert pin.pinned is None


def test_an_unpersisted_first_use_pin_is_undone() -> None:
    pin = MasterPin()
    admitted = pin.admit(MASTER.hello(BINDING), BINDING)
    pin.forget_first_use(admitted)
    assert pin.pinned is None
    pinned = MasterPin(MASTER.public)
    pinned.forget_first_use(pinned.admit(MASTER.hello(BINDING), BINDING))  # not a first use
    assert pinned.pinned == MASTER.public


def test_the_master_hello_round_trips_and_bad_fields_are_refused() -> None:
    hello = MASTER.hello(BINDING)
    assert decode(encode(hello)) == hello and verify(decode(encode(hello)), BINDING) == MASTER.public
    with pytest.raises(InvalidMessage):
        MasterHello(b"short", hello.proof)
    with pytest.raises(InvalidMessage):
        MasterHello(MASTER.public, b"short")
    for body in (
        {"t": "master_hello", "v": 1, "master_key": MASTER.public.hex(), "proof": None},
        {"t": "master_hello", "v": 1, "master_key": "zz" * 32, "proof": hello.proof.hex()},
        {"t": "master_hello", "v": 1, "master_key": MASTER.public.hex(), "proof": hello.proof.hex(), "x": 1},
    ):
        payload = msgpack.packb(body, use_bin_type=True)
        with pytest.raises(HeartbeatProtocolError) as e:
            decode(HEADER.pack(len(payload)) + payload)
        assert e.value.code is ErrorCode.BAD_FIELD


def test_parse_master_key() -> None:
    assert parse_master_key(key_text(MASTER.public).upper() + "\n") == MASTER.public
    for bad in ("", "ab" * 31, "zz" * 32):
        with pytest.raises(ValueError):
            parse_master_key(bad)


def _channels() -> tuple[Channel, Channel]:
    secret = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")
    client = Channel(secret, Side.CLIENT, Purpose.HEARTBEAT, 0.0)
    server = Channel(secret, Side.SERVER, Purpose.HEARTBEAT, 0.0)
    to_server = client.initiate()
    while not (client.established and server.established):
        to_client = b"".join(e.data for e in server.feed(to_server, 0.0) if isinstance(e, HandshakeBytes))
        to_server = b"".join(e.data for e in client.feed(to_client, 0.0) if isinstance(e, HandshakeBytes))
        if to_server:
            assert any(isinstance(e, Established) for e in server.feed(to_server, 0.0))
            to_server = b""
    return client, server


def test_both_ends_of_a_real_channel_agree_on_the_binding_the_proof_is_made_over() -> None:
    client, server = _channels()
    pin = MasterPin(MASTER.public)
    assert pin.admit(MASTER.hello(server.binding), client.binding).key == MASTER.public
    other_client, _ = _channels()  # a second connection: a man in the middle's
    with pytest.raises(MasterNotProven):
        pin.admit(MASTER.hello(server.binding), other_client.binding)


def test_the_session_says_nothing_and_believes_nothing_before_the_proof() -> None:
    session = HeartbeatSession(LeaseClock(), MasterPin(MASTER.public))
    session.connection_made(BINDING)
    with pytest.raises(RuntimeError):
        session.hello(HELLO)  # no Hello before the master proved its key
    with pytest.raises(MasterNotProven):
        session.receive(encode(Ack(1, 5.0, ())))
    frame = encode(ROGUE.hello(BINDING))
    assert session.master_proof(frame[:10]) is None  # byte by byte is fine
    with pytest.raises(MasterNotProven):
        session.master_proof(frame[10:])
    assert session.master is None
    session.connection_lost()
    session.connection_made(OTHER_BINDING)
    admitted = None
    for byte in encode(MASTER.hello(OTHER_BINDING)):
        admitted = session.master_proof(bytes([byte]))
    assert admitted is not None and not admitted.first_use
    assert decode(session.hello(HELLO)) == HELLO
