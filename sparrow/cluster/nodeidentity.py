"""Node identity: which node a heartbeat connection speaks for (docs/cluster.md, "Node identity").

The cluster channel (``sparrow.cluster.channel``) proves only that a peer holds the cluster secret,
which every member does; the node id in a Hello was the peer's word. Now each node has a key pair
of its own (Ed25519, made on its first start: ``sparrow.nodekey``, ``DATA_DIR/node.key``), and its
Hello (hello v2) carries the public key and a signature, the *proof*, over::

    b"sparrow node hello v1\\0" | channel binding | node_id | b"\\0" | incarnation (8 bytes, big endian)

The channel binding (``Channel.binding``) is the handshake transcript of this one connection: both
nonces and both ephemeral X25519 shares. So a proof cannot be replayed on another connection, and a
member in the middle (two handshakes, two bindings) cannot pass the real node's proof on: it would
have to sign its own binding with the node's private key, which never leaves the node.

The master keeps the bindings ``node_id -> public key`` (:class:`NodeKeys`, loaded from the
authority, ``nodes.public_key``) and admits a Hello only when (:meth:`NodeKeys.admit`):

- it carries a key and a proof (``no_identity``: a v1 Hello, an older node);
- the proof verifies under the key it carries (``bad_proof``);
- the node id is bound to that key, or to none yet: then it is bound now, *trust on first use*
  as ssh does with host keys (``key_mismatch`` when it is bound to another key).

Each refusal is a :class:`IdentityRefused` whose ``code`` is the label of the master's
``sparrow_master_refused_connections_total{reason}``. An operator changes a binding only on
purpose: ``sparrow node rekey NODE [--key HEX]`` (:meth:`NodeKeys.rebind`; the disk of a node was
replaced, or its key lost) and ``sparrow node forget`` (:meth:`NodeKeys.drop`).

Sans-IO: no files, no sockets, no clock.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from sparrow.cluster.messages import NODE_KEY_SIZE, Hello, InvalidMessage, check_key_bytes, check_node_id

#: Labels the proof so no other signature of the key can pass for it.
PROOF_LABEL = b"sparrow node hello v1\0"
#: The private part of a node key as the key file holds it (the Ed25519 seed).
SEED_SIZE = 32


class IdentityCode(enum.Enum):
    """Why a Hello was not admitted; the value is the refusal's metric label."""

    #: No key or no proof (a hello v1 from an older node).
    NO_IDENTITY = "no_identity"
    #: The proof does not verify under the key the Hello carries.
    BAD_PROOF = "bad_proof"
    #: The node id is bound to another key.
    KEY_MISMATCH = "key_mismatch"


class IdentityRefused(Exception):
    """A Hello the master does not admit; ``code`` says why, ``str()`` is one line for the logs
    of both ends (it names the keys, never anything secret)."""

    def __init__(self, code: IdentityCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def key_text(public: bytes) -> str:
    """How a public key is written (logs, the CLI, the authority): 64 lowercase hex digits."""
    return public.hex()


def parse_key_text(text: str, whose: str = "node") -> bytes:
    """A public key written by :func:`key_text` (``whose`` names it in the reason: a node's or the
    master's, both Ed25519); raises ValueError with a one-line reason."""
    text = text.strip().lower()
    if len(text) != 2 * NODE_KEY_SIZE:
        raise ValueError(f"a {whose} key is {2 * NODE_KEY_SIZE} hex digits, got {len(text)} characters")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"a {whose} key is hex digits") from None
    try:
        Ed25519PublicKey.from_public_bytes(key)
    except ValueError:
        raise ValueError("not an Ed25519 public key") from None
    return key


def proof_message(binding: bytes, node_id: str, incarnation: int) -> bytes:
    """What a Hello's proof signs (the module docstring)."""
    check_node_id("node_id", node_id)
    return PROOF_LABEL + binding + node_id.encode("ascii") + b"\0" + incarnation.to_bytes(8, "big")


