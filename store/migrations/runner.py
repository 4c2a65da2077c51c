"""The migration runner: plan, back up, apply, record (docs/cluster.md, "Schema versions and
migrations"; the shape follows Alembic's ``runtime/migration.py``).

A run, for every unit (``store.migrations.units``) whose version differs from the target:

1. plans the chain of steps (``StepGraph.path``, shortest) and computes the result *before* writing
   anything: JSON bodies in memory, a database on an in-memory copy. A step that fails on a record,
   or that changes an identity, stops here with nothing written;
2. writes a backup of each unit it will change into ``DATA_DIR/backups/<UTC timestamp>/`` (same
   relative paths; the database through SQLite's online backup API);
3. applies: a JSON record is replaced atomically with ``store.metadata.write_record``, the new
   ``schema_version`` in the same write; a database gets every step and the ``meta`` version update
   in one transaction;
4. appends one JSON line per unit to ``DATA_DIR/migrations.log``: kind, item, from, to, steps,
   applied_at, changes, checksum_before, checksum_after, backup.

Each unit is migrated atomically; a run interrupted between two units leaves each one at its old or
its new version, and running again finishes the rest. A unit already at its target is not touched,
so a second run is a no-op (no backup, no history entry). Identities (volume ``uuid``/``volume_id``
and ``name``; the authority's volume ids, node ids and ``(volume_id, epoch)`` pairs) are compared
before and after and a change is refused. Block data (``*.img``) is never opened.

A real run holds the data directory's lock (``store.lock.DataDirLock``), so it cannot run under a
live daemon; ``dry_run`` and ``versions`` only read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from store.lock import DataDirLock
from store.metadata import canonical_json, checksum, fsync_dir, read_record, write_durably, write_record
from store.migrations.errors import IdentityChanged, MigrationError, NoMigrationPath
from store.migrations.graph import JSON_KINDS, KINDS, SQLITE_KINDS, Step, StepGraph, default_graph
from store.migrations.sqlitemeta import immediate_transaction, read_version, write_version
from store.migrations.units import Unit, dump_checksum, open_readonly, scan, sha256_text

HISTORY_FILE = "migrations.log"
BACKUPS_DIR = "backups"
#: Fields of a JSON body that name the thing: a step must leave every one it finds as it was.
JSON_IDENTITY_FIELDS: Mapping[str, tuple[str, ...]] = {
    "volume": ("name", "uuid", "volume_id"),
    "cluster-volume": ("volume_id", "epoch"),
    "cluster-node": ("node_id", "incarnation"),
}
#: Queries whose answers are identities in a database: equal before and after every migration.
SQLITE_IDENTITY_QUERIES: Mapping[str, Mapping[str, str]] = {
    "authority": {
        "volume ids": "SELECT volume_id FROM volumes ORDER BY 1",
        "node ids": "SELECT node_id FROM nodes ORDER BY 1",
        "assignment epochs": "SELECT volume_id, epoch FROM assignments ORDER BY 1, 2",
    }
}
#: Keys whose values never go into plans or the history (CHAP secrets live in volume records).
_SECRET_MARK = "secret"

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Problem:
    """A unit the run leaves alone, and why."""

    kind: str
    item: str
    reason: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Pending:
    """A unit and the steps that take it to ``target``."""

    unit: Unit
    target: int
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    data_dir: Path
    pending: tuple[Pending, ...]
    #: Units already at their target.
    current: tuple[Unit, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True, slots=True)
class Applied:
    """What was (or, in a dry run, would be) done to one unit."""

    kind: str
    item: str
    from_version: int
    to_version: int
    steps: tuple[str, ...]
    changes: tuple[str, ...]
    checksum_before: str
    checksum_after: str


@dataclass(frozen=True, slots=True)
class MigrationReport:
    data_dir: Path
    dry_run: bool
    applied: tuple[Applied, ...]
    #: How many units were already at their target.
    unchanged: int
    problems: tuple[Problem, ...]
    #: Where the backup went (None when nothing was written).
    backup_dir: Path | None


@dataclass(frozen=True, slots=True)
class KindVersions:
    """How many units of one kind are at each version (``--list-versions``)."""

    kind: str
    latest: int
    counts: Mapping[int, int] = field(default_factory=dict)
    unreadable: int = 0


# --- planning ------------------------------------------------------------------------------------


def _kinds(kinds: frozenset[str] | None) -> frozenset[str]:
    if kinds is None:
        return KINDS
    unknown = kinds - KINDS
    if unknown:
        raise MigrationError(
            f"unknown record kind {sorted(unknown)[0]!r} (known: {', '.join(sorted(KINDS))})"
        )
    return kinds


def _check_dir(data_dir: Path) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MigrationError(f"data directory {data_dir} does not exist or is not a directory")
    return data_dir


def versions(
    data_dir: Path, *, kinds: frozenset[str] | None = None, graph: StepGraph | None = None
) -> tuple[KindVersions, ...]:
    """Count the units of each kind per schema version (reads only)."""
    graph = graph or default_graph()
    wanted = _kinds(kinds)
    units, bad = scan(_check_dir(data_dir), wanted)
    result = []
    for kind in sorted(wanted):
        counts = Counter(u.version for u in units if u.kind == kind)
        result.append(
            KindVersions(
                kind, graph.head(kind), dict(sorted(counts.items())), sum(b.kind == kind for b in bad)
            )
        )
    return tuple(result)


def plan(
    data_dir: Path,
    target: int | None = None,
    *,
    kinds: frozenset[str] | None = None,
    graph: StepGraph | None = None,
) -> Plan:
    """What a run would do: for each unit, the chain of steps to ``target`` (default: the newest
    version of its kind). Reads only."""
    graph = graph or default_graph()
    data_dir = _check_dir(data_dir)
    units, bad = scan(data_dir, _kinds(kinds))
    problems = [Problem(b.kind, b.item, b.reason) for b in bad]
    pending: list[Pending] = []
    current: list[Unit] = []
    for unit in units:
        head = graph.head(unit.kind)
        goal = head if target is None else target
        if unit.version == goal:
            current.append(unit)
            continue
        if target is None and unit.version > head:
            reason = (
                f"schema version {unit.version} is newer than this Sparrow knows ({head}): "
                "written by a newer Sparrow"
            )
            problems.append(Problem(unit.kind, unit.item, reason))
            continue
        try:
            steps = graph.path(unit.kind, unit.version, goal)
        except NoMigrationPath as e:
            problems.append(Problem(unit.kind, unit.item, str(e)))
            continue
        pending.append(Pending(unit, goal, steps))
    return Plan(data_dir, tuple(pending), tuple(current), tuple(problems))


# --- computing a migration (no writes) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Prepared:
    pending: Pending
    applied: Applied
    #: The new body (JSON kinds).
    body: dict[str, Any] | None


def _redact(key: str, value: Any) -> Any:
    if _SECRET_MARK in key.lower() and value is not None:
        return "<redacted>"
    if isinstance(value, dict):
        return {k: _redact(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(key, v) for v in value]
    return value


def _render(key: str, value: Any) -> str:
    return json.dumps(_redact(key, value), sort_keys=True)


def diff_bodies(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[str, ...]:
    """One line per top-level field added, removed or changed (secret values redacted)."""
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in before:
            lines.append(f"add {key} = {_render(key, after[key])}")
        elif key not in after:
            lines.append(f"remove {key} (was {_render(key, before[key])})")
        elif before[key] != after[key]:
            lines.append(f"change {key}: {_render(key, before[key])} -> {_render(key, after[key])}")
    return tuple(lines)


def envelope_bytes(kind: str, version: int, body: dict[str, Any]) -> bytes:
    """The bytes ``store.metadata.write_record`` writes for this record (for the dry-run checksum)."""
    envelope = {"kind": kind, "schema_version": version, "crc32c": checksum(body), "body": body}
    return (json.dumps(envelope, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _prepare_json(p: Pending) -> _Prepared:
    unit = p.unit
    assert unit.body is not None
    body: Any = copy.deepcopy(unit.body)
    for step in p.steps:
        body = step.upgrade(copy.deepcopy(body))
        if not isinstance(body, dict):
            raise ValueError(f"step {step.name} returned a {type(body).__name__}, not a record")
    canonical_json(body)  # raises if a step produced something JSON cannot hold
    for name in JSON_IDENTITY_FIELDS.get(unit.kind, ()):
        if name in unit.body and body.get(name) != unit.body[name]:
            raise IdentityChanged(unit.item, f"{name} {unit.body[name]!r} -> {body.get(name, '<removed>')!r}")
    applied = Applied(
        unit.kind,
        unit.item,
        unit.version,
        p.target,
        tuple(s.name for s in p.steps),
        diff_bodies(unit.body, body),
        unit.checksum,
        sha256_text(envelope_bytes(unit.kind, p.target, body)),
    )
    return _Prepared(p, applied, body)


def _identities(kind: str, conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]] | None]:
    out: dict[str, list[tuple[Any, ...]] | None] = {}
    for label, query in SQLITE_IDENTITY_QUERIES.get(kind, {}).items():
        try:
            out[label] = [tuple(r) for r in conn.execute(query).fetchall()]
        except sqlite3.Error:
            out[label] = None  # the table does not exist (yet)
    return out


def _check_identities(
    item: str, before: dict[str, list[tuple[Any, ...]] | None], after: dict[str, list[tuple[Any, ...]] | None]
) -> None:
    for label, rows in before.items():
        if rows is not None and after.get(label) != rows:
            raise IdentityChanged(item, f"{label} differ")


def _schema(conn: sqlite3.Connection) -> dict[str, str]:
    rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    return {name: sql for name, sql in rows}


def _row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _apply_sql_steps(p: Pending, conn: sqlite3.Connection) -> None:
    """Inside the caller's BEGIN IMMEDIATE: every step, the checks, the version update."""
    item = p.unit.item
    if read_version(conn) != p.unit.version:
        raise MigrationError(f"{item} changed since it was planned; run the migration again")
    before = _identities(p.unit.kind, conn)
    for step in p.steps:
        step.upgrade(conn)
        if not conn.in_transaction:
            raise MigrationError(f"step {step.name} ended the migration's transaction (it must not COMMIT)")
    write_version(conn, p.target)
    _check_identities(item, before, _identities(p.unit.kind, conn))
    violations = conn.execute("PRAGMA foreign_key_check").fetchall()
    if violations:
        raise MigrationError(f"{item}: the migrated database breaks a foreign key ({violations[0][0]})")


