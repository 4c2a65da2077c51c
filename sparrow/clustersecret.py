"""The cluster secret as the daemons are configured with it (docs/cluster.md, "The cluster channel").

``sparrow master`` and ``sparrow node`` need ``--cluster-secret-file PATH`` (a file made by ``sparrow
secret generate PATH``, copied to every member, mode 0600); ``sparrow serve`` makes its own in its
data directory (:data:`SERVE_SECRET_NAME`) unless the TOML config names one (``cluster_secret_file``).
Every problem is one line: a :class:`~sparrow.config.ConfigError`.
"""

from __future__ import annotations

from pathlib import Path

from sparrow.cluster.channel import ClusterSecret, SecretError, ensure_cluster_secret, load_cluster_secret
from sparrow.config import ConfigError

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
