"""The assignment epoch (docs/cluster.md, "Identities and numbers").

An :class:`Epoch` orders the assignments of one volume: a higher epoch supersedes a lower one, and
a node rejects an assignment whose epoch is lower than the one it has persisted.

Only ``sparrow/cluster/publisher.py`` mints an epoch, and it does so durably (the new value is
committed to the AuthorityStore before any node hears of it). Everything else that needs an
``Epoch`` -- the heartbeat codec, the authority store, the node adapter -- is *decoding a recorded
epoch* and uses :meth:`Epoch.restore`. A test scans the source tree for direct construction
outside the publisher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self


@dataclass(frozen=True, order=True, slots=True)
class Epoch:
    """A volume's assignment epoch: one non-negative int, totally ordered by ``value``.

    Construct directly only in ``sparrow/cluster/publisher.py``; elsewhere use :meth:`restore`.
    """

    value: int

    def __post_init__(self) -> None:
        # bool is an int subclass; an epoch of True is a bug, not 1.
        if type(self.value) is not int:
            raise TypeError(f"epoch value must be an int, got {type(self.value).__name__}")
        if self.value < 0:
            raise ValueError(f"epoch value must be >= 0, got {self.value}")

    @classmethod
    def restore(cls, value: int) -> Self:
        """Rebuild an epoch from its recorded int (wire, store or persisted node record).

        This is decoding a recorded epoch, never minting one: the value must already have been
        published by the master. Raises ``TypeError``/``ValueError`` for a non-int or negative value.
        """
        return cls(value)

    def __int__(self) -> int:
        return self.value

    def __str__(self) -> str:
        return f"epoch {self.value}"
