"""sparrow.backup carries the master's master.key, so a master restored from a backup (on the same
disk or a new one) is still the master its nodes pinned (docs/cluster.md, "Master identity")."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from sparrow.backup import KEY_TABLE, BackupError, backup, restore
from sparrow.cluster.authority import AuthorityStore
from sparrow.masterkey import MASTER_KEY_NAME, master_identity
from store.migrations import AUTHORITY_FILE


def master_dir(path: Path) -> Path:
    path.mkdir()
    AuthorityStore.open_in(path).close()
    return path


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_master_restored_on_a_new_disk_is_the_same_master(tmp_path: Path) -> None:
    old = master_dir(tmp_path / "old")
    identity = master_identity(old)
    key_text = (old / MASTER_KEY_NAME).read_bytes()
    result = backup(old, tmp_path / "backups")
    assert result.master_key == "carried" and KEY_TABLE in tables(result.path)
    assert KEY_TABLE not in tables(old / AUTHORITY_FILE)  # never in the live authority

    new = master_dir(tmp_path / "new")  # a new disk: its first start made another master.key
    other = master_identity(new)
    assert other.public != identity.public
    restored = restore(result.path, new)
    assert restored.master_key == "restored" and restored.previous_master_key is not None
    assert (new / MASTER_KEY_NAME).read_bytes() == key_text
    assert stat.S_IMODE((new / MASTER_KEY_NAME).stat().st_mode) == 0o600
    assert master_identity(new).public == identity.public  # the nodes' pin holds
    assert master_identity(new).seed == identity.seed
    assert KEY_TABLE not in tables(new / AUTHORITY_FILE)
    assert key_text.strip() not in (new / AUTHORITY_FILE).read_bytes()  # not left in a free page
    kept = restored.previous_master_key
    assert kept.name.startswith(f"{MASTER_KEY_NAME}.before-restore-")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_on_the_same_disk_the_key_stays_and_an_old_backup_keeps_the_data_dirs(tmp_path: Path) -> None:
    data = master_dir(tmp_path / "data")
    identity = master_identity(data)
    result = backup(data, tmp_path / "b1.sqlite3")
    assert restore(result.path, data).master_key == "unchanged"
    assert master_identity(data).public == identity.public
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(MASTER_KEY_NAME)) == [MASTER_KEY_NAME]

    # A backup made before backups carried the key: restored, the data directory's key is kept.
    older = tmp_path / "b0.sqlite3"
    with sqlite3.connect(result.path) as conn:
        conn.execute(f"DROP TABLE {KEY_TABLE}")
    result.path.rename(older)
    assert restore(older, data).master_key == "absent"
    assert master_identity(data).public == identity.public

    bare = master_dir(tmp_path / "bare")  # no master.key yet: nothing to carry
    assert backup(bare, tmp_path / "b2.sqlite3").master_key == "absent"


def test_a_restore_whose_key_cannot_be_written_leaves_the_data_dirs_key_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The master.key is never absent: a master started on a data directory without one makes a
    new key, a new identity every node refuses (and new stream keys). A restore that fails while
    putting the backup's key back raises BackupError with the data directory's key where it was."""
    old = master_dir(tmp_path / "old")
    master_identity(old)
    result = backup(old, tmp_path / "b.sqlite3")
    new = master_dir(tmp_path / "new")
    master_identity(new)
    before = (new / MASTER_KEY_NAME).read_bytes()
    authority = (new / AUTHORITY_FILE).read_bytes()

    real_write = os.write

    def no_key_write(fd: int, data: bytes) -> int:
        if data.strip() == (old / MASTER_KEY_NAME).read_bytes().strip():
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", no_key_write)
    with pytest.raises(BackupError):
        restore(result.path, new)
    monkeypatch.undo()
    assert (new / MASTER_KEY_NAME).read_bytes() == before
    assert (new / AUTHORITY_FILE).read_bytes() == authority


def test_a_backup_carrying_an_unusable_key_is_refused_before_anything_changes(tmp_path: Path) -> None:
    old = master_dir(tmp_path / "old")
    master_identity(old)
    result = backup(old, tmp_path / "b.sqlite3")
    with sqlite3.connect(result.path) as conn:
        conn.execute(f"UPDATE {KEY_TABLE} SET key_text = ?", (b"short\n",))
    new = master_dir(tmp_path / "new")
    master_identity(new)
    before = (new / MASTER_KEY_NAME).read_bytes()
    with pytest.raises(BackupError, match="master"):
        restore(result.path, new)
    assert (new / MASTER_KEY_NAME).read_bytes() == before
    assert sorted(p.name for p in new.iterdir() if p.name.startswith(MASTER_KEY_NAME)) == [MASTER_KEY_NAME]
    assert KEY_TABLE not in tables(new / AUTHORITY_FILE)
