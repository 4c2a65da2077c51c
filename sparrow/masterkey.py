"""The master's own key (docs/replication.md, "Who may open a stream"; docs/cluster.md, "Master
identity").

A file in the master's data directory (:data:`MASTER_KEY_NAME`), made on the first start of
``sparrow master`` or ``sparrow serve`` the way ``sparrow serve`` makes its cluster secret
(``sparrow.clustersecret``: 256 random bits, mode 0600, written whole or not at all, refused if
group or others can read it), and never sent anywhere. From it the master derives

- the replication stream keys it hands out in the Acks (``sparrow.replication.streamauth``);
  nothing derived is stored, so a new key only means new stream keys in the next Acks;
- its identity (:func:`master_identity`, ``sparrow.cluster.masteridentity``): the Ed25519 key it
  proves to every node, which the nodes pin. A new ``master.key`` is a new master to them: keep
  it (``sparrow backup`` carries it, docs/operations.md).
"""

from __future__ import annotations

from pathlib import Path

from sparrow.cluster.channel import SecretError
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.clustersecret import ensure_cluster_secret, load_cluster_secret

MASTER_KEY_NAME = "master.key"


def master_key(data_dir: Path) -> bytes:
    """The master key of ``data_dir`` (32 bytes), made first if there is none. Raises SecretError
    with a one-line reason."""
    try:
        # The file's text is a secret like the cluster's; its derived key is the master key.
        return ensure_cluster_secret(data_dir / MASTER_KEY_NAME).key
    except SecretError as e:
        raise SecretError(f"master key: {e}") from None


def existing_master_identity(data_dir: Path) -> MasterIdentity:
    """The identity of the master key ``data_dir`` holds, never making one (``sparrow master
    key``). Raises SecretError with a one-line reason."""
    try:
        return MasterIdentity.derive(load_cluster_secret(data_dir / MASTER_KEY_NAME).key)
    except SecretError as e:
        raise SecretError(f"master key: {e} (a master makes it on its first start)") from None


def master_identity(data_dir: Path) -> MasterIdentity:
    """The identity of ``data_dir``'s master key, the key made first if there is none."""
    return MasterIdentity.derive(master_key(data_dir))
