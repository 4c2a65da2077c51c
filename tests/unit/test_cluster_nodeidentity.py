"""sparrow.cluster.nodeidentity (sans-IO): a node's key, the proof its Hello carries, and the
master's bindings; and the Hello v2 / Refusal wire form (sparrow.cluster.heartbeat)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from sparrow.cluster.heartbeat import HEADER, ErrorCode, HeartbeatProtocolError, decode, encode
from sparrow.cluster.messages import Hello, InvalidMessage, Refusal
from sparrow.cluster.nodeidentity import (
    Admission,
    AdmissionPolicy,
    ApprovalRefused,
    IdentityCode,
    IdentityRefused,
    NodeKey,
    NodeKeys,
    key_text,
    parse_key_text,
    proof_message,
)

NODE = NodeKey(bytes(range(32)))
ATTACKER = NodeKey(bytes(range(1, 33)))
BINDING = b"SPRW\x02\x01" + b"c" * 64 + b"s" * 64  # a channel binding (the handshake transcript)
OTHER_BINDING = b"SPRW\x02\x01" + b"C" * 64 + b"S" * 64


def hello(node_id: str = "n1", incarnation: int = 7) -> Hello:
    return Hello(node_id, incarnation, "10.0.0.1:3260", "10.0.0.1:3291", "10.0.0.1:3281", 1 << 40, 1 << 30)


def test_a_signed_hello_proves_its_key_for_this_connection_only() -> None:
    signed = NODE.sign_hello(hello(), BINDING)
    assert signed.node_key == NODE.public and signed.proof is not None
    keys = NodeKeys()
    admitted = keys.admit(signed, BINDING)
    assert (admitted.key, admitted.first_use) == (NODE.public, True)
    assert keys.key("n1") == NODE.public
    # Replayed on another connection (a recorded Hello, or a member in the middle relaying it).
    with pytest.raises(IdentityRefused) as e:
        keys.admit(signed, OTHER_BINDING)
    assert e.value.code is IdentityCode.BAD_PROOF
    # The same key on a new connection is the same node: admitted, not a first use.
    again = keys.admit(NODE.sign_hello(hello(incarnation=8), OTHER_BINDING), OTHER_BINDING)
    assert (again.key, again.first_use) == (NODE.public, False)


@pytest.mark.parametrize(
    "forge",
    [
        lambda h: dataclasses.replace(h, node_id="n2"),  # the proof was for n1
        lambda h: dataclasses.replace(h, incarnation=h.incarnation + 1),
        lambda h: dataclasses.replace(h, node_key=ATTACKER.public),  # another key, the node's proof
        lambda h: dataclasses.replace(h, proof=bytes(64)),
        lambda h: dataclasses.replace(h, proof=h.proof[:-1] + bytes([h.proof[-1] ^ 1])),
    ],
)
def test_a_proof_that_does_not_verify_is_refused(forge: object) -> None:
    assert callable(forge)
    forged = forge(NODE.sign_hello(hello(), BINDING))
    keys = NodeKeys()
    with pytest.raises(IdentityRefused) as e:
        keys.admit(forged, BINDING)
    assert e.value.code is IdentityCode.BAD_PROOF
    assert len(keys) == 0  # nothing bound by a failed proof


def test_a_hello_without_a_key_is_refused_as_an_older_node() -> None:
    with pytest.raises(IdentityRefused) as e:
        NodeKeys().admit(hello(), BINDING)
    assert e.value.code is IdentityCode.NO_IDENTITY and "upgrade" in str(e.value)
    keyed = dataclasses.replace(hello(), node_key=NODE.public)  # a key but no proof
    with pytest.raises(IdentityRefused) as e:
        NodeKeys().admit(keyed, BINDING)
    assert e.value.code is IdentityCode.NO_IDENTITY


def test_a_member_with_its_own_key_cannot_speak_for_a_bound_node() -> None:
    keys = NodeKeys({"n1": NODE.public})
    with pytest.raises(IdentityRefused) as e:
        keys.admit(ATTACKER.sign_hello(hello(), BINDING), BINDING)
    assert e.value.code is IdentityCode.KEY_MISMATCH
    message = str(e.value)
    assert "\n" not in message
    assert key_text(NODE.public) in message and key_text(ATTACKER.public) in message
    assert f"sparrow node rekey n1 --key {key_text(ATTACKER.public)}" in message
    assert keys.key("n1") == NODE.public  # unchanged
    # Another node id is free: the attacker binds its own name, not n1's.
    assert keys.admit(ATTACKER.sign_hello(hello("n9"), BINDING), BINDING).first_use


def test_the_operator_rebinds_pins_and_forgets() -> None:
    keys = NodeKeys({"n1": NODE.public})
    replaced = NodeKey(bytes(range(2, 34)))  # the node's new disk made a new key
    keys.rebind("n1", replaced.public)  # pinned: only that key
    with pytest.raises(IdentityRefused):
        keys.admit(ATTACKER.sign_hello(hello(), BINDING), BINDING)
    assert not keys.admit(replaced.sign_hello(hello(), BINDING), BINDING).first_use
    keys.rebind("n1", None)  # unbound: the next Hello binds
    assert keys.admit(ATTACKER.sign_hello(hello(), BINDING), BINDING).first_use
    keys.drop("n1")
    assert keys.key("n1") is None and list(keys) == []
    with pytest.raises(ValueError):
        keys.rebind("n1", b"short")
    with pytest.raises(InvalidMessage):
        keys.rebind("Not An Id", NODE.public)


def test_under_the_approve_policy_a_new_node_is_pending_until_the_operator_approves_its_key() -> None:
    keys = NodeKeys({"n1": NODE.public}, {"n1": NODE.public}, AdmissionPolicy.APPROVE)
    assert keys.admit(NODE.sign_hello(hello(), BINDING), BINDING).admission is Admission.APPROVED
    # A member with the secret says Hello as a node id no one holds: bound, but pending.
    rogue = keys.admit(ATTACKER.sign_hello(hello("n9"), BINDING), BINDING)
    assert (rogue.first_use, rogue.admission, rogue.newly_approved) == (True, Admission.PENDING, False)
    assert keys.pending() == {"n9"} and keys.admission("n9") is Admission.PENDING
    # Saying Hello again does not approve it.
    again = keys.admit(ATTACKER.sign_hello(hello("n9", 8), OTHER_BINDING), OTHER_BINDING)
    assert again.admission is Admission.PENDING and keys.pending() == {"n9"}
    assert keys.approve("n9") == ATTACKER.public  # the operator approves the key it proved
    assert keys.pending() == frozenset() and keys.admission("n9") is Admission.APPROVED
    assert keys.admit(ATTACKER.sign_hello(hello("n9"), BINDING), BINDING).admission is Admission.APPROVED
    # Forgotten: the approval goes with the binding; its next Hello is a new, pending node.
    keys.drop("n9")
    assert keys.admit(ATTACKER.sign_hello(hello("n9"), BINDING), BINDING).admission is Admission.PENDING


def test_an_approval_ahead_pins_the_key_and_an_unnamed_approval_takes_the_next_key_once() -> None:
    keys = NodeKeys({}, {}, AdmissionPolicy.APPROVE)
    with pytest.raises(ApprovalRefused, match="--key"):
        keys.approve("n2")  # never said Hello: the operator must name the key
    keys.approve("n2", NODE.public)
    with pytest.raises(IdentityRefused) as e:
        keys.admit(ATTACKER.sign_hello(hello("n2"), BINDING), BINDING)
    assert e.value.code is IdentityCode.KEY_MISMATCH
    admitted = keys.admit(NODE.sign_hello(hello("n2"), BINDING), BINDING)
    assert (admitted.first_use, admitted.admission) == (False, Admission.APPROVED)
    # A pending node whose key is not the one the operator names: the named key wins.
    keys.admit(ATTACKER.sign_hello(hello("n3"), BINDING), BINDING)
    keys.approve("n3", NODE.public)
    assert keys.key("n3") == NODE.public and keys.admission("n3") is Admission.APPROVED
    # Loaded from the authority: an approval ahead binds; one with no key (a member that had no
    # key when the authority was migrated to v9) approves the key its next Hello proves, once.
    loaded = NodeKeys({}, {"n4": NODE.public, "n5": None}, AdmissionPolicy.APPROVE)
    assert loaded.key("n4") == NODE.public and loaded.pending() == frozenset()
    first = loaded.admit(ATTACKER.sign_hello(hello("n5"), BINDING), BINDING)
    assert (first.admission, first.newly_approved) == (Admission.APPROVED, True)
    assert loaded.approved_key("n5") == ATTACKER.public
    # Rekeyed to none: unbound and no longer approved.
    loaded.rebind("n5", None)
    assert loaded.admit(NODE.sign_hello(hello("n5"), BINDING), BINDING).admission is Admission.PENDING
    with pytest.raises(ValueError):
        keys.approve("n6", b"short")


def test_under_the_open_policy_the_first_key_is_approved_and_recorded() -> None:
    keys = NodeKeys({}, {}, AdmissionPolicy.OPEN)
    first = keys.admit(NODE.sign_hello(hello(), BINDING), BINDING)
    assert (first.admission, first.newly_approved) == (Admission.APPROVED, True)
    again = keys.admit(NODE.sign_hello(hello(), OTHER_BINDING), OTHER_BINDING)
    assert (again.admission, again.newly_approved) == (Admission.APPROVED, False)
    assert keys.pending() == frozenset()
    # A binding left pending under the approve policy is approved by an open master's next Hello.
    held = NodeKeys({"n2": ATTACKER.public}, {}, AdmissionPolicy.OPEN)
    assert held.pending() == {"n2"}
    assert held.admit(ATTACKER.sign_hello(hello("n2"), BINDING), BINDING).newly_approved


def test_key_text_round_trips_and_bad_keys_are_refused() -> None:
    assert parse_key_text(key_text(NODE.public)) == NODE.public
    assert parse_key_text(" " + key_text(NODE.public).upper() + "\n") == NODE.public
    for bad in ("ab" * 31, "zz" * 32, ""):
        with pytest.raises(ValueError):
            parse_key_text(bad)


def test_the_key_stays_out_of_repr_and_the_proof_signs_a_labelled_message() -> None:
    assert NODE.seed.hex() not in repr(NODE)
    message = proof_message(BINDING, "n1", 7)
    assert message.startswith(b"sparrow node hello v1\0" + BINDING)
    assert message.endswith(b"n1\0" + (7).to_bytes(8, "big"))
    assert NODE.seed.hex() not in repr(NODE.sign_hello(hello(), BINDING))
    with pytest.raises(ValueError):
        NodeKey(b"short")
    assert NodeKey.generate().public != NodeKey.generate().public


# -- the wire (hello v2, refusal v1) ------------------------------------------------------------------


def _frame(body: dict[str, object]) -> bytes:
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


V1_HELLO = {
    "t": "hello", "v": 1, "node_id": "n1", "incarnation": 7, "iscsi_portal": "10.0.0.1:3260",
    "replication": "10.0.0.1:3291", "http": "10.0.0.1:3281", "capacity_bytes": 1 << 40,
    "free_bytes": 1 << 30,
}  # fmt: skip


def test_a_hello_v2_carries_the_key_and_proof_and_a_v1_hello_decodes_without() -> None:
    signed = NODE.sign_hello(hello(), BINDING)
    decoded = decode(encode(signed))
    assert isinstance(decoded, Hello) and decoded == signed and decoded.proof == signed.proof
    assert decode(_frame(V1_HELLO)) == hello()
    with pytest.raises(HeartbeatProtocolError) as e:
        decode(_frame({**V1_HELLO, "node_key": key_text(NODE.public)}))  # v1 has no such field
    assert e.value.code is ErrorCode.BAD_FIELD


@pytest.mark.parametrize(
    "fields",
    [
        {"node_key": "ab" * 31, "proof": None},
        {"node_key": "zz" * 32, "proof": None},
        {"node_key": None, "proof": "ab" * 64},  # a proof without a key
        {"node_key": "ab" * 32, "proof": "ab" * 63},
        {"node_key": 5, "proof": None},
    ],
)
def test_a_malformed_key_or_proof_is_a_bad_field(fields: dict[str, object]) -> None:
    with pytest.raises(HeartbeatProtocolError) as e:
        decode(_frame({**V1_HELLO, "v": 2, **fields}))
    assert e.value.code is ErrorCode.BAD_FIELD


def test_a_refusal_travels_and_is_bounded() -> None:
    refusal = Refusal("key_mismatch", "node 'n1' is bound to another key")
    assert decode(encode(refusal)) == refusal
    for reason, detail in (("Bad Reason", "x"), ("key_mismatch", "two\nlines"), ("a", "x" * 513)):
        with pytest.raises(InvalidMessage):
            Refusal(reason, detail)
