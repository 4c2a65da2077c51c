"""sparrow.backup carries the master's master.key, so a master restored from a backup (on the same
disk or a new one) is still the master its nodes pinned (docs/cluster.md, "Master identity")."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from sparrow.backup import KEY_TABLE, backup, restore
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
