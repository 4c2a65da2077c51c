"""Authority v3 -> v4: a node can be forgotten while the history names it (docs/cluster.md,
"Capacity, forgetting nodes, health").

``assignments`` is append-only and ``assignments.primary_node REFERENCES nodes (node_id)``, so a
node that any recorded assignment names keeps its row. This step adds:

- ``nodes.forgotten_at`` (REAL, NULL: a member): set by ``AuthorityStore.forget_node`` on a node
  the history names; such a node is left out of everything that reads nodes (the node list, the
  capacity bound at create, leases at a master's start, placement), and a Hello from its id
  clears it again (a new node). A node that no assignment names is deleted instead;
- a trigger that refuses a new assignment naming a forgotten node (primary or replica).

No existing row is touched (every ``forgotten_at`` is NULL), so identities (volume ids, node ids,
epochs) stay. Runs inside the runner's transaction, which also records version 4;
``sparrow.cluster.authority`` creates a new database as the v1 schema followed by every step, so
both have the same schema.
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 3
to_version = 4
describe = "nodes gain forgotten_at; a new assignment may not name a forgotten node"

STATEMENTS = (
    "ALTER TABLE nodes ADD COLUMN forgotten_at REAL",
    """CREATE TRIGGER assignments_no_forgotten_node BEFORE INSERT ON assignments
        WHEN EXISTS (SELECT 1 FROM nodes WHERE forgotten_at IS NOT NULL AND (
            node_id = NEW.primary_node OR node_id IN (SELECT value FROM json_each(NEW.replicas))))
        BEGIN SELECT RAISE(ABORT, 'an assignment may not name a forgotten node'); END""",
)


def upgrade(connection: sqlite3.Connection) -> None:
    """Add the column and the trigger (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
