"""Authority v7 -> v8: a volume can be paused (docs/cluster.md, "Pause and resume"); the
cluster's discovery CHAP is the master's.

``volumes.paused`` (INTEGER 0/1, NOT NULL, default 0): what the operator asked for, set by
``sparrow volume pause`` and cleared by ``sparrow volume resume`` (``AuthorityStore.set_paused``).
``assignments.paused`` (the same): whether the assignment published at that epoch pauses the
volume. The control loop asks for a new epoch whenever the two differ (sparrow.cluster.pause), so
a pause reaches the nodes only through the Publisher, and the history records when it did.

``cluster_settings`` (one row, ``id`` = 1, absent until first set): the discovery CHAP every node
asks of a SendTargets session (``discovery_chap_*``, all NULL: none), set by ``sparrow cluster
update`` and carried by every Ack (ack v7).

Existing rows get 0: nothing was paused before v8. No identity (volume ids, node ids, epochs)
changes and no other row is touched (the assignments' append-only triggers refuse UPDATE, not
ALTER TABLE). Runs inside the runner's transaction, which also records version 8;
``sparrow.cluster.authority`` creates a new database as the v1 schema followed by every step, so
both have the same schema.
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 7
to_version = 8
describe = (
    "volumes and assignments gain paused (existing rows: 0, not paused); cluster_settings holds the "
    "discovery CHAP (no row: never set)"
)

STATEMENTS = (
    "ALTER TABLE volumes ADD COLUMN paused INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1))",
    "ALTER TABLE assignments ADD COLUMN paused INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1))",
    """CREATE TABLE cluster_settings (
        id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
        discovery_chap_user TEXT,
        discovery_chap_secret TEXT,
        discovery_chap_mutual_user TEXT,
        discovery_chap_mutual_secret TEXT
    )""",
)


def upgrade(connection: sqlite3.Connection) -> None:
    """Add the columns (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
