"""Authority v2 -> v3: API tokens (sparrow.auth.tokens; docs/cluster.md, "API tokens").

A new table; no existing row is touched, so identities (volume ids, node ids, epochs) stay::

    tokens(token_id PK (16 hex digits), role ('admin'|'operator'|'reader'), tenant (a volume-name
           prefix, NULL: every volume), name, secret_sha256 (64 hex digits: never the token
           itself), created_at, revoked_at (NULL: in force))

Tokens are never deleted, only revoked (a trigger refuses DELETE), so a revoked id is never reused.
A migrated database holds no token: the master's first start mints the bootstrap admin token.
Runs inside the runner's transaction, which also records version 3; ``sparrow.cluster.authority``
creates a new database as the v1 schema followed by every step, so both have the same schema.
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 2
to_version = 3
describe = "API tokens: id, role, tenant, name, sha256 of the secret, created and revoked times"

STATEMENTS = (
    """CREATE TABLE tokens (
        token_id TEXT PRIMARY KEY NOT NULL CHECK (length(token_id) = 16),
        role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'reader')),
        tenant TEXT,
        name TEXT,
        secret_sha256 TEXT NOT NULL CHECK (length(secret_sha256) = 64),
        created_at REAL NOT NULL,
        revoked_at REAL
    )""",
    """CREATE TRIGGER tokens_never_deleted BEFORE DELETE ON tokens
        BEGIN SELECT RAISE(ABORT, 'tokens are revoked (revoked_at), never removed'); END""",
)


def upgrade(connection: sqlite3.Connection) -> None:
    """Create the table (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
