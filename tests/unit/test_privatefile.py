"""sparrow.privatefile's owner rule: a key, secret or pin file that another user owns is refused
whatever its mode (that user could rewrite it), as ssh refuses such a key file; root's and our
own are taken."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparrow.cluster.channel import SecretError
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.masterpin import PIN_NAME, load_pin, save_pin
from sparrow.nodekey import NODE_KEY_NAME, node_key
from sparrow.privatefile import read_private, write_private

OTHER_UID = 4242


def give_away(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Make ``path`` belong to a user other than the one this process runs as (and not root):
    chown it when we are root, else run as someone else (os.geteuid). The owner's uid."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
        return OTHER_UID
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    return owner


def test_a_private_file_another_user_owns_is_refused_whatever_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    write_private(path, b"s" * 32)
    assert read_private(path, "cluster secret file", 64) == b"s" * 32  # ours: taken
    owner = give_away(path, monkeypatch)
    with pytest.raises(SecretError) as e:
        read_private(path, "cluster secret file", 64)
    assert str(e.value) == (
        f"cluster secret file {path} belongs to another user (uid {owner}); chown it to the user "
        "the daemon runs as"
    )


def test_a_node_key_another_user_owns_stops_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node_key(tmp_path)
    give_away(tmp_path / NODE_KEY_NAME, monkeypatch)
    with pytest.raises(SecretError, match=r"node key file .* belongs to another user"):
        node_key(tmp_path)


def test_a_master_pin_another_user_owns_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = MasterIdentity.derive(b"A" * 32).public
    save_pin(tmp_path, key)
    assert load_pin(tmp_path) == key
    owner = give_away(tmp_path / PIN_NAME, monkeypatch)
    with pytest.raises(SecretError, match=rf"master pin file .* belongs to another user \(uid {owner}\)"):
        load_pin(tmp_path)


def test_root_owned_files_are_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret"
    write_private(path, b"s" * 32)
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "geteuid", lambda: OTHER_UID)  # a daemon user reading root's file
    else:
        monkeypatch.setattr(os, "fstat", lambda fd, real=os.fstat: _as_root(real(fd)))
    assert read_private(path, "cluster secret file", 64) == b"s" * 32


def _as_root(st: os.stat_result) -> os.stat_result:
    fields = list(st)
    fields[4] = 0  # st_uid
    return os.stat_result(fields)
