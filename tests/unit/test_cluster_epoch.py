"""sparrow.cluster.epoch: ordering, restore, and the rule that only the publisher mints epochs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparrow.cluster.epoch import Epoch

REPO = Path(__file__).resolve().parents[2]
#: The one module allowed to construct an epoch directly (docs/cluster.md, "Identities and numbers").
MINTER = REPO / "sparrow" / "cluster" / "publisher.py"
#: Built from pieces so this file does not match itself.
DIRECT_CONSTRUCTION = re.compile(r"\b" + "Epoch" + r"\s*\(")


def test_restore_keeps_the_value() -> None:
    epoch = Epoch.restore(7)
    assert epoch.value == 7
    assert int(epoch) == 7
    assert str(epoch) == "epoch 7"


def test_equal_values_are_equal_and_hash_alike() -> None:
    assert Epoch.restore(3) == Epoch.restore(3)
    assert hash(Epoch.restore(3)) == hash(Epoch.restore(3))
    assert Epoch.restore(3) != Epoch.restore(4)
    assert len({Epoch.restore(3), Epoch.restore(3), Epoch.restore(4)}) == 2


@given(st.integers(0, 2**64), st.integers(0, 2**64))
def test_ordering_follows_the_value(a: int, b: int) -> None:
    ea, eb = Epoch.restore(a), Epoch.restore(b)
    assert (ea < eb) == (a < b)
    assert (ea <= eb) == (a <= b)
    assert (ea > eb) == (a > b)
    assert (ea == eb) == (a == b)
    assert max(ea, eb).value == max(a, b)


def test_is_frozen() -> None:
    epoch = Epoch.restore(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        epoch.value = 2  # type: ignore[misc]


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None])
def test_restore_rejects_non_ints(value: object) -> None:
    with pytest.raises(TypeError):
        Epoch.restore(value)  # type: ignore[arg-type]


def test_restore_rejects_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Epoch.restore(-1)
    assert Epoch.restore(0).value == 0


def test_restore_is_documented_as_not_minting() -> None:
    doc = Epoch.restore.__doc__ or ""
    assert "decoding a recorded epoch, never minting one" in doc


def test_pattern_catches_direct_construction() -> None:
    # The scan below is only worth something if its pattern matches what it must forbid.
    forbidden = "Epoch" + "(3)"
    assert DIRECT_CONSTRUCTION.search(f"x = {forbidden}")
    assert DIRECT_CONSTRUCTION.search("x = " + "Epoch" + " (value=3)")
    assert not DIRECT_CONSTRUCTION.search("x = Epoch.restore(3)")
    assert not DIRECT_CONSTRUCTION.search("x = restored_epoch(3)")


def test_only_the_publisher_constructs_epochs() -> None:
    offenders = []
    for top in ("sparrow", "frontend", "store", "tests", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path == MINTER or ".venv" in path.parts:
                continue
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if DIRECT_CONSTRUCTION.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "only sparrow/cluster/publisher.py may mint an epoch:\n" + "\n".join(offenders)
