"""The master's own key (docs/replication.md, "Who may open a stream").

A file in the master's data directory (:data:`MASTER_KEY_NAME`), made on the first start of
``sparrow master`` or ``sparrow serve`` the way ``sparrow serve`` makes its cluster secret
(``sparrow.clustersecret``: 256 random bits, mode 0600, written whole or not at all, refused if
group or others can read it), and never sent anywhere. From it the master derives the replication
stream keys it hands out in the Acks (``sparrow.replication.streamauth``); nothing derived is
stored, so a new key (a lost data directory) only means new stream keys in the next Acks.
"""

from __future__ import annotations

from pathlib import Path

from sparrow.cluster.channel import SecretError
from sparrow.clustersecret import ensure_cluster_secret

MASTER_KEY_NAME = "master.key"


def master_key(data_dir: Path) -> bytes:
    """The master key of ``data_dir`` (32 bytes), made first if there is none. Raises SecretError
    with a one-line reason."""
    try:
        # The file's text is a secret like the cluster's; its derived key is the master key.
        return ensure_cluster_secret(data_dir / MASTER_KEY_NAME).key
    except SecretError as e:
        raise SecretError(f"master key: {e}") from None