def _prepare_sqlite(p: Pending) -> _Prepared:
    """Rehearse the steps on an in-memory copy: the changes and checksum, nothing written."""
    unit = p.unit
    source = open_readonly(unit.path)
    memory = sqlite3.connect(":memory:", isolation_level=None)
    try:
        source.backup(memory)
        schema_before, counts_before = _schema(memory), _row_counts(memory)
        with immediate_transaction(memory):
            _apply_sql_steps(p, memory)
        schema_after, counts_after = _schema(memory), _row_counts(memory)
        changes = [f"step {s.name}: {s.describe}" for s in p.steps]
        changes += [f"add {sql}" for n, sql in sorted(schema_after.items()) if n not in schema_before]
        changes += [f"drop {sql}" for n, sql in sorted(schema_before.items()) if n not in schema_after]
        changes += [
            f"alter {schema_before[n]} -> {sql}"
            for n, sql in sorted(schema_after.items())
            if n in schema_before and schema_before[n] != sql
        ]
        changes += [
            f"rows in {t}: {counts_before.get(t, 0)} -> {c}"
            for t, c in sorted(counts_after.items())
            if t != "meta" and counts_before.get(t, 0) != c
        ]
        after = dump_checksum(memory)
    finally:
        memory.close()
        source.close()
    applied = Applied(
        unit.kind,
        unit.item,
        unit.version,
        p.target,
        tuple(s.name for s in p.steps),
        tuple(changes),
        unit.checksum,
        after,
    )
    return _Prepared(p, applied, None)


