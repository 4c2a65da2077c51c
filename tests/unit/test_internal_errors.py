"""A bug caught inside the iSCSI core is logged with its traceback, counted in /metrics and in the
process, and fails the test suite (tests/conftest.py) unless the test expects it."""

from __future__ import annotations

import pytest
import structlog
from prometheus_client import generate_latest

from frontend import internal_errors
from frontend.iscsi.connection import CloseConnection, Connection, Phase
from frontend.iscsi.login import LoginMachine
from frontend.iscsi.pdu import LoginRequest, encode_bytes
from frontend.iscsi.session import SessionTable
from frontend.metrics import NoMetrics
from frontend.target import TargetRegistry, TargetSettings
from sparrow.metrics import PrometheusMetrics


class Recorder(NoMetrics):
    def __init__(self) -> None:
        self.errors: list[str] = []

    def internal_error(self, where: str) -> None:
        self.errors.append(where)


@pytest.mark.internal_errors_expected
def test_a_bug_in_the_core_is_logged_counted_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Recorder()
    conn = Connection(TargetSettings(nop_interval=0), TargetRegistry(), SessionTable(), now=0.0, peer="p",
                      metrics=metrics)

    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    # The login machine is pure Python in both builds; Connection's own methods cannot be replaced
    # when it is compiled (frontend/build.py).
    monkeypatch.setattr(LoginMachine, "receive", broken)
    before = internal_errors.count()
    with structlog.testing.capture_logs() as logs:
        conn.receive_data(encode_bytes(LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000001, 0, 1, 0, 0, 0,
                                                    b"InitiatorName=iqn.2026-12.test:i\0")), 1.0)
    assert internal_errors.count() == before + 1
    assert metrics.errors == ["receive"]
    (record,) = [r for r in logs if r["event"] == internal_errors.INTERNAL_ERROR_EVENT]
    assert record["where"] == "receive" and isinstance(record["exc_info"], RuntimeError)
    assert record["log_level"] == "error"
    assert conn.phase is Phase.CLOSED
    assert isinstance(conn.next_event(), CloseConnection)


def test_prometheus_exports_the_counter() -> None:
    metrics = PrometheusMetrics()
    metrics.internal_error("scsi")
    metrics.internal_error("scsi")
    text = generate_latest(metrics.registry).decode()
    assert 'sparrow_internal_errors_total{where="scsi"} 2.0' in text
