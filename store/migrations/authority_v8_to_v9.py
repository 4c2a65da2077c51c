"""Authority v8 -> v9: a node is a member only once the operator approved it (docs/cluster.md,
"Node admission").

``node_approvals(node_id PK, public_key, approved_at)``: the key the operator approved for a node
id (``sparrow node approve``), or the key a master under ``--admission open`` admitted. A node
whose bound key (``nodes.public_key``) has no approval is *pending*: the master takes its
heartbeats but places nothing on it. A row may name a node id that never said Hello (approved
ahead with ``--key``: its first Hello must prove that key). ``public_key`` NULL: approved for the
key its next Hello proves (bound on first use, then recorded here).

Existing nodes are approved: every member (``forgotten_at`` NULL) gets a row with its bound key,
or NULL when it has none yet (rekeyed to none, or never said Hello since v7), so a cluster that
upgrades keeps every node it had. Forgotten nodes get none (their next Hello is a new node's). No
other row is touched. Runs inside the runner's transaction, which also records version 9;
``sparrow.cluster.authority`` creates a new database as the v1 schema followed by every step, so
both have the same schema (a new database has no node, so the INSERT adds nothing).
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 8
to_version = 9
describe = (
    "node_approvals holds the key the operator approved per node id; every member node is "
    "approved with its bound key (NULL: the key its next Hello proves)"
)

STATEMENTS = (
    """CREATE TABLE node_approvals (
        node_id TEXT PRIMARY KEY NOT NULL,
        public_key TEXT CHECK (public_key IS NULL OR
            (length(public_key) = 64 AND NOT public_key GLOB '*[^0-9a-f]*')),
        approved_at REAL NOT NULL
    )""",
    "INSERT INTO node_approvals (node_id, public_key, approved_at) "
    "SELECT node_id, public_key, last_seen FROM nodes WHERE forgotten_at IS NULL",
)


def upgrade(connection: sqlite3.Connection) -> None:
    """Add the table and approve the member nodes (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