def _prepare(p: Pending) -> _Prepared:
    if p.unit.kind in JSON_KINDS:
        return _prepare_json(p)
    assert p.unit.kind in SQLITE_KINDS
    return _prepare_sqlite(p)


# --- writing --------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup_dir(data_dir: Path, now: datetime) -> Path:
    root = data_dir / BACKUPS_DIR
    root.mkdir(mode=0o700, exist_ok=True)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    for n in range(1000):
        candidate = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        fsync_dir(root)
        return candidate
    raise MigrationError(f"cannot create a backup directory under {root}")


def _write_backup(backup: Path, prepared: list[_Prepared]) -> None:
    for prep in prepared:
        unit = prep.pending.unit
        dest = backup / unit.item
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if unit.kind in JSON_KINDS:
            raw = unit.path.read_bytes()
            if sha256_text(raw) != unit.checksum:
                raise MigrationError(f"{unit.item} changed since it was planned; run the migration again")
            write_durably(dest, raw, os.O_CREAT | os.O_EXCL)
        else:
            source = sqlite3.connect(unit.path, isolation_level=None)
            target = sqlite3.connect(dest, isolation_level=None)
            try:
                source.backup(target)
            finally:
                target.close()
                source.close()
            os.chmod(dest, 0o600)
            _fsync_file(dest)
        fsync_dir(dest.parent)
    fsync_dir(backup)


