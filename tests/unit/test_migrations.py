"""store.migrations: the step graph, the v1 -> v2 volume step, the runner, and `sparrow migrate`.

Version-1 inputs are the real records under tests/fixtures/v1/ (see tests/fixtures/README.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sparrow.cli import main
from store.lock import DataDirLock, DataDirLocked
from store.metadata import read_record, write_record
from store.migrations import (
    AUTHORITY_FILE,
    BACKUPS_DIR,
    HISTORY_FILE,
    BadStep,
    IdentityChanged,
    MigrationError,
    NoMigrationPath,
    Step,
    StepGraph,
    authority_v1_to_v2,
    authority_v2_to_v3,
    authority_v3_to_v4,
    authority_v4_to_v5,
    authority_v5_to_v6,
    authority_v6_to_v7,
    authority_v7_to_v8,
    authority_v8_to_v9,
    default_graph,
    discover_steps,
    migrate,
    plan,
    read_history,
    versions,
)
from store.migrations import volume_v1_to_v2 as v1_to_v2
from store.migrations.runner import diff_bodies
from store.migrations.sqlitemeta import create_meta, read_version
from store.volumes import VOLUME_SCHEMA_VERSION, VolumeMeta

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v1" / "volumes"
FIXTURE_NAMES = ("alpha", "beta", "delta", "gamma")


# --- helpers -------------------------------------------------------------------------------------


def fixture_body(name: str) -> dict[str, Any]:
    return read_record(FIXTURES / f"{name}.json", "volume", 1).body


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A node data directory holding the v1 fixture records and a sparse data file for each."""
    root = tmp_path / "data"
    volumes = root / "volumes"
    volumes.mkdir(parents=True)
    for name in FIXTURE_NAMES:
        shutil.copyfile(FIXTURES / f"{name}.json", volumes / f"{name}.json")
        body = fixture_body(name)
        with open(volumes / f"{name}.img", "wb") as f:
            f.truncate(body["size"])
            f.seek(body["block_size"])
            f.write(name.encode() * 100)
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``root``: sha256, inode, mtime_ns (so a rewrite shows even with equal bytes)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                st.st_ino,
                st.st_mtime_ns,
            )
    return out


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def module(name: str, **attrs: Any) -> types.ModuleType:
    m = types.ModuleType(f"store.migrations.{name}")
    for key, value in attrs.items():
        setattr(m, key, value)
    return m


def step(
    kind: str, a: int, b: int, upgrade: Callable[[Any], Any] = lambda r: r, describe: str = "test step"
) -> Step:
    return Step(f"{kind}_v{a}_to_v{b}", kind, a, b, describe, upgrade)


class Clock:
    """A wall clock for backups and history that moves one second per call."""

    def __init__(self) -> None:
        self.t = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


# --- the graph -----------------------------------------------------------------------------------


def test_shortest_path_takes_a_step_that_skips_versions() -> None:
    graph = StepGraph(
        [step("volume", 1, 2), step("volume", 2, 3), step("volume", 3, 4), step("volume", 1, 3)]
    )
    assert [s.name for s in graph.path("volume", 1, 4)] == ["volume_v1_to_v3", "volume_v3_to_v4"]
    assert [s.name for s in graph.path("volume", 2, 4)] == ["volume_v2_to_v3", "volume_v3_to_v4"]
    assert [s.name for s in graph.path("volume", 1, 2)] == ["volume_v1_to_v2"]
    assert graph.path("volume", 3, 3) == ()
    assert graph.head("volume") == 4


def test_paths_stay_within_their_kind_and_never_go_back() -> None:
    graph = StepGraph([step("volume", 1, 2), step("authority", 2, 3)])
    with pytest.raises(NoMigrationPath, match="downgrades are not supported"):
        graph.path("volume", 2, 1)
    with pytest.raises(NoMigrationPath, match="from version 1 to 3"):
        graph.path("volume", 1, 3)  # 2 -> 3 exists only for the authority
    assert graph.head("authority") == 3
    assert StepGraph([]).head("volume") == 1


def test_duplicate_steps_are_refused() -> None:
    with pytest.raises(BadStep, match="duplicates"):
        StepGraph([step("volume", 1, 2), step("volume", 1, 2)])


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"kind": "disk"}, "kind must be one of"),
        ({"from_version": 0}, "from_version must be an int >= 1"),
        ({"to_version": "2"}, "to_version must be an int"),
        ({"to_version": True}, "to_version must be an int"),
        ({"from_version": 2, "to_version": 2}, "forward only"),
        ({"from_version": 3, "to_version": 2}, "forward only"),
        ({"describe": ""}, "describe must be one non-empty line"),
        ({"describe": "two\nlines"}, "describe must be one non-empty line"),
        ({"upgrade": None}, "upgrade is not a function"),
    ],
)
def test_step_modules_must_declare_a_valid_step(attrs: dict[str, Any], reason: str) -> None:
    good: dict[str, Any] = {
        "kind": "volume",
        "from_version": 1,
        "to_version": 2,
        "describe": "x",
        "upgrade": lambda r: r,
    }
    assert Step.from_module(module("volume_v1_to_v2", **good)).to_version == 2
    with pytest.raises(BadStep, match=reason):
        Step.from_module(module("volume_v1_to_v2", **(good | attrs)))


def test_discovery_checks_that_a_module_name_matches_its_declaration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "fake_steps"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("x = 1\n")  # not a step: ignored
    body = (
        "kind = 'volume'\nfrom_version = {a}\nto_version = {b}\ndescribe = 'd'\n"
        "def upgrade(r):\n    return r\n"
    )
    (pkg / "volume_v1_to_v2.py").write_text(body.format(a=1, b=2))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [s.name for s in discover_steps("fake_steps")] == ["volume_v1_to_v2"]
    (pkg / "volume_v2_to_v3.py").write_text(body.format(a=2, b=4))
    with pytest.raises(BadStep, match="its name says"):
        discover_steps("fake_steps")
    for name in [m for m in sys.modules if m.startswith("fake_steps")]:
        monkeypatch.delitem(sys.modules, name)


def test_the_shipped_graph_has_the_volume_step() -> None:
    graph = default_graph()
    assert [s.name for s in graph.path("volume", 1, 2)] == ["volume_v1_to_v2"]
    assert graph.head("volume") == 2


def test_volumes_py_reads_and_writes_the_newest_volume_schema() -> None:
    assert default_graph().head("volume") == VOLUME_SCHEMA_VERSION


