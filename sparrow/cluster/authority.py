"""AuthorityStore: the master's durable record of volumes, nodes and published assignments
(docs/cluster.md, "Publisher and AuthorityStore").

SQLite (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL`` (a committed transaction is on disk
when COMMIT returns) and foreign keys on. Every change is one transaction, so a ``kill -9`` at any
instant leaves either the old state or the new one. Tables (schema version 9)::

    meta(id = 1, schema_version)                         store.migrations.sqlitemeta
    volumes(volume_id PK, name, size, block_size, replicas, created_at, deleted_at,
            physical_block_size, chap_user, chap_secret, chap_mutual_user, chap_mutual_secret,
            backing,                                     (the last six: v2, all nullable)
            paused)                                      (v8, 0/1: sparrow volume pause)
    nodes(node_id PK, incarnation, addresses json, capacity, first_seen, last_seen,
          forgotten_at,                                  (v4, nullable)
          draining,                                      (v6, 0/1: sparrow node drain)
          public_key)                                    (v7, 64 hex | NULL: its identity key)
    assignments(volume_id -> volumes, epoch, primary_node, replicas json, created_at,
                in_sync json,                            (v5: the in-sync set, primary first)
                paused,                                  (v8, 0/1: this epoch pauses the volume)
                PRIMARY KEY (volume_id, epoch))
    tokens(token_id PK, role, tenant, name, secret_sha256, created_at, revoked_at)   (v3)
    cluster_settings(id = 1, discovery_chap_user, discovery_chap_secret,
                     discovery_chap_mutual_user, discovery_chap_mutual_secret)       (v8)
    node_approvals(node_id PK, public_key (64 hex | NULL: its next Hello's), approved_at)  (v9)

Rules the schema itself enforces (defence in depth behind the Publisher):

- ``assignments`` is append-only (triggers refuse UPDATE and DELETE), and a new row's epoch must be
  exactly the volume's highest epoch + 1: epochs per volume are 1, 2, 3... with no gap and no reuse.
- a new assignment may not name a forgotten node (``nodes.forgotten_at``; a trigger).
- a token is never deleted, only revoked (``revoked_at``); only the sha256 of its secret is kept
  (sparrow.auth.tokens).
- a volume is never deleted, only marked (``deleted_at``), so its epochs stay recorded and a
  volume id is never reused; ``name`` is unique among volumes not deleted (a partial unique
  index), so a name can be reused after its volume is deleted.

Forgetting a node (``forget_node``): a node that no recorded assignment names is deleted; one that
the history names keeps its row (the history's foreign key) and is marked ``forgotten_at``. A
forgotten node is not a member: ``nodes()`` and ``AuthorityTransaction.node`` leave it out, so it is
not listed, does not bound the size of a new volume, gets no lease at a master's start and cannot
be placed on. Its Hello again (``upsert_node``) makes it a new node. A node the current assignment
of a live volume names is never forgotten (``NodeHoldsCopy``), so an assignment in force never
names a forgotten node. Forgetting a node also drops its approval (``node_approvals``), and so
does rebinding it to no key (``set_node_key``): its next Hello is pending until approved again.

The store never mints an epoch: it has no method that invents an epoch number. It decodes the
recorded ones with ``Epoch.restore``; only ``sparrow.cluster.publisher`` makes new ones.

Schema versions: ``open`` creates a new database at ``SCHEMA_VERSION`` (the v1 tables followed by
the ``store.migrations`` steps, so a new database and a migrated one have the same schema). It
refuses a database of a newer version (``store.metadata.SchemaTooNew``) and also one of an *older*
version (``store.migrations.SchemaTooOld``, whose message is the exact ``sparrow migrate DATA_DIR`` command):
the daemon does not migrate silently on start, because a migration is an operator's act that writes
a backup and a history entry first, and a master that upgraded the schema behind the operator's back
could no longer be rolled back to the previous release.

Times (``created_at``, ``seen_at`` ...) are wall-clock seconds (``time.time()``): they outlive the
process, unlike the monotonic ``now`` of the sans-IO cores. Calls block (an fsync per change): the
asyncio layer runs them in a thread; the connection is shared under a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sparrow.auth.tokens import Role, TokenRecord
from sparrow.cluster.epoch import Epoch
from sparrow.cluster.messages import (
    BLOCK_SIZES,
    NODE_KEY_SIZE,
    VOLUME_NAME_PATTERN,
    Assignment,
    Hello,
    InvalidMessage,
    VolumeChap,
    check_node_id,
    check_portal,
    check_uint,
    check_volume_id,
)
from store.metadata import SchemaTooNew
from store.migrations import (
    AUTHORITY_FILE,
    SchemaTooOld,
    authority_v1_to_v2,
    authority_v2_to_v3,
    authority_v3_to_v4,
    authority_v4_to_v5,
    authority_v5_to_v6,
    authority_v6_to_v7,
    authority_v7_to_v8,
    authority_v8_to_v9,
)
from store.migrations.sqlitemeta import create_meta, immediate_transaction, read_version

log = structlog.get_logger("sparrow.cluster.authority")

#: The schema this code reads and writes (the head of the "authority" steps in store.migrations).
SCHEMA_VERSION = 9
#: How long a statement waits for another connection's lock before failing (milliseconds).
BUSY_TIMEOUT_MS = 5000

_SCHEMA_V1 = (
    """CREATE TABLE volumes (
        volume_id TEXT PRIMARY KEY NOT NULL CHECK (length(volume_id) = 32),
        name TEXT NOT NULL,
        size INTEGER NOT NULL CHECK (size > 0),
        block_size INTEGER NOT NULL CHECK (block_size IN (512, 4096)),
        replicas INTEGER NOT NULL CHECK (replicas >= 1),
        created_at REAL NOT NULL,
        deleted_at REAL
    )""",
    "CREATE UNIQUE INDEX volumes_live_name ON volumes (name) WHERE deleted_at IS NULL",
    """CREATE TRIGGER volumes_never_deleted BEFORE DELETE ON volumes
        BEGIN SELECT RAISE(ABORT, 'volumes are marked deleted (deleted_at), never removed'); END""",
    """CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY NOT NULL,
        incarnation INTEGER NOT NULL,
        addresses TEXT NOT NULL,
        capacity INTEGER NOT NULL CHECK (capacity >= 0),
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    )""",
    """CREATE TABLE assignments (
        volume_id TEXT NOT NULL REFERENCES volumes (volume_id),
        epoch INTEGER NOT NULL CHECK (epoch >= 1),
        primary_node TEXT REFERENCES nodes (node_id),
        replicas TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (volume_id, epoch)
    )""",
    """CREATE TRIGGER assignments_next_epoch BEFORE INSERT ON assignments
        WHEN NEW.epoch IS NOT
            (SELECT coalesce(max(epoch), 0) + 1 FROM assignments WHERE volume_id = NEW.volume_id)
        BEGIN SELECT RAISE(ABORT, 'an assignment epoch must be the volume''s highest epoch + 1'); END""",
    """CREATE TRIGGER assignments_no_update BEFORE UPDATE ON assignments
        BEGIN SELECT RAISE(ABORT, 'assignments are append-only'); END""",
    """CREATE TRIGGER assignments_no_delete BEFORE DELETE ON assignments
        BEGIN SELECT RAISE(ABORT, 'assignments are append-only'); END""",
)


class AuthorityError(Exception):
    """A change the authority store refuses (nothing was written)."""


class NodeHoldsCopy(AuthorityError):
    """A node the current assignment of a live volume names (primary or replica): not forgotten."""

    def __init__(self, node_id: str, volumes: tuple[str, ...]) -> None:
        super().__init__(f"node {node_id!r} holds a copy of {', '.join(volumes)}; move or delete it first")
        self.node_id = node_id
        #: The names of the volumes, sorted.
        self.volumes = volumes


class Forgotten(enum.Enum):
    """What ``AuthorityStore.forget_node`` did."""

    #: No assignment names the node: its row is gone.
    REMOVED = "removed"
    #: The assignment history names it: its row stays, marked ``forgotten_at``.
    MARKED = "marked"


class InvalidAuthorityRecord(AuthorityError, ValueError):
    """A field that may not be stored (bad id, name, size ...)."""


class VolumeExists(AuthorityError):
    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"a volume with {what} already exists")


class UnknownVolume(AuthorityError):
    def __init__(self, volume_id: str) -> None:
        self.volume_id = volume_id
        super().__init__(f"no volume {volume_id} (or it is deleted)")


class UnknownNode(AuthorityError):
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        super().__init__(f"no node {node_id!r} has ever said hello")


class UnknownToken(AuthorityError):
    def __init__(self, token_id: str) -> None:
        self.token_id = token_id
        super().__init__(f"no token {token_id!r} (or it is revoked)")


class NotAnAuthorityDatabase(AuthorityError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path} is not a Sparrow authority database: {reason}")


class AuthorityCorrupt(AuthorityError):
    """The database holds something its own constraints should have made impossible."""


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    volume_id: str
    name: str
    size: int
    block_size: int
    #: How many copies the operator asked for.
    replicas: int
    created_at: float
    deleted_at: float | None = None
    #: The export settings (schema v2), carried by every Assignment of the volume.
    #: None: the logical block size.
    physical_block_size: int | None = None
    #: The target's CHAP (None: none); its secrets stay out of ``repr``.
    chap: VolumeChap | None = None
    #: An absolute path on the node (None: a sparse file in the node's data directory).
    backing: str | None = None
    #: The operator paused it (schema v8; sparrow.cluster.pause publishes it under a new epoch).
    paused: bool = False


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    """Where a node listens, as its Hello said (``host:port`` each)."""

    iscsi_portal: str
    replication: str
    http: str

    def to_json(self) -> str:
        return json.dumps(
            {"iscsi_portal": self.iscsi_portal, "replication": self.replication, "http": self.http},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> NodeAddresses:
        data = json.loads(text)
        return cls(data["iscsi_portal"], data["replication"], data["http"])

    @classmethod
    def from_hello(cls, hello: Hello) -> NodeAddresses:
        return cls(hello.iscsi_portal, hello.replication, hello.http)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    incarnation: int
    addresses: NodeAddresses
    capacity: int
    first_seen: float
    last_seen: float
    #: When it was forgotten (None: a member). ``nodes()`` never returns a forgotten node.
    forgotten_at: float | None = None
    #: The operator is draining it (schema v6): no new copies, its copies moved off.
    draining: bool = False
    #: The public key bound to the node id (schema v7; None: bound at its next Hello).
    public_key: bytes | None = None


def _key_column(public_key: bytes) -> str:
    if type(public_key) is not bytes or len(public_key) != NODE_KEY_SIZE:
        raise InvalidAuthorityRecord(f"public_key: expected {NODE_KEY_SIZE} bytes")
    return public_key.hex()


def _checked(check: Any, field: str, value: object) -> None:
    try:
        check(field, value)
    except InvalidMessage as e:
        raise InvalidAuthorityRecord(str(e)) from None


def _volume_from_row(row: sqlite3.Row) -> VolumeRecord:
    return VolumeRecord(
        row["volume_id"],
        row["name"],
        row["size"],
        row["block_size"],
        row["replicas"],
        row["created_at"],
        row["deleted_at"],
        row["physical_block_size"],
        _chap_from_row(row),
        row["backing"],
        bool(row["paused"]),
    )


def _chap_from_row(row: sqlite3.Row) -> VolumeChap | None:
    if row["chap_user"] is None:
        return None
    try:
        return VolumeChap(
            row["chap_user"], row["chap_secret"], row["chap_mutual_user"], row["chap_mutual_secret"]
        )
    except (InvalidMessage, TypeError) as e:
        raise AuthorityCorrupt(f"volume {row['volume_id']} has invalid CHAP: {e}") from None


def _chap_columns(chap: VolumeChap | None) -> tuple[str | None, str | None, str | None, str | None]:
    if chap is None:
        return (None, None, None, None)
    return (chap.user, chap.secret, chap.mutual_user, chap.mutual_secret)


def _node_from_row(row: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        row["node_id"],
        row["incarnation"],
        NodeAddresses.from_json(row["addresses"]),
        row["capacity"],
        row["first_seen"],
        row["last_seen"],
        row["forgotten_at"],
        bool(row["draining"]),
        None if row["public_key"] is None else bytes.fromhex(row["public_key"]),
    )


def _token_from_row(row: sqlite3.Row) -> TokenRecord:
    try:
        role = Role(row["role"])
    except ValueError:
        raise AuthorityCorrupt(f"token {row['token_id']} has role {row['role']!r}") from None
    return TokenRecord(
        row["token_id"],
        role,
        row["tenant"],
        row["name"],
        row["secret_sha256"],
        row["created_at"],
        row["revoked_at"],
    )


class AuthorityTransaction:
    """Reads and the one assignment write, inside ``AuthorityStore.write_transaction`` (BEGIN
    IMMEDIATE: no other writer can slip in between a read and the write that depends on it)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def volume(self, volume_id: str) -> VolumeRecord | None:
        row = self._conn.execute("SELECT * FROM volumes WHERE volume_id = ?", (volume_id,)).fetchone()
        return None if row is None else _volume_from_row(row)

    def node(self, node_id: str) -> NodeRecord | None:
        """A member node (None: never said hello, or forgotten)."""
        row = self._conn.execute(
            "SELECT * FROM nodes WHERE node_id = ? AND forgotten_at IS NULL", (node_id,)
        ).fetchone()
        return None if row is None else _node_from_row(row)

    def max_epoch(self, volume_id: str) -> Epoch | None:
        """The highest epoch ever recorded for the volume (None: never assigned)."""
        row = self._conn.execute(
            "SELECT max(epoch) FROM assignments WHERE volume_id = ?", (volume_id,)
        ).fetchone()
        return None if row[0] is None else Epoch.restore(row[0])

    def latest_placement(
        self, volume_id: str
    ) -> tuple[str | None, tuple[str, ...], tuple[str, ...], bool] | None:
        """``(primary, replicas, in_sync, paused)`` of the volume's newest assignment (None: never
        assigned)."""
        row = self._conn.execute(
            "SELECT primary_node, replicas, in_sync, paused FROM assignments WHERE volume_id = ? "
            "ORDER BY epoch DESC LIMIT 1",
            (volume_id,),
        ).fetchone()
        if row is None:
            return None
        return (
            row["primary_node"],
            tuple(json.loads(row["replicas"])),
            tuple(json.loads(row["in_sync"])),
            bool(row["paused"]),
        )

    def replication_portals(self, replicas: tuple[str, ...]) -> tuple[str | None, ...]:
        """Each node's replication address as its last Hello said (None: not a member)."""
        return tuple(None if (n := self.node(node)) is None else n.addresses.replication for node in replicas)

    def grow_volume(self, volume_id: str, size: int) -> VolumeRecord:
        """Set a live volume's size: grow only, a multiple of its block size (the same size is
        allowed and changes nothing). Raises UnknownVolume, InvalidAuthorityRecord."""
        volume = self.volume(volume_id)
        if volume is None or volume.deleted_at is not None:
            raise UnknownVolume(volume_id)
        _checked(lambda f, v: check_uint(f, v, minimum=1), "size", size)
        if size % volume.block_size:
            raise InvalidAuthorityRecord(
                f"size: {size} is not a multiple of the block size {volume.block_size}"
            )
        if size < volume.size:
            raise InvalidAuthorityRecord(f"size: volumes only grow ({size} < {volume.size})")
        if size != volume.size:
            self._conn.execute("UPDATE volumes SET size = ? WHERE volume_id = ?", (size, volume_id))
        return dataclasses.replace(volume, size=size)

    def record_assignment(
        self,
        volume_id: str,
        epoch: Epoch,
        primary: str | None,
        replicas: tuple[str, ...],
        created_at: float,
        in_sync: tuple[str, ...],
        paused: bool = False,
    ) -> None:
        """Append an assignment row. Only the Publisher calls this, with the epoch it minted; the
        schema refuses any epoch but the volume's highest + 1, and an ``in_sync`` naming a node
        ``replicas`` does not."""
        try:
            self._conn.execute(
                "INSERT INTO assignments (volume_id, epoch, primary_node, replicas, created_at, in_sync, "
                "paused) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    volume_id,
                    epoch.value,
                    primary,
                    json.dumps(list(replicas)),
                    created_at,
                    json.dumps(list(in_sync)),
                    int(bool(paused)),
                ),
            )
        except sqlite3.IntegrityError as e:
            raise AuthorityError(f"assignment {volume_id} {epoch} refused: {e}") from None


