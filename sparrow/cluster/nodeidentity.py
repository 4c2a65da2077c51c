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

Admission (docs/cluster.md, "Node admission"): a binding made on first use says only that the node
id now has *a* key, not that anyone wanted that node in the cluster. So :class:`NodeKeys` also keeps
the operator's *approvals* (``node_id -> key``, the authority's ``node_approvals``), and an admitted
Hello is :attr:`Admission.APPROVED` only when its key is the one approved for the node id; any
other admitted Hello is :attr:`Admission.PENDING`: the master takes its heartbeats, but places
nothing on it, sends it no assignment and believes none of its volume reports, until
``sparrow node approve`` (:meth:`NodeKeys.approve`). Under :attr:`AdmissionPolicy.OPEN` (a lab's
``sparrow master --admission open``) the first key a node id proves is approved with it, as
before. An approval may come before the node's first Hello (``--key``): it binds the node id to
that key at once, so a Hello proving another key is refused (``key_mismatch``). An approval that
names no key (nodes that had no key when the authority was migrated to v9) approves the key the
node's next Hello proves, once.

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


class Admission(enum.Enum):
    """Whether an admitted node is a member (the value is what ``sparrow node list`` shows)."""

    #: Its key is the one approved for its node id: a placement target like any other.
    APPROVED = "approved"
    #: Its key is bound but not approved: heartbeats taken, nothing placed on it.
    PENDING = "pending"


class AdmissionPolicy(enum.Enum):
    """What the master does with a key no one approved (``sparrow master --admission``)."""

    #: Hold the node pending until ``sparrow node approve`` (the default).
    APPROVE = "approve"
    #: Approve the first key a node id proves (trust on first use; labs).
    OPEN = "open"


class ApprovalRefused(Exception):
    """An approval the operator asked for that :meth:`NodeKeys.approve` refuses; one line."""


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
    """A Hello :meth:`NodeKeys.admit` let in; ``first_use``: its key was bound just now;
    ``admission``: whether the node is a member; ``newly_approved``: its key was approved just now
    (the open policy, or an approval that named no key), so the caller records the approval."""

    node_id: str
    key: bytes
    first_use: bool
    admission: Admission = Admission.APPROVED
    newly_approved: bool = False


def _checked_key(node_id: str, key: bytes) -> bytes:
    check_node_id("node_id", node_id)
    try:
        check_key_bytes("key", key, NODE_KEY_SIZE)
    except InvalidMessage as e:
        raise ValueError(str(e)) from None
    return key