# --- the v1 -> v2 volume step --------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_v2_volume_id_is_the_v1_uuid_and_nothing_else_changes(name: str) -> None:
    before = fixture_body(name)
    frozen = json.dumps(before, sort_keys=True)
    after = v1_to_v2.upgrade(before)
    assert json.dumps(before, sort_keys=True) == frozen, "the step modified its argument"
    assert after["volume_id"] == before["uuid"]
    assert "physical_block_size" in after
    assert after["physical_block_size"] == before.get("physical_block_size")
    assert {k: v for k, v in after.items() if k != "volume_id"} == before | {
        "physical_block_size": before.get("physical_block_size")
    }
    # The v2 body still decodes with today's reader: same identity, serial and NAA designators.
    meta = VolumeMeta.from_record(after, Path(f"{name}.json"))
    assert (meta.uuid, meta.serial, meta.naa, meta.name) == (
        before["uuid"],
        before["serial"],
        before["naa"],
        before["name"],
    )


def test_v1_record_without_physical_block_size_gets_null() -> None:
    before = fixture_body("delta")
    assert "physical_block_size" not in before  # the fixture is a pre-f4c20db record
    assert v1_to_v2.upgrade(before)["physical_block_size"] is None
    assert v1_to_v2.upgrade(fixture_body("gamma"))["physical_block_size"] == 4096


def test_v1_record_without_uuid_cannot_be_upgraded() -> None:
    body = fixture_body("alpha")
    del body["uuid"]
    with pytest.raises(ValueError, match="no uuid"):
        v1_to_v2.upgrade(body)


# --- the runner on JSON records ------------------------------------------------------------------


def test_plan_and_versions_count_what_is_there(data_dir: Path) -> None:
    the_plan = plan(data_dir)
    assert [p.unit.item for p in the_plan.pending] == [f"volumes/{n}.json" for n in FIXTURE_NAMES]
    assert {(p.unit.version, p.target) for p in the_plan.pending} == {(1, 2)}
    assert the_plan.problems == () and the_plan.current == ()
    counts = {kv.kind: (dict(kv.counts), kv.unreadable, kv.latest) for kv in versions(data_dir)}
    assert counts == {
        "volume": ({1: 4}, 0, 2),
        "authority": ({}, 0, 9),
        "cluster-volume": ({}, 0, 1),
        "cluster-node": ({}, 0, 1),
    }


def test_dry_run_writes_nothing(data_dir: Path) -> None:
    before = snapshot(data_dir)
    report = migrate(data_dir, dry_run=True)
    assert report.dry_run and report.backup_dir is None
    assert len(report.applied) == 4
    delta = next(a for a in report.applied if a.item == "volumes/delta.json")
    assert delta.changes == (
        "add physical_block_size = null",
        f'add volume_id = "{fixture_body("delta")["uuid"]}"',
    )
    assert snapshot(data_dir) == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["volumes"]


def test_migrate_upgrades_backs_up_and_records(data_dir: Path) -> None:
    originals = {n: (data_dir / "volumes" / f"{n}.json").read_bytes() for n in FIXTURE_NAMES}
    images = {k: v for k, v in snapshot(data_dir).items() if k.endswith(".img")}
    predicted = {a.item: a.checksum_after for a in migrate(data_dir, dry_run=True).applied}
    clock = Clock()

    report = migrate(data_dir, clock=clock)

    assert not report.dry_run and report.problems == () and report.unchanged == 0
    assert report.backup_dir == data_dir / BACKUPS_DIR / "20261122T120001.000000Z"
    for name in FIXTURE_NAMES:
        path = data_dir / "volumes" / f"{name}.json"
        record = read_record(path, "volume", 2)
        old = fixture_body(name)
        assert record.schema_version == 2
        assert record.body["volume_id"] == old["uuid"]
        assert {k: record.body[k] for k in ("name", "uuid", "serial", "naa")} == {
            k: old[k] for k in ("name", "uuid", "serial", "naa")
        }
        assert (report.backup_dir / "volumes" / f"{name}.json").read_bytes() == originals[name]
    # Block data: same bytes, same inode, never rewritten, and not copied into the backup.
    assert {k: v for k, v in snapshot(data_dir).items() if k.endswith(".img")} == images
    assert not list(report.backup_dir.rglob("*.img"))

    history = read_history(data_dir)
    assert [h["item"] for h in history] == [f"volumes/{n}.json" for n in FIXTURE_NAMES]
    for entry in history:
        path = data_dir / entry["item"]
        assert (entry["kind"], entry["from"], entry["to"], entry["steps"]) == (
            "volume",
            1,
            2,
            ["volume_v1_to_v2"],
        )
        assert entry["checksum_before"] == sha(report.backup_dir / entry["item"])
        assert entry["checksum_after"] == sha(path) == predicted[entry["item"]]
        assert entry["backup"] == f"{BACKUPS_DIR}/20261122T120001.000000Z"
        assert entry["changes"] and all(c.startswith("add ") for c in entry["changes"])
        assert datetime.fromisoformat(entry["applied_at"]) > datetime(2026, 11, 22, 12, 0, 1, tzinfo=UTC)
    assert oct((data_dir / HISTORY_FILE).stat().st_mode & 0o777) == "0o600"


def test_a_second_run_is_a_no_op(data_dir: Path) -> None:
    migrate(data_dir, clock=Clock())
    after_first = snapshot(data_dir)
    report = migrate(data_dir, clock=Clock())
    assert report.applied == () and report.backup_dir is None and report.unchanged == 4
    after_second = snapshot(data_dir)
    after_second.pop("sparrow.lock")  # the lock file records the holder's pid each run
    after_first.pop("sparrow.lock")
    assert after_second == after_first
    assert len(read_history(data_dir)) == 4


def test_an_interrupted_run_finishes_the_rest(data_dir: Path) -> None:
    # One record already at v2 (as if a run died after it): only the other three are migrated.
    path = data_dir / "volumes" / "beta.json"
    write_record(path, "volume", 2, v1_to_v2.upgrade(fixture_body("beta")))
    report = migrate(data_dir, clock=Clock())
    assert sorted(a.item for a in report.applied) == [
        "volumes/alpha.json",
        "volumes/delta.json",
        "volumes/gamma.json",
    ]
    assert report.unchanged == 1
    assert report.backup_dir is not None
    assert not (report.backup_dir / "volumes" / "beta.json").exists()


