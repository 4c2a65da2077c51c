"""Private files in the way an ssh key is kept: the cluster secret (sparrow.clustersecret), the
master key (sparrow.masterkey) and the node key (sparrow.nodekey).

Read: a regular file, not a symlink (``O_NOFOLLOW``), owned by the user the daemon runs as or by
root (:func:`foreign_owner`: another user could rewrite it, whatever its mode), not readable or
writable by group or others, at most a given size. Written: whole or not at all, mode 0600 from
its first byte (a temporary file, fsynced, linked into place: never replacing a file that exists,
then the directory fsynced), so a crash while a daemon makes its first key never leaves an empty
or partial file that would keep it from starting. Every problem is a
:class:`~sparrow.cluster.channel.SecretError` with one line naming the file (``what``: "cluster
secret file", "node key file").
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from sparrow.cluster.channel import SecretError
from store.metadata import fsync_dir


def foreign_owner(st: os.stat_result) -> int | None:
    """The owner's uid when the file belongs to neither the user this process runs as nor root
    (as ssh refuses a key file another user owns), else None."""
    owner = st.st_uid
    return None if owner in (0, os.geteuid()) else owner


def read_private(path: Path, what: str, max_size: int) -> bytes:
    """The bytes of the private file at ``path`` (at most ``max_size + 1``: the caller judges the
    size). Raises FileNotFoundError when there is none, SecretError when it is not a regular file
    or group or others may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SecretError(f"cannot open {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{what} {path} is not a regular file")
        if (owner := foreign_owner(st)) is not None:
            raise SecretError(
                f"{what} {path} belongs to another user (uid {owner}); chown it to the user "
                "the daemon runs as"
            )
        if st.st_mode & 0o077:
            raise SecretError(
                f"{what} {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        return os.read(fd, max_size + 1)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path``, mode 0600, atomically. Raises FileExistsError when
    ``path`` exists (it is never replaced), OSError when it cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # atomic, and never replaces an existing file
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
