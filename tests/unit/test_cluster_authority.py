"""sparrow.cluster.authority: the master's durable store (docs/cluster.md, "Publisher and
AuthorityStore"): schema and pragmas, versions, volumes, nodes, and the rules the schema enforces."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparrow.auth import tokens
from sparrow.cluster import authority, controller
from sparrow.cluster.authority import (
    SCHEMA_VERSION,
    AuthorityStore,
    InvalidAuthorityRecord,
    NodeAddresses,
    NotAnAuthorityDatabase,
    UnknownToken,
    UnknownVolume,
    VolumeExists,
    VolumeRecord,
)
from sparrow.cluster.epoch import Epoch
from sparrow.cluster.messages import Hello, VolumeChap
from sparrow.cluster.publisher import Publisher
from store.metadata import SchemaTooNew
from store.migrations import AUTHORITY_FILE, SchemaTooOld, default_graph, migrate

VOL_A = "a" * 32
VOL_B = "b" * 32
ADDR_1 = NodeAddresses("10.0.0.1:3260", "10.0.0.1:3261", "10.0.0.1:3280")
ADDR_2 = NodeAddresses("10.0.0.2:3260", "10.0.0.2:3261", "10.0.0.2:3280")


@dataclasses.dataclass(frozen=True)
class Ask:
    volume_id: str
    primary: str | None
    replicas: tuple[str, ...]
    #: The in-sync set (None: every copy, as for a new volume).
    sync: tuple[str, ...] | None = None

    @property
    def in_sync(self) -> tuple[str, ...]:
        return self.replicas if self.sync is None else self.sync


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / AUTHORITY_FILE


@pytest.fixture
def store(path: Path) -> Iterator[AuthorityStore]:
    s = AuthorityStore.open(path)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def add(store: AuthorityStore, name: str = "vol1", volume_id: str = VOL_A) -> VolumeRecord:
    return store.add_volume(
        name, size=1 << 20, block_size=512, replicas=2, created_at=100.0, volume_id=volume_id
    )


# --- opening ---------------------------------------------------------------------------------------


def test_open_creates_the_schema_in_wal_with_full_sync(store: AuthorityStore, path: Path) -> None:
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    other = raw(path)
    tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {
        "meta", "volumes", "nodes", "assignments", "tokens", "cluster_settings", "node_approvals"
    }  # fmt: skip
    assert other.execute("SELECT schema_version FROM meta").fetchall() == [(SCHEMA_VERSION,)]
    other.close()


def test_the_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It holds the volumes' CHAP secrets: made 0600 (and its WAL with it), an older 0644 one too."""
    made = tmp_path / "made.sqlite3"
    with AuthorityStore.open(made) as store:
        chap = VolumeChap("u", "s3cret-s3cret", None, None)
        store.add_volume("v", size=1 << 20, block_size=512, replicas=1, created_at=0.0, chap=chap)
        for f in (made, made.with_name(made.name + "-wal")):
            assert f.stat().st_mode & 0o777 == 0o600, f
    older = tmp_path / "older.sqlite3"
    shutil.copy(made, older)
    older.chmod(0o644)
    with AuthorityStore.open(older):
        pass
    assert older.stat().st_mode & 0o777 == 0o600


def test_reopen_keeps_everything(path: Path) -> None:
    with AuthorityStore.open(path) as s:
        add(s)
        s.upsert_node("n1", incarnation=7, addresses=ADDR_1, capacity=10, seen_at=5.0)
        Publisher(s, wall_clock=lambda: 1.0).publish(Ask(VOL_A, "n1", ("n1",)))
    with AuthorityStore.open(path) as s:
        assert [v.volume_id for v in s.volumes()] == [VOL_A]
        assert [(n.node_id, n.incarnation) for n in s.nodes()] == [("n1", 7)]
        assert s.max_epoch(VOL_A) == Epoch.restore(1)


def test_a_newer_schema_is_refused_naming_both_versions(path: Path) -> None:
    AuthorityStore.open(path).close()
    conn = raw(path)
    conn.execute("UPDATE meta SET schema_version = ?", (SCHEMA_VERSION + 4,))
    conn.close()
    with pytest.raises(SchemaTooNew) as info:
        AuthorityStore.open(path)
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 4, SCHEMA_VERSION)
    assert f"schema version {SCHEMA_VERSION + 4}" in str(info.value)
    assert f"reads up to {SCHEMA_VERSION}" in str(info.value)


