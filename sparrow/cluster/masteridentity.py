"""Master identity: which master a node's heartbeat connection talks to (docs/cluster.md, "Master
identity"). The mirror image of ``sparrow.cluster.nodeidentity``.

The cluster channel proves only that the peer holds the cluster secret, which every member does:
a member could run the handshake *as the master* towards a node and read its Acks (assignments,
stream keys, CHAP secrets) or feed it false assignments. So the master has a key pair of its own,
Ed25519, derived from its master key (``DATA_DIR/master.key``, ``sparrow.masterkey``)::

    seed = HKDF-SHA256(master key, info=b"sparrow master identity v1")

and its first message on every heartbeat connection (:class:`~sparrow.cluster.messages.MasterHello`,
master_hello v1) carries the public key and a signature, the *proof*, over::

    b"sparrow master hello v1\\0" | channel binding

``Channel.binding`` is this connection's handshake transcript (both nonces, both X25519 shares):
a proof cannot be replayed on another connection, and a member in the middle (two handshakes, two
bindings) cannot pass the real master's proof on.

The node keeps one pinned key (:class:`MasterPin`): the operator's (``sparrow node --master-key
HEX``), the one it pinned before (``DATA_DIR/master.pin``, ``sparrow.masterpin``), or none yet,
and then it pins the first master that proves a key (trust on first use). It admits a master only
when (:meth:`MasterPin.admit`):

- the first message is a MasterHello (``no_proof``: an Ack, a Refusal, an older master);
- the proof verifies under the key it carries, for this connection's binding (``bad_proof``);
- the key is the pinned one, or none is pinned yet (``key_mismatch``).

Each refusal is a :class:`MasterNotProven` whose ``code`` is the label of the node's
``sparrow_node_master_refused_total{reason}``. Until a master is admitted the node says nothing
(no Hello) and applies nothing, so its lease lapses and it fences as for a master it cannot reach.

Sans-IO: no files, no sockets, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sparrow.cluster.messages import NODE_KEY_SIZE, InvalidMessage, MasterHello, Message, check_key_bytes
from sparrow.cluster.nodeidentity import key_text, parse_key_text

#: Labels the proof so no other signature of the key can pass for it (nor a node's Hello proof).
PROOF_LABEL = b"sparrow master hello v1\0"
#: What the identity's seed is derived under from the master key.
SEED_INFO = b"sparrow master identity v1"
#: A master's public key (Ed25519), as a node key.
MASTER_KEY_SIZE = NODE_KEY_SIZE


class MasterCode(enum.Enum):
    """Why a master was not admitted; the value is the node's refusal metric label."""

    #: The master's first message was not a MasterHello (an older master, or not a master).
    NO_PROOF = "no_proof"
    #: The proof does not verify under the key it carries, for this connection.
    BAD_PROOF = "bad_proof"
    #: The master proved another key than the pinned one.
    KEY_MISMATCH = "key_mismatch"


class MasterNotProven(Exception):
    """A master the node does not admit; ``code`` says why, ``str()`` is one line naming the keys
    and what the operator should do (never anything secret)."""

    def __init__(self, code: MasterCode, message: str, *, offered: bytes | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: The key the peer proved (None: it proved none).
        self.offered = offered


def proof_message(binding: bytes) -> bytes:
    """What a MasterHello's proof signs (the module docstring)."""
    return PROOF_LABEL + binding


def parse_master_key(text: str) -> bytes:
    """A master public key as :func:`~sparrow.cluster.nodeidentity.key_text` writes it (64 hex
    digits); raises ValueError with a one-line reason."""
    return parse_key_text(text, "master")


@dataclass(frozen=True, slots=True)
class MasterIdentity:
    """The master's key pair. ``seed`` is the private key (kept out of ``repr``); :attr:`public`
    is what the nodes pin."""

    seed: bytes = field(repr=False)
    public: bytes = field(init=False)

    def __post_init__(self) -> None:
        if type(self.seed) is not bytes or len(self.seed) != 32:
            raise ValueError("a master identity's seed is 32 bytes")
        public = self._private().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        object.__setattr__(self, "public", public)

    @classmethod
    def derive(cls, master_key: bytes) -> MasterIdentity:
        """The identity of the master whose master key is ``master_key`` (the module docstring)."""
        if len(master_key) < 32:
            raise ValueError("a master key has at least 32 bytes")
        return cls(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEED_INFO).derive(master_key))

    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def hello(self, binding: bytes) -> MasterHello:
        """The MasterHello proving this key on the connection of ``binding``."""
        return MasterHello(self.public, self._private().sign(proof_message(binding)))


def verify(message: Message, binding: bytes) -> bytes:
    """The key ``message`` proves on the connection of ``binding``, if it is a MasterHello whose
    proof verifies; raises MasterNotProven (NO_PROOF, BAD_PROOF)."""
    if not isinstance(message, MasterHello):
        raise MasterNotProven(
            MasterCode.NO_PROOF,
            f"the master sent a {type(message).__name__} before proving its key "
            "(an older master, or not the master); upgrade the master",
        )
    try:
        Ed25519PublicKey.from_public_bytes(message.master_key).verify(message.proof, proof_message(binding))
    except (InvalidSignature, ValueError):
        raise MasterNotProven(
            MasterCode.BAD_PROOF,
            f"the master's proof does not verify under key {key_text(message.master_key)} "
            "for this connection",
            offered=message.master_key,
        ) from None
    return message.master_key


@dataclass(frozen=True, slots=True)
class MasterAdmitted:
    """A master :meth:`MasterPin.admit` let in; ``first_use``: its key was pinned just now (the
    caller persists it before acting on anything the master says)."""

    key: bytes
    first_use: bool


class MasterPin:
    """The node's pinned master key (trust on first use when none is given; the module docstring)."""

    def __init__(self, pinned: bytes | None = None) -> None:
        if pinned is not None:
            try:
                check_key_bytes("master_key", pinned, MASTER_KEY_SIZE)
            except InvalidMessage as e:
                raise ValueError(str(e)) from None
        self._pinned = pinned

    @property
    def pinned(self) -> bytes | None:
        return self._pinned

    def admit(self, message: Message, binding: bytes) -> MasterAdmitted:
        """Admit the master whose first message on the connection of ``binding`` is ``message``,
        pinning its key on first use; raises MasterNotProven."""
        key = verify(message, binding)
        if self._pinned is None:
            self._pinned = key
            return MasterAdmitted(key, first_use=True)
        if key != self._pinned:
            raise MasterNotProven(
                MasterCode.KEY_MISMATCH,
                f"this node pinned master key {key_text(self._pinned)}, this master proved key "
                f"{key_text(key)}: refused (a member playing master, or the master's key changed); "
                "if it was changed on purpose, take the new key from `sparrow master key` on the "
                "master and restart this node with --master-key KEY (docs/operations.md)",
                offered=key,
            )
        return MasterAdmitted(key, first_use=False)

    def forget_first_use(self, admitted: MasterAdmitted) -> None:
        """Undo a first-use pin the caller could not persist (the next master pins again)."""
        if admitted.first_use and self._pinned == admitted.key:
            self._pinned = None
