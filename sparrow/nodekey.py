"""The node's own key, ``DATA_DIR/node.key`` (docs/cluster.md, "Node identity").

Made on the node's first start (``sparrow node``, and the node of ``sparrow serve``), under the
data directory's lock: 64 hex digits (the Ed25519 seed, :class:`~sparrow.cluster.nodeidentity.NodeKey`)
and a newline, mode 0600, written whole or not at all (a temporary file, fsynced, linked into place,
the directory fsynced). The private key never leaves the node; the master binds its public key to
the node id on the first Hello.

A key file that exists but cannot be used (not a regular file, readable or writable by group or
others, not 64 hex digits) stops the node with a one-line error: it is never replaced silently,
since it may be restored. A *missing* file is made anew, which is what a new disk needs: the master
then refuses the node's Hellos (``key_mismatch``) until the operator runs ``sparrow node rekey``
(docs/operations.md, "Replacing a node's disk").
"""

from __future__ import annotations

from pathlib import Path

from sparrow.cluster.channel import SecretError
from sparrow.cluster.nodeidentity import SEED_SIZE, NodeKey
from sparrow.privatefile import read_private, write_private

NODE_KEY_NAME = "node.key"
#: Larger than this is not a node key file.
MAX_KEY_FILE = 256


def _corrupt(path: Path, why: str) -> SecretError:
    return SecretError(
        f"node key file {path} {why}; restore it from a backup, or move it away to make a new key "
        "and rebind the node on the master (`sparrow node rekey NODE`)"
    )


def load_node_key(path: Path) -> NodeKey:
    """The key at ``path``; raises FileNotFoundError, or SecretError with a one-line reason."""
    data = read_private(path, "node key file", MAX_KEY_FILE)
    text = data.strip()
    if len(data) > MAX_KEY_FILE or len(text) != 2 * SEED_SIZE:
        raise _corrupt(path, f"does not hold {2 * SEED_SIZE} hex digits")
    try:
        return NodeKey(bytes.fromhex(text.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(path, f"does not hold {2 * SEED_SIZE} hex digits") from None


def write_node_key(path: Path, key: NodeKey) -> None:
    """Write ``key`` to ``path`` (mode 0600, atomically); never replaces a file (FileExistsError)."""
    write_private(path, key.seed.hex().encode() + b"\n")


def node_key(data_dir: Path) -> tuple[NodeKey, bool]:
    """The node key of ``data_dir`` and whether it was made just now. Raises SecretError with a
    one-line reason (a key file that exists and is not usable is never replaced)."""
    path = data_dir / NODE_KEY_NAME
    try:
        return load_node_key(path), False
    except FileNotFoundError:
        pass
    try:
        write_node_key(path, NodeKey.generate())
    except FileExistsError:
        return load_node_key(path), False
    except OSError as e:
        raise SecretError(f"cannot create node key file {path}: {e.strerror or e}") from None
    return load_node_key(path), True
