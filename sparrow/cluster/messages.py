"""Control-plane messages (docs/cluster.md, "Messages").

Frozen dataclasses for what nodes and the master say to each other; the wire form is in
``sparrow.cluster.heartbeat``. Every message validates its fields when it is built, so an invalid
message can neither be sent nor come out of the decoder: a bad field raises :class:`InvalidMessage`
(the codec turns it into ``HeartbeatProtocolError(BAD_FIELD, ...)``).

Node -> master: :class:`Hello` once per connection, then :class:`Heartbeat` every interval.
Master -> node: :class:`Ack` for each heartbeat, carrying the lease, the node's assignments and the
volume directory (every live volume's primary portal, :class:`DirectoryEntry`), so that any node can
point a login or a SendTargets at the primary of a volume it holds no copy of.

Heartbeats are observations, never authority: an epoch in a :class:`VolumeObservation` is what the
node *has*, and only the master's :class:`Assignment` says what it *should* have.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

from sparrow.cluster.epoch import Epoch

#: Node ids are operator-chosen (docs/cluster.md, "Identities and numbers").
NODE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
#: Volume ids are ``uuid.uuid4().hex``, minted by the master at create.
VOLUME_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
#: Volume names: the same rule as ``store.volumes.NAME_PATTERN``.
VOLUME_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
#: Block sizes a volume may have (``store.volumes.BLOCK_SIZES``).
BLOCK_SIZES = (512, 4096)
#: The longest CHAP name or secret, and the longest backing path, an Assignment may carry (the
#: codec's ``MAX_STR_LEN`` is 1024; RFC 7143 12.1.3 leaves CHAP lengths to the implementation).
MAX_SETTING_LEN = 1024
#: The largest counter (seq, epoch, incarnation): it must fit SQLite's signed 64-bit INTEGER.
MAX_UINT = 2**63 - 1
#: The largest byte count (capacity, free space, sizes, write positions): 4 EiB, far beyond any
#: disk and leaving room for sums in a signed 64-bit integer.
MAX_BYTES = 2**62
#: The most volumes one message may list (observations, assignments, directory, tombstones).
MAX_VOLUMES = 16384
#: The most copies a volume may list (replicas, replica states).
MAX_COPIES = 8
#: The longest lease a master may grant (seconds).
MAX_LEASE_SECONDS = 3600.0
#: Diagnostics a heartbeat carries (heartbeat v3): the distinct unsupported SCSI commands reported
#: per volume, the volumes reported skipped at start, and the longest text of an error or reason
#: (a longer one is cut by :func:`clip`). An iSCSI name is at most 223 bytes (RFC 7143 4.2.7.1).
MAX_UNSUPPORTED = 8
MAX_SKIPPED = 64
MAX_REASON_LEN = 512
MAX_INITIATOR_LEN = 223

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")

_E = TypeVar("_E", bound=enum.Enum)
_R = TypeVar("_R")


class InvalidMessage(ValueError):
    """A message field holds a value the protocol does not allow.

    ``field`` names it (dotted for nested records, e.g. ``observations[2].write_position``).
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Role(enum.Enum):
    """What a node is for one volume."""

    PRIMARY = "primary"
    REPLICA = "replica"
    NONE = "none"


class Health(enum.Enum):
    """How a node's copy of a volume is doing, as the node sees it."""

    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"
    OFFLINE = "offline"


class SyncState(enum.Enum):
    """Where one replica of a volume stands, as its primary sees it."""

    SYNCING = "syncing"
    IN_SYNC = "in_sync"
    FAILED = "failed"


# -- field checks (shared by the constructors; the codec relies on them) --------------------------


def check_node_id(field: str, value: object) -> str:
    """A node id: ``[a-z0-9][a-z0-9.-]{0,62}``."""
    if not isinstance(value, str) or not NODE_ID_PATTERN.fullmatch(value):
        raise InvalidMessage(field, f"not a node id: {value!r}")
    return value


def check_volume_id(field: str, value: object) -> str:
    """A volume id: 32 lowercase hex digits (``uuid4().hex``)."""
    if not isinstance(value, str) or not VOLUME_ID_PATTERN.fullmatch(value):
        raise InvalidMessage(field, f"not a volume id (32 lowercase hex digits): {value!r}")
    return value


