"""The schema version of a Sparrow SQLite database: the one-row ``meta`` table.

Shared by the database's owner (``sparrow.cluster.authority``, which creates it) and the migration
runner (which reads it and, in the same transaction as a step, updates it). The row is::

    meta(id INTEGER PRIMARY KEY CHECK (id = 1), schema_version INTEGER NOT NULL)
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

META_DDL = (
    "CREATE TABLE meta ("
    "id INTEGER PRIMARY KEY CHECK (id = 1), "
    "schema_version INTEGER NOT NULL CHECK (schema_version >= 1))"
)


class NoMetaTable(Exception):
    """The database has no (readable) ``meta`` row: it is not a Sparrow database, or it is empty."""


def read_version(conn: sqlite3.Connection) -> int:
    """The recorded schema version. Raises NoMetaTable."""
    try:
        row = conn.execute("SELECT schema_version FROM meta WHERE id = 1").fetchone()
    except sqlite3.DatabaseError as e:
        raise NoMetaTable(str(e)) from e
    if row is None or type(row[0]) is not int:
        raise NoMetaTable("no schema_version row in meta")
    version: int = row[0]
    return version


def create_meta(conn: sqlite3.Connection, version: int) -> None:
    """Create the table with its one row (inside the caller's transaction)."""
    conn.execute(META_DDL)
    conn.execute("INSERT INTO meta (id, schema_version) VALUES (1, ?)", (version,))


def write_version(conn: sqlite3.Connection, version: int) -> None:
    """Set the version (inside the caller's transaction, with the change it records)."""
    cur = conn.execute("UPDATE meta SET schema_version = ? WHERE id = 1", (version,))
    if cur.rowcount != 1:
        raise NoMetaTable("no schema_version row in meta")


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises (the write lock is taken at the
    start, so a transaction never fails half way for a lock another writer holds)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
