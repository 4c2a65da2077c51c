"""Resync progress as the CLI shows it with ``--wait`` in a terminal (pure functions, no I/O).

Read from ``sparrow volume inspect --json`` (the master's volume answers): each copy's ``sync`` is
``in_sync``, ``syncing`` or ``stale``, and a ``syncing`` copy may carry ``resync = {"done_bytes",
"total_bytes"}``. A copy without it (an older master, or a copy that has not started) still counts
as waiting; the bar then shows what it knows and says how many copies report no figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sparrow.sizes import format_size

#: Columns of the bar itself (the text around it comes on top, cut to the terminal's width).
BAR_WIDTH = 30


@dataclass(frozen=True, slots=True)
class Progress:
    """The copies a wait is about, summed: bytes copied and to copy (of those that report them),
    copies syncing, those of them without figures, and stale copies (not syncing yet)."""

    done_bytes: int = 0
    total_bytes: int = 0
    syncing: int = 0
    unreported: int = 0
    stale: int = 0

    @property
    def fraction(self) -> float | None:
        """Done / total of the copies that report figures (None: none does)."""
        if self.total_bytes <= 0:
            return None
        return min(1.0, max(0.0, self.done_bytes / self.total_bytes))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def progress_of(volumes: Iterable[Mapping[str, Any]], nodes: Iterable[str] | None = None) -> Progress:
    """Sum the copies of ``volumes`` that are not in sync (only those on ``nodes``, if given)."""
    wanted = None if nodes is None else set(nodes)
    done = total = syncing = unreported = stale = 0
    for volume in volumes:
        for copy in volume.get("replicas") or ():
            if not isinstance(copy, Mapping) or (wanted is not None and copy.get("node_id") not in wanted):
                continue
            sync = copy.get("sync")
            if sync == "stale":
                stale += 1
            elif sync == "syncing":
                syncing += 1
                resync = copy.get("resync")
                figures = resync if isinstance(resync, Mapping) else {}
                d, t = _count(figures.get("done_bytes")), _count(figures.get("total_bytes"))
                if d is None or t is None or t == 0:
                    unreported += 1
                else:
                    done, total = done + min(d, t), total + t
    return Progress(done, total, syncing, unreported, stale)


def render(label: str, progress: Progress, width: int = 80) -> str:
    """One line: ``label [#####.....]  42% 420 MiB / 1.0 GiB, 1 copy syncing``, cut to ``width``.
    Without figures: ``label [..........] 1 copy syncing (no progress reported)``."""
    fraction = progress.fraction
    filled = 0 if fraction is None else round(fraction * BAR_WIDTH)
    bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
    parts = []
    if fraction is not None:
        parts.append(
            f"{fraction * 100:3.0f}% {format_size(progress.done_bytes)} / {format_size(progress.total_bytes)}"
        )
    words = []
    if progress.syncing:
        words.append(f"{progress.syncing} {'copy' if progress.syncing == 1 else 'copies'} syncing")
    if progress.stale:
        words.append(f"{progress.stale} stale")
    if progress.unreported:
        words.append(f"{progress.unreported} without progress figures")
    if not words and fraction is None:
        words.append("waiting")
    line = (
        " ".join([label, bar, *parts])
        + (", " if parts and words else " " if words else "")
        + ", ".join(words)
    )
    return line[: max(0, width)]