V1_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v1" / AUTHORITY_FILE


def test_a_v1_store_is_refused_with_the_migrate_command_and_migrate_fixes_it(tmp_path: Path) -> None:
    path = tmp_path / AUTHORITY_FILE
    shutil.copyfile(V1_FIXTURE, path)
    assert SCHEMA_VERSION == 9
    with pytest.raises(SchemaTooOld) as info:
        AuthorityStore.open(path)
    assert (info.value.found, info.value.required) == (1, 9)
    assert info.value.command == f"sparrow migrate {tmp_path}"
    assert str(info.value) == (
        f"{path} has schema version 1; this Sparrow needs version 9: stop Sparrow and run "
        f"`sparrow migrate {tmp_path}`"
    )
    report = migrate(tmp_path)
    assert [a.item for a in report.applied] == [AUTHORITY_FILE]
    with AuthorityStore.open(path) as s:
        assert [v.name for v in s.volumes()] == ["alpha", "beta"]
        assert all(
            (v.physical_block_size, v.chap, v.backing) == (None, None, None)
            for v in s.volumes(include_deleted=True)
        )
        assert {k: (a.epoch, a.primary, a.size) for k, a in s.latest_assignments().items()} == {
            "a1" * 16: (1, "node-a", 64 << 20),
            "b2" * 16: (2, "node-b", 128 << 20),
        }


def test_a_new_database_has_the_schema_of_a_migrated_one(tmp_path: Path) -> None:
    migrated = tmp_path / "old"
    migrated.mkdir()
    shutil.copyfile(V1_FIXTURE, migrated / AUTHORITY_FILE)
    migrate(migrated)
    AuthorityStore.open(tmp_path / AUTHORITY_FILE).close()

    def schema(path: Path) -> list[tuple[str, str]]:
        conn = raw(path)
        try:
            return conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
            ).fetchall()
        finally:
            conn.close()

    assert schema(tmp_path / AUTHORITY_FILE) == schema(migrated / AUTHORITY_FILE)


def test_volume_settings_are_kept_and_carried_by_assignments(store: AuthorityStore) -> None:
    chap = VolumeChap("iqn.host", "initiator-secret", "target", "target-secret1")
    record = store.add_volume(
        "settings",
        size=1 << 20,
        block_size=512,
        replicas=1,
        created_at=1.0,
        volume_id=VOL_B,
        physical_block_size=4096,
        chap=chap,
        backing="/dev/sdz",
    )
    assert (record.physical_block_size, record.chap, record.backing) == (4096, chap, "/dev/sdz")
    assert store.volume(VOL_B) == record
    assert "initiator-secret" not in repr(record)
    store.upsert_node("n1", incarnation=7, addresses=ADDR_1, capacity=10, seen_at=5.0)
    published = Publisher(store, wall_clock=lambda: 1.0).publish(Ask(VOL_B, "n1", ("n1",)))
    assert (published.physical_block_size, published.chap, published.backing) == (4096, chap, "/dev/sdz")
    assert store.latest_assignment(VOL_B) == published


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"physical_block_size": 1024}, "physical_block_size"),
        ({"physical_block_size": 512, "block_size": 4096}, "physical_block_size"),
        ({"physical_block_size": True}, "physical_block_size"),
        ({"backing": "relative/path"}, "backing"),
        ({"chap": ("u", "s")}, "chap"),
    ],
)
def test_bad_volume_settings_are_refused(store: AuthorityStore, fields: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"size": 1 << 20, "block_size": 512, "replicas": 1, "created_at": 1.0, **fields}
    with pytest.raises(InvalidAuthorityRecord, match=match):
        store.add_volume("bad", **args)
    assert store.volumes() == ()


def test_a_database_that_is_not_ours_is_refused(path: Path) -> None:
    conn = raw(path)
    conn.execute("CREATE TABLE stuff (x)")
    conn.close()
    with pytest.raises(NotAnAuthorityDatabase, match="no meta table"):
        AuthorityStore.open(path)


def test_the_code_version_is_the_head_of_the_authority_steps() -> None:
    assert default_graph().head("authority") == SCHEMA_VERSION


