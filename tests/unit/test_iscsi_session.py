"""SessionTable: TSIH allocation and reinstatement (RFC 7143 6.3.5)."""

from __future__ import annotations

from typing import Any

import pytest

from frontend.iscsi.params import SessionParams, SessionType
from frontend.iscsi.session import MAX_TSIH, SessionTable, TsihExhausted
from frontend.target import Target

INIT = "iqn.1994-05.com.example:init"
IQN = "iqn.2026-11.io.sparrow:vol1"


def _params(
    tsih: int, isid: int = 1, kind: SessionType = SessionType.NORMAL, init: str = INIT
) -> SessionParams:
    return SessionParams(kind, init, isid, tsih, IQN if kind is SessionType.NORMAL else None)


def _target() -> Target:
    lu: Any = object()
    return Target(IQN, "vol1", lu)


def test_new_tsih_is_never_zero_and_skips_tsihs_in_use() -> None:
    table = SessionTable()
    first = table.new_tsih()
    assert first != 0
    table.open(_params(first), _target(), tpgt=1)
    assert table.tsih_exists(first)
    assert table.new_tsih() != first


def test_tsih_allocation_wraps_past_0xffff_without_zero() -> None:
    table = SessionTable()
    seen = {table.new_tsih() for _ in range(MAX_TSIH)}
    assert len(seen) == MAX_TSIH and 0 not in seen
    assert table.new_tsih() == 1


def test_tsih_exhaustion_raises() -> None:
    table = SessionTable()
    for tsih in range(1, MAX_TSIH + 1):
        table.open(_params(tsih, isid=tsih), _target(), tpgt=1)
    with pytest.raises(TsihExhausted):
        table.new_tsih()


def test_open_builds_the_nexus_and_discovery_has_none() -> None:
    table = SessionTable()
    s, displaced = table.open(_params(1), _target(), tpgt=3)
    assert displaced is None
    assert s.nexus is not None and s.nexus.initiator_port == f"{INIT},i,0x000000000001" and s.nexus.tpgt == 3
    d, _ = table.open(_params(2, kind=SessionType.DISCOVERY), None, tpgt=1)
    assert d.nexus is None and d.is_discovery


def test_same_initiator_isid_and_target_reinstates() -> None:
    table = SessionTable()
    old, _ = table.open(_params(1), _target(), tpgt=1)
    new, displaced = table.open(_params(2), _target(), tpgt=1)
    assert displaced is old and old.closed and not new.closed
    assert table.get(1) is None and table.get(2) is new
    assert table.find(INIT, 1, IQN) is new
    # the displaced session's connection goes away later: closing it again changes nothing
    assert table.close(old) is False
    assert table.find(INIT, 1, IQN) is new and len(table) == 1


def test_other_isid_or_initiator_is_a_separate_session() -> None:
    table = SessionTable()
    a, _ = table.open(_params(1, isid=1), _target(), tpgt=1)
    b, displaced_b = table.open(_params(2, isid=2), _target(), tpgt=1)
    c, displaced_c = table.open(_params(3, init="iqn.1994-05.com.example:other"), _target(), tpgt=1)
    assert displaced_b is None and displaced_c is None
    assert len(table) == 3 and set(table) == {a, b, c}
    assert table.of_target(IQN) == [a, b, c]


def test_close_reports_only_once() -> None:
    table = SessionTable()
    s, _ = table.open(_params(1), _target(), tpgt=1)
    assert table.close(s) is True
    assert table.close(s) is False
    assert not table.tsih_exists(1) and len(table) == 0
