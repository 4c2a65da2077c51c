"""The wrappers below the LU (MarkingStore, ReplicatedStore) delegate through one base, and resolve
the inner store's inline capabilities once, not per command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sparrow.node.replicated_store import ReplicatedStore
from store.blockstore import InlineIo, InlineWrites
from store.delegating import DelegatingStore
from store.dirtymap import DirtyMap, MarkingStore
from store.memstore import MemoryBlockStore

VID = "0123456789abcdef0123456789abcdef"
MIB = 1 << 20


class _NoInline:
    """A store with no inline capability (only what the wrappers delegate)."""

    block_size = 512
    size = MIB
    supports_unmap = False


def _forbid_protocol_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    meta: Any = type(InlineIo)

    def refuse(cls: Any, instance: Any) -> bool:
        raise AssertionError(f"isinstance(..., {cls.__name__}) on the hot path")

    monkeypatch.setattr(meta, "__instancecheck__", refuse)


async def test_inline_capabilities_are_resolved_once_not_per_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = MemoryBlockStore(4 * MIB, 512)
    dirty = DirtyMap.open(tmp_path / "v.dirty", VID, 4 * MIB, missing_clean=True)
    await dirty.mark(0, MIB)
    marking = MarkingStore(inner, dirty)
    replicated = ReplicatedStore(marking, VID, "n1", clock=lambda: 0.0, open_link=None)
    replicated.configure(1, [])  # one copy: writes go straight to the inner store
    _forbid_protocol_checks(monkeypatch)
    for _ in range(3):
        assert replicated.write_now(4096, b"x" * 512)
        assert replicated.read_now(4096, 512) == b"x" * 512
        assert not marking.write_now(2 * MIB, b"y" * 512)  # region 2 not durably dirty: a mark first
        assert not marking.write_inline(2 * MIB, [b"y" * 512])
    dirty.close()


async def test_the_wrappers_delegate_through_the_base_and_follow_a_new_inner(tmp_path: Path) -> None:
    dirty = DirtyMap.open(tmp_path / "v.dirty", VID, 4 * MIB, missing_clean=True)
    marking = MarkingStore(MemoryBlockStore(4 * MIB, 4096), dirty)
    replicated = ReplicatedStore(marking, VID, "n1", clock=lambda: 0.0, open_link=None)
    for store in (marking, replicated):
        assert isinstance(store, DelegatingStore)
        assert store.size == 4 * MIB and store.block_size == 4096 and store.supports_unmap
        assert await store.read(0, 4096) == bytes(4096)
        assert await store.mapped_extent(0) == await MemoryBlockStore(4 * MIB, 4096).mapped_extent(0)
    assert marking.inline_io is marking.inner and marking.inline_writes is None  # memory: no pwritev
    replicated.inner = _NoInline()  # type: ignore[assignment]
    assert replicated.inline_io is None and replicated.read_now(0, 512) is None
    assert replicated.block_size == 512 and replicated.size == MIB
    assert isinstance(marking, InlineWrites)  # it offers the method; the inner store decides
    dirty.close()
