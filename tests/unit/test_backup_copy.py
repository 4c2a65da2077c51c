"""sparrow.backup._copy: the copy of an authority (it holds CHAP secrets) is 0600 from its first
page, whatever the umask: never readable by others while SQLite writes it."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from sparrow import backup


def test_the_copy_is_0600_before_its_first_page_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "authority.sqlite3"
    with sqlite3.connect(source) as conn:
        conn.execute("CREATE TABLE secrets (chap TEXT)")
        conn.execute("INSERT INTO secrets VALUES ('chap-secret-0123456789')")
    conn.close()
    target = tmp_path / "copy.sqlite3"
    modes: list[int] = []
    real_connect = backup._connect

    class Watching:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def backup(self, dst: sqlite3.Connection) -> None:
            modes.append(stat.S_IMODE(os.stat(target).st_mode))  # the file as the pages go in
            self.conn.backup(dst)

        def close(self) -> None:
            self.conn.close()

    monkeypatch.setattr(backup, "_connect", lambda path: Watching(real_connect(path)))
    old_umask = os.umask(0o022)
    try:
        backup._copy(source, target)
    finally:
        os.umask(old_umask)
    assert modes == [0o600]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT chap FROM secrets").fetchall() == [("chap-secret-0123456789",)]
    copy.close()