# --- volumes ---------------------------------------------------------------------------------------


def test_add_and_list_volumes(store: AuthorityStore) -> None:
    b = add(store, "bravo", VOL_B)
    a = add(store, "alpha", VOL_A)
    assert store.volumes() == (a, b)
    assert a == VolumeRecord(VOL_A, "alpha", 1 << 20, 512, 2, 100.0, None)
    minted = store.add_volume("charlie", size=4096, block_size=4096, replicas=1, created_at=1.0)
    assert len(minted.volume_id) == 32 and minted.volume_id not in (VOL_A, VOL_B)
    assert store.volume(minted.volume_id) == minted


def test_duplicate_ids_and_live_names_are_refused(store: AuthorityStore) -> None:
    add(store, "vol1", VOL_A)
    with pytest.raises(VolumeExists, match=f"id {VOL_A}"):
        add(store, "other", VOL_A)
    with pytest.raises(VolumeExists, match="name 'vol1'"):
        add(store, "vol1", VOL_B)
    assert len(store.volumes()) == 1


def test_delete_marks_and_frees_the_name(store: AuthorityStore) -> None:
    add(store, "vol1", VOL_A)
    deleted = store.delete_volume(VOL_A, deleted_at=200.0)
    assert deleted.deleted_at == 200.0
    assert store.volumes() == ()
    assert store.volumes(include_deleted=True) == (deleted,)
    with pytest.raises(UnknownVolume):
        store.delete_volume(VOL_A, deleted_at=300.0)
    with pytest.raises(UnknownVolume):
        store.delete_volume(VOL_B, deleted_at=300.0)
    assert add(store, "vol1", VOL_B).name == "vol1"  # a deleted volume's name can be used again
    with pytest.raises(VolumeExists, match="id"):
        add(store, "vol2", VOL_A)  # its id cannot


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"volume_id": "XYZ"}, "volume_id"),
        ({"name": "Bad Name"}, "name"),
        ({"size": 0}, "size"),
        ({"size": 1000}, "not a multiple"),
        ({"block_size": 1024}, "block_size"),
        ({"replicas": 0}, "replicas"),
        ({"replicas": True}, "replicas"),
    ],
)
def test_invalid_volumes_are_refused(store: AuthorityStore, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "name": "vol1",
        "size": 1 << 20,
        "block_size": 512,
        "replicas": 1,
        "created_at": 0.0,
        "volume_id": VOL_A,
    }
    with pytest.raises(InvalidAuthorityRecord, match=match):
        store.add_volume(**(args | kwargs))  # type: ignore[arg-type]
    assert store.volumes(include_deleted=True) == ()


# --- nodes -----------------------------------------------------------------------------------------


def test_upsert_node_keeps_first_seen(store: AuthorityStore) -> None:
    first = store.upsert_node("n1", incarnation=1, addresses=ADDR_1, capacity=100, seen_at=10.0)
    assert (first.first_seen, first.last_seen) == (10.0, 10.0)
    again = store.upsert_node("n1", incarnation=2, addresses=ADDR_2, capacity=50, seen_at=20.0)
    assert again == authority.NodeRecord("n1", 2, ADDR_2, 50, 10.0, 20.0)
    assert store.nodes() == (again,)


def test_upsert_hello(store: AuthorityStore) -> None:
    hello = Hello("n2", 99, "10.0.0.2:3260", "10.0.0.2:3261", "10.0.0.2:3280", 1 << 30, 1 << 29)
    node = store.upsert_hello(hello, seen_at=3.0)
    assert (node.node_id, node.incarnation, node.addresses, node.capacity) == ("n2", 99, ADDR_2, 1 << 30)


@pytest.mark.parametrize(
    ("node_id", "addresses", "match"),
    [
        ("Node_1", ADDR_1, "node_id"),
        ("n1", NodeAddresses("nohost", "10.0.0.1:1", "10.0.0.1:2"), "addresses.iscsi_portal"),
    ],
)
def test_invalid_nodes_are_refused(
    store: AuthorityStore, node_id: str, addresses: NodeAddresses, match: str
) -> None:
    with pytest.raises(InvalidAuthorityRecord, match=match):
        store.upsert_node(node_id, incarnation=1, addresses=addresses, capacity=1, seen_at=0.0)
    assert store.nodes() == ()


