"""Where the CLI finds its API token, and where a daemon writes the bootstrap admin token.

The credentials file is JSON, one entry per API URL (as kubeconfig keeps one per cluster)::

    {"apis": {"http://127.0.0.1:3280": {"token": "spw_...", "token_id": "...", "role": "admin"}}}

Its path (:func:`credentials_path`): ``$SPARROW_CREDENTIALS`` if set, else
``$XDG_CONFIG_HOME/sparrow/credentials.json`` (``~/.config/sparrow/credentials.json`` when
XDG_CONFIG_HOME is unset). The CLI also reads :data:`SYSTEM_CREDENTIALS` (what the systemd units
write) when the user's file has no entry for the URL.

Writes (:func:`store_token`) keep the other entries, are atomic (a temporary file, fsync, rename,
fsync of the directory) and serialized by ``flock`` on a lock file beside it; the file is 0600 and
a directory it creates 0700. The URL key is :func:`api_key`: scheme, lower-case host and port,
no path; a wildcard listen address (``0.0.0.0``, ``::``) is written as ``127.0.0.1`` (the URL the
CLI uses by default).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CREDENTIALS_ENV = "SPARROW_CREDENTIALS"
TOKEN_ENV = "SPARROW_TOKEN"
SYSTEM_CREDENTIALS = Path("/etc/sparrow/credentials.json")
_WILDCARDS = frozenset({"0.0.0.0", "::", "", "[::]"})


class CredentialsError(Exception):
    """The credentials file cannot be read or written (one line)."""


def credentials_path(env: Mapping[str, str] | None = None) -> Path:
    """``$SPARROW_CREDENTIALS``, else ``$XDG_CONFIG_HOME/sparrow/credentials.json`` (default ~/.config)."""
    env = os.environ if env is None else env
    explicit = env.get(CREDENTIALS_ENV)
    if explicit:
        return Path(explicit)
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "sparrow" / "credentials.json"


def api_key(url: str) -> str:
    """The entry key of an API URL: ``scheme://host:port`` (host lower case, wildcard -> 127.0.0.1)."""
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if host in _WILDCARDS:
        host = "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme or 'http'}://{shown}:{port}"


def http_url(host: str, port: int) -> str:
    """The API URL the CLI would use for an HTTP listener bound at ``host:port``."""
    return api_key(f"http://{'[' + host + ']' if ':' in host else host}:{port}")


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        raise CredentialsError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("apis", {}), dict):
        raise CredentialsError(f"{path} is not a Sparrow credentials file")
    return data


def lookup(url: str, paths: tuple[Path, ...]) -> str | None:
    """The token for ``url`` in the first of ``paths`` that has one (None: none has).
    An unreadable file is skipped (the caller may not be allowed to read the system's)."""
    key = api_key(url)
    for path in paths:
        try:
            entry = _read(path).get("apis", {}).get(key)
        except CredentialsError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("token"), str):
            return str(entry["token"])
    return None


def search_path(env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The files the CLI looks in, in order: the user's (:func:`credentials_path`), then the system's."""
    user = credentials_path(env)
    return (user,) if user == SYSTEM_CREDENTIALS else (user, SYSTEM_CREDENTIALS)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def store_token(path: Path, url: str, entry: Mapping[str, Any]) -> None:
    """Set the entry of ``url`` in the file at ``path`` (see the module docstring).

    Raises CredentialsError."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(path):
            data = _read(path)
            apis = dict(data.get("apis", {}))
            apis[api_key(url)] = dict(entry)
            data["apis"] = apis
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    os.fchmod(f.fileno(), 0o600)
                    json.dump(data, f, indent=2, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as e:
        raise CredentialsError(f"cannot write {path}: {e.strerror or e}") from None


def resolve_token(url: str, given: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The token the CLI sends to ``url``: ``given`` (``--token``), else ``$SPARROW_TOKEN``, else
    the entry for ``url`` in the user's credentials file, then in the system's (None: no token)."""
    env = os.environ if env is None else env
    if given:
        return given
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV]
    return lookup(url, search_path(env))
