"""Bugs caught inside the iSCSI core are never silent.

Where the core catches an exception it did not expect (it keeps the server up: the connection is
closed, or the command answered HARDWARE ERROR / INTERNAL TARGET FAILURE), it calls ``caught``: the
exception is logged there with its traceback (event ``INTERNAL_ERROR_EVENT``), counted in /metrics
as ``sparrow_internal_errors_total{where}`` (``FrontendMetrics.internal_error``), and counted in
this process (``count``), which the test suite checks after every test: a test fails on any such
error (tests/conftest.py; the integration fixtures look for the event in the daemons' logs).
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Any

import structlog

from frontend.metrics import FrontendMetrics

log = structlog.get_logger("sparrow.iscsi")

#: The log event of an internal error (the integration fixtures look for it).
INTERNAL_ERROR_EVENT = "iscsi internal error"


class Where(enum.StrEnum):
    """Where in the core a bug was caught: the ``where`` label."""

    RECEIVE = "receive"      # Connection.receive_data: the connection is closed
    COMPLETE = "complete"    # Connection.complete / aborted: the connection is closed
    SCSI = "scsi"            # the SCSI layer (IscsiProtocol._execute): HARDWARE ERROR to the initiator


_COUNTS: Counter[Where] = Counter()


def caught(where: Where, exc: BaseException, metrics: FrontendMetrics, **context: Any) -> None:
    """Log ``exc`` with its traceback, count it in /metrics and in this process."""
    log.error(INTERNAL_ERROR_EVENT, where=where.value, exc_info=exc, **context)
    _COUNTS[where] += 1
    metrics.internal_error(where.value)


def count() -> int:
    """Internal errors caught in this process so far (the test suite's check)."""
    return sum(_COUNTS.values())
