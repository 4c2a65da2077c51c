"""Authority v5 -> v6: a node can be drained (docs/cluster.md, "Operator moves").

``nodes.draining`` (INTEGER 0/1, NOT NULL, default 0): set by ``sparrow node drain`` and cleared by
``sparrow node undrain`` (``AuthorityStore.set_draining``). A draining node gets no new copy, and
the master moves every primary and copy off it (sparrow.cluster.moves). It is kept in the
authority, not in the master's memory, so a master restart goes on draining.

Existing rows get 0: no node was draining before v6. No identity (volume ids, node ids, epochs)
changes and no other row is touched. Runs inside the runner's transaction, which also records
version 6; ``sparrow.cluster.authority`` creates a new database as the v1 schema followed by every
step, so both have the same schema.
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 5
to_version = 6
describe = "nodes gain draining (existing rows: 0, not draining)"

STATEMENTS = ("ALTER TABLE nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0 CHECK (draining IN (0, 1))",)


def upgrade(connection: sqlite3.Connection) -> None:
    """Add the column (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
