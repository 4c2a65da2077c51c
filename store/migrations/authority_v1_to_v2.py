"""Authority v1 -> v2: each volume carries its export settings (docs/cluster.md, "Embedded mode").

New nullable columns of ``volumes``, every existing row getting NULL (= the v1 behaviour):

- ``physical_block_size`` (512 or 4096; NULL: the logical block size, SBC-3 6.4.3);
- ``chap_user``, ``chap_secret``, ``chap_mutual_user``, ``chap_mutual_secret`` (RFC 7143 12.1.3;
  all NULL: no CHAP);
- ``backing`` (an absolute path on the node; NULL: a sparse file in the node's data directory).

``ALTER TABLE ... ADD COLUMN`` only: no row is rewritten, so identities (volume ids, node ids,
epochs) are untouched. Runs inside the runner's transaction, which also records version 2.
``sparrow.cluster.authority`` creates a new database as the v1 schema followed by this step, so a
migrated database and a new one have the same schema.
"""

from __future__ import annotations

import sqlite3

kind = "authority"
from_version = 1
to_version = 2
describe = "volumes gain physical_block_size, CHAP (user, secret, mutual user, mutual secret) and backing"

STATEMENTS = (
    "ALTER TABLE volumes ADD COLUMN physical_block_size INTEGER "
    "CHECK (physical_block_size IS NULL OR physical_block_size IN (512, 4096))",
    "ALTER TABLE volumes ADD COLUMN chap_user TEXT",
    "ALTER TABLE volumes ADD COLUMN chap_secret TEXT",
    "ALTER TABLE volumes ADD COLUMN chap_mutual_user TEXT",
    "ALTER TABLE volumes ADD COLUMN chap_mutual_secret TEXT",
    "ALTER TABLE volumes ADD COLUMN backing TEXT",
)


def upgrade(connection: sqlite3.Connection) -> None:
    """Add the columns (inside the caller's transaction; never COMMITs)."""
    for statement in STATEMENTS:
        connection.execute(statement)