def test_a_step_that_changes_an_identity_is_refused_before_anything_is_written(data_dir: Path) -> None:
    def renumber(record: dict[str, Any]) -> dict[str, Any]:
        return record | {"uuid": "0" * 32}

    graph = StepGraph([step("volume", 1, 2, renumber)])
    before = snapshot(data_dir)
    with pytest.raises(IdentityChanged, match="uuid"):
        migrate(data_dir, graph=graph, clock=Clock())
    before.pop("sparrow.lock", None)
    after = snapshot(data_dir)
    after.pop("sparrow.lock")
    assert after == before
    assert read_history(data_dir) == []


def test_a_step_that_removes_the_name_is_refused(data_dir: Path) -> None:
    graph = StepGraph([step("volume", 1, 2, lambda r: {k: v for k, v in r.items() if k != "name"})])
    with pytest.raises(IdentityChanged, match="name"):
        migrate(data_dir, graph=graph, dry_run=True)


def test_a_record_a_step_cannot_take_is_left_alone_and_reported(data_dir: Path) -> None:
    path = data_dir / "volumes" / "gamma.json"
    broken = fixture_body("gamma")
    del broken["uuid"]
    write_record(path, "volume", 1, broken)
    raw = path.read_bytes()
    report = migrate(data_dir, clock=Clock())
    assert [str(p) for p in report.problems] == [
        "volumes/gamma.json: step volume_v1_to_v2 failed: ValueError: v1 volume record has no uuid to "
        "derive volume_id from"
    ]
    assert len(report.applied) == 3
    assert path.read_bytes() == raw


def test_corrupt_and_too_new_records_are_reported_not_touched(data_dir: Path) -> None:
    corrupt = data_dir / "volumes" / "alpha.json"
    envelope = json.loads(corrupt.read_text())
    envelope["body"]["size"] += 512  # the checksum no longer matches
    corrupt.write_text(json.dumps(envelope))
    newer = data_dir / "volumes" / "beta.json"
    write_record(newer, "volume", 7, fixture_body("beta"))
    (data_dir / "volumes" / ".gamma.json.tmp-abcd").write_text("garbage")  # a crashed write: ignored
    kept = {p: p.read_bytes() for p in (corrupt, newer)}

    report = migrate(data_dir, clock=Clock())

    assert sorted((p.item, p.reason) for p in report.problems) == [
        ("volumes/alpha.json", "checksum mismatch"),
        (
            "volumes/beta.json",
            "schema version 7 is newer than this Sparrow knows (2): written by a newer Sparrow",
        ),
    ]
    assert sorted(a.item for a in report.applied) == ["volumes/delta.json", "volumes/gamma.json"]
    assert all(p.read_bytes() == raw for p, raw in kept.items())
    counts = {kv.kind: (dict(kv.counts), kv.unreadable) for kv in versions(data_dir)}
    assert counts["volume"] == ({2: 2, 7: 1}, 1)


def test_target_version_and_kind_restrict_the_run(data_dir: Path) -> None:
    assert migrate(data_dir, 1, dry_run=True).applied == ()
    assert migrate(data_dir, dry_run=True, kinds=frozenset({"authority"})).applied == ()
    report = migrate(data_dir, 3, dry_run=True)
    assert report.applied == () and len(report.problems) == 4
    assert "from version 1 to 3" in report.problems[0].reason
    with pytest.raises(MigrationError, match="unknown record kind 'disk'"):
        plan(data_dir, kinds=frozenset({"disk"}))


def test_a_real_run_needs_the_data_directory_lock(data_dir: Path) -> None:
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        with pytest.raises(DataDirLocked):
            migrate(data_dir)
        assert len(migrate(data_dir, dry_run=True).applied) == 4  # reading needs no lock
    finally:
        lock.release()
    assert read_record(data_dir / "volumes" / "alpha.json", "volume", 2).schema_version == 1


