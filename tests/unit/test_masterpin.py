"""sparrow.masterpin: the node's pinned master key in DATA_DIR/master.pin, and where the pin at a
node's start comes from (the operator's --master-key, the file, or none: trust on first use)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sparrow.cluster.channel import SecretError
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.cluster.nodeidentity import key_text
from sparrow.masterkey import MASTER_KEY_NAME, existing_master_identity, master_identity, master_key
from sparrow.masterpin import PIN_NAME, load_pin, save_pin, startup_pin

A = MasterIdentity.derive(b"A" * 32).public
B = MasterIdentity.derive(b"B" * 32).public


def test_a_pin_is_written_atomically_0644_and_read_back(tmp_path: Path) -> None:
    assert load_pin(tmp_path) is None
    save_pin(tmp_path, A)
    path = tmp_path / PIN_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # a public key: readable, written by its owner only
    assert path.read_text() == key_text(A) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [PIN_NAME]  # no temporary left
    assert load_pin(tmp_path) == A
    save_pin(tmp_path, B)  # replaced whole
    assert load_pin(tmp_path) == B


@pytest.mark.parametrize("problem", ["group-writable", "symlink", "garbage", "directory"])
def test_a_pin_file_that_cannot_be_trusted_stops_the_node(tmp_path: Path, problem: str) -> None:
    path = tmp_path / PIN_NAME
    if problem == "group-writable":
        save_pin(tmp_path, A)
        path.chmod(0o664)
    elif problem == "symlink":
        (tmp_path / "elsewhere").write_text(key_text(A) + "\n")
        path.symlink_to(tmp_path / "elsewhere")
    elif problem == "garbage":
        path.write_text("not a key\n")
        path.chmod(0o644)
    else:
        path.mkdir()
    with pytest.raises(SecretError, match="master pin file"):
        load_pin(tmp_path)
    with pytest.raises(SecretError):  # never a silent trust on first use
        startup_pin(tmp_path, None)


def test_the_startup_pin_the_operators_key_wins_and_is_kept(tmp_path: Path) -> None:
    assert startup_pin(tmp_path, None).source == "none"
    first = startup_pin(tmp_path, A)
    assert (first.key, first.source, first.replaced) == (A, "operator", None)
    assert load_pin(tmp_path) == A  # persisted: a restart without the flag keeps it
    kept = startup_pin(tmp_path, None)
    assert (kept.key, kept.source) == (A, "file")
    repinned = startup_pin(tmp_path, B)  # the operator re-pins after changing the master's key
    assert (repinned.key, repinned.replaced) == (B, A)
    assert load_pin(tmp_path) == B
    (tmp_path / PIN_NAME).chmod(0o666)  # a bad file: the operator's key replaces it
    assert startup_pin(tmp_path, A).key == A and load_pin(tmp_path) == A


def test_the_master_identity_comes_from_master_key_and_is_never_made_by_the_cli(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="master key"):
        existing_master_identity(tmp_path)
    assert not (tmp_path / MASTER_KEY_NAME).exists()
    identity = master_identity(tmp_path)  # the daemon makes master.key on its first start
    assert identity == MasterIdentity.derive(master_key(tmp_path))
    assert existing_master_identity(tmp_path).public == identity.public
    other = tmp_path / "other"
    other.mkdir()
    assert master_identity(other).public != identity.public
    os.chmod(tmp_path / MASTER_KEY_NAME, 0o640)
    with pytest.raises(SecretError):
        existing_master_identity(tmp_path)