def _make_private(path: Path) -> None:
    """The database holds the volumes' CHAP secrets: it is made, or made again, readable by its
    owner only (0600); SQLite gives its -wal and -shm files the database's mode."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise AuthorityError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            for sidecar in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(sidecar, 0o600)
            log.warning(
                "authority database was readable by others; made it 0600", path=str(path), mode=f"{mode:04o}"
            )
    finally:
        os.close(fd)


class AuthorityStore:
    """The durable authority. Open with :meth:`open`; every method that changes something commits
    before it returns."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path

    # ---- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> AuthorityStore:
        """Open the database at ``path`` (``DATA_DIR/authority.sqlite3`` for ``sparrow migrate`` to
        find it), creating it at ``SCHEMA_VERSION`` if it has no tables yet.

        Raises SchemaTooNew / SchemaTooOld (see the module docstring) and NotAnAuthorityDatabase.
        """
        path = Path(path)
        _make_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" in tables:
                cls._check_version(conn, path)
            elif tables:
                raise NotAnAuthorityDatabase(path, f"it has tables {sorted(tables)} but no meta table")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise AuthorityError(f"cannot put {path} in WAL mode (journal mode is {mode})")
            if "meta" not in tables:
                with immediate_transaction(conn):
                    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                        for statement in _SCHEMA_V1:
                            conn.execute(statement)
                        authority_v1_to_v2.upgrade(conn)
                        authority_v2_to_v3.upgrade(conn)
                        authority_v3_to_v4.upgrade(conn)
                        authority_v4_to_v5.upgrade(conn)
                        authority_v5_to_v6.upgrade(conn)
                        authority_v6_to_v7.upgrade(conn)
                        authority_v7_to_v8.upgrade(conn)
                        authority_v8_to_v9.upgrade(conn)
                        create_meta(conn, SCHEMA_VERSION)
                cls._check_version(conn, path)  # someone else may have created it meanwhile
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @staticmethod
    def _check_version(conn: sqlite3.Connection, path: Path) -> None:
        try:
            found = read_version(conn)
        except Exception as e:
            raise NotAnAuthorityDatabase(path, str(e)) from None
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(path, found, SCHEMA_VERSION)
        if found < SCHEMA_VERSION:
            raise SchemaTooOld(path, found, SCHEMA_VERSION, path.parent)

    @classmethod
    def open_in(cls, data_dir: str | Path) -> AuthorityStore:
        """Open (or create) ``DATA_DIR/authority.sqlite3``."""
        return cls.open(Path(data_dir) / AUTHORITY_FILE)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuthorityStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[AuthorityTransaction]:
        """One BEGIN IMMEDIATE transaction: committed when the block ends, rolled back if it raises."""
        with self._lock, immediate_transaction(self._conn):
            yield AuthorityTransaction(self._conn)

    # ---- volumes ----------------------------------------------------------------------------------

    def add_volume(
        self,
        name: str,
        *,
        size: int,
        block_size: int,
        replicas: int,
        created_at: float,
        volume_id: str | None = None,
        physical_block_size: int | None = None,
        chap: VolumeChap | None = None,
        backing: str | None = None,
    ) -> VolumeRecord:
        """Record a new volume; ``volume_id`` defaults to a fresh ``uuid4().hex`` (the master mints
        volume ids). ``physical_block_size`` is 512 or 4096 and not below ``block_size``;
        ``backing`` an absolute path. Raises VolumeExists (id, or a live volume of that name) and
        InvalidAuthorityRecord."""
        volume_id = uuid.uuid4().hex if volume_id is None else volume_id
        _checked(check_volume_id, "volume_id", volume_id)
        if not isinstance(name, str) or not VOLUME_NAME_PATTERN.fullmatch(name):
            raise InvalidAuthorityRecord(f"name: not a volume name: {name!r}")
        if type(block_size) is not int or block_size not in BLOCK_SIZES:
            raise InvalidAuthorityRecord(f"block_size: must be 512 or 4096, not {block_size!r}")
        _checked(lambda f, v: check_uint(f, v, minimum=1), "size", size)
        if size % block_size:
            raise InvalidAuthorityRecord(f"size: {size} is not a multiple of the block size {block_size}")
        _checked(lambda f, v: check_uint(f, v, minimum=1), "replicas", replicas)
        if physical_block_size is not None and (
            type(physical_block_size) is not int
            or physical_block_size not in BLOCK_SIZES
            or physical_block_size < block_size
        ):
            raise InvalidAuthorityRecord(
                f"physical_block_size: must be 512 or 4096 and not below the block size {block_size}, "
                f"not {physical_block_size!r}"
            )
        if chap is not None and not isinstance(chap, VolumeChap):
            raise InvalidAuthorityRecord(f"chap: not a VolumeChap: {type(chap).__name__}")
        if backing is not None and (
            not isinstance(backing, str) or not backing.startswith("/") or "\0" in backing
        ):
            raise InvalidAuthorityRecord(f"backing: must be an absolute path, not {backing!r}")
        record = VolumeRecord(
            volume_id,
            name,
            size,
            block_size,
            replicas,
            float(created_at),
            None,
            physical_block_size,
            chap,
            backing,
        )
        with self._lock, immediate_transaction(self._conn):
            if self._conn.execute("SELECT 1 FROM volumes WHERE volume_id = ?", (volume_id,)).fetchone():
                raise VolumeExists(f"id {volume_id}")
            if self._conn.execute(
                "SELECT 1 FROM volumes WHERE name = ? AND deleted_at IS NULL", (name,)
            ).fetchone():
                raise VolumeExists(f"name {name!r}")
            self._conn.execute(
                "INSERT INTO volumes (volume_id, name, size, block_size, replicas, created_at, "
                "physical_block_size, chap_user, chap_secret, chap_mutual_user, chap_mutual_secret, backing) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    volume_id,
                    name,
                    size,
                    block_size,
                    replicas,
                    record.created_at,
                    physical_block_size,
                    *_chap_columns(chap),
                    backing,
                ),
            )
        return record

    def delete_volume(self, volume_id: str, *, deleted_at: float) -> VolumeRecord:
        """Mark a live volume deleted (its rows and epochs stay). Raises UnknownVolume."""
        with self._lock, immediate_transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE volumes SET deleted_at = ? WHERE volume_id = ? AND deleted_at IS NULL",
                (float(deleted_at), volume_id),
            )
            if cur.rowcount != 1:
                raise UnknownVolume(volume_id)
            row = self._conn.execute("SELECT * FROM volumes WHERE volume_id = ?", (volume_id,)).fetchone()
        return _volume_from_row(row)

    def set_paused(self, volume_id: str, paused: bool) -> VolumeRecord:
        """Record the operator's pause (or resume) of a live volume; the control loop publishes it
        under the next epoch (sparrow.cluster.pause). Raises UnknownVolume."""
        with self._lock, immediate_transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE volumes SET paused = ? WHERE volume_id = ? AND deleted_at IS NULL",
                (int(bool(paused)), volume_id),
            )
            if cur.rowcount != 1:
                raise UnknownVolume(volume_id)
            row = self._conn.execute("SELECT * FROM volumes WHERE volume_id = ?", (volume_id,)).fetchone()
        return _volume_from_row(row)

    def set_chap(self, volume_id: str, chap: VolumeChap | None) -> VolumeRecord:
        """Replace a live volume's CHAP (None: none). An export setting, not a reason for a new
        epoch: the next Acks carry it (docs/cluster.md). Raises UnknownVolume, InvalidAuthorityRecord."""
        if chap is not None and not isinstance(chap, VolumeChap):
            raise InvalidAuthorityRecord(f"chap: not a VolumeChap: {type(chap).__name__}")
        with self._lock, immediate_transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE volumes SET chap_user = ?, chap_secret = ?, chap_mutual_user = ?, "
                "chap_mutual_secret = ? WHERE volume_id = ? AND deleted_at IS NULL",
                (*_chap_columns(chap), volume_id),
            )
            if cur.rowcount != 1:
                raise UnknownVolume(volume_id)
            row = self._conn.execute("SELECT * FROM volumes WHERE volume_id = ?", (volume_id,)).fetchone()
        return _volume_from_row(row)

    # ---- cluster settings ---------------------------------------------------------------------------

    def discovery_chap(self) -> tuple[bool, VolumeChap | None]:
        """``(recorded, chap)``: the discovery CHAP of every node (None: none), and whether it was
        ever set (``sparrow serve`` seeds it from its configuration only when it never was)."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM cluster_settings WHERE id = 1").fetchone()
        if row is None:
            return False, None
        if row["discovery_chap_user"] is None:
            return True, None
        try:
            chap = VolumeChap(
                row["discovery_chap_user"],
                row["discovery_chap_secret"],
                row["discovery_chap_mutual_user"],
                row["discovery_chap_mutual_secret"],
            )
        except (InvalidMessage, TypeError) as e:
            raise AuthorityCorrupt(f"the discovery CHAP is invalid: {e}") from None
        return True, chap

    def set_discovery_chap(self, chap: VolumeChap | None) -> None:
        """Record the discovery CHAP (None: none). Raises InvalidAuthorityRecord."""
        if chap is not None and not isinstance(chap, VolumeChap):
            raise InvalidAuthorityRecord(f"discovery chap: not a VolumeChap: {type(chap).__name__}")
        with self._lock, immediate_transaction(self._conn):
            self._conn.execute(
                "INSERT INTO cluster_settings (id, discovery_chap_user, discovery_chap_secret, "
                "discovery_chap_mutual_user, discovery_chap_mutual_secret) VALUES (1, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET discovery_chap_user = excluded.discovery_chap_user, "
                "discovery_chap_secret = excluded.discovery_chap_secret, "
                "discovery_chap_mutual_user = excluded.discovery_chap_mutual_user, "
                "discovery_chap_mutual_secret = excluded.discovery_chap_mutual_secret",
                _chap_columns(chap),
            )

    def volume(self, volume_id: str) -> VolumeRecord | None:
        """One volume, deleted or not (None if it never existed)."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM volumes WHERE volume_id = ?", (volume_id,)).fetchone()
        return None if row is None else _volume_from_row(row)

    def volumes(self, *, include_deleted: bool = False) -> tuple[VolumeRecord, ...]:
        """Live volumes (and deleted ones if asked), by name then id."""
        query = "SELECT * FROM volumes"
        if not include_deleted:
            query += " WHERE deleted_at IS NULL"
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY name, volume_id").fetchall()
        return tuple(_volume_from_row(r) for r in rows)

    # ---- nodes ------------------------------------------------------------------------------------

    def upsert_node(
        self,
        node_id: str,
        *,
        incarnation: int,
        addresses: NodeAddresses,
        capacity: int,
        seen_at: float,
        public_key: bytes | None = None,
        approve: bool = False,
    ) -> NodeRecord:
        """Record a node's Hello: insert it, or update everything but ``first_seen``. A forgotten
        node's Hello makes it a new node: ``forgotten_at`` cleared, ``first_seen`` = ``seen_at``.
        ``public_key``: the key the master admitted the Hello with (``NodeKeys.admit``), recorded
        as the node's binding (None keeps a member's binding, and leaves a forgotten node's none).
        ``approve``: the master approved that key with this Hello (``Admitted.newly_approved``:
        ``--admission open``, or an approval that named no key), recorded in ``node_approvals``
        in the same transaction."""
        if approve and public_key is None:
            raise InvalidAuthorityRecord("an approval names the key it approves")
        _checked(check_node_id, "node_id", node_id)
        _checked(check_uint, "incarnation", incarnation)
        _checked(check_uint, "capacity", capacity)
        for field in ("iscsi_portal", "replication", "http"):
            _checked(check_portal, f"addresses.{field}", getattr(addresses, field))
        key = None if public_key is None else _key_column(public_key)
        with self._lock, immediate_transaction(self._conn):
            self._conn.execute(
                "INSERT INTO nodes (node_id, incarnation, addresses, capacity, first_seen, last_seen, "
                "public_key) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                "incarnation = excluded.incarnation, addresses = excluded.addresses, "
                "capacity = excluded.capacity, last_seen = excluded.last_seen, "
                "first_seen = CASE WHEN forgotten_at IS NULL THEN first_seen ELSE excluded.first_seen END, "
                "draining = CASE WHEN forgotten_at IS NULL THEN draining ELSE 0 END, "
                "public_key = coalesce(excluded.public_key, "
                "CASE WHEN forgotten_at IS NULL THEN public_key END), "
                "forgotten_at = NULL",
                (node_id, incarnation, addresses.to_json(), capacity, float(seen_at), float(seen_at), key),
            )
            if approve:
                self._approve(node_id, key, float(seen_at))
            row = self._conn.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return _node_from_row(row)

    def _approve(self, node_id: str, key: str | None, approved_at: float) -> None:
        self._conn.execute(
            "INSERT INTO node_approvals (node_id, public_key, approved_at) VALUES (?, ?, ?) "
            "ON CONFLICT (node_id) DO UPDATE SET public_key = excluded.public_key, "
            "approved_at = excluded.approved_at",
            (node_id, key, approved_at),
        )

    def upsert_hello(self, hello: Hello, *, seen_at: float, approve: bool = False) -> NodeRecord:
        """``upsert_node`` from a Hello (capacity is its ``capacity_bytes``)."""
        return self.upsert_node(
            hello.node_id,
            incarnation=hello.incarnation,
            addresses=NodeAddresses.from_hello(hello),
            capacity=hello.capacity_bytes,
            seen_at=seen_at,
            public_key=hello.node_key,
            approve=approve,
        )

    def forget_node(self, node_id: str, *, forgotten_at: float) -> Forgotten | None:
        """Forget a member node (None: no such member, or already forgotten). A node that no
        recorded assignment names (as primary or replica, any epoch, any volume) is deleted; one
        the history names is marked ``forgotten_at`` (the append-only history keeps its foreign
        key). Raises :class:`NodeHoldsCopy` while the current assignment of a live volume names
        it. Whether the node is alive is the caller's to check (the store keeps no observations)."""
        with self._lock, immediate_transaction(self._conn):
            row = self._conn.execute(
                "SELECT 1 FROM nodes WHERE node_id = ? AND forgotten_at IS NULL", (node_id,)
            ).fetchone()
            if row is None:  # at most an approval ahead of the node's first Hello
                dropped = self._conn.execute("DELETE FROM node_approvals WHERE node_id = ?", (node_id,))
                return Forgotten.REMOVED if dropped.rowcount else None
            holding = self._conn.execute(
                "SELECT DISTINCT v.name FROM volumes v JOIN assignments a ON a.volume_id = v.volume_id "
                "AND a.epoch = (SELECT max(epoch) FROM assignments WHERE volume_id = v.volume_id) "
                "WHERE v.deleted_at IS NULL AND (a.primary_node = ?1 "
                "OR ?1 IN (SELECT value FROM json_each(a.replicas))) ORDER BY v.name",
                (node_id,),
            ).fetchall()
            if holding:
                raise NodeHoldsCopy(node_id, tuple(r["name"] for r in holding))
            named = self._conn.execute(
                "SELECT 1 FROM assignments WHERE primary_node = ?1 "
                "OR ?1 IN (SELECT value FROM json_each(replicas)) LIMIT 1",
                (node_id,),
            ).fetchone()
            self._conn.execute("DELETE FROM node_approvals WHERE node_id = ?", (node_id,))
            if named is None:
                self._conn.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))
                return Forgotten.REMOVED
            self._conn.execute(
                "UPDATE nodes SET forgotten_at = ?, public_key = NULL WHERE node_id = ?",
                (float(forgotten_at), node_id),
            )
            return Forgotten.MARKED

    def set_node_key(
        self, node_id: str, public_key: bytes | None, *, approved_at: float | None = None
    ) -> NodeRecord:
        """Bind a member node to ``public_key``, or to none (its next Hello binds on first use):
        ``sparrow node rekey``. The operator named the key, so it is approved with it (at
        ``approved_at``, default now); rebound to none, the node loses its approval (its next Hello
        is pending). Raises UnknownNode (never said hello, or forgotten)."""
        key = None if public_key is None else _key_column(public_key)
        with self._lock, immediate_transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE nodes SET public_key = ? WHERE node_id = ? AND forgotten_at IS NULL", (key, node_id)
            )
            if cur.rowcount != 1:
                raise UnknownNode(node_id)
            if key is None:
                self._conn.execute("DELETE FROM node_approvals WHERE node_id = ?", (node_id,))
            else:
                self._approve(node_id, key, time.time() if approved_at is None else float(approved_at))
            row = self._conn.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return _node_from_row(row)

    def node_keys(self) -> dict[str, bytes]:
        """The bindings of the member nodes that have one (``NodeKeys``' start)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT node_id, public_key FROM nodes WHERE forgotten_at IS NULL AND public_key IS NOT NULL"
            ).fetchall()
        return {r["node_id"]: bytes.fromhex(r["public_key"]) for r in rows}

    def approvals(self) -> dict[str, bytes | None]:
        """The approved key per node id (None: the key its next Hello proves); ``NodeKeys``' start."""
        with self._lock:
            rows = self._conn.execute("SELECT node_id, public_key FROM node_approvals").fetchall()
        return {
            r["node_id"]: None if r["public_key"] is None else bytes.fromhex(r["public_key"]) for r in rows
        }

    def approve_node(self, node_id: str, public_key: bytes, *, approved_at: float) -> None:
        """Approve ``public_key`` for ``node_id`` (``sparrow node approve``): a pending member's key,
        or ahead of the node's first Hello. A member bound to another key is rebound to this one
        (the operator named it with ``--key``), in the same transaction."""
        _checked(check_node_id, "node_id", node_id)
        key = _key_column(public_key)
        with self._lock, immediate_transaction(self._conn):
            self._conn.execute(
                "UPDATE nodes SET public_key = ? WHERE node_id = ? AND forgotten_at IS NULL", (key, node_id)
            )
            self._approve(node_id, key, float(approved_at))

    def set_draining(self, node_id: str, draining: bool) -> NodeRecord:
        """Mark a member node draining (or not). Raises UnknownNode (never said hello, or forgotten)."""
        with self._lock, immediate_transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE nodes SET draining = ? WHERE node_id = ? AND forgotten_at IS NULL",
                (int(bool(draining)), node_id),
            )
            if cur.rowcount != 1:
                raise UnknownNode(node_id)
            row = self._conn.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return _node_from_row(row)

    def nodes(self, *, include_forgotten: bool = False) -> tuple[NodeRecord, ...]:
        """Member nodes (and forgotten ones if asked), by node id."""
        query = "SELECT * FROM nodes" + ("" if include_forgotten else " WHERE forgotten_at IS NULL")
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY node_id").fetchall()
        return tuple(_node_from_row(r) for r in rows)

    # ---- tokens -------------------------------------------------------------------------------------

    def add_token(self, record: TokenRecord) -> None:
        """Record a new token (only its secret's sha256). Raises InvalidAuthorityRecord."""
        try:
            with self._lock, immediate_transaction(self._conn):
                self._conn.execute(
                    "INSERT INTO tokens (token_id, role, tenant, name, secret_sha256, created_at, "
                    "revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.token_id,
                        record.role.value,
                        record.tenant,
                        record.name,
                        record.secret_sha256,
                        float(record.created_at),
                        record.revoked_at,
                    ),
                )
        except sqlite3.IntegrityError as e:
            raise InvalidAuthorityRecord(f"token {record.token_id}: {e}") from None

    def token(self, token_id: str) -> TokenRecord | None:
        """One token, revoked or not (None: no such id)."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
        return None if row is None else _token_from_row(row)

    def tokens(self, *, include_revoked: bool = False) -> tuple[TokenRecord, ...]:
        """Tokens in force (and revoked ones if asked), oldest first."""
        query = "SELECT * FROM tokens" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY created_at, token_id").fetchall()
        return tuple(_token_from_row(r) for r in rows)

    def has_tokens(self) -> bool:
        """True once any token was ever made (revoked ones count: bootstrap happens once)."""
        with self._lock:
            return self._conn.execute("SELECT 1 FROM tokens LIMIT 1").fetchone() is not None

    def revoke_token(self, token_id: str, *, revoked_at: float) -> TokenRecord:
        """Revoke a token in force; it stops working at once. Raises UnknownToken."""
        with self._lock, immediate_transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (float(revoked_at), token_id),
            )
            if cur.rowcount != 1:
                raise UnknownToken(token_id)
            row = self._conn.execute("SELECT * FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
        return _token_from_row(row)

    # ---- assignments --------------------------------------------------------------------------------

    def max_epoch(self, volume_id: str) -> Epoch | None:
        """The highest epoch ever recorded for the volume, deleted or not (None: never assigned)."""
        with self._lock:
            return AuthorityTransaction(self._conn).max_epoch(volume_id)

    def latest_assignment(self, volume_id: str) -> Assignment | None:
        """The assignment in force for a live volume (None: deleted, unknown, or never assigned)."""
        return self._latest("AND v.volume_id = ?", (volume_id,)).get(volume_id)

    def latest_assignments(self) -> Mapping[str, Assignment]:
        """The assignment in force for every live volume that has one, by volume id."""
        return self._latest("", ())

    def _latest(self, where: str, params: tuple[str, ...]) -> dict[str, Assignment]:
        query = (
            "SELECT v.*, a.epoch, a.primary_node, a.replicas AS placement, a.in_sync, "
            "a.paused AS published_paused, n.addresses "
            "FROM volumes v "
            "JOIN assignments a ON a.volume_id = v.volume_id AND a.epoch = "
            "(SELECT max(epoch) FROM assignments WHERE volume_id = v.volume_id) "
            "LEFT JOIN nodes n ON n.node_id = a.primary_node "
            f"WHERE v.deleted_at IS NULL {where} ORDER BY v.volume_id"
        )
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
            replication = {
                r["node_id"]: NodeAddresses.from_json(r["addresses"]).replication
                for r in self._conn.execute("SELECT node_id, addresses FROM nodes WHERE forgotten_at IS NULL")
            }
        out: dict[str, Assignment] = {}
        for row in rows:
            primary: str | None = row["primary_node"]
            if primary is not None and row["addresses"] is None:
                raise AuthorityCorrupt(f"assignment of {row['volume_id']} names unknown node {primary!r}")
            portal = None if primary is None else NodeAddresses.from_json(row["addresses"]).iscsi_portal
            replicas = tuple(json.loads(row["placement"]))
            try:
                out[row["volume_id"]] = assignment_of(
                    _volume_from_row(row),
                    Epoch.restore(row["epoch"]),
                    primary,
                    portal,
                    replicas,
                    in_sync=tuple(json.loads(row["in_sync"])),
                    replication_portals=tuple(replication.get(node) for node in replicas),
                    paused=bool(row["published_paused"]),
                )
            except InvalidMessage as e:
                raise AuthorityCorrupt(
                    f"assignment of {row['volume_id']} epoch {row['epoch']}: {e}"
                ) from None
        return out


def assignment_of(
    volume: VolumeRecord,
    epoch: Epoch,
    primary: str | None,
    primary_portal: str | None,
    replicas: tuple[str, ...],
    *,
    in_sync: tuple[str, ...],
    replication_portals: tuple[str | None, ...],
    paused: bool = False,
) -> Assignment:
    """The wire Assignment of ``volume`` for a recorded (or just minted) epoch: name, size, block
    size and the export settings come from the volume record; ``in_sync`` and ``paused`` from the
    assignment row (what was published at the epoch, not ``volume.paused``, the operator's wish:
    the two differ until the control loop publishes the change); ``replication_portals`` (aligned
    with ``replicas``) from the nodes' last Hellos."""
    return Assignment(
        volume_id=volume.volume_id,
        name=volume.name,
        size=volume.size,
        block_size=volume.block_size,
        epoch=epoch.value,
        primary=primary,
        primary_portal=primary_portal,
        replicas=replicas,
        physical_block_size=volume.physical_block_size,
        chap=volume.chap,
        backing=volume.backing,
        in_sync=in_sync,
        replication_portals=replication_portals,
        paused=paused,
    )
