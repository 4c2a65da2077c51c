"""Task management (RFC 7143 11.5, 11.6; SAM-5 7), without I/O: what each function aborts and
resets, as a table, and the responses that wait for aborted tasks to leave the SCSI layer.

``TMF_RULES`` says, per function, which tasks it aborts (``TmfScope``), which reset the LU gets,
and the response when it aborts nothing by rule. ``Connection._on_tmf`` applies it. A response waits
(``HeldResponses``) until every task it aborted while executing has come back (SAM-5 7.1:
FUNCTION COMPLETE only after the affected commands are aborted); the connection asks the asyncio
layer to cancel those (``CancelExecution``) so that it need not wait for a long command.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from frontend.scsi.lu import ResetKind


class TmfFunction(enum.IntEnum):
    """RFC 7143 11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    """RFC 7143 11.6.1."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class TmfScope(enum.Enum):
    """The tasks a function aborts."""

    REFERENCED_TASK = "referenced-task"   # ABORT TASK: the task its Referenced Task Tag names
    LUN = "lun"                           # every task of this session on the LUN
    TARGET = "target"                     # every task of this session; other sessions' by the server
    NONE = "none"                         # nothing: answered at once with the rule's response


@dataclass(frozen=True, slots=True)
class TmfRule:
    scope: TmfScope
    reset: ResetKind | None        # the reset the LU gets (and, for TARGET, the other sessions)
    response: TmfResponse          # FUNCTION COMPLETE, or the refusal when scope is NONE


_COMPLETE: Final = TmfResponse.FUNCTION_COMPLETE

#: RFC 7143 11.5.1 for ERL 0. CLEAR ACA: we never establish ACA (NACA=1 is refused); TASK REASSIGN
#: needs ERL 2. A function not in the table is answered REJECTED.
TMF_RULES: Final[dict[TmfFunction, TmfRule]] = {
    TmfFunction.ABORT_TASK: TmfRule(TmfScope.REFERENCED_TASK, None, TmfResponse.FUNCTION_COMPLETE),
    TmfFunction.ABORT_TASK_SET: TmfRule(TmfScope.LUN, None, TmfResponse.FUNCTION_COMPLETE),
    TmfFunction.CLEAR_TASK_SET: TmfRule(TmfScope.LUN, None, TmfResponse.FUNCTION_COMPLETE),
    TmfFunction.LOGICAL_UNIT_RESET: TmfRule(TmfScope.LUN, ResetKind.LUN, TmfResponse.FUNCTION_COMPLETE),
    TmfFunction.TARGET_WARM_RESET: TmfRule(TmfScope.TARGET, ResetKind.TARGET_WARM, _COMPLETE),
    TmfFunction.TARGET_COLD_RESET: TmfRule(TmfScope.TARGET, ResetKind.TARGET_COLD, _COMPLETE),
    TmfFunction.CLEAR_ACA: TmfRule(TmfScope.NONE, None, TmfResponse.NOT_SUPPORTED),
    TmfFunction.TASK_REASSIGN: TmfRule(TmfScope.NONE, None, TmfResponse.REASSIGNMENT_NOT_SUPPORTED),
}
REJECTED_RULE: Final = TmfRule(TmfScope.NONE, None, TmfResponse.REJECTED)


def rule_for(function: int) -> TmfRule:
    try:
        return TMF_RULES[TmfFunction(function)]
    except ValueError:
        return REJECTED_RULE


class HeldTmfResponse:
    """A TMF response that waits for aborted tasks to come back from the SCSI layer."""

    __slots__ = ("close_after", "itt", "response", "waiting")

    def __init__(self, itt: int, response: int, waiting: set[int], close_after: bool) -> None:
        self.itt = itt
        self.response = response
        self.waiting = waiting
        self.close_after = close_after


class HeldResponses:
    """The held TMF responses of one connection, in the order they were held."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[HeldTmfResponse] = []

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, held: HeldTmfResponse) -> None:
        self._held.append(held)

    def clear(self) -> None:
        self._held.clear()

    def task_returned(self, task_id: int) -> list[HeldTmfResponse]:
        """Task ``task_id`` left the SCSI layer: the responses that waited only for it, to send now."""
        still: list[HeldTmfResponse] = []
        ready: list[HeldTmfResponse] = []
        for held in self._held:
            held.waiting.discard(task_id)
            (still if held.waiting else ready).append(held)
        self._held = still
        return ready