# --- forgetting nodes (schema v4) --------------------------------------------------------------------


def node(
    store: AuthorityStore, node_id: str, addresses: NodeAddresses = ADDR_1, seen_at: float = 0.0
) -> None:
    store.upsert_node(node_id, incarnation=1, addresses=addresses, capacity=1 << 30, seen_at=seen_at)


def test_forget_removes_a_node_no_assignment_names(store: AuthorityStore) -> None:
    node(store, "n1")
    node(store, "n2", ADDR_2)
    assert store.forget_node("n2", forgotten_at=5.0) is authority.Forgotten.REMOVED
    assert [n.node_id for n in store.nodes(include_forgotten=True)] == ["n1"]
    assert store.forget_node("n2", forgotten_at=6.0) is None  # nothing left to forget
    assert store.forget_node("never", forgotten_at=6.0) is None


def test_forget_marks_a_node_only_the_history_of_deleted_volumes_names(
    store: AuthorityStore, path: Path
) -> None:
    add(store, "vol1", VOL_A)
    node(store, "n1")
    node(store, "n2", ADDR_2)
    publisher = Publisher(store, wall_clock=lambda: 1.0)
    publisher.publish(Ask(VOL_A, "n1", ("n1", "n2")))
    store.delete_volume(VOL_A, deleted_at=2.0)

    assert store.forget_node("n1", forgotten_at=5.0) is authority.Forgotten.MARKED  # the primary
    assert store.forget_node("n2", forgotten_at=6.0) is authority.Forgotten.MARKED  # a replica
    assert store.nodes() == ()
    assert [(n.node_id, n.forgotten_at) for n in store.nodes(include_forgotten=True)] == [
        ("n1", 5.0),
        ("n2", 6.0),
    ]
    assert store.forget_node("n1", forgotten_at=7.0) is None  # already forgotten
    # The history stays as it was, its foreign key satisfied.
    assert store.max_epoch(VOL_A) == Epoch.restore(1)
    conn = raw(path)
    history = conn.execute("SELECT primary_node, replicas FROM assignments").fetchall()
    assert history == [("n1", '["n1", "n2"]')]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    # Nothing can be placed on a forgotten node: the publisher does not see it, nor does the schema.
    add(store, "vol2", VOL_B)
    with pytest.raises(authority.UnknownNode):
        publisher.publish(Ask(VOL_B, "n1", ("n1",)))
    conn = raw(path)
    for primary, replicas in (("'n1'", "'[\"n1\"]'"), ("NULL", "'[\"n2\"]'")):
        with pytest.raises(sqlite3.IntegrityError, match="may not name a forgotten node"):
            conn.execute(f"INSERT INTO assignments VALUES ('{VOL_B}', 1, {primary}, {replicas}, 0, '[]', 0)")
    conn.close()
    assert store.max_epoch(VOL_B) is None


def test_a_node_the_current_assignment_of_a_live_volume_names_is_not_forgotten(store: AuthorityStore) -> None:
    add(store, "vol1", VOL_A)
    add(store, "vol2", VOL_B)
    for node_id, addresses in (("n1", ADDR_1), ("n2", ADDR_2), ("n3", ADDR_1)):
        node(store, node_id, addresses)
    publisher = Publisher(store, wall_clock=lambda: 1.0)
    publisher.publish(Ask(VOL_A, "n3", ("n3",)))
    publisher.publish(Ask(VOL_A, "n1", ("n1", "n2")))  # n3 is named by epoch 1 only
    publisher.publish(Ask(VOL_B, "n2", ("n2",)))
    for node_id, holds in (("n1", "vol1"), ("n2", "vol1, vol2")):
        with pytest.raises(authority.NodeHoldsCopy) as info:
            store.forget_node(node_id, forgotten_at=5.0)
        assert str(info.value) == f"node {node_id!r} holds a copy of {holds}; move or delete it first"
    assert store.forget_node("n3", forgotten_at=5.0) is authority.Forgotten.MARKED
    assert [n.node_id for n in store.nodes()] == ["n1", "n2"]
    store.delete_volume(VOL_A, deleted_at=6.0)  # n1 is named by deleted volumes only now
    assert store.forget_node("n1", forgotten_at=7.0) is authority.Forgotten.MARKED
    with pytest.raises(authority.NodeHoldsCopy, match="holds a copy of vol2;"):
        store.forget_node("n2", forgotten_at=7.0)


