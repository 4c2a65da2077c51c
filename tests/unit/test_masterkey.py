"""The master's own key file (sparrow.masterkey): made once, 0600, reused, refused when others can
read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparrow.cluster.channel import SecretError
from sparrow.masterkey import MASTER_KEY_NAME, master_key


def test_the_master_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    key = master_key(tmp_path)
    path = tmp_path / MASTER_KEY_NAME
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [MASTER_KEY_NAME]  # no temporary left
    assert master_key(tmp_path) == key
    other = tmp_path / "other"
    other.mkdir()
    assert master_key(other) != key


def test_a_master_key_others_can_read_is_refused(tmp_path: Path) -> None:
    master_key(tmp_path)
    (tmp_path / MASTER_KEY_NAME).chmod(0o640)
    with pytest.raises(SecretError, match=r"master key: .* chmod 600"):
        master_key(tmp_path)