@dataclass(frozen=True, slots=True)
class NodeKey:
    """A node's key pair. ``seed`` is the private key (kept out of ``repr``); :attr:`public` is
    what the master binds."""

    seed: bytes = field(repr=False)
    public: bytes = field(init=False)

    def __post_init__(self) -> None:
        if type(self.seed) is not bytes or len(self.seed) != SEED_SIZE:
            raise ValueError(f"a node key's seed is {SEED_SIZE} bytes")
        public = self._private().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        object.__setattr__(self, "public", public)

    @classmethod
    def generate(cls) -> NodeKey:
        private = Ed25519PrivateKey.generate()
        return cls(private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def prove(self, binding: bytes, node_id: str, incarnation: int) -> bytes:
        """The proof of a Hello for ``node_id``/``incarnation`` on the connection of ``binding``."""
        return self._private().sign(proof_message(binding, node_id, incarnation))

    def sign_hello(self, hello: Hello, binding: bytes) -> Hello:
        """``hello`` carrying this key and its proof for the connection of ``binding``."""
        proof = self.prove(binding, hello.node_id, hello.incarnation)
        return dataclasses.replace(hello, node_key=self.public, proof=proof)


def verify(hello: Hello, binding: bytes) -> bytes:
    """The public key of ``hello`` once its proof verifies for the connection of ``binding``;
    raises IdentityRefused (NO_IDENTITY, BAD_PROOF)."""
    if hello.node_key is None or hello.proof is None:
        raise IdentityRefused(
            IdentityCode.NO_IDENTITY,
            f"node {hello.node_id!r} sent no node key (an older node: hello v1); upgrade it",
        )
    try:
        Ed25519PublicKey.from_public_bytes(hello.node_key).verify(
            hello.proof, proof_message(binding, hello.node_id, hello.incarnation)
        )
    except (InvalidSignature, ValueError):
        raise IdentityRefused(
            IdentityCode.BAD_PROOF,
            f"node {hello.node_id!r}: the proof does not verify under key {key_text(hello.node_key)}",
        ) from None
    return hello.node_key


@dataclass(frozen=True, slots=True)
class Admitted:
    """A Hello :meth:`NodeKeys.admit` let in; ``first_use``: its key was bound just now."""

    node_id: str
    key: bytes
    first_use: bool


class NodeKeys:
    """The master's bindings ``node_id -> public key`` (trust on first use; the module docstring).

    Loaded from the authority at the master's start; the authority records a binding with the
    node's record (``AuthorityStore.upsert_hello`` writes the admitted Hello's key), so this map
    and the authority agree once the node's upsert has run."""

    def __init__(self, bindings: Mapping[str, bytes] | None = None) -> None:
        self._keys: dict[str, bytes] = {}
        for node_id, key in (bindings or {}).items():
            self.rebind(node_id, key)

    def key(self, node_id: str) -> bytes | None:
        return self._keys.get(node_id)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def admit(self, hello: Hello, binding: bytes) -> Admitted:
        """Admit ``hello`` on the connection of ``binding``, binding its key on first use; raises
        IdentityRefused."""
        key = verify(hello, binding)
        bound = self._keys.get(hello.node_id)
        if bound is None:
            self._keys[hello.node_id] = key
            return Admitted(hello.node_id, key, first_use=True)
        if bound != key:
            raise IdentityRefused(
                IdentityCode.KEY_MISMATCH,
                f"node {hello.node_id!r} is bound to key {key_text(bound)}, this connection proved "
                f"key {key_text(key)}; if the node's disk was replaced (or its node.key lost), "
                f"run `sparrow node rekey {hello.node_id} --key {key_text(key)}` on the master",
            )
        return Admitted(hello.node_id, key, first_use=False)

    def rebind(self, node_id: str, key: bytes | None) -> None:
        """The operator's binding: ``key``, or none (the next Hello binds on first use)."""
        check_node_id("node_id", node_id)
        if key is None:
            self._keys.pop(node_id, None)
            return
        try:
            check_key_bytes("key", key, NODE_KEY_SIZE)
        except InvalidMessage as e:
            raise ValueError(str(e)) from None
        self._keys[node_id] = key

    def drop(self, node_id: str) -> None:
        """The node was forgotten: its next Hello is a new node's."""
        self._keys.pop(node_id, None)