def test_a_hello_from_a_forgotten_node_makes_it_a_new_node(store: AuthorityStore, path: Path) -> None:
    add(store, "vol1", VOL_A)
    node(store, "n1", seen_at=1.0)
    Publisher(store, wall_clock=lambda: 1.0).publish(Ask(VOL_A, "n1", ("n1",)))
    store.delete_volume(VOL_A, deleted_at=2.0)
    assert store.forget_node("n1", forgotten_at=3.0) is authority.Forgotten.MARKED
    store.close()
    with AuthorityStore.open(path) as again:  # forgotten stays forgotten across a restart
        assert again.nodes() == ()
        back = again.upsert_node("n1", incarnation=9, addresses=ADDR_2, capacity=5, seen_at=10.0)
        assert back == authority.NodeRecord("n1", 9, ADDR_2, 5, 10.0, 10.0, None)
        assert again.nodes() == (back,)
        add(again, "vol2", VOL_B)
        assert Publisher(again, wall_clock=lambda: 11.0).publish(Ask(VOL_B, "n1", ("n1",))).epoch == 1


# --- assignments as the store shows them -------------------------------------------------------------


def test_latest_assignment_joins_volume_and_primary_portal(store: AuthorityStore) -> None:
    add(store, "vol1", VOL_A)
    add(store, "vol2", VOL_B)
    assert store.latest_assignment(VOL_A) is None and store.max_epoch(VOL_A) is None
    store.upsert_node("n1", incarnation=1, addresses=ADDR_1, capacity=1, seen_at=0.0)
    store.upsert_node("n2", incarnation=1, addresses=ADDR_2, capacity=1, seen_at=0.0)
    publisher = Publisher(store, wall_clock=lambda: 0.0)
    publisher.publish(Ask(VOL_A, "n1", ("n1", "n2")))
    publisher.publish(Ask(VOL_A, "n2", ("n2", "n1")))
    publisher.publish(Ask(VOL_B, None, ()))
    latest = store.latest_assignment(VOL_A)
    assert latest is not None
    assert (latest.epoch, latest.primary, latest.primary_portal, latest.replicas) == (
        2,
        "n2",
        "10.0.0.2:3260",
        ("n2", "n1"),
    )
    assert (latest.name, latest.size, latest.block_size) == ("vol1", 1 << 20, 512)
    assert store.max_epoch(VOL_A) == Epoch.restore(2)
    assert dict(store.latest_assignments()) == {VOL_A: latest, VOL_B: store.latest_assignment(VOL_B)}
    # A node's new portal shows in the assignment that names it.
    store.upsert_node("n2", incarnation=2, addresses=ADDR_1, capacity=1, seen_at=1.0)
    assert store.latest_assignment(VOL_A).primary_portal == "10.0.0.1:3260"  # type: ignore[union-attr]
    # A deleted volume has no assignment in force, but its epochs stay recorded.
    store.delete_volume(VOL_A, deleted_at=5.0)
    assert store.latest_assignment(VOL_A) is None
    assert set(store.latest_assignments()) == {VOL_B}
    assert store.max_epoch(VOL_A) == Epoch.restore(2)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("UPDATE assignments SET primary_node = NULL", "append-only"),
        ("DELETE FROM assignments", "append-only"),
        (f"INSERT INTO assignments VALUES ('{VOL_A}', 3, NULL, '[]', 0, '[]', 0)", "highest epoch \\+ 1"),
        (f"INSERT INTO assignments VALUES ('{VOL_A}', 1, NULL, '[]', 0, '[]', 0)", "highest epoch \\+ 1"),
        (f"INSERT INTO assignments VALUES ('{VOL_B}', 1, NULL, '[]', 0, '[]', 0)", "FOREIGN KEY"),
        (f"INSERT INTO assignments VALUES ('{VOL_A}', 2, 'ghost', '[]', 0, '[]', 0)", "FOREIGN KEY"),
        ("DELETE FROM volumes", "never removed"),
    ],
)
def test_the_schema_refuses_what_the_rules_forbid(
    store: AuthorityStore, path: Path, sql: str, match: str
) -> None:
    add(store, "vol1", VOL_A)
    Publisher(store, wall_clock=lambda: 0.0).publish(Ask(VOL_A, None, ()))
    conn = raw(path)
    with pytest.raises(sqlite3.IntegrityError, match=match):
        conn.execute(sql)
    conn.close()
    assert store.max_epoch(VOL_A) == Epoch.restore(1)
    assert len(store.volumes()) == 1


