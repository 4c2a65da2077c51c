"""DataDirLock: one process per data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from store.blockstore import StoreError
from store.lock import DataDirLock, DataDirLocked


def test_second_lock_on_the_same_dir_fails_with_the_holder_pid(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")
    first.acquire()
    try:
        assert (tmp_path / "data" / "sparrow.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(DataDirLocked) as info:
            DataDirLock(tmp_path / "data").acquire()  # a new open file description: flock conflicts
        assert info.value.pid == os.getpid()
        assert isinstance(info.value, StoreError)
        assert str(tmp_path / "data") in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
    finally:
        first.release()


def test_release_lets_another_holder_in(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    first.release()
    assert not first.held
    with DataDirLock(tmp_path) as second:
        assert second.held
        with pytest.raises(DataDirLocked):
            DataDirLock(tmp_path).acquire()
    third = DataDirLock(tmp_path)
    third.acquire()
    third.release()


def test_unknown_holder_pid_is_reported_as_unknown(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        (tmp_path / "sparrow.lock").write_text("garbage")
        with pytest.raises(DataDirLocked, match="pid unknown") as info:
            DataDirLock(tmp_path).acquire()
        assert info.value.pid is None
    finally:
        first.release()