class NodeKeys:
    """The master's bindings ``node_id -> public key`` (trust on first use) and approvals
    ``node_id -> public key`` (the module docstring).

    Loaded from the authority at the master's start; the authority records a binding with the
    node's record (``AuthorityStore.upsert_hello`` writes the admitted Hello's key), so this map
    and the authority agree once the node's upsert has run. An approval ahead of a node's first
    Hello binds its node id too. Without ``approvals`` and ``policy`` (unit harnesses) every
    binding is approved: the policy defaults to OPEN here; the master passes its own."""

    def __init__(
        self,
        bindings: Mapping[str, bytes] | None = None,
        approvals: Mapping[str, bytes | None] | None = None,
        policy: AdmissionPolicy = AdmissionPolicy.OPEN,
    ) -> None:
        self.policy = policy
        self._keys: dict[str, bytes] = {}
        #: node_id -> approved key (None: the key its next Hello proves).
        self._approved: dict[str, bytes | None] = {}
        for node_id, key in (bindings or {}).items():
            self._keys[node_id] = _checked_key(node_id, key)
        if approvals is None:
            if policy is AdmissionPolicy.OPEN:
                self._approved.update(self._keys)
            return
        for node_id, approved in approvals.items():
            if approved is None:
                self._approved[node_id] = None
                continue
            self._approved[node_id] = _checked_key(node_id, approved)
            self._keys.setdefault(node_id, approved)  # approved ahead of its first Hello

    def key(self, node_id: str) -> bytes | None:
        return self._keys.get(node_id)

    def admission(self, node_id: str) -> Admission | None:
        """The node's admission (None: no key bound to it)."""
        key = self._keys.get(node_id)
        if key is None:
            return None
        return Admission.APPROVED if self._approved.get(node_id, b"") == key else Admission.PENDING

    def approved_key(self, node_id: str) -> bytes | None:
        """The key approved for ``node_id`` (None: none, or the key its next Hello proves)."""
        return self._approved.get(node_id)

    def pending(self) -> frozenset[str]:
        """The node ids bound to a key no one approved: no placement target (controller)."""
        return frozenset(n for n in self._keys if self.admission(n) is Admission.PENDING)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def admit(self, hello: Hello, binding: bytes) -> Admitted:
        """Admit ``hello`` on the connection of ``binding``, binding its key on first use; raises
        IdentityRefused."""
        key = verify(hello, binding)
        node_id = hello.node_id
        bound = self._keys.get(node_id)
        if bound is None:
            self._keys[node_id] = key
            return self._admitted(node_id, key, first_use=True)
        if bound != key:
            raise IdentityRefused(
                IdentityCode.KEY_MISMATCH,
                f"node {hello.node_id!r} is bound to key {key_text(bound)}, this connection proved "
                f"key {key_text(key)}; if the node's disk was replaced (or its node.key lost), "
                f"run `sparrow node rekey {hello.node_id} --key {key_text(key)}` on the master",
            )
        return self._admitted(node_id, key, first_use=False)

    def _admitted(self, node_id: str, key: bytes, *, first_use: bool) -> Admitted:
        """``node_id`` proved its bound ``key``: approved, pending, or approved now (the policy, or
        an approval that named no key)."""
        if node_id in self._approved and self._approved[node_id] in (None, key):
            newly = self._approved[node_id] is None
            self._approved[node_id] = key
            return Admitted(node_id, key, first_use, Admission.APPROVED, newly_approved=newly)
        if self.policy is AdmissionPolicy.OPEN:
            self._approved[node_id] = key
            return Admitted(node_id, key, first_use, Admission.APPROVED, newly_approved=True)
        return Admitted(node_id, key, first_use, Admission.PENDING)

    def approve(self, node_id: str, key: bytes | None = None) -> bytes:
        """The operator's approval (``sparrow node approve``); returns the key approved.

        Without ``key``: the key the pending node proved (ApprovalRefused when no key is bound to
        the node id: it has not said Hello, so the operator must name the key). With ``key``
        (``--key``: the operator named it, so it is approved even if the pending node proved
        another): the node id is bound to it at once, so a connection that proved another key
        is refused at its next heartbeat and a Hello proving another key is refused."""
        check_node_id("node_id", node_id)
        bound = self._keys.get(node_id)
        if key is None:
            if bound is None:
                raise ApprovalRefused(
                    f"node {node_id!r} has not said Hello: approve it ahead with --key "
                    "(the key the node logs at start as `node key`)"
                )
            key = bound
        else:
            key = _checked_key(node_id, key)
        self._keys[node_id] = key
        self._approved[node_id] = key
        return key

    def rebind(self, node_id: str, key: bytes | None) -> None:
        """The operator's binding: ``key``, or none (the next Hello binds on first use). A named
        key is approved with it (the operator named it); none drops the approval (under the
        approve policy the next Hello is pending), as ``AuthorityStore.set_node_key`` records it."""
        check_node_id("node_id", node_id)
        if key is None:
            self._keys.pop(node_id, None)
            self._approved.pop(node_id, None)
            return
        self._keys[node_id] = self._approved[node_id] = _checked_key(node_id, key)

    def drop(self, node_id: str) -> None:
        """The node was forgotten: its next Hello is a new node's (pending until approved)."""
        self._keys.pop(node_id, None)
        self._approved.pop(node_id, None)