# --- tokens (schema v3) ----------------------------------------------------------------------------


def test_tokens_are_stored_as_hashes_listed_and_revoked(store: AuthorityStore, path: Path) -> None:
    assert not store.has_tokens()
    admin = tokens.mint("admin", name="bootstrap", created_at=100.0)
    reader = tokens.mint("reader", tenant="team-a", created_at=101.0)
    store.add_token(admin.record)
    store.add_token(reader.record)
    assert store.has_tokens()
    assert store.token(admin.record.token_id) == admin.record
    assert store.tokens() == (admin.record, reader.record)

    revoked = store.revoke_token(reader.record.token_id, revoked_at=200.0)
    assert revoked.revoked_at == 200.0
    assert store.tokens() == (admin.record,)
    assert store.tokens(include_revoked=True)[1] == revoked
    with pytest.raises(tokens.Unauthorized):
        tokens.verify(store.token(reader.record.token_id), tokens.parse(reader.plaintext)[1])
    with pytest.raises(UnknownToken):
        store.revoke_token(reader.record.token_id, revoked_at=201.0)  # once only
    with pytest.raises(UnknownToken):
        store.revoke_token("0" * 16, revoked_at=201.0)
    assert store.has_tokens()  # revoked tokens count: the bootstrap happens once

    # Never deleted, and never the plaintext: neither the secret nor the whole token is on disk.
    with pytest.raises(sqlite3.IntegrityError, match="never removed"):
        raw(path).execute("DELETE FROM tokens")
    store.close()
    for file in path.parent.iterdir():
        data = file.read_bytes()
        for new in (admin, reader):
            assert new.plaintext.encode() not in data
            assert tokens.parse(new.plaintext)[1].encode() not in data


def test_a_token_id_is_never_reused(store: AuthorityStore) -> None:
    new = tokens.mint("operator", created_at=1.0)
    store.add_token(new.record)
    with pytest.raises(InvalidAuthorityRecord):
        store.add_token(new.record)


def test_pause_chap_and_discovery_chap_are_recorded_and_survive_a_reopen(path: Path) -> None:
    """Authority v8: the pause wish per volume, the pause per published epoch, CHAP replaced in
    place, and the cluster's discovery CHAP (never set / set / off)."""
    with AuthorityStore.open(path) as s:
        s.upsert_node("n1", incarnation=1, addresses=ADDR_1, capacity=1 << 40, seen_at=1.0)
        v = s.add_volume("v", size=1 << 20, block_size=512, replicas=1, created_at=1.0)
        assert v.paused is False and s.discovery_chap() == (False, None)
        assert s.set_paused(v.volume_id, True).paused is True
        publisher = Publisher(s, wall_clock=lambda: 2.0)
        ask = controller.AssignmentAsk(v.volume_id, "n1", ("n1",), "place", ("n1",), paused=True)
        first = publisher.publish(ask)
        assert first.paused is True
        chap = VolumeChap("alice", "alice-secret-1", None, None)
        assert s.set_chap(v.volume_id, chap).chap == chap
        _, again = publisher.resize(v.volume_id, 2 << 20)
        assert again is not None and again.paused is True and again.chap == chap  # a resize keeps it
        s.set_discovery_chap(VolumeChap("disco", "discovery-secret-1", None, None))
    with AuthorityStore.open(path) as s:
        (record,) = s.volumes()
        assert record.paused is True and record.chap == chap
        latest = s.latest_assignment(v.volume_id)
        assert latest is not None and latest.paused is True and latest.epoch == 2
        assert s.discovery_chap() == (True, VolumeChap("disco", "discovery-secret-1", None, None))
        s.set_discovery_chap(None)
        assert s.discovery_chap() == (True, None)
        assert s.set_chap(v.volume_id, None).chap is None
        with pytest.raises(UnknownVolume):
            s.set_paused("f" * 32, True)
