"""Operator commands that work on a master's data directory itself, not through its API
(docs/operations.md):

- ``sparrow audit [--data-dir DIR] [--since TIME] [--volume NAME] [--json]`` reads
  ``DIR/audit.jsonl`` (sparrow.master.audit). It reads the file, not an API route, so it answers
  when the master is stopped or wedged (when the trail matters most) and needs no token: the
  file's mode (0600, owned by the daemon's user) is the access control, as for the authority.
- ``sparrow backup DATA_DIR DEST`` and ``sparrow restore BACKUP DATA_DIR`` (sparrow.backup).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TextIO

from sparrow.cli import CliError, UsageError


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir)
    from sparrow.config import default_data_dir

    return default_data_dir()


def cmd_audit(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.master.audit import AUDIT_FILE, format_record, parse_time, read_records, select

    path = _data_dir(args) / AUDIT_FILE
    try:
        since = None if args.since is None else parse_time(args.since, time.time())
    except ValueError as e:
        raise UsageError(f"sparrow audit: error: {e}") from None
    try:
        records = read_records(path)
    except FileNotFoundError:
        raise CliError(f"no audit log at {path} (is --data-dir the master's data directory?)") from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    for record in select(records, since=since, volume=args.volume):
        print(json.dumps(record.json()) if args.json else format_record(record), file=out)
    return 0


def cmd_backup(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.backup import BackupError, backup

    try:
        result = backup(Path(args.data_dir), Path(args.dest))
    except BackupError as e:
        raise CliError(str(e)) from None
    print(f"backed up {result.volumes} volumes (highest epoch {result.max_epoch}) to {result.path}", file=out)
    if result.master_key == "carried":
        print(
            "the backup carries master.key (the master's identity): keep it as secret as the data directory",
            file=out,
        )
    else:
        print("the data directory holds no master.key: the backup carries none", file=out)
    return 0


def cmd_restore(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.backup import BackupError, restore

    try:
        result = restore(Path(args.backup), Path(args.data_dir))
    except BackupError as e:
        raise CliError(str(e)) from None
    print(
        f"restored {result.volumes} volumes (highest epoch {result.max_epoch}) into {result.path}; "
        f"the replaced authority was kept as {result.previous}"
        if result.previous is not None
        else f"restored {result.volumes} volumes (highest epoch {result.max_epoch}) into {result.path}",
        file=out,
    )
    if result.master_key == "restored":
        old = result.previous_master_key
        kept = "" if old is None else f"; the one replaced kept as {old}"
        print(f"restored master.key: the nodes' pinned master key is the backed-up master's{kept}", file=out)
    elif result.master_key == "absent":
        print(
            "the backup carries no master.key (an older backup): the data directory's is kept; nodes "
            "pinned to another master key refuse this master until re-pinned (docs/operations.md)",
            file=out,
        )
    return 0


def add_ops_commands(commands: Any) -> None:
    audit = commands.add_parser(
        "audit",
        help="show the master's audit trail: API changes and epochs minted",
        description="Print the audit trail of the master whose data directory is DIR: every "
        "mutating API call (who, what, result) and every epoch minted. Reads the file directly "
        "(works while the master is stopped).",
    )
    audit.add_argument("--data-dir", metavar="DIR", help="the master's data directory (default: serve's)")
    audit.add_argument("--since", metavar="TIME", help="ISO 8601 time (UTC) or a duration back (15m, 2h, 7d)")
    audit.add_argument("--volume", metavar="NAME", help="only records about this volume")
    audit.add_argument("--json", action="store_true", help="one JSON object per record")
    audit.set_defaults(func=cmd_audit)

    backup = commands.add_parser(
        "backup",
        help="copy the master's authority database consistently (the master may be running)",
        description="Copy DATA_DIR/authority.sqlite3 to DEST with SQLite's online backup: a "
        "consistent snapshot even while the master runs. DEST is a file (or a directory to put "
        "authority-<time>.sqlite3 in); it is never overwritten.",
    )
    backup.add_argument("data_dir", metavar="DATA_DIR")
    backup.add_argument("dest", metavar="DEST")
    backup.set_defaults(func=cmd_backup)

    restore = commands.add_parser(
        "restore",
        help="bring an authority backup back into a stopped master's data directory",
        description="Put BACKUP in place as DATA_DIR/authority.sqlite3 (the daemon must be stopped; "
        "the replaced database is kept beside it). Epochs never go back: a volume that a node "
        "reports at a higher epoch than the backup holds is announced to nobody until the master "
        "has minted an epoch above the node's (docs/operations.md).",
    )
    restore.add_argument("backup", metavar="BACKUP")
    restore.add_argument("data_dir", metavar="DATA_DIR")
    restore.set_defaults(func=cmd_restore)
