"""The cluster secret as the daemons are configured with it (docs/cluster.md, "The cluster channel").

``sparrow master`` and ``sparrow node`` need ``--cluster-secret-file PATH`` (a file made by ``sparrow
secret generate PATH``, copied to every member, mode 0600); ``sparrow serve`` makes its own in its
data directory (:data:`SERVE_SECRET_NAME`) unless the TOML config names one (``cluster_secret_file``).
Every problem is one line: a :class:`~sparrow.config.ConfigError` (the file functions raise
:class:`~sparrow.cluster.channel.SecretError`).

The file is read as an ssh key is: a regular file, not a symlink, not readable or writable by group
or others. :func:`generate_cluster_secret` writes it whole or not at all (a temporary file, fsynced,
then linked into place), so a crash while ``sparrow serve`` makes its first secret never leaves an
empty or partial file behind that would keep it from starting.
"""

from __future__ import annotations

import os
from pathlib import Path

from sparrow.cluster.channel import ClusterSecret, SecretError
from sparrow.config import ConfigError
from sparrow.privatefile import read_private, write_private

#: A secret file larger than this is not a secret file.
MAX_SECRET_FILE = 4096


def load_cluster_secret(path: Path) -> ClusterSecret:
    """Read the secret at ``path``: it must exist, be a regular file not readable or writable by
    group or others (like an ssh key), and hold at least MIN_SECRET_LEN characters. Raises
    :class:`SecretError` with a one-line reason."""
    try:
        data = read_private(path, "cluster secret file", MAX_SECRET_FILE)
    except FileNotFoundError:
        raise SecretError(f"cluster secret file {path} does not exist") from None
    if len(data) > MAX_SECRET_FILE:
        raise SecretError(f"cluster secret file {path} is larger than {MAX_SECRET_FILE} bytes")
    try:
        return ClusterSecret.from_text(data)
    except SecretError as e:
        raise SecretError(f"cluster secret file {path}: {e}") from None


def generate_cluster_secret(path: Path) -> None:
    """Write a fresh secret (64 hex digits, 256 random bits) to ``path``, mode 0600, atomically;
    refuses to overwrite an existing file (raises FileExistsError)."""
    write_private(path, os.urandom(32).hex().encode() + b"\n")


def ensure_cluster_secret(path: Path) -> ClusterSecret:
    """The secret at ``path``, made first if there is none (``sparrow serve``'s own secret)."""
    try:
        generate_cluster_secret(path)
    except FileExistsError:
        pass
    except OSError as e:
        raise SecretError(f"cannot create cluster secret file {path}: {e.strerror or e}") from None
    return load_cluster_secret(path)


FLAG = "--cluster-secret-file"
#: ``sparrow serve``'s own secret, in its data directory.
SERVE_SECRET_NAME = "cluster.secret"
#: Why a master or node without a cluster secret does not start.
NO_SECRET = (
    f"{FLAG} is required: make a secret with `sparrow secret generate PATH` "
    "(copy it to every member of the cluster, mode 0600)"
)


def secret_from_flag(path: str | None) -> ClusterSecret:
    """The secret named by ``--cluster-secret-file``; raises ConfigError(usage=True)."""
    if not path:
        raise ConfigError(NO_SECRET, usage=True)
    try:
        return load_cluster_secret(Path(path).expanduser())
    except SecretError as e:
        raise ConfigError(f"{FLAG}: {e}", usage=True) from None


def serve_secret(data_dir: Path, configured: Path | None) -> ClusterSecret:
    """``sparrow serve``'s secret: the configured file, else ``DATA_DIR/cluster.secret`` (made 0600
    on first start, reused afterwards). Raises ConfigError."""
    try:
        if configured is not None:
            return load_cluster_secret(configured)
        return ensure_cluster_secret(data_dir / SERVE_SECRET_NAME)
    except SecretError as e:
        raise ConfigError(str(e)) from None
