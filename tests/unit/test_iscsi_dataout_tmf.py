"""The Data-Out collection rules and the task management table, driven directly (no connection)."""

from __future__ import annotations

from frontend.iscsi.dataout import DATA_PHASE_ERROR, INCORRECT_AMOUNT_OF_DATA, DataOutCollector
from frontend.iscsi.pdu import RESERVED_TAG, DataOut, ScsiCommand
from frontend.iscsi.tasks import Task, TaskInput
from frontend.iscsi.tmf import (
    TMF_RULES,
    HeldResponses,
    HeldTmfResponse,
    TmfFunction,
    TmfResponse,
    TmfScope,
    rule_for,
)
from frontend.scsi.lu import ResetKind


def collecting_write(edtl: int, immediate: bytes = b"") -> Task:
    cmd = ScsiCommand(False, True, False, True, 1, 0, 7, edtl, 1, 0, bytes(16), immediate)
    task = Task(1, cmd, 0)
    if immediate:
        task.store(0, immediate)
    task.move(TaskInput.ACCEPT_NEEDS_DATA)
    return task


Sent = list[tuple[int, int, int, int]]


def collector(max_burst: int = 1024, max_r2t: int = 1) -> tuple[DataOutCollector, Sent]:
    sent: Sent = []
    ttts = iter(range(100, 200))
    c = DataOutCollector(lambda task, ttt, sn, off, n: sent.append((ttt, sn, off, n)), lambda: next(ttts),
                         max_burst=max_burst, max_r2t=max_r2t)
    return c, sent


def test_r2ts_cover_what_immediate_data_left_one_burst_at_a_time() -> None:
    c, sent = collector(max_burst=1024, max_r2t=1)
    task = collecting_write(3000, b"i" * 512)
    c.solicit(task)
    assert sent == [(100, 0, 512, 1024)]
    assert c.receive(task, DataOut(True, 0, 7, 100, 0, 0, 512, b"a" * 1024)) is None
    assert sent[-1] == (101, 1, 1536, 1024)
    assert c.receive(task, DataOut(True, 0, 7, 101, 0, 0, 1536, b"b" * 1024)) is None
    assert c.receive(task, DataOut(True, 0, 7, 102, 0, 0, 2560, b"c" * 440)) is None
    assert task.data_complete and bytes(task.buffer) == b"i" * 512 + b"a" * 1024 + b"b" * 1024 + b"c" * 440


def test_faults_name_their_asc_and_store_nothing() -> None:
    c, _sent = collector()
    task = collecting_write(2048)
    c.solicit(task)
    fault = c.receive(task, DataOut(True, 0, 7, 999, 0, 0, 0, b"x" * 4))
    assert fault is not None and fault.code == DATA_PHASE_ERROR and "Target Transfer Tag" in fault.why
    fault = c.receive(task, DataOut(True, 0, 7, 100, 0, 3, 0, b"x" * 4))
    assert fault is not None and fault.code == DATA_PHASE_ERROR and "DataSN 3" in fault.why
    fault = c.receive(task, DataOut(True, 0, 7, 100, 0, 0, 8, b"x" * 4))
    assert fault is not None and fault.code == INCORRECT_AMOUNT_OF_DATA
    fault = c.receive(task, DataOut(True, 0, 7, RESERVED_TAG, 0, 0, 0, b"x" * 4))
    assert fault is not None  # unsolicited data after the (empty) unsolicited sequence
    assert task.received == 0


def test_every_function_has_a_rule_and_unknown_ones_are_rejected() -> None:
    assert set(TMF_RULES) == set(TmfFunction)
    assert rule_for(0).response is TmfResponse.REJECTED and rule_for(99).scope is TmfScope.NONE
    assert rule_for(TmfFunction.LOGICAL_UNIT_RESET).reset is ResetKind.LUN
    assert rule_for(TmfFunction.TARGET_COLD_RESET).scope is TmfScope.TARGET
    for rule in TMF_RULES.values():
        assert (rule.scope is TmfScope.NONE) == (rule.response is not TmfResponse.FUNCTION_COMPLETE)
        assert rule.scope is not TmfScope.TARGET or rule.reset is not None


def test_held_responses_go_when_their_last_task_returns() -> None:
    held = HeldResponses()
    first = HeldTmfResponse(1, 0, {5, 6}, close_after=False)
    second = HeldTmfResponse(2, 0, {6}, close_after=False)
    held.hold(first)
    held.hold(second)
    assert held.task_returned(6) == [second]
    assert held and held.task_returned(5) == [first] and not held