def test_a_missing_data_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        migrate(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_diffs_never_show_secrets() -> None:
    before = {"chap": {"user": "u", "secret": "hunter2hunter2"}, "size": 1}
    after = {"chap": {"user": "u", "secret": "other-secret-1"}, "size": 2, "mutual_secret": "x"}
    lines = diff_bodies(before, after)
    assert lines == (
        'change chap: {"secret": "<redacted>", "user": "u"} -> {"secret": "<redacted>", "user": "u"}',
        'add mutual_secret = "<redacted>"',
        "change size: 1 -> 2",
    )
    assert not any("hunter2" in line or "other-secret" in line for line in lines)


# --- the runner on a SQLite database -------------------------------------------------------------


def make_authority_v1(data_dir: Path) -> None:
    """A minimal v1 authority database (the real AuthorityStore is tested with its own schema in
    test_cluster_authority.py)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(data_dir / AUTHORITY_FILE, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    create_meta(conn, 1)
    conn.execute("CREATE TABLE volumes (volume_id TEXT PRIMARY KEY, name TEXT)")
    conn.execute("CREATE TABLE nodes (node_id TEXT PRIMARY KEY, zone TEXT)")
    conn.execute("CREATE TABLE assignments (volume_id TEXT, epoch INTEGER, PRIMARY KEY (volume_id, epoch))")
    conn.executemany("INSERT INTO volumes VALUES (?, ?)", [("a" * 32, "one"), ("b" * 32, "two")])
    conn.executemany("INSERT INTO nodes VALUES (?, NULL)", [("n1",), ("n2",)])
    conn.executemany("INSERT INTO assignments VALUES (?, ?)", [("a" * 32, 1), ("a" * 32, 2), ("b" * 32, 1)])
    conn.execute("COMMIT")
    conn.close()


def add_index(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE nodes ADD COLUMN rack TEXT")
    conn.execute("CREATE INDEX nodes_rack ON nodes (rack)")


def db_version(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / AUTHORITY_FILE)
    try:
        return read_version(conn)
    finally:
        conn.close()


def db_checksum(data_dir: Path) -> str:
    """The database's content checksum (planned against no steps, so it is simply current)."""
    return plan(data_dir, graph=StepGraph([])).current[0].checksum


def test_sqlite_steps_run_in_one_transaction_with_the_version(tmp_path: Path) -> None:
    data_dir = tmp_path / "master"
    make_authority_v1(data_dir)
    graph = StepGraph([step("authority", 1, 2, add_index, "nodes get a rack")])
    before = plan(data_dir, graph=graph).pending[0].unit.checksum

    dry = migrate(data_dir, graph=graph, dry_run=True)
    assert db_version(data_dir) == 1
    report = migrate(data_dir, graph=graph, clock=Clock())

    assert db_version(data_dir) == 2
    (applied,) = report.applied
    assert applied.changes == dry.applied[0].changes
    assert applied.changes == (
        "step authority_v1_to_v2: nodes get a rack",
        "add CREATE INDEX nodes_rack ON nodes (rack)",
        "alter CREATE TABLE nodes (node_id TEXT PRIMARY KEY, zone TEXT) -> CREATE TABLE nodes (node_id TEXT "
        "PRIMARY KEY, zone TEXT, rack TEXT)",
    )
    assert applied.checksum_before == before
    assert applied.checksum_after == dry.applied[0].checksum_after != before
    # The backup is the database as it was: version 1, same content.
    assert report.backup_dir is not None
    backup = sqlite3.connect(report.backup_dir / AUTHORITY_FILE)
    assert read_version(backup) == 1
    assert backup.execute("SELECT count(*) FROM assignments").fetchone() == (3,)
    backup.close()
    (entry,) = read_history(data_dir)
    assert (entry["kind"], entry["item"], entry["from"], entry["to"]) == ("authority", AUTHORITY_FILE, 1, 2)
    assert migrate(data_dir, graph=graph).applied == ()  # idempotent


def test_a_failing_sqlite_step_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    data_dir = tmp_path / "master"
    make_authority_v1(data_dir)

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE nodes ADD COLUMN rack TEXT")
        raise RuntimeError("step bug")

    checksum = db_checksum(data_dir)
    report = migrate(data_dir, graph=StepGraph([step("authority", 1, 2, half_done)]))
    assert [p.reason for p in report.problems] == ["step authority_v1_to_v2 failed: RuntimeError: step bug"]
    assert db_version(data_dir) == 1
    assert db_checksum(data_dir) == checksum


@pytest.mark.parametrize(
    ("sql", "error", "match"),
    [
        ("DELETE FROM nodes WHERE node_id = 'n2'", IdentityChanged, "node ids differ"),
        ("UPDATE assignments SET epoch = 3 WHERE epoch = 2", IdentityChanged, "assignment epochs differ"),
        ("UPDATE volumes SET volume_id = 'c' || substr(volume_id, 2)", IdentityChanged, "volume ids differ"),
        ("COMMIT", MigrationError, "must not COMMIT"),
    ],
)
def test_sqlite_steps_that_break_the_rules_are_refused(
    tmp_path: Path, sql: str, error: type[Exception], match: str
) -> None:
    data_dir = tmp_path / "master"
    make_authority_v1(data_dir)
    checksum = db_checksum(data_dir)

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute(sql)

    with pytest.raises(error, match=match):
        migrate(data_dir, graph=StepGraph([step("authority", 1, 2, bad)]))
    assert db_version(data_dir) == 1
    assert db_checksum(data_dir) == checksum
    assert not (data_dir / BACKUPS_DIR).exists()


def test_reading_a_database_leaves_no_files_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "master"
    make_authority_v1(data_dir)
    names = sorted(p.name for p in data_dir.iterdir())
    versions(data_dir)
    migrate(data_dir, graph=StepGraph([step("authority", 1, 2, add_index)]), dry_run=True)
    assert sorted(p.name for p in data_dir.iterdir()) == names


def test_a_file_that_is_not_a_sparrow_database_is_reported(tmp_path: Path) -> None:
    (tmp_path / AUTHORITY_FILE).write_bytes(b"not sqlite at all, just bytes" * 100)
    assert [p.item for p in plan(tmp_path).problems] == [AUTHORITY_FILE]


# --- sparrow migrate -----------------------------------------------------------------------------


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["migrate", *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, f"expected one line, got {text!r}"
    assert "Traceback" not in text
    return text.rstrip("\n")


def test_cli_list_versions(data_dir: Path) -> None:
    make_authority_v1(data_dir)
    code, out, err = run(str(data_dir), "--list-versions")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "authority: 1 at version 1 (latest version 9)",
        "cluster-node: no records (latest version 1)",
        "cluster-volume: no records (latest version 1)",
        "volume: 4 at version 1 (latest version 2)",
    ]
    code, out, _ = run(str(data_dir), "--list-versions", "--kind", "volume")
    assert out.splitlines() == ["volume: 4 at version 1 (latest version 2)"]


def test_cli_dry_run_then_run_then_no_op(data_dir: Path) -> None:
    before = snapshot(data_dir)
    code, out, err = run(str(data_dir), "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "would migrate volume volumes/alpha.json: version 1 -> 2"
    assert (
        out.splitlines()[-1] == "dry run: 4 records would be migrated, 0 already current; nothing was written"
    )
    assert snapshot(data_dir) == before

    code, out, err = run(str(data_dir))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "migrated volume volumes/alpha.json: version 1 -> 2"
    assert lines[-2].startswith(f"backup written to {data_dir / BACKUPS_DIR}/")
    assert lines[-1] == f"4 records migrated, 0 already current; history in {data_dir / HISTORY_FILE}"

    code, out, err = run(str(data_dir))
    assert (code, out, err) == (0, "nothing to migrate: 4 records already at the target version\n", "")


def test_cli_problems_exit_1_with_one_line(data_dir: Path) -> None:
    code, out, err = run(str(data_dir), "--target-version", "3")
    assert code == 1
    assert one_line(err) == (
        "sparrow: error: 4 records not migrated: volume volumes/alpha.json: no migration path for volume "
        "records from version 1 to 3 (and 3 more, listed above)"
    )
    assert out.count("left unchanged volume") == 4


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("--target-version", "0"), 2, "argument --target-version: invalid version '0'"),
        (("--target-version", "x"), 2, "argument --target-version: invalid version 'x'"),
        (("--kind", "disk"), 2, "argument --kind: invalid choice: 'disk'"),
    ],
)
def test_cli_usage_errors(data_dir: Path, argv: tuple[str, ...], code: int, message: str) -> None:
    got, out, err = run(str(data_dir), *argv)
    assert (got, out) == (code, "")
    assert message in one_line(err)


def test_cli_missing_directory_and_locked_directory(tmp_path: Path, data_dir: Path) -> None:
    code, out, err = run(str(tmp_path / "nope"))
    assert (code, out) == (1, "")
    assert (
        one_line(err)
        == f"sparrow: error: data directory {tmp_path / 'nope'} does not exist or is not a directory"
    )
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        code, out, err = run(str(data_dir))
    finally:
        lock.release()
    assert (code, out) == (1, "")
    assert one_line(err).startswith(
        f"sparrow: error: data directory {data_dir} is in use by another sparrow process (pid {os.getpid()})"
    )


# --- the real authority step, on the v1 fixture --------------------------------------------------

AUTHORITY_V1 = FIXTURES.parent / AUTHORITY_FILE

