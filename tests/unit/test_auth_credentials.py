"""sparrow.auth.credentials: where the CLI finds its token, and how a daemon writes one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparrow.auth import credentials
from sparrow.auth.credentials import api_key, credentials_path, lookup, resolve_token, store_token


def test_the_file_path_follows_sparrow_credentials_then_xdg(tmp_path: Path) -> None:
    assert credentials_path({"SPARROW_CREDENTIALS": "/x/c.json", "XDG_CONFIG_HOME": "/y"}) == Path(
        "/x/c.json"
    )
    assert credentials_path({"XDG_CONFIG_HOME": "/y"}) == Path("/y/sparrow/credentials.json")
    assert credentials_path({}) == Path.home() / ".config" / "sparrow" / "credentials.json"


def test_entries_are_keyed_by_the_api_url() -> None:
    assert api_key("http://127.0.0.1:3280/") == "http://127.0.0.1:3280"
    assert api_key("http://0.0.0.0:3280") == "http://127.0.0.1:3280"
    assert api_key("HTTP://LocalHost:99") == "http://localhost:99"
    assert api_key("http://[::]:3280") == "http://127.0.0.1:3280"
    assert api_key("http://example.org") == "http://example.org:80"


def test_store_keeps_other_entries_atomically_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "new" / "credentials.json"
    store_token(path, "http://127.0.0.1:1", {"token": "one"})
    store_token(path, "http://127.0.0.1:2", {"token": "two"})
    store_token(path, "http://127.0.0.1:1", {"token": "uno"})
    assert json.loads(path.read_text())["apis"] == {
        "http://127.0.0.1:1": {"token": "uno"},
        "http://127.0.0.1:2": {"token": "two"},
    }
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.json", "credentials.json.lock"]


def test_the_token_comes_from_the_flag_then_the_environment_then_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, system = tmp_path / "user.json", tmp_path / "system.json"
    monkeypatch.setattr(credentials, "SYSTEM_CREDENTIALS", system)
    url = "http://127.0.0.1:3280"
    store_token(system, url, {"token": "from-system"})
    store_token(system, "http://127.0.0.1:9", {"token": "other"})
    env = {"SPARROW_CREDENTIALS": str(user)}
    assert resolve_token(url, None, env) == "from-system"
    store_token(user, url, {"token": "from-user"})
    assert resolve_token(url, None, env) == "from-user"
    assert resolve_token(url, None, {**env, "SPARROW_TOKEN": "from-env"}) == "from-env"
    assert resolve_token(url, "from-flag", {**env, "SPARROW_TOKEN": "from-env"}) == "from-flag"
    assert resolve_token("http://127.0.0.1:1", None, env) is None
    user.write_text("not json")
    assert lookup(url, (user, system)) == "from-system"  # an unreadable file is skipped
