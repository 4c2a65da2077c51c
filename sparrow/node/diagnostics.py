"""What a node tells the master about its volumes beyond epochs and roles (heartbeat v3), so that
``sparrow volume explain`` can say why a volume is in its state (sparrow/cluster/explain.py):

- per volume, the error of the node's last failed attempt to act on its assignment (an
  ``execute_plan`` failure: a store it cannot create or open, a name held by another volume ...),
  cleared when a later plan runs that volume's actions through;
- per volume, the SCSI commands its LU answered INVALID COMMAND OPERATION CODE
  (``frontend.scsi.unsupported``: one tally per volume id, kept while the node runs, so it
  outlives a close and reopen of the LU), also counted in ``sparrow_scsi_unsupported_total``;
- the volumes the node skipped when it loaded its data directory at start, and why
  (``store.volumes.VolumeManager.load_all``).

Pure data on the event loop; the daemon feeds it, the heartbeat reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

from frontend.scsi.unsupported import UnsupportedCommands
from sparrow.cluster.messages import MAX_SKIPPED, SkippedVolume, UnsupportedCommand, clip
from store.volumes import VolumeLoadError

#: Called with (volume name, opcode, service action) for each unsupported command counted.
OnUnsupported = Callable[[str, int, int | None], None]


class NodeDiagnostics:
    """Per-volume errors and unsupported commands, and the volumes skipped at start."""

    def __init__(self, on_unsupported: OnUnsupported | None = None) -> None:
        self._on_unsupported = on_unsupported
        self._tallies: dict[str, UnsupportedCommands] = {}
        self._errors: dict[str, str] = {}

    # -- unsupported commands -----------------------------------------------------------------------

    def tally(self, volume_id: str, name: str) -> UnsupportedCommands:
        """The volume's tally (made on first use), for its LU."""
        tally = self._tallies.get(volume_id)
        if tally is None:
            on_note = None
            if self._on_unsupported is not None:
                report = self._on_unsupported

                def on_note(opcode: int, service_action: int | None) -> None:
                    report(name, opcode, service_action)

            tally = self._tallies[volume_id] = UnsupportedCommands(on_note)
        return tally

    def unsupported(self) -> dict[str, tuple[UnsupportedCommand, ...]]:
        """Per volume id, what its LU answered as unsupported (volumes with none are left out)."""
        return {
            volume_id: tuple(
                UnsupportedCommand(s.opcode, s.service_action, s.count, clip(s.last_initiator, 223))
                for s in tally.snapshot()
            )
            for volume_id, tally in self._tallies.items()
            if len(tally)
        }

    # -- convergence errors -------------------------------------------------------------------------

    def plan_ran(self, volume_ids: Collection[str], failed: Mapping[str, BaseException]) -> None:
        """A plan acted on ``volume_ids``; ``failed`` holds the error of each volume whose part
        failed. The others' earlier errors are cleared."""
        for volume_id in volume_ids:
            error = failed.get(volume_id)
            if error is None:
                self._errors.pop(volume_id, None)
            else:
                self._errors[volume_id] = clip(f"{type(error).__name__}: {error}")

    def errors(self) -> Mapping[str, str]:
        """Per volume id, the error of the last failed attempt to act on its assignment."""
        return dict(self._errors)

    def forget(self, volume_id: str) -> None:
        """The volume was destroyed here: nothing more to say about it."""
        self._errors.pop(volume_id, None)
        self._tallies.pop(volume_id, None)


def skipped_volumes(errors: Iterable[VolumeLoadError]) -> tuple[SkippedVolume, ...]:
    """The volumes a node did not load at start, as its heartbeat reports them (the first
    :data:`MAX_SKIPPED` by name; names and reasons clipped to what the wire allows)."""
    ordered = sorted(errors, key=lambda e: e.name)[:MAX_SKIPPED]
    return tuple(SkippedVolume(clip(e.name, 255), clip(e.reason)) for e in ordered)
