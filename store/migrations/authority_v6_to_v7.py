"""Authority v6 -> v7: nodes gain their public key (docs/cluster.md, "Node identity").

``nodes.public_key`` (TEXT, nullable: 64 lowercase hex digits, an Ed25519 public key): the key the
master bound to the node id, on the node's first Hello (trust on first use) or by the operator
(``sparrow node rekey``). The master admits a Hello for the node id only with a proof made by that
key (sparrow.cluster.nodeidentity).

Existing rows get NULL: no node proved a key before v7, so each is bound at its next Hello, as a
new node is. No identity (volume ids, node ids, epochs) changes and no other row is touched. Runs
inside the runner's transaction, which also records version 7; ``sparrow.cluster.authority``
creates a new database as the v1 schema followed by every step, so both have the same schema.
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 6
to_version = 7
describe = "nodes gain public_key, the node's identity key (existing rows: NULL, bound at the next Hello)"

STATEMENTS = (
    "ALTER TABLE nodes ADD COLUMN public_key TEXT CHECK (public_key IS NULL OR "
    "(length(public_key) = 64 AND NOT public_key GLOB '*[^0-9a-f]*'))",
)


def upgrade(connection: sqlite3.Connection) -> None:
    """Add the column (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