def check_volume_name(field: str, value: object) -> str:
    """A volume name: ``[a-z0-9][a-z0-9.-]{0,62}`` (``store.volumes.NAME_PATTERN``)."""
    if not isinstance(value, str) or not VOLUME_NAME_PATTERN.fullmatch(value):
        raise InvalidMessage(field, f"not a volume name: {value!r}")
    return value


def check_uint(field: str, value: object, *, minimum: int = 0, maximum: int = MAX_UINT) -> int:
    """An int in ``[minimum, maximum]`` (default ``2**63 - 1``); ``bool`` is not an int here."""
    if type(value) is not int:
        raise InvalidMessage(field, f"expected an int, got {type(value).__name__}")
    if value < minimum or value > maximum:
        raise InvalidMessage(field, f"{value} is out of range [{minimum}, {maximum}]")
    return value


def check_bytes(field: str, value: object, *, minimum: int = 0) -> int:
    """A byte count in ``[minimum, MAX_BYTES]``."""
    return check_uint(field, value, minimum=minimum, maximum=MAX_BYTES)


def check_count(field: str, items: tuple[object, ...], maximum: int) -> None:
    """A list of at most ``maximum`` items."""
    if len(items) > maximum:
        raise InvalidMessage(field, f"{len(items)} items, at most {maximum} allowed")


def check_bool(field: str, value: object) -> bool:
    if type(value) is not bool:
        raise InvalidMessage(field, f"expected a bool, got {type(value).__name__}")
    return value


