"""Which files and block devices a volume may be backed by: the operator's allowed prefixes.

A volume's ``backing`` names an existing file or block device to serve instead of a new sparse file
in the data directory. A request may name only what the operator allowed
(``allowed_backing_prefixes`` in the config, ``--allow-backing`` on the command line; none by
default, so every backing is refused):

- the path is resolved (``os.path.realpath``: every symlink followed) and must equal one of the
  prefixes, or lie below one (``/srv/disks`` allows ``/srv/disks/a``, not ``/srv/disks2``); the
  prefixes are resolved too, so ``/dev/disk/by-id/wwn-...`` allows the device it points at;
- the target must be a block device, or an existing regular file; a request never creates it, and
  never grows or truncates it (:mod:`store.blockstore` opens it with ``grow=False``: a regular file
  must hold exactly the volume's size).

:meth:`BackingPolicy.resolve` is the check; ``store.volumes.VolumeManager`` applies it wherever it
opens a backing for a new volume (the node side: an assignment's backing is refused there too).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass


class BackingRefused(ValueError):
    """A backing path outside the allowed prefixes (or no prefix allowed at all)."""


def normalize_prefix(prefix: str) -> str:
    """An allowed prefix as given: absolute, normalized (no ``..``, no trailing ``/``). Raises ValueError."""
    if not isinstance(prefix, str) or not prefix.startswith("/") or "\0" in prefix:
        raise ValueError(f"an allowed backing prefix must be an absolute path, not {prefix!r}")
    return os.path.normpath(prefix)


def is_below(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or lies below it (whole path components; both normalized)."""
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class BackingPolicy:
    """The operator's allowed backing prefixes (empty: no backing is allowed)."""

    prefixes: tuple[str, ...] = ()

    @classmethod
    def of(cls, prefixes: Iterable[str]) -> BackingPolicy:
        return cls(tuple(normalize_prefix(p) for p in prefixes))

    def resolve(self, backing: str) -> str:
        """The real path of ``backing`` if it lies under an allowed prefix; raises BackingRefused."""
        if not self.prefixes:
            raise BackingRefused(
                f"backing {backing} refused: no backing path is allowed on this node "
                "(the operator lists them in allowed_backing_prefixes or with --allow-backing)"
            )
        if not isinstance(backing, str) or not backing.startswith("/") or "\0" in backing:
            raise BackingRefused(f"backing must be an absolute path, not {backing!r}")
        real = os.path.realpath(backing)
        for prefix in self.prefixes:
            if is_below(real, os.path.realpath(prefix)):
                return real
        shown = backing if real == backing else f"{backing} (resolves to {real})"
        raise BackingRefused(
            f"backing {shown} refused: not under an allowed backing prefix ({', '.join(self.prefixes)})"
        )

    def allows_name(self, backing: str) -> bool:
        """The lexical check a master without the node's file system can make (no symlinks
        resolved: the node resolves them when it opens the path)."""
        if not isinstance(backing, str) or not backing.startswith("/") or "\0" in backing:
            return False
        path = os.path.normpath(backing)
        return any(is_below(path, p) for p in self.prefixes)


#: The default: no backing is allowed anywhere.
NO_BACKING = BackingPolicy()
