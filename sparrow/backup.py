"""``sparrow backup`` and ``sparrow restore``: the master's authority, copied and brought back
(docs/operations.md, "Backup and restore").

**Backup** (the master may be running): SQLite's online backup API copies
``DATA_DIR/authority.sqlite3`` in one step, so the copy is one consistent snapshot (a transaction
the master commits meanwhile is either wholly in it or not at all; the master's writers wait at
most the copy's duration, a few milliseconds for a small authority). The copy is checked
(``PRAGMA integrity_check``, the schema version), made a self-contained file (journal mode DELETE,
no ``-wal``), fsync'ed, mode 0600, and linked into place only once complete: DEST never holds a
partial file and an existing file is never overwritten. The copy also carries the master's
``master.key`` (table :data:`KEY_TABLE`, in the copy only): the root of the master's identity,
which every node pins (docs/cluster.md, "Master identity"), so a master restored from it, on the
same disk or a new one, is still the master its nodes pinned. The backup is therefore as secret as
the data directory (it already held the CHAP secrets).

**Restore** (the daemon must be stopped: it takes the data directory's lock, store.lock): the
backup is checked the same way (a newer schema than this Sparrow knows is refused), then

1. ``DATA_DIR/restore.json`` is written first (so no crash leaves a restored authority without it):
   the master that starts on it holds every assignment until the nodes have reported their
   epochs, and never announces an epoch at or below one a node reported (sparrow.cluster.epochfloor);
2. the backup's ``master.key`` (if it carries one) is put back: a different ``master.key`` in the
   data directory is kept as ``master.key.before-restore-<time>``; the key table is dropped from
   the restored authority (with ``secure_delete``);
3. the current authority (with its ``-wal``) is kept as ``authority.sqlite3.before-restore-<time>``;
4. the backup is copied in (online backup API into a temporary file, fsync, rename, fsync dir);
5. a ``restore`` line goes to the audit log.

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
from sparrow.cluster.channel import ClusterSecret, SecretError
from sparrow.cluster.epochfloor import RESTORE_MARKER
from sparrow.clustersecret import MAX_SECRET_FILE
from sparrow.masterkey import MASTER_KEY_NAME
from sparrow.privatefile import read_private, write_private
from store.lock import DataDirLock, DataDirLocked
from store.metadata import fsync_dir
from store.migrations import AUTHORITY_FILE
from store.migrations.sqlitemeta import read_version

BUSY_TIMEOUT_MS = 10_000
FILE_MODE = 0o600
#: The table of a backup file that carries the master's ``master.key`` (never in a live authority).
KEY_TABLE = "backup_master_key"


class BackupError(Exception):
    """A backup or restore that cannot be done; nothing was changed at its destination."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    volumes: int
    max_epoch: int
    #: Restore: where the replaced authority was kept (None: there was none).
    previous: Path | None = None
    #: What became of ``master.key``: backup: "carried" or "absent" (the data directory had none);
    #: restore: "restored", "unchanged" (the same key was there) or "absent" (an older backup
    #: without one: the data directory's is kept).
    master_key: str = "absent"
    #: Restore: where a different master.key was kept (None: none was replaced).
    previous_master_key: Path | None = None


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
        carried = _carry_master_key(data_dir, partial)
        try:
            os.link(partial, dest)  # never replaces an existing file
        except FileExistsError:
            raise BackupError(f"{dest} exists: a backup never overwrites a file") from None
        fsync_dir(dest.parent)
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(dest, volumes, max_epoch, master_key="carried" if carried else "absent")


def _carry_master_key(data_dir: Path, partial: Path) -> bool:
    """Put ``data_dir``'s master.key in the backup copy ``partial``; False when there is none."""
    try:
        text = read_private(data_dir / MASTER_KEY_NAME, "master key file", MAX_SECRET_FILE)
    except FileNotFoundError:
        return False
    except SecretError as e:
        raise BackupError(str(e)) from None
    try:
        conn = sqlite3.connect(partial, isolation_level=None)
        try:
            conn.execute(f"CREATE TABLE {KEY_TABLE} (key_text BLOB NOT NULL)")
            conn.execute(f"INSERT INTO {KEY_TABLE} VALUES (?)", (text,))
        finally:
            conn.close()
        _fsync_file(partial)
    except sqlite3.Error as e:
        raise BackupError(f"cannot add the master key to {partial}: {e}") from None
    return True


def _take_master_key(incoming: Path) -> bytes | None:
    """The master.key a backup copy carries, dropped from it (None: an older backup)."""
    conn = sqlite3.connect(incoming, isolation_level=None)
    try:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (KEY_TABLE,))
        if found.fetchone() is None:
            return None
        row = conn.execute(f"SELECT key_text FROM {KEY_TABLE}").fetchone()
        conn.execute("PRAGMA secure_delete = ON")  # the key's bytes are overwritten, not freed
        conn.execute(f"DROP TABLE {KEY_TABLE}")
    finally:
        conn.close()
    _fsync_file(incoming)
    return None if row is None else bytes(row[0])


def _check_master_key(text: bytes) -> None:
    """Raise BackupError unless ``text`` is a master.key a master can load (checked before the
    restore changes anything: a key it could not load would stop the master, or make it another)."""
    try:
        if len(text) > MAX_SECRET_FILE:
            raise SecretError(f"larger than {MAX_SECRET_FILE} bytes")
        ClusterSecret.from_text(text)
    except SecretError as e:
        raise BackupError(f"the backup's master key is not usable: {e}") from None


def _put_master_key(data_dir: Path, text: bytes, now: float) -> tuple[str, Path | None]:
    """Make ``text`` the master.key of ``data_dir``; a different one is kept aside."""
    path = data_dir / MASTER_KEY_NAME
    try:
        current = read_private(path, "master key file", MAX_SECRET_FILE)
    except FileNotFoundError:
        current = None
    except SecretError:
        current = b""  # unusable: kept aside, the backup's replaces it
    if current is not None and current.strip() == text.strip():
        return "unchanged", None
    # Never a moment without a master.key (a master started on none makes a new one: another
    # identity, refused by every node): the new key is written whole, the old one linked aside,
    # then the new one renamed over it.
    tmp = data_dir / f".{MASTER_KEY_NAME}.restoring"
    tmp.unlink(missing_ok=True)
    previous = None
    try:
        write_private(tmp, text)
        if current is not None:
            previous = data_dir / f"{MASTER_KEY_NAME}.before-restore-{_stamp(now)}"
            os.link(path, previous, follow_symlinks=False)
        try:
            os.replace(tmp, path)
        except OSError:
            if previous is not None:
                previous.unlink(missing_ok=True)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(data_dir)
    return "restored", previous


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
            key_text = _take_master_key(incoming)
            if key_text is not None:
                _check_master_key(key_text)
            _write_marker(data_dir, backup_file, max_epoch, now)
            key_state, previous_key = "absent", None
            if key_text is not None:
                key_state, previous_key = _put_master_key(data_dir, key_text, now)
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
    return BackupResult(target, volumes, max_epoch, previous, key_state, previous_key)


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