def check_seconds(field: str, value: object) -> float:
    """A finite, non-negative duration in seconds (an int is accepted and made a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(field, f"expected a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidMessage(field, f"{value!r} is not a finite non-negative duration")
    return seconds


def split_portal(portal: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6addr]:port`` for IPv6) into host and port; raises InvalidMessage.

    The host is an IPv4 address, a bracketed IPv6 address or an RFC 1123 host name; the port is
    1..65535 in decimal.
    """
    host, sep, port_text = portal.rpartition(":")
    if not sep or not host or not _PORT.fullmatch(port_text):
        raise InvalidMessage("portal", f"not host:port: {portal!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidMessage("portal", f"port {port} out of range in {portal!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidMessage("portal", f"unterminated IPv6 address in {portal!r}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidMessage("portal", f"bad IPv6 address in {portal!r}") from None
        return host[1:-1], port
    labels = host.split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise InvalidMessage("portal", f"bad host in {portal!r}")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidMessage("portal", f"bad IPv4 address in {portal!r}") from None
    return host, port


def check_portal(field: str, value: object) -> str:
    """A portal: ``host:port`` (see :func:`split_portal`)."""
    if not isinstance(value, str):
        raise InvalidMessage(field, f"expected host:port, got {type(value).__name__}")
    try:
        split_portal(value)
    except InvalidMessage as exc:
        raise InvalidMessage(field, exc.reason) from None
    return value


def _check_enum(field: str, value: object, kind: type[_E]) -> _E:
    if not isinstance(value, kind):
        raise InvalidMessage(field, f"expected a {kind.__name__}, got {value!r}")
    return value


def _check_records(field: str, value: object, kind: type[_R]) -> tuple[_R, ...]:
    if not isinstance(value, tuple) or not all(isinstance(item, kind) for item in value):
        raise InvalidMessage(field, f"expected a tuple of {kind.__name__}")
    return value


def check_key_bytes(field: str, value: object, size: int) -> bytes:
    """Exactly ``size`` bytes (a key, a signature)."""
    if type(value) is not bytes or len(value) != size:
        raise InvalidMessage(field, f"expected {size} bytes")
    return value


def clip(text: str, limit: int = MAX_REASON_LEN) -> str:
    """``text`` cut to ``limit`` characters (the cut marked with an ellipsis)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _check_reason(field: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_REASON_LEN:
        raise InvalidMessage(field, f"expected a non-empty string of at most {MAX_REASON_LEN} chars")
    return value


# -- node -> master ---------------------------------------------------------------------------------

#: A node's public key: Ed25519 (sparrow.cluster.nodeidentity).
NODE_KEY_SIZE = 32
#: An Ed25519 signature.
PROOF_SIZE = 64


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on a node's connection: who it is and where it listens.

    ``incarnation`` is new every time the node process starts (e.g. ``time.time_ns()``), so the
    master can tell a restart from a partition.
    """

    node_id: str
    incarnation: int
    iscsi_portal: str
    replication: str
    http: str
    capacity_bytes: int
    free_bytes: int
    #: The node's public key (Ed25519, :data:`NODE_KEY_SIZE` bytes; hello v2, None in a v1 Hello):
    #: the identity the master binds to ``node_id`` (sparrow.cluster.nodeidentity).
    node_key: bytes | None = None
    #: The node's signature over this connection's channel binding and its identity
    #: (``nodeidentity.proof_message``; :data:`PROOF_SIZE` bytes). It belongs to one connection,
    #: so it is not part of what a Hello says about the node: not compared, not in ``repr``.
    proof: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_node_id("node_id", self.node_id)
        check_uint("incarnation", self.incarnation)
        check_portal("iscsi_portal", self.iscsi_portal)
        check_portal("replication", self.replication)
        check_portal("http", self.http)
        check_bytes("capacity_bytes", self.capacity_bytes)
        check_bytes("free_bytes", self.free_bytes)
        if self.node_key is not None:
            check_key_bytes("node_key", self.node_key, NODE_KEY_SIZE)
        if self.proof is not None:
            if self.node_key is None:
                raise InvalidMessage("proof", "a proof without a node_key")
            check_key_bytes("proof", self.proof, PROOF_SIZE)


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """One replica of a volume as its primary sees it: how far it has the data."""

    node_id: str
    state: SyncState
    write_position: int
    #: A SYNCING copy's resync progress: bytes copied and acknowledged, of bytes to copy
    #: (heartbeat v2; both 0 otherwise).
    resync_done: int = 0
    resync_total: int = 0

    def __post_init__(self) -> None:
        check_node_id("node_id", self.node_id)
        _check_enum("state", self.state, SyncState)
        check_bytes("write_position", self.write_position)
        check_bytes("resync_done", self.resync_done)
        check_bytes("resync_total", self.resync_total)
        if self.resync_done > self.resync_total:
            raise InvalidMessage("resync_done", "more than resync_total")


@dataclass(frozen=True, slots=True)
class UnsupportedCommand:
    """A SCSI command a volume's LU answered INVALID COMMAND OPERATION CODE (heartbeat v3):
    ``opcode``, its ``service_action`` (None for an opcode without one), how many times since the
    node started, and the iSCSI name of the last initiator that sent it. Counted by the frontend
    (``frontend.scsi.unsupported``)."""

    opcode: int
    service_action: int | None
    count: int
    last_initiator: str

    def __post_init__(self) -> None:
        check_uint("opcode", self.opcode, maximum=0xFF)
        if self.service_action is not None:
            check_uint("service_action", self.service_action, maximum=0xFFFF)
        check_uint("count", self.count, minimum=1)
        if not isinstance(self.last_initiator, str) or len(self.last_initiator) > MAX_INITIATOR_LEN:
            raise InvalidMessage("last_initiator", f"expected a string of at most {MAX_INITIATOR_LEN} chars")


@dataclass(frozen=True, slots=True)
class SkippedVolume:
    """A volume the node found in its data directory at start and did not load (heartbeat v3):
    its ``name`` (the record's file name) and why (a corrupt or unreadable record, a missing or
    wrong-sized data file or backing, an orphan data file ...; ``store.volumes.load_all``)."""

    name: str
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 255:
            raise InvalidMessage("name", "expected a file name of 1..255 chars")
        _check_reason("reason", self.reason)


@dataclass(frozen=True, slots=True)
class VolumeObservation:
    """What a node has for one volume: the epoch and role it has applied, its health, how far
    its data goes, its replicas' states (when primary), and whether it has converged on its
    latest assignment. Epoch 0 means the node holds no assignment for the volume.

    Diagnostics (heartbeat v3; absent from older heartbeats): ``error``, why the node's last
    attempt to act on the volume's assignment failed (None: it did not), and ``unsupported``, the
    SCSI commands its LU answered as unsupported (at most :data:`MAX_UNSUPPORTED`).
    """

    volume_id: str
    epoch: int
    role: Role
    health: Health
    write_position: int
    replica_states: tuple[ReplicaState, ...]
    converged: bool
    error: str | None = None
    unsupported: tuple[UnsupportedCommand, ...] = ()

    def __post_init__(self) -> None:
        check_volume_id("volume_id", self.volume_id)
        check_uint("epoch", self.epoch)
        _check_enum("role", self.role, Role)
        _check_enum("health", self.health, Health)
        check_bytes("write_position", self.write_position)
        replicas = _check_records("replica_states", self.replica_states, ReplicaState)
        check_count("replica_states", replicas, MAX_COPIES)
        if len({r.node_id for r in replicas}) != len(replicas):
            raise InvalidMessage("replica_states", "a node appears twice")
        check_bool("converged", self.converged)
        if self.error is not None:
            _check_reason("error", self.error)
        unsupported = _check_records("unsupported", self.unsupported, UnsupportedCommand)
        check_count("unsupported", unsupported, MAX_UNSUPPORTED)
        if len({(u.opcode, u.service_action) for u in unsupported}) != len(unsupported):
            raise InvalidMessage("unsupported", "a command appears twice")

    @property
    def restored_epoch(self) -> Epoch:
        """The observed epoch as an :class:`Epoch` (decoding a recorded epoch, not minting)."""
        return Epoch.restore(self.epoch)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic report from a node. ``seq`` increases with every heartbeat the node process sends,
    across reconnects (the node's ``LeaseClock`` relies on it); the Ack echoes it. ``skipped``
    (heartbeat v3): the volumes it did not load at start, and why (at most :data:`MAX_SKIPPED`).
    """

    seq: int
    observations: tuple[VolumeObservation, ...]
    skipped: tuple[SkippedVolume, ...] = ()

    def __post_init__(self) -> None:
        check_uint("seq", self.seq)
        observations = _check_records("observations", self.observations, VolumeObservation)
        check_count("observations", observations, MAX_VOLUMES)
        if len({o.volume_id for o in observations}) != len(observations):
            raise InvalidMessage("observations", "a volume appears twice")
        skipped = _check_records("skipped", self.skipped, SkippedVolume)
        check_count("skipped", skipped, MAX_SKIPPED)


# -- master -> node ---------------------------------------------------------------------------------


def _check_text(field_name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_SETTING_LEN:
        raise InvalidMessage(field_name, f"expected a non-empty string of at most {MAX_SETTING_LEN} chars")
    return value


#: C0 controls and DEL: a CHAP name travels in a login's text (``CHAP_N=name``, NUL-separated
#: pairs, RFC 7143 6.1), where a NUL would end the pair and start another key of the sender's.
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def check_chap_name(field_name: str, value: object) -> str:
    """A CHAP name an operator gives (``user``, ``mutual_user``): :class:`VolumeChap`'s text rule
    and no control character. Checked where a name enters (the API, the configuration), not by
    VolumeChap itself, so that a record written before the rule still loads."""
    _check_text(field_name, value)
    assert isinstance(value, str)
    if _CONTROL.search(value):
        raise InvalidMessage(field_name, "no control characters (a NUL, a newline, an escape) in a CHAP name")
    return value


@dataclass(frozen=True, slots=True)
class VolumeChap:
    """CHAP for one volume's target (RFC 7143 12.1.3): the initiator proves ``user``/``secret``;
    with mutual CHAP the target proves ``mutual_user``/``mutual_secret`` back. Secrets travel on
    the heartbeat connection, sealed by the cluster channel (docs/cluster.md).
    The secrets are left out of ``repr`` so that logging an Assignment never prints them."""

    user: str
    secret: str = field(repr=False)
    mutual_user: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_text("user", self.user)
        _check_text("secret", self.secret)
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise InvalidMessage("mutual_user", "mutual CHAP needs both a user and a secret")
        if self.mutual_user is not None:
            _check_text("mutual_user", self.mutual_user)
            _check_text("mutual_secret", self.mutual_secret)
            if self.mutual_secret == self.secret:
                # RFC 7143 9.2.1: a secret that authenticates initiators must not authenticate a target.
                raise InvalidMessage("mutual_secret", "must differ from the initiator's secret")


@dataclass(frozen=True, slots=True)
class Assignment:
    """What the master has published for one volume at ``epoch``.

    ``replicas`` lists every node holding a copy, primary first; ``primary`` is None (and so is
    ``primary_portal``) when the volume has no primary. ``epoch`` is an int on the wire; use
    :attr:`restored_epoch` for the :class:`Epoch`.

    The volume's export settings (ack schema v3; absent from older Acks): ``physical_block_size``
    (None: the logical block size; SBC-3 6.4.3 LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT), the
    target's ``chap`` (None: no CHAP) and ``backing``, an absolute path of a file or block device
    on the node that holds the data (None: a sparse file in the node's data directory; only the
    embedded one-node mode sets it). Changing a setting is not a reason for a new epoch.

    The in-sync set (ack schema v5; docs/replication.md): ``in_sync`` names the copies the master
    records as holding every acknowledged write, a subsequence of ``replicas`` (so the primary
    first); the primary waits for each of them before it answers a write, and only they may be
    promoted. It changes only under a new epoch. Left empty it means the primary alone (and
    nothing without a primary): what an Ack older than v5 means, and the only safe reading, since
    before v5 no other copy was known to hold the data. ``replication_portals`` is aligned with
    ``replicas``: each copy's replication address (its ``Hello.replication``; None: unknown);
    left empty it means all unknown. A portal is an address, not authority: it may change under
    the same epoch (a replica restarted on another port).

    ``paused`` (ack schema v7; docs/cluster.md, "Pause and resume"): the operator paused the
    volume; its primary answers reads and writes with NOT READY (frontend.scsi.lu). It changes only
    under a new epoch, and every epoch of a paused volume carries it (a failover stays paused).
    """

    volume_id: str
    name: str
    size: int
    block_size: int
    epoch: int
    primary: str | None
    primary_portal: str | None
    replicas: tuple[str, ...]
    physical_block_size: int | None = None
    chap: VolumeChap | None = None
    backing: str | None = None
    in_sync: tuple[str, ...] = ()
    replication_portals: tuple[str | None, ...] = ()
    paused: bool = False

    def __post_init__(self) -> None:
        check_volume_id("volume_id", self.volume_id)
        check_volume_name("name", self.name)
        if type(self.paused) is not bool:
            raise InvalidMessage("paused", f"expected a bool, not {self.paused!r}")
        if type(self.block_size) is not int or self.block_size not in BLOCK_SIZES:
            raise InvalidMessage("block_size", f"must be 512 or 4096, not {self.block_size!r}")
        physical = self.physical_block_size
        if physical is not None and (
            type(physical) is not int or physical not in BLOCK_SIZES or physical < self.block_size
        ):
            raise InvalidMessage(
                "physical_block_size", f"must be 512 or 4096 and at least the block size, not {physical!r}"
            )
        if self.chap is not None and not isinstance(self.chap, VolumeChap):
            raise InvalidMessage("chap", f"expected a VolumeChap, got {type(self.chap).__name__}")
        if self.backing is not None and (
            not _check_text("backing", self.backing).startswith("/") or "\0" in self.backing
        ):
            raise InvalidMessage("backing", f"must be an absolute path, not {self.backing!r}")
        size = check_bytes("size", self.size, minimum=1)
        if size % self.block_size:
            raise InvalidMessage("size", f"{size} is not a multiple of the block size {self.block_size}")
        check_uint("epoch", self.epoch)
        if not isinstance(self.replicas, tuple):
            raise InvalidMessage("replicas", "expected a tuple of node ids")
        check_count("replicas", self.replicas, MAX_COPIES)
        for index, node in enumerate(self.replicas):
            check_node_id(f"replicas[{index}]", node)
        if len(set(self.replicas)) != len(self.replicas):
            raise InvalidMessage("replicas", "a node appears twice")
        if self.primary is None:
            if self.primary_portal is not None:
                raise InvalidMessage("primary_portal", "set without a primary")
        else:
            check_node_id("primary", self.primary)
            if self.primary_portal is None:
                raise InvalidMessage("primary_portal", "missing for a primary")
            check_portal("primary_portal", self.primary_portal)
            if not self.replicas or self.replicas[0] != self.primary:
                raise InvalidMessage("replicas", "must list the primary first")
        self._check_in_sync()
        self._check_replication_portals()

    def _check_in_sync(self) -> None:
        if not isinstance(self.in_sync, tuple):
            raise InvalidMessage("in_sync", "expected a tuple of node ids")
        check_count("in_sync", self.in_sync, MAX_COPIES)
        if not self.in_sync and self.primary is not None:
            object.__setattr__(self, "in_sync", (self.primary,))
        for index, node in enumerate(self.in_sync):
            check_node_id(f"in_sync[{index}]", node)
        position = {node: i for i, node in enumerate(self.replicas)}
        if any(node not in position for node in self.in_sync):
            raise InvalidMessage("in_sync", "names a node that holds no copy")
        indices = [position[node] for node in self.in_sync]
        if indices != sorted(set(indices)):
            raise InvalidMessage("in_sync", "must list copies once each, in the order of replicas")
        if self.in_sync and self.in_sync[0] != self.primary:
            raise InvalidMessage("in_sync", "must list the primary first (and be empty without one)")

    def _check_replication_portals(self) -> None:
        portals = self.replication_portals
        if not isinstance(portals, tuple):
            raise InvalidMessage("replication_portals", "expected a tuple of portals")
        if not portals:
            portals = (None,) * len(self.replicas)
            object.__setattr__(self, "replication_portals", portals)
        if len(portals) != len(self.replicas):
            raise InvalidMessage(
                "replication_portals", f"{len(portals)} portals for {len(self.replicas)} replicas"
            )
        for index, portal in enumerate(portals):
            if portal is not None:
                check_portal(f"replication_portals[{index}]", portal)

    @property
    def restored_epoch(self) -> Epoch:
        """The assignment's epoch as an :class:`Epoch` (decoding a recorded epoch, not minting)."""
        return Epoch.restore(self.epoch)

    def role_of(self, node_id: str) -> Role:
        """The role this assignment gives ``node_id``."""
        if node_id == self.primary:
            return Role.PRIMARY
        if node_id in self.replicas:
            return Role.REPLICA
        return Role.NONE

    def replication_portal(self, node_id: str) -> str | None:
        """Where ``node_id``'s copy listens for replication (None: unknown, or no copy)."""
        if node_id not in self.replicas:
            return None
        return self.replication_portals[self.replicas.index(node_id)]


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """Where one live volume is served: its primary's iSCSI portal (``host:port``), or None while
    the volume has no primary. Every node gets the whole directory, so a node that holds no copy of
    the volume can still answer a login with "target moved temporarily" (RFC 7143 11.13.5) and list
    the primary's portal in SendTargets (RFC 7143 13.8).
    """

    volume_id: str
    name: str
    primary_portal: str | None

    def __post_init__(self) -> None:
        check_volume_id("volume_id", self.volume_id)
        check_volume_name("name", self.name)
        if self.primary_portal is not None:
            check_portal("primary_portal", self.primary_portal)


@dataclass(frozen=True, slots=True)
class DeletedVolume:
    """A tombstone: the volume was deleted through the master (its authority record carries
    ``deleted_at``), so a node that still reports a copy of it destroys that copy."""

    volume_id: str
    name: str

    def __post_init__(self) -> None:
        check_volume_id("volume_id", self.volume_id)
        check_volume_name("name", self.name)


#: The size of a replication stream key (``sparrow.replication.streamauth``).
STREAM_KEY_SIZE = 32


@dataclass(frozen=True, slots=True)
class StreamKey:
    """The key of the replication stream of ``volume_id``, at the epoch of the same Ack's
    assignment, from its primary to ``replica`` (ack v6; docs/replication.md, "Who may open a
    stream"). Derived by the master from a key only it holds; the primary proves it in its OPEN.
    Kept out of ``repr``."""

    volume_id: str
    replica: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_volume_id("volume_id", self.volume_id)
        check_node_id("replica", self.replica)
        if type(self.key) is not bytes or len(self.key) != STREAM_KEY_SIZE:
            raise InvalidMessage("key", f"expected {STREAM_KEY_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Ack:
    """The master's answer to heartbeat ``seq``.

    The lease (``lease_seconds``, counted by the node from when it *sent* heartbeat ``seq``; see
    ``sparrow.cluster.lease``) is granted for every volume whose assignment names the node primary.
    ``assignments`` are the node's own (volumes it holds a copy of); ``directory`` lists every live
    volume of the cluster with its primary's portal (schema v2; empty in a v1 Ack); ``deleted``
    names the deleted volumes among those the heartbeat reported (schema v4; empty before).
    ``stream_keys`` (schema v6; empty before) are the replication stream keys of the assignments
    that name the node primary (one per other copy) or replica (its own): each names a volume
    assigned in this Ack with a primary, and a copy of it other than the primary.
    ``discovery_chap`` (schema v7; None before): the CHAP the node asks of every SendTargets
    (discovery) session, the master's cluster setting (None: none); secrets kept out of ``repr``.
    """

    seq: int
    lease_seconds: float
    assignments: tuple[Assignment, ...]
    directory: tuple[DirectoryEntry, ...] = ()
    deleted: tuple[DeletedVolume, ...] = ()
    stream_keys: tuple[StreamKey, ...] = ()
    discovery_chap: VolumeChap | None = None

    def __post_init__(self) -> None:
        check_uint("seq", self.seq)
        if self.discovery_chap is not None and not isinstance(self.discovery_chap, VolumeChap):
            kind = type(self.discovery_chap).__name__
            raise InvalidMessage("discovery_chap", f"expected a VolumeChap, got {kind}")
        # Normalise an int to a float so equality and the wire form do not depend on the caller.
        object.__setattr__(self, "lease_seconds", check_seconds("lease_seconds", self.lease_seconds))
        if self.lease_seconds > MAX_LEASE_SECONDS:
            raise InvalidMessage("lease_seconds", f"{self.lease_seconds} exceeds {MAX_LEASE_SECONDS}")
        assignments = _check_records("assignments", self.assignments, Assignment)
        check_count("assignments", assignments, MAX_VOLUMES)
        if len({a.volume_id for a in assignments}) != len(assignments):
            raise InvalidMessage("assignments", "a volume appears twice")
        directory = _check_records("directory", self.directory, DirectoryEntry)
        check_count("directory", directory, MAX_VOLUMES)
        if len({e.volume_id for e in directory}) != len(directory):
            raise InvalidMessage("directory", "a volume appears twice")
        deleted = _check_records("deleted", self.deleted, DeletedVolume)
        check_count("deleted", deleted, MAX_VOLUMES)
        if len({d.volume_id for d in deleted}) != len(deleted):
            raise InvalidMessage("deleted", "a volume appears twice")
        live = {a.volume_id for a in assignments} | {e.volume_id for e in directory}
        if any(d.volume_id in live for d in deleted):
            raise InvalidMessage("deleted", "a deleted volume is also assigned or in the directory")
        self._check_stream_keys(assignments)

    def _check_stream_keys(self, assignments: tuple[Assignment, ...]) -> None:
        keys = _check_records("stream_keys", self.stream_keys, StreamKey)
        check_count("stream_keys", keys, MAX_VOLUMES * (MAX_COPIES - 1))
        if len({(k.volume_id, k.replica) for k in keys}) != len(keys):
            raise InvalidMessage("stream_keys", "a (volume, replica) appears twice")
        by_id = {a.volume_id: a for a in assignments}
        for index, k in enumerate(keys):
            a = by_id.get(k.volume_id)
            if a is None or a.primary is None or k.replica == a.primary or k.replica not in a.replicas:
                raise InvalidMessage(
                    f"stream_keys[{index}]", "names no replica of a volume this Ack assigns with a primary"
                )


#: A refusal's ``reason``: the label of the master's refused-connections metric.
REFUSAL_REASON_PATTERN = re.compile(r"[a-z_]{1,32}")
#: The longest ``detail`` of a refusal (one line).
MAX_REFUSAL_DETAIL = 512


@dataclass(frozen=True, slots=True)
class Refusal:
    """Master -> node, the last message on a connection the master refuses after the handshake
    (a Hello it does not admit: sparrow.cluster.nodeidentity, or a live incarnation), so the node
    can log why; the master closes the connection after it (refusal v1, since hello v2).
    ``reason`` is the label the master counts it under, ``detail`` one line for the operator."""

    reason: str
    detail: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not REFUSAL_REASON_PATTERN.fullmatch(self.reason):
            raise InvalidMessage("reason", f"not a refusal reason: {self.reason!r}")
        if not isinstance(self.detail, str) or len(self.detail) > MAX_REFUSAL_DETAIL or "\n" in self.detail:
            raise InvalidMessage("detail", f"expected one line of at most {MAX_REFUSAL_DETAIL} characters")


@dataclass(frozen=True, slots=True)
class MasterHello:
    """Master -> node, the master's first message on every heartbeat connection (master_hello v1):
    its public key (Ed25519, :data:`NODE_KEY_SIZE` bytes) and its signature over this connection's
    channel binding (``masteridentity.proof_message``, :data:`PROOF_SIZE` bytes). The node
    believes nothing else on the connection, and says nothing, before this proves the key it
    pinned (sparrow.cluster.masteridentity; docs/cluster.md, "Master identity")."""

    master_key: bytes
    proof: bytes = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        check_key_bytes("master_key", self.master_key, NODE_KEY_SIZE)
        check_key_bytes("proof", self.proof, PROOF_SIZE)


#: Every message that travels in a heartbeat frame.
Message: TypeAlias = Hello | Heartbeat | Ack | Refusal | MasterHello