IDENTITY_QUERIES = (
    "SELECT volume_id, name, size, block_size, replicas, created_at, deleted_at FROM volumes ORDER BY 1",
    "SELECT node_id, incarnation, addresses, capacity, first_seen, last_seen FROM nodes ORDER BY 1",
    # The columns every version has (v5 adds in_sync, checked by its own test).
    "SELECT volume_id, epoch, primary_node, replicas, created_at FROM assignments ORDER BY 1, 2",
)


#: Columns later steps add to tables an earlier step's test compares whole (``SELECT *``): left
#: out, so each step's test compares what that step touched (authority_v7_to_v8: ``paused``).
LATER_COLUMNS = frozenset({"paused"})


def rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        match = re.fullmatch(r"SELECT \* FROM (\w+)( .*)?", query)
        if match is not None:
            table = match[1]
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[1] not in LATER_COLUMNS]
            query = f"SELECT {', '.join(columns)} FROM {table}{match[2] or ''}"
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def test_authority_v1_to_v2_on_the_fixture(tmp_path: Path) -> None:
    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V1, data_dir / AUTHORITY_FILE)
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in IDENTITY_QUERIES}
    assert len(before[IDENTITY_QUERIES[2]]) == 4  # the fixture has assignments, a failover, a deleted volume

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.item, applied.from_version, applied.to_version) == (AUTHORITY_FILE, 1, 9)
    assert applied.steps == (
        "authority_v1_to_v2",
        "authority_v2_to_v3",
        "authority_v3_to_v4",
        "authority_v4_to_v5",
        "authority_v5_to_v6",
        "authority_v6_to_v7",
        "authority_v7_to_v8",
        "authority_v8_to_v9",
    )
    assert applied.changes[0] == f"step authority_v1_to_v2: {authority_v1_to_v2.describe}"
    assert applied.checksum_before != applied.checksum_after
    assert db_version(data_dir) == 9
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in IDENTITY_QUERIES} == before
    new_columns = rows(
        data_dir / AUTHORITY_FILE,
        "SELECT physical_block_size, chap_user, chap_secret, chap_mutual_user, chap_mutual_secret, backing "
        "FROM volumes",
    )
    assert new_columns == [(None,) * 6] * 3
    # The backup is the fixture as it was.
    assert report.backup_dir is not None
    backup = report.backup_dir / AUTHORITY_FILE
    assert rows(backup, "SELECT schema_version FROM meta") == [(1,)]
    assert {q: rows(backup, q) for q in IDENTITY_QUERIES} == before
    (entry,) = read_history(data_dir)
    assert (entry["kind"], entry["item"], entry["from"], entry["to"]) == ("authority", AUTHORITY_FILE, 1, 9)
    # Idempotent: a second run finds nothing to do and writes no second history entry.
    again = migrate(data_dir, clock=Clock())
    assert again.applied == () and again.backup_dir is None
    assert len(read_history(data_dir)) == 1
    assert db_version(data_dir) == 9


AUTHORITY_V2 = FIXTURES.parents[1] / "v2" / AUTHORITY_FILE


def test_authority_v2_to_v3_on_the_fixture(tmp_path: Path) -> None:
    """A v2 database gains an empty tokens table; no row it held changes; the store opens it and
    stores a token's hash only."""
    from sparrow.auth import tokens
    from sparrow.cluster.authority import AuthorityStore

    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V2, data_dir / AUTHORITY_FILE)
    assert db_version(data_dir) == 2
    queries = (*IDENTITY_QUERIES, "SELECT * FROM volumes ORDER BY 1")
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries}

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.from_version, applied.to_version) == (2, 9)
    assert applied.steps == (
        "authority_v2_to_v3",
        "authority_v3_to_v4",
        "authority_v4_to_v5",
        "authority_v5_to_v6",
        "authority_v6_to_v7",
        "authority_v7_to_v8",
        "authority_v8_to_v9",
    )
    assert applied.changes[0] == f"step authority_v2_to_v3: {authority_v2_to_v3.describe}"
    assert db_version(data_dir) == 9
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries} == before
    assert rows(data_dir / AUTHORITY_FILE, "SELECT * FROM tokens") == []
    assert report.backup_dir is not None
    assert rows(report.backup_dir / AUTHORITY_FILE, "SELECT schema_version FROM meta") == [(2,)]
    with AuthorityStore.open_in(data_dir) as store:
        assert not store.has_tokens()
        new = tokens.mint("admin", created_at=1.0)
        store.add_token(new.record)
        assert store.token(new.record.token_id) == new.record
    # A new database and a migrated one have the same schema.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    AuthorityStore.open_in(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY 1, 2"
    assert rows(fresh / AUTHORITY_FILE, schema) == rows(data_dir / AUTHORITY_FILE, schema)


AUTHORITY_V3 = FIXTURES.parents[1] / "v3" / AUTHORITY_FILE


def test_authority_v3_to_v4_on_the_fixture(tmp_path: Path) -> None:
    """A v3 database gains ``nodes.forgotten_at`` (all NULL) and the trigger; no row it held
    changes; on the migrated store a node the history names only through a deleted volume is
    forgotten by a mark, one no assignment names is removed, one a live volume names is refused."""
    from sparrow.cluster.authority import AuthorityStore, Forgotten, NodeHoldsCopy

    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V3, data_dir / AUTHORITY_FILE)
    assert db_version(data_dir) == 3
    queries = (*IDENTITY_QUERIES, "SELECT * FROM volumes ORDER BY 1", "SELECT * FROM tokens ORDER BY 1")
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries}
    assert len(before[IDENTITY_QUERIES[1]]) == 4 and len(before[queries[-1]]) == 2  # see fixtures/README.md

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.from_version, applied.to_version) == (3, 9)
    assert applied.steps == (
        "authority_v3_to_v4",
        "authority_v4_to_v5",
        "authority_v5_to_v6",
        "authority_v6_to_v7",
        "authority_v7_to_v8",
        "authority_v8_to_v9",
    )
    assert applied.changes[0] == f"step authority_v3_to_v4: {authority_v3_to_v4.describe}"
    assert db_version(data_dir) == 9
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries} == before
    assert rows(data_dir / AUTHORITY_FILE, "SELECT node_id, forgotten_at FROM nodes ORDER BY 1") == [
        ("node-a", None),
        ("node-b", None),
        ("node-c", None),
        ("node-d", None),
    ]
    assert report.backup_dir is not None
    assert rows(report.backup_dir / AUTHORITY_FILE, "SELECT schema_version FROM meta") == [(3,)]
    with AuthorityStore.open_in(data_dir) as store:
        assert [n.node_id for n in store.nodes()] == ["node-a", "node-b", "node-c", "node-d"]
        with pytest.raises(NodeHoldsCopy, match="node 'node-a' holds a copy of alpha, beta;"):
            store.forget_node("node-a", forgotten_at=2.0)  # primary of alpha, a replica of beta
        with pytest.raises(NodeHoldsCopy, match="node 'node-b' holds a copy of beta"):
            store.forget_node("node-b", forgotten_at=2.0)  # also primary of the deleted "gone"
        assert store.forget_node("node-c", forgotten_at=2.0) is Forgotten.MARKED  # only the deleted "old"
        assert store.forget_node("node-d", forgotten_at=2.0) is Forgotten.REMOVED  # never assigned
        assert [n.node_id for n in store.nodes()] == ["node-a", "node-b"]
        assert [(n.node_id, n.forgotten_at) for n in store.nodes(include_forgotten=True)] == [
            ("node-a", None),
            ("node-b", None),
            ("node-c", 2.0),
        ]
        assert store.max_epoch("d4" * 16) is not None  # the history that names node-c stays
    # A new database and a migrated one have the same schema.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    AuthorityStore.open_in(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY 1, 2"
    assert rows(fresh / AUTHORITY_FILE, schema) == rows(data_dir / AUTHORITY_FILE, schema)


