"""sparrow.node.diagnostics: what a node reports about its volumes beyond epochs and roles."""

from __future__ import annotations

from sparrow.cluster.messages import MAX_REASON_LEN, MAX_SKIPPED, SkippedVolume, UnsupportedCommand
from sparrow.node.diagnostics import NodeDiagnostics, skipped_volumes
from store.volumes import VolumeLoadError

VOL, OTHER = "ab" * 16, "cd" * 16


def test_a_plan_sets_the_error_of_each_volume_that_failed_and_clears_the_others() -> None:
    diagnostics = NodeDiagnostics()
    diagnostics.plan_ran({VOL, OTHER}, {VOL: OSError("no space left"), OTHER: ValueError("x" * 1000)})
    errors = diagnostics.errors()
    assert errors[VOL] == "OSError: no space left"
    assert len(errors[OTHER]) == MAX_REASON_LEN  # clipped to what the wire carries
    diagnostics.plan_ran({VOL}, {})
    assert set(diagnostics.errors()) == {OTHER}  # a plan that did not touch OTHER leaves it
    diagnostics.forget(OTHER)
    assert diagnostics.errors() == {}


def test_unsupported_commands_are_kept_per_volume_and_counted_by_volume_name() -> None:
    counted: list[tuple[str, int, int | None]] = []
    diagnostics = NodeDiagnostics(lambda *args: counted.append(args))
    tally = diagnostics.tally(VOL, "db")
    assert diagnostics.tally(VOL, "db") is tally  # the same tally for a reopened LU
    assert diagnostics.unsupported() == {}
    tally.note(bytes([0xA3, 0x1E]), "iqn.2026-01.test:a")
    assert diagnostics.unsupported() == {VOL: (UnsupportedCommand(0xA3, 0x1E, 1, "iqn.2026-01.test:a"),)}
    assert counted == [("db", 0xA3, 0x1E)]
    diagnostics.forget(VOL)
    assert diagnostics.unsupported() == {}


def test_skipped_volumes_are_sorted_and_bounded() -> None:
    errors = [VolumeLoadError(f"v{i:03}", f"/d/v{i:03}.json", "bad") for i in range(MAX_SKIPPED + 5)]
    skipped = skipped_volumes(reversed(errors))
    assert len(skipped) == MAX_SKIPPED
    assert skipped[0] == SkippedVolume("v000", "bad")
