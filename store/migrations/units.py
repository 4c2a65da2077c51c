"""What a data directory holds that has a schema version: the *units* a migration works on.

- kind ``volume``: ``DATA_DIR/volumes/<name>.json``, one ``store.metadata`` envelope per volume
  (``<name>.img`` next to it is block data and is never opened here).
- kind ``cluster-volume``: ``DATA_DIR/cluster/<volume_id>.json``, a node's epoch and role per volume;
  kind ``cluster-node``: ``DATA_DIR/node.json``, a node's id and incarnation
  (``sparrow.cluster.nodestate``).
- kind ``authority``: ``DATA_DIR/authority.sqlite3``, the master's AuthorityStore; its version is
  the ``meta`` row (``store.migrations.sqlitemeta``).

Reading never writes: a database is opened read-only, and ``immutable`` when it has no WAL file (so
not even an empty ``-wal``/``-shm`` is left behind).
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.metadata import CorruptRecord, is_temp_file, read_record
from store.migrations.graph import KIND_AUTHORITY, KIND_CLUSTER_NODE, KIND_CLUSTER_VOLUME, KIND_VOLUME
from store.migrations.sqlitemeta import NoMetaTable, read_version

AUTHORITY_FILE = "authority.sqlite3"
VOLUMES_DIR = "volumes"
#: Where each JSON kind keeps its records, relative to the data directory: a directory of records...
JSON_DIRS = {KIND_VOLUME: VOLUMES_DIR, KIND_CLUSTER_VOLUME: "cluster"}
#: ... or one file.
JSON_FILES = {KIND_CLUSTER_NODE: "node.json"}


@dataclass(frozen=True, slots=True)
class Unit:
    """One versioned thing found in a data directory."""

    kind: str
    path: Path
    #: The path relative to the data directory (names it in plans, backups and the history).
    item: str
    version: int
    #: The record body (JSON kinds); None for a database.
    body: dict[str, Any] | None
    #: ``sha256:<hex>`` of the file (JSON) or of the SQL dump (database).
    checksum: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Something that should have a version but cannot be read: it is reported and left alone."""

    kind: str
    item: str
    reason: str


def sha256_text(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dump_checksum(conn: sqlite3.Connection) -> str:
    """A checksum of a database's content (its SQL dump), independent of page layout."""
    return sha256_text("\n".join(conn.iterdump()).encode())


def authority_path(data_dir: Path) -> Path:
    return Path(data_dir) / AUTHORITY_FILE


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open a database without writing anything (see the module docstring)."""
    wal = path.with_name(path.name + "-wal")
    query = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?{query}"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def scan(data_dir: Path, kinds: frozenset[str]) -> tuple[list[Unit], list[Unreadable]]:
    """Every unit of ``kinds`` in ``data_dir``, sorted by kind and item."""
    data_dir = Path(data_dir)
    units: list[Unit] = []
    bad: list[Unreadable] = []
    found: list[tuple[str, Path, str]] = []
    for kind, subdir in sorted(JSON_DIRS.items()):
        directory = data_dir / subdir
        if kind not in kinds or not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.name.endswith(".json") and not is_temp_file(path.name) and path.is_file():
                found.append((kind, path, f"{subdir}/{path.name}"))
    for kind, name in sorted(JSON_FILES.items()):
        if kind in kinds and (data_dir / name).is_file():
            found.append((kind, data_dir / name, name))
    for kind, path, item in found:
        try:
            raw = path.read_bytes()
            record = read_record(path, kind, sys.maxsize)
        except OSError as e:
            bad.append(Unreadable(kind, item, f"cannot read: {e.strerror or e}"))
            continue
        except CorruptRecord as e:
            bad.append(Unreadable(kind, item, e.reason))
            continue
        units.append(Unit(kind, path, item, record.schema_version, record.body, sha256_text(raw)))
    if KIND_AUTHORITY in kinds:
        path = authority_path(data_dir)
        if path.exists():
            try:
                conn = open_readonly(path)
                try:
                    version = read_version(conn)
                    checksum = dump_checksum(conn)
                finally:
                    conn.close()
            except NoMetaTable as e:
                bad.append(Unreadable(KIND_AUTHORITY, AUTHORITY_FILE, f"not a Sparrow database ({e})"))
            except sqlite3.Error as e:
                bad.append(Unreadable(KIND_AUTHORITY, AUTHORITY_FILE, f"cannot read: {e}"))
            else:
                units.append(Unit(KIND_AUTHORITY, path, AUTHORITY_FILE, version, None, checksum))
    return units, bad
