"""The node's own key file (sparrow.nodekey): made once, 0600, atomically, reused; a file that
exists and cannot be used stops the node (never replaced); a missing one is made anew."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparrow.cluster.channel import SecretError
from sparrow.nodekey import NODE_KEY_NAME, node_key, write_node_key


def test_the_node_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    key, made = node_key(tmp_path)
    path = tmp_path / NODE_KEY_NAME
    assert made and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [NODE_KEY_NAME]  # no temporary left
    assert path.read_text() == key.seed.hex() + "\n"
    again, made = node_key(tmp_path)
    assert not made and again == key and again.public == key.public
    with pytest.raises(FileExistsError):
        write_node_key(path, key)  # never overwritten


def test_a_lost_key_is_made_anew(tmp_path: Path) -> None:
    key, _ = node_key(tmp_path)
    (tmp_path / NODE_KEY_NAME).unlink()
    new, made = node_key(tmp_path)
    assert made and new.public != key.public  # the master refuses it until `sparrow node rekey`


@pytest.mark.parametrize(
    ("content", "mode", "match"),
    [
        (b"", 0o600, "does not hold 64 hex digits"),
        (b"ab" * 31 + b"\n", 0o600, "does not hold 64 hex digits"),
        (b"zz" * 32 + b"\n", 0o600, "does not hold 64 hex digits"),
        (b"\xff" * 64, 0o600, "does not hold 64 hex digits"),
        (b"ab" * 200, 0o600, "does not hold 64 hex digits"),
        (b"ab" * 32 + b"\n", 0o644, "accessible by group or others .* chmod 600"),
    ],
)
def test_a_key_file_that_cannot_be_used_stops_the_node_and_is_kept(
    tmp_path: Path, content: bytes, mode: int, match: str
) -> None:
    path = tmp_path / NODE_KEY_NAME
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(SecretError, match=match) as e:
        node_key(tmp_path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == content  # left for the operator to restore or move away


def test_a_symlinked_or_odd_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    node_key(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere" / NODE_KEY_NAME, tmp_path / NODE_KEY_NAME)
    with pytest.raises(SecretError, match="cannot open node key file"):
        node_key(tmp_path)
    (tmp_path / NODE_KEY_NAME).unlink()
    (tmp_path / NODE_KEY_NAME).mkdir()
    with pytest.raises(SecretError, match="is not a regular file"):
        node_key(tmp_path)
