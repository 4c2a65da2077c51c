"""Errors of schema migration (docs/cluster.md, "Schema versions and migrations")."""

from __future__ import annotations

import os
import shlex

from store.blockstore import StoreError


class MigrationError(StoreError):
    """A migration cannot be planned or applied; nothing the error names was changed."""


class BadStep(MigrationError):
    """A step module that does not declare a valid step (a bug in the tree, not in the data)."""

    def __init__(self, module: str, reason: str) -> None:
        self.module = module
        self.reason = reason
        super().__init__(f"migration step {module}: {reason}")


class NoMigrationPath(MigrationError):
    """No chain of registered steps leads from the found version to the target."""

    def __init__(self, kind: str, found: int, target: int) -> None:
        self.kind = kind
        self.found = found
        self.target = target
        hint = " (downgrades are not supported; restore a backup instead)" if target < found else ""
        super().__init__(f"no migration path for {kind} records from version {found} to {target}{hint}")


class IdentityChanged(MigrationError):
    """A step changed an identity (volume id/uuid, name, node id, epoch): refused, nothing written."""

    def __init__(self, item: str, detail: str) -> None:
        self.item = item
        self.detail = detail
        super().__init__(f"migration of {item} would change an identity ({detail}); nothing was written")


class SchemaTooOld(StoreError):
    """Durable state written by an older Sparrow. The daemon refuses it rather than migrating in
    place on its own: a migration is an operator's act (stop, back up, migrate, start), run with
    ``sparrow migrate DATA_DIR``, which writes a backup and a history entry first."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        found: int,
        required: int,
        data_dir: str | os.PathLike[str],
    ) -> None:
        self.path = os.fspath(path)
        self.found = found
        self.required = required
        self.data_dir = os.fspath(data_dir)
        self.command = f"sparrow migrate {shlex.quote(self.data_dir)}"
        super().__init__(
            f"{self.path} has schema version {found}; this Sparrow needs version {required}: "
            f"stop Sparrow and run `{self.command}`"
        )