AUTHORITY_V4 = FIXTURES.parents[1] / "v4" / AUTHORITY_FILE


def test_authority_v4_to_v5_on_the_fixture(tmp_path: Path) -> None:
    """A v4 database gains ``assignments.in_sync``: every existing row records its primary alone
    (``[]`` without one), because before v5 only the primary held the data (the step's docstring);
    no other row or column changes, the append-only triggers still hold, and the store reads the
    set back into each Assignment with the replicas' replication portals."""
    from sparrow.cluster.authority import AuthorityStore
    from sparrow.cluster.publisher import Publisher

    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V4, data_dir / AUTHORITY_FILE)
    assert db_version(data_dir) == 4
    queries = (*IDENTITY_QUERIES, "SELECT * FROM volumes ORDER BY 1", "SELECT * FROM tokens ORDER BY 1")
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries}
    assert len(before[IDENTITY_QUERIES[2]]) == 7  # see fixtures/README.md

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.from_version, applied.to_version) == (4, 9)
    assert applied.steps == (
        "authority_v4_to_v5",
        "authority_v5_to_v6",
        "authority_v6_to_v7",
        "authority_v7_to_v8",
        "authority_v8_to_v9",
    )
    assert applied.changes[0] == f"step authority_v4_to_v5: {authority_v4_to_v5.describe}"
    assert db_version(data_dir) == 9
    old_columns = "SELECT volume_id, epoch, primary_node, replicas, created_at FROM assignments ORDER BY 1, 2"
    assert rows(data_dir / AUTHORITY_FILE, old_columns) == before[IDENTITY_QUERIES[2]]
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries[3:]} == {q: before[q] for q in queries[3:]}
    assert rows(
        data_dir / AUTHORITY_FILE, "SELECT volume_id, epoch, in_sync FROM assignments ORDER BY 1, 2"
    ) == [
        ("a1" * 16, 1, '["node-a"]'),
        ("b2" * 16, 1, '["node-a"]'),
        ("b2" * 16, 2, '["node-b"]'),
        ("c3" * 16, 1, '["node-b"]'),
        ("d4" * 16, 1, '["node-c"]'),
        ("e5" * 16, 1, '["node-a"]'),  # three placements, one copy of the data
        ("e5" * 16, 2, "[]"),
    ]
    assert report.backup_dir is not None
    assert rows(report.backup_dir / AUTHORITY_FILE, "SELECT schema_version FROM meta") == [(4,)]
    conn = sqlite3.connect(data_dir / AUTHORITY_FILE)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE assignments SET in_sync = '[]'")
        with pytest.raises(sqlite3.IntegrityError, match="in_sync must be an array of its replicas"):
            conn.execute(
                "INSERT INTO assignments VALUES (?, 3, 'node-b', ?, 0, ?, 0)",
                ("e5" * 16, '["node-b"]', '["node-b", "node-a"]'),
            )
    finally:
        conn.close()
    with AuthorityStore.open_in(data_dir) as store:
        beta = store.latest_assignment("b2" * 16)
        assert beta is not None
        assert (beta.replicas, beta.in_sync) == (("node-b", "node-a"), ("node-b",))
        assert beta.replication_portals == ("10.0.0.1:4261", "10.0.0.1:4260")
        gamma = store.latest_assignment("e5" * 16)
        assert gamma is not None and (gamma.primary, gamma.in_sync) == (None, ())

        @dataclasses.dataclass(frozen=True)
        class Ask:
            volume_id: str
            primary: str | None
            replicas: tuple[str, ...]
            in_sync: tuple[str, ...]

        # The stale copy stays out until an ask (a later resync) puts it back, under a new epoch.
        again = Publisher(store, wall_clock=lambda: 2.0).publish(
            Ask("b2" * 16, "node-b", ("node-b", "node-a"), ("node-b", "node-a"))
        )
        assert (again.epoch, again.in_sync) == (3, ("node-b", "node-a"))
        assert store.latest_assignment("b2" * 16) == again
    # A new database and a migrated one have the same schema.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    AuthorityStore.open_in(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY 1, 2"
    assert rows(fresh / AUTHORITY_FILE, schema) == rows(data_dir / AUTHORITY_FILE, schema)


AUTHORITY_V5 = FIXTURES.parents[1] / "v5" / AUTHORITY_FILE