def _apply_json(prep: _Prepared) -> Applied:
    unit, target = prep.pending.unit, prep.pending.target
    assert prep.body is not None
    write_record(unit.path, unit.kind, target, prep.body)
    read_record(unit.path, unit.kind, target)  # it reads back as the new version
    after = sha256_text(unit.path.read_bytes())
    return _with_after(prep.applied, after)


def _apply_sqlite(prep: _Prepared) -> Applied:
    conn = sqlite3.connect(prep.pending.unit.path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        with immediate_transaction(conn):
            _apply_sql_steps(prep.pending, conn)
        after = dump_checksum(conn)
    finally:
        conn.close()
    return _with_after(prep.applied, after)


def _with_after(applied: Applied, after: str) -> Applied:
    return dataclasses.replace(applied, checksum_after=after)


def _append_history(data_dir: Path, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode()
    path = data_dir / HISTORY_FILE
    write_durably(path, line, os.O_APPEND | os.O_CREAT)
    fsync_dir(data_dir)


def read_history(data_dir: Path) -> list[dict[str, Any]]:
    """The history entries, oldest first ([] when no migration ever ran)."""
    try:
        text = (Path(data_dir) / HISTORY_FILE).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def migrate(
    data_dir: Path,
    target: int | None = None,
    *,
    dry_run: bool = False,
    kinds: frozenset[str] | None = None,
    graph: StepGraph | None = None,
    clock: Clock = _utcnow,
) -> MigrationReport:
    """Migrate every unit of ``kinds`` in ``data_dir`` to ``target`` (default: the newest version
    of its kind). ``dry_run`` computes everything and writes nothing.

    Raises MigrationError (IdentityChanged when a step would change an identity; nothing written)
    and, for a real run, ``store.lock.DataDirLocked`` when a daemon holds the directory. Units that
    cannot be read or have no path to the target are left alone and listed in ``problems``.
    """
    data_dir = _check_dir(data_dir)
    lock = None if dry_run else DataDirLock(data_dir)
    if lock is not None:
        lock.acquire()
    try:
        the_plan = plan(data_dir, target, kinds=kinds, graph=graph)
        prepared: list[_Prepared] = []
        problems = list(the_plan.problems)
        for pending in the_plan.pending:
            try:
                prepared.append(_prepare(pending))
            except MigrationError:
                raise
            except Exception as e:  # a step that cannot take this record: leave it, report it
                step_names = ", ".join(s.name for s in pending.steps)
                reason = f"step {step_names} failed: {type(e).__name__}: {e}"
                problems.append(Problem(pending.unit.kind, pending.unit.item, reason))
        if dry_run or not prepared:
            return MigrationReport(
                data_dir,
                dry_run,
                tuple(p.applied for p in prepared),
                len(the_plan.current),
                tuple(problems),
                None,
            )
        backup = _backup_dir(data_dir, clock())
        _write_backup(backup, prepared)
        done: list[Applied] = []
        for prep in prepared:
            applied = _apply_json(prep) if prep.pending.unit.kind in JSON_KINDS else _apply_sqlite(prep)
            _append_history(
                data_dir,
                {
                    "kind": applied.kind,
                    "item": applied.item,
                    "from": applied.from_version,
                    "to": applied.to_version,
                    "steps": list(applied.steps),
                    "applied_at": clock().astimezone(UTC).isoformat(),
                    "changes": list(applied.changes),
                    "checksum_before": applied.checksum_before,
                    "checksum_after": applied.checksum_after,
                    "backup": str(backup.relative_to(data_dir)),
                },
            )
            done.append(applied)
        return MigrationReport(data_dir, False, tuple(done), len(the_plan.current), tuple(problems), backup)
    finally:
        if lock is not None:
            lock.release()
