"""``sparrow backup`` and ``sparrow restore``: the master's authority, copied and brought back
(docs/operations.md, "Backup and restore").

**Backup** (the master may be running): SQLite's online backup API copies
``DATA_DIR/authority.sqlite3`` in one step, so the copy is one consistent snapshot (a transaction
the master commits meanwhile is either wholly in it or not at all; the master's writers wait at
most the copy's duration, a few milliseconds for a small authority). The copy is checked
(``PRAGMA integrity_check``, the schema version), made a self-contained file (journal mode DELETE,
no ``-wal``), fsync'ed, mode 0600, and linked into place only once complete: DEST never holds a
partial file and an existing file is never overwritten.

**Restore** (the daemon must be stopped: it takes the data directory's lock, store.lock): the
backup is checked the same way (a newer schema than this Sparrow knows is refused), then

1. ``DATA_DIR/restore.json`` is written first (so no crash leaves a restored authority without it):
   the master that starts on it holds every assignment until the nodes have reported their
   epochs, and never announces an epoch at or below one a node reported (sparrow.cluster.epochfloor);
2. the current authority (with its ``-wal``) is kept as ``authority.sqlite3.before-restore-<time>``;
3. the backup is copied in (online backup API into a temporary file, fsync, rename, fsync dir);
4. a ``restore`` line goes to the audit log.

What a restore cannot bring back: volumes created after the backup are unknown to the restored
master (their copies stay on the nodes, unannounced); a volume deleted after it is live again (its
copies were destroyed: it comes back empty); a resize made after it must be made again (nodes
refuse a smaller size than the one they hold).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sparrow.cluster.authority import SCHEMA_VERSION
from sparrow.cluster.epochfloor import RESTORE_MARKER
from store.lock import DataDirLock, DataDirLocked
from store.metadata import fsync_dir
from store.migrations import AUTHORITY_FILE
from store.migrations.sqlitemeta import read_version

BUSY_TIMEOUT_MS = 10_000
FILE_MODE = 0o600


class BackupError(Exception):
    """A backup or restore that cannot be done; nothing was changed at its destination."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    volumes: int
    max_epoch: int
    #: Restore: where the replaced authority was kept (None: there was none).
    previous: Path | None = None


def _stamp(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _copy(source: Path, target: Path) -> None:
    """SQLite's online backup of ``source`` into the new file ``target``, in one step. The file is
    made 0600 before the first page is written (the authority holds CHAP secrets): SQLite keeps
    the mode of a file that exists, where one it created would be readable under the umask until
    the copy ended."""
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    src = _connect(source)
    try:
        dst = sqlite3.connect(target, isolation_level=None)
        try:
            src.backup(dst)  # pages=-1: every page in one step, one consistent snapshot
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    os.chmod(target, FILE_MODE)
    _fsync_file(target)


def check(path: Path) -> tuple[int, int]:
    """Raise BackupError unless ``path`` is a sound authority database this Sparrow can open
    (possibly after ``sparrow migrate``); its live volume count and highest epoch."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise BackupError(f"{path}: cannot open: {e}") from None
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if verdict != "ok":
            raise BackupError(f"{path}: integrity check failed: {verdict}")
        version = read_version(conn)
        if version > SCHEMA_VERSION:
            raise BackupError(f"{path}: schema version {version}, newer than this Sparrow ({SCHEMA_VERSION})")
        volumes = conn.execute("SELECT count(*) FROM volumes WHERE deleted_at IS NULL").fetchone()[0]
        max_epoch = conn.execute("SELECT coalesce(max(epoch), 0) FROM assignments").fetchone()[0]
    except BackupError:
        raise
    except Exception as e:  # sqlite3.Error, a missing meta table ...
        raise BackupError(f"{path}: not an authority database: {e}") from None
    finally:
        conn.close()
    return int(volumes), int(max_epoch)


def backup(data_dir: Path, dest: Path, *, now: float | None = None) -> BackupResult:
    """Copy ``data_dir``'s authority to ``dest`` (a new file, or a directory to put
    ``authority-<time>.sqlite3`` in). Raises BackupError."""
    now = time.time() if now is None else now
    source = data_dir / AUTHORITY_FILE
    if not source.is_file():
        raise BackupError(f"{data_dir} holds no authority database ({AUTHORITY_FILE})")
    if dest.is_dir():
        dest = dest / f"authority-{_stamp(now)}.sqlite3"
    if dest.exists():
        raise BackupError(f"{dest} exists: a backup never overwrites a file")
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        try:
            _copy(source, partial)
        except (sqlite3.Error, OSError) as e:
            raise BackupError(f"cannot back up {source} to {dest}: {e}") from None
        volumes, max_epoch = check(partial)
        try:
            os.link(partial, dest)  # never replaces an existing file
        except FileExistsError:
            raise BackupError(f"{dest} exists: a backup never overwrites a file") from None
        fsync_dir(dest.parent)
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(dest, volumes, max_epoch)


def restore(backup_file: Path, data_dir: Path, *, now: float | None = None) -> BackupResult:
    """Bring ``backup_file`` back as ``data_dir``'s authority (see the module docstring).
    Raises BackupError (a running daemon, a bad backup); nothing changed then."""
    now = time.time() if now is None else now
    if not backup_file.is_file():
        raise BackupError(f"no backup file {backup_file}")
    if not data_dir.is_dir():
        raise BackupError(f"no data directory {data_dir}")
    volumes, max_epoch = check(backup_file)
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirLocked as e:
        raise BackupError(f"{e}; a restore needs the daemon stopped") from None
    try:
        target = data_dir / AUTHORITY_FILE
        incoming = data_dir / f".{AUTHORITY_FILE}.restoring"
        incoming.unlink(missing_ok=True)
        try:
            _copy(backup_file, incoming)
            _write_marker(data_dir, backup_file, max_epoch, now)
            previous = None
            if target.exists():
                previous = data_dir / f"{AUTHORITY_FILE}.before-restore-{_stamp(now)}"
                for suffix in ("", "-wal", "-shm"):
                    old = Path(f"{target}{suffix}")
                    if old.exists():
                        os.replace(old, f"{previous}{suffix}")
            os.replace(incoming, target)
            fsync_dir(data_dir)
        except (sqlite3.Error, OSError) as e:
            raise BackupError(f"cannot restore {backup_file} into {data_dir}: {e}") from None
        finally:
            incoming.unlink(missing_ok=True)
        _audit(data_dir, backup_file, volumes, max_epoch)
    finally:
        lock.release()
    return BackupResult(target, volumes, max_epoch, previous)


def _write_marker(data_dir: Path, backup_file: Path, max_epoch: int, now: float) -> None:
    marker = data_dir / RESTORE_MARKER
    tmp = data_dir / f".{RESTORE_MARKER}.tmp"
    body = {"restored_at": now, "backup": str(backup_file.resolve()), "backup_max_epoch": max_epoch}
    tmp.write_text(json.dumps(body) + "\n")
    os.chmod(tmp, FILE_MODE)
    _fsync_file(tmp)
    os.replace(tmp, marker)
    fsync_dir(data_dir)


def _audit(data_dir: Path, backup_file: Path, volumes: int, max_epoch: int) -> None:
    from sparrow.master.audit import AuditError, AuditLog

    try:
        line = {"type": "restore", "backup": str(backup_file.resolve()), "volumes": volumes}
        AuditLog.open_in(data_dir).append({**line, "max_epoch": max_epoch})
    except AuditError as e:
        raise BackupError(f"restored, but {e}") from None