def test_authority_v5_to_v6_on_the_fixture(tmp_path: Path) -> None:
    """A v5 database gains ``nodes.draining`` (0 on every row); no other row or column changes; the
    migrated store marks a node draining and back, refuses an unknown one, and a forgotten node
    that says hello again comes back not draining."""
    from sparrow.cluster.authority import AuthorityStore, NodeAddresses, UnknownNode

    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V5, data_dir / AUTHORITY_FILE)
    assert db_version(data_dir) == 5
    queries = (
        *IDENTITY_QUERIES,
        "SELECT * FROM volumes ORDER BY 1",
        "SELECT * FROM tokens ORDER BY 1",
        "SELECT * FROM assignments ORDER BY 1, 2",
    )
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries}
    assert len(before[queries[-1]]) == 8  # see fixtures/README.md
    nodes_before = rows(data_dir / AUTHORITY_FILE, "SELECT * FROM nodes ORDER BY 1")

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.from_version, applied.to_version) == (5, 9)
    assert applied.steps == (
        "authority_v5_to_v6",
        "authority_v6_to_v7",
        "authority_v7_to_v8",
        "authority_v8_to_v9",
    )
    assert applied.changes[0] == f"step authority_v5_to_v6: {authority_v5_to_v6.describe}"
    assert db_version(data_dir) == 9
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries} == before
    nodes_after = rows(data_dir / AUTHORITY_FILE, "SELECT * FROM nodes ORDER BY 1")
    assert nodes_after == [(*n, 0, None) for n in nodes_before]
    conn = sqlite3.connect(data_dir / AUTHORITY_FILE)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE nodes SET draining = 2")
    finally:
        conn.close()
    with AuthorityStore.open_in(data_dir) as store:
        assert not any(n.draining for n in store.nodes())
        assert store.set_draining("node-b", True).draining
        assert [n.node_id for n in store.nodes() if n.draining] == ["node-b"]
        assert not store.set_draining("node-b", False).draining
        with pytest.raises(UnknownNode):
            store.set_draining("node-z", True)
        store.set_draining("node-c", True)  # named only by the deleted "old"
        store.forget_node("node-c", forgotten_at=3.0)
        with pytest.raises(UnknownNode):
            store.set_draining("node-c", True)  # forgotten: not a member
        back = store.upsert_node(
            "node-c",
            incarnation=9,
            addresses=NodeAddresses("10.0.0.4:3260", "10.0.0.4:3291", "10.0.0.4:3281"),
            capacity=1 << 30,
            seen_at=4.0,
        )
        assert not back.draining  # a new node
        store.set_draining("node-a", True)
        again = store.upsert_node(
            "node-a",
            incarnation=10,
            addresses=NodeAddresses("10.0.0.1:3260", "10.0.0.1:3291", "10.0.0.1:3281"),
            capacity=1 << 30,
            seen_at=5.0,
        )
        assert again.draining  # a restart does not end a drain
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    AuthorityStore.open_in(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY 1, 2"
    assert rows(fresh / AUTHORITY_FILE, schema) == rows(data_dir / AUTHORITY_FILE, schema)


def test_authority_v6_to_v7_on_the_fixture(tmp_path: Path) -> None:
    """A v6 database (the v5 fixture migrated to 6) gains ``nodes.public_key``, NULL on every row:
    each node is bound at its next Hello; no other row or column changes; the migrated store binds
    a key by the Hello's upsert, keeps it through a keyless upsert, rebinds and unbinds it
    (``sparrow node rekey``), refuses a malformed one, and forgetting a node drops its key."""
    from sparrow.cluster.authority import AuthorityStore, InvalidAuthorityRecord, NodeAddresses, UnknownNode

    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V5, data_dir / AUTHORITY_FILE)
    migrate(data_dir, 6, clock=Clock())
    assert db_version(data_dir) == 6
    queries = (
        *IDENTITY_QUERIES,
        "SELECT * FROM volumes ORDER BY 1",
        "SELECT * FROM tokens ORDER BY 1",
        "SELECT * FROM assignments ORDER BY 1, 2",
    )
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries}
    nodes_before = rows(data_dir / AUTHORITY_FILE, "SELECT * FROM nodes ORDER BY 1")
    assert len(nodes_before) == 4

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.from_version, applied.to_version) == (6, 9)
    assert applied.steps == ("authority_v6_to_v7", "authority_v7_to_v8", "authority_v8_to_v9")
    assert applied.changes[0] == f"step authority_v6_to_v7: {authority_v6_to_v7.describe}"
    assert db_version(data_dir) == 9
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries} == before
    assert rows(data_dir / AUTHORITY_FILE, "SELECT * FROM nodes ORDER BY 1") == [
        (*n, None) for n in nodes_before
    ]
    conn = sqlite3.connect(data_dir / AUTHORITY_FILE)
    try:
        for bad in ("ab" * 31, "AB" * 32, "zz" * 32):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                conn.execute("UPDATE nodes SET public_key = ?", (bad,))
    finally:
        conn.close()
    key, other = bytes(range(32)), bytes(range(1, 33))
    address = NodeAddresses("10.0.0.1:3260", "10.0.0.1:3291", "10.0.0.1:3281")
    with AuthorityStore.open_in(data_dir) as store:
        assert store.node_keys() == {}
        assert all(n.public_key is None for n in store.nodes())

        def upsert(node_id: str, public_key: bytes | None, seen_at: float) -> bytes | None:
            record = store.upsert_node(
                node_id, incarnation=9, addresses=address, capacity=1, seen_at=seen_at, public_key=public_key
            )
            return record.public_key

        assert upsert("node-a", key, 1.0) == key
        assert upsert("node-a", None, 2.0) == key  # a keyless upsert keeps the binding
        assert store.node_keys() == {"node-a": key}
        assert store.set_node_key("node-a", other).public_key == other
        assert store.set_node_key("node-a", None).public_key is None
        with pytest.raises(UnknownNode):
            store.set_node_key("node-z", key)
        with pytest.raises(InvalidAuthorityRecord):
            store.set_node_key("node-a", b"short")
        assert upsert("node-c", key, 3.0) == key  # named only by the deleted "old"
        store.forget_node("node-c", forgotten_at=4.0)
        assert "node-c" not in store.node_keys()
        with pytest.raises(UnknownNode):
            store.set_node_key("node-c", key)  # forgotten: not a member
        assert upsert("node-c", None, 5.0) is None  # a new node: the old binding is gone
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    AuthorityStore.open_in(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY 1, 2"
    assert rows(fresh / AUTHORITY_FILE, schema) == rows(data_dir / AUTHORITY_FILE, schema)


def test_authority_v7_to_v8_on_the_fixture(tmp_path: Path) -> None:
    """A v7 database (the v5 fixture migrated to 7) gains ``volumes.paused`` and
    ``assignments.paused``, 0 on every row (nothing was paused before), and an empty
    ``cluster_settings`` (no discovery CHAP); no other row or column changes, the append-only
    assignments included; the result has the schema of a new database."""
    from sparrow.cluster.authority import AuthorityStore

    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V5, data_dir / AUTHORITY_FILE)
    migrate(data_dir, 7, clock=Clock())
    assert db_version(data_dir) == 7
    queries = (
        *IDENTITY_QUERIES,
        "SELECT * FROM volumes ORDER BY 1",
        "SELECT * FROM nodes ORDER BY 1",
        "SELECT * FROM tokens ORDER BY 1",
        "SELECT * FROM assignments ORDER BY 1, 2",
    )
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries}
    assert before["SELECT * FROM assignments ORDER BY 1, 2"]

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.from_version, applied.to_version) == (7, 9)
    assert applied.steps == ("authority_v7_to_v8", "authority_v8_to_v9")
    assert applied.changes[0] == f"step authority_v7_to_v8: {authority_v7_to_v8.describe}"
    assert db_version(data_dir) == 9
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries} == before
    for table in ("volumes", "assignments"):
        paused = rows(data_dir / AUTHORITY_FILE, f"SELECT DISTINCT paused FROM {table}")
        assert paused == [(0,)], table
    assert rows(data_dir / AUTHORITY_FILE, "SELECT * FROM cluster_settings") == []
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    AuthorityStore.open_in(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY 1, 2"
    assert rows(fresh / AUTHORITY_FILE, schema) == rows(data_dir / AUTHORITY_FILE, schema)


def test_authority_v8_to_v9_approves_every_member_node(tmp_path: Path) -> None:
    """A v8 database (the v5 fixture migrated to 8, two nodes bound to a key, one with none yet,
    one forgotten) gains ``node_approvals``: each member approved with its bound key, or with
    none (the key its next Hello proves), the forgotten one not at all; no other row changes;
    the master's admission from the migrated store holds every member approved, so an upgrade
    strands no node, while a new node id is pending."""
    from sparrow.cluster.authority import AuthorityStore
    from sparrow.cluster.messages import Hello
    from sparrow.cluster.nodeidentity import Admission, AdmissionPolicy, NodeKey, NodeKeys

    data_dir = tmp_path / "master"
    data_dir.mkdir()
    shutil.copyfile(AUTHORITY_V5, data_dir / AUTHORITY_FILE)
    migrate(data_dir, 8, clock=Clock())
    a, b, c = NodeKey(b"a" * 32), NodeKey(b"b" * 32), NodeKey(b"c" * 32)
    conn = sqlite3.connect(data_dir / AUTHORITY_FILE)
    try:
        with conn:
            conn.execute("UPDATE nodes SET public_key = ? WHERE node_id = 'node-a'", (a.public.hex(),))
            conn.execute("UPDATE nodes SET public_key = ? WHERE node_id = 'node-b'", (b.public.hex(),))
            conn.execute("UPDATE nodes SET forgotten_at = 2.0, public_key = NULL WHERE node_id = 'node-d'")
    finally:
        conn.close()
    queries = (
        *IDENTITY_QUERIES,
        "SELECT * FROM volumes ORDER BY 1",
        "SELECT * FROM nodes ORDER BY 1",
        "SELECT * FROM tokens ORDER BY 1",
        "SELECT * FROM assignments ORDER BY 1, 2",
    )
    before = {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries}

    report = migrate(data_dir, clock=Clock())

    (applied,) = report.applied
    assert (applied.from_version, applied.to_version, applied.steps) == (8, 9, ("authority_v8_to_v9",))
    assert applied.changes[0] == f"step authority_v8_to_v9: {authority_v8_to_v9.describe}"
    assert db_version(data_dir) == 9
    assert {q: rows(data_dir / AUTHORITY_FILE, q) for q in queries} == before
    assert rows(data_dir / AUTHORITY_FILE, "SELECT node_id, public_key FROM node_approvals ORDER BY 1") == [
        ("node-a", a.public.hex()),
        ("node-b", b.public.hex()),
        ("node-c", None),
    ]
    with AuthorityStore.open_in(data_dir) as store:
        keys = NodeKeys(store.node_keys(), store.approvals(), AdmissionPolicy.APPROVE)
    assert keys.pending() == frozenset()
    assert (keys.admission("node-a"), keys.admission("node-b")) == (Admission.APPROVED, Admission.APPROVED)
    binding = b"\x01" * 32

    def hello(node_id: str, key: NodeKey) -> Hello:
        return key.sign_hello(
            Hello(node_id, 1, "10.0.0.9:3260", "10.0.0.9:3261", "10.0.0.9:8080", 1, 1), binding
        )

    admitted = keys.admit(hello("node-c", c), binding)  # its first key since v7: approved, and recorded
    assert (admitted.admission, admitted.newly_approved) == (Admission.APPROVED, True)
    assert keys.admit(hello("node-d", c), binding).admission is Admission.PENDING  # forgotten: a new node
    conn = sqlite3.connect(data_dir / AUTHORITY_FILE)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE node_approvals SET public_key = 'zz'")
    finally:
        conn.close()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    AuthorityStore.open_in(fresh).close()
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY 1, 2"
    assert rows(fresh / AUTHORITY_FILE, schema) == rows(data_dir / AUTHORITY_FILE, schema)


def test_the_authority_steps_are_registered() -> None:
    steps = sorted(
        (s.name, s.from_version, s.to_version) for s in default_graph().steps if s.kind == "authority"
    )
    assert steps == [
        ("authority_v1_to_v2", 1, 2),
        ("authority_v2_to_v3", 2, 3),
        ("authority_v3_to_v4", 3, 4),
        ("authority_v4_to_v5", 4, 5),
        ("authority_v5_to_v6", 5, 6),
        ("authority_v6_to_v7", 6, 7),
        ("authority_v7_to_v8", 7, 8),
        ("authority_v8_to_v9", 8, 9),
    ]
    assert default_graph().head("authority") == 9


def test_a_nodes_cluster_records_are_counted_and_their_identities_guarded(tmp_path: Path) -> None:
    """`sparrow migrate` sees a node's epoch-and-role records (DATA_DIR/cluster/) and its node.json."""
    from sparrow.cluster.messages import Role
    from sparrow.cluster.nodestate import NodeState, VolumeRole
    from store.migrations.runner import JSON_IDENTITY_FIELDS

    state = NodeState(tmp_path)
    state.load()
    state.begin_incarnation("n1", 1_000)
    role = VolumeRole("ab" * 16, "vol-a", 3, Role.PRIMARY, "n1", "10.0.0.1:3260", ("n1",), 1 << 20, 512)
    state.persist(role)
    counts = {v.kind: (dict(v.counts), v.unreadable) for v in versions(tmp_path)}
    assert counts["cluster-volume"] == ({1: 1}, 0)
    assert counts["cluster-node"] == ({1: 1}, 0)
    assert JSON_IDENTITY_FIELDS["cluster-volume"] == ("volume_id", "epoch")
    assert JSON_IDENTITY_FIELDS["cluster-node"] == ("node_id", "incarnation")
