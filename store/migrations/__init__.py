"""Schema versions and migrations of Sparrow's durable state (docs/cluster.md).

Two kinds of durable state carry a schema version: the node's JSON records (kind ``volume``,
``DATA_DIR/volumes/*.json``, a ``store.metadata`` envelope) and the master's AuthorityStore (kind
``authority``, ``DATA_DIR/authority.sqlite3``, its ``meta`` table). Steps are modules in this
package (``graph``: how they declare themselves and how a path is found); ``runner`` plans, backs
up, applies and records; ``sparrow migrate DATA_DIR`` is the command.

Sparrow itself never migrates on start: a daemon that finds state older than it reads refuses it
with ``SchemaTooOld``, whose message is the exact ``sparrow migrate`` command to run.
"""

from store.migrations.errors import BadStep, IdentityChanged, MigrationError, NoMigrationPath, SchemaTooOld
from store.migrations.graph import (
    BASE_VERSION,
    KIND_AUTHORITY,
    KIND_VOLUME,
    KINDS,
    Step,
    StepGraph,
    default_graph,
    discover_steps,
)
from store.migrations.runner import (
    BACKUPS_DIR,
    HISTORY_FILE,
    Applied,
    KindVersions,
    MigrationReport,
    Pending,
    Plan,
    Problem,
    migrate,
    plan,
    read_history,
    versions,
)
from store.migrations.units import AUTHORITY_FILE, authority_path

__all__ = [
    "AUTHORITY_FILE",
    "BACKUPS_DIR",
    "BASE_VERSION",
    "HISTORY_FILE",
    "KINDS",
    "KIND_AUTHORITY",
    "KIND_VOLUME",
    "Applied",
    "BadStep",
    "IdentityChanged",
    "KindVersions",
    "MigrationError",
    "MigrationReport",
    "NoMigrationPath",
    "Pending",
    "Plan",
    "Problem",
    "SchemaTooOld",
    "Step",
    "StepGraph",
    "authority_path",
    "default_graph",
    "discover_steps",
    "migrate",
    "plan",
    "read_history",
    "versions",
]
