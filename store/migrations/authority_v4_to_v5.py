"""Authority v4 -> v5: each assignment records its in-sync set (docs/replication.md, "The in-sync
set at the master").

``assignments.in_sync`` (a JSON array of node ids, a subsequence of ``replicas``, the primary
first) names the copies the master records as holding every acknowledged write at that epoch. It
is written with the row by the Publisher and, like the row, never changed (the append-only
triggers stay); it changes only through a new epoch.

Existing rows get ``in_sync`` = the primary alone (``[]`` for a row without a primary), **not**
every replica. Before v5 nothing replicated: a volume created with ``--replicas 3`` had three
placements but one copy of the data, the primary's. A replica of such a volume holds zeros (or
whatever an earlier placement left there), so recording it as in sync would be a lie the
controller would act on: once the primary forwards writes, the replica would acknowledge every
new write and look current while it lacks every write made before the upgrade, and a failover
could promote it and lose them. With the primary alone, the other copies count as stale: they
are never promoted, and rejoin only through a full copy (resync), recorded under a new epoch.
A new volume (v5 on) starts with all its copies in sync: they are all zeros, with nothing written.

The trigger ``assignments_no_update`` is dropped for the one UPDATE that fills the column and
created again with the same text; a new trigger refuses a row whose ``in_sync`` is missing or
names a node ``replicas`` does not. No identity (volume ids, node ids, epochs) changes. Runs inside
the runner's transaction, which also records version 5; ``sparrow.cluster.authority`` creates a
new database as the v1 schema followed by every step, so both have the same schema.
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 4
to_version = 5
describe = "assignments gain in_sync (existing rows: the primary alone; only it held the data)"

#: Exactly the v1 text, so a migrated database and a new one have the same schema.
_NO_UPDATE = """CREATE TRIGGER assignments_no_update BEFORE UPDATE ON assignments
        BEGIN SELECT RAISE(ABORT, 'assignments are append-only'); END"""

STATEMENTS = (
    "ALTER TABLE assignments ADD COLUMN in_sync TEXT",
    "DROP TRIGGER assignments_no_update",
    "UPDATE assignments SET in_sync = CASE WHEN primary_node IS NULL THEN json_array() "
    "ELSE json_array(primary_node) END",
    _NO_UPDATE,
    """CREATE TRIGGER assignments_in_sync BEFORE INSERT ON assignments
        WHEN NEW.in_sync IS NULL OR json_valid(NEW.in_sync) = 0
            OR json_type(NEW.in_sync) IS NOT 'array'
            OR EXISTS (SELECT 1 FROM json_each(NEW.in_sync)
                       WHERE value NOT IN (SELECT value FROM json_each(NEW.replicas)))
        BEGIN SELECT RAISE(ABORT, 'an assignment''s in_sync must be an array of its replicas'); END""",
)


def upgrade(connection: sqlite3.Connection) -> None:
    """Add and fill the column, and the trigger (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
