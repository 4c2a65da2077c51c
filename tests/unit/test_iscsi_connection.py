"""The connection core driven end to end by a tiny initiator built from the codec (no sockets)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.iscsi.connection import (
    PHASE_TRANSITIONS,
    CancelExecution,
    CloseConnection,
    Connection,
    ExecuteScsi,
    LoggedIn,
    Phase,
    TargetResetRequested,
    lun_number,
)
from frontend.iscsi.errors import IllegalTransition
from frontend.iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    encode_bytes,
    target_reader,
)
from frontend.iscsi.session import SessionTable
from frontend.iscsi.tasks import TASK_TRANSITIONS, Task, TaskInput, TaskState
from frontend.scsi.lu import ResetKind, no_such_lun
from frontend.scsi.types import Nexus, ScsiRequest, ScsiResult, ScsiStatus
from frontend.target import Target, TargetRegistry, TargetSettings

INIT = "iqn.1994-05.com.example:init"
IQN = "iqn.2026-11.io.sparrow:vol1"
ISID = 0x23D000000001
BLOCK = 512

READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])       # one block
READ10_2 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0])     # two blocks
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
TUR = bytes(6)


def _blocks(cdb: bytes) -> int:
    return cdb[8] if cdb[0] in (0x28, 0x2A) else 0


class FakeLu:
    """Reads return block-sized patterns; the CDB's transfer length is reported like the real LU."""

    def __init__(self) -> None:
        self.requests: list[ScsiRequest] = []
        self.resets: list[tuple[ResetKind, Nexus | None]] = []
        self.lost: list[Nexus] = []
        self.result: Callable[[ScsiRequest], ScsiResult] | None = None

    async def execute(self, req: ScsiRequest) -> ScsiResult:
        self.requests.append(req)
        if self.result is not None:
            return self.result(req)
        tl = _blocks(bytes(req.cdb)) * BLOCK
        if req.cdb[0] == 0x28:
            return ScsiResult(ScsiStatus.GOOD, bytes(i & 0xFF for i in range(tl)), transfer_length=tl)
        if req.cdb[0] == 0x2A:
            return ScsiResult(ScsiStatus.GOOD, transfer_length=tl)
        return ScsiResult(ScsiStatus.GOOD)

    def reset(self, kind: ResetKind, nexus: Nexus | None) -> None:
        self.resets.append((kind, nexus))

    def nexus_lost(self, nexus: Nexus) -> None:
        self.lost.append(nexus)


def run_now(coro: Coroutine[Any, Any, ScsiResult]) -> ScsiResult:
    """Run a coroutine that never suspends (the fake LU's) to its result."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    raise AssertionError("the fake LU suspended")


LOGIN_KEYS = {
    "HeaderDigest": "None",
    "DataDigest": "None",
    "ImmediateData": "Yes",
    "InitialR2T": "Yes",
    "MaxRecvDataSegmentLength": "8192",
    "FirstBurstLength": "65536",
    "MaxBurstLength": "262144",
    "MaxOutstandingR2T": "1",
}


class Initiator:
    """A tiny initiator: encodes requests, feeds the connection, decodes what it sends back."""

    def __init__(
        self,
        target_settings: TargetSettings | None = None,
        *,
        sessions: SessionTable | None = None,
        registry: TargetRegistry | None = None,
        lu: FakeLu | None = None,
        isid: int = ISID,
    ) -> None:
        self.settings = target_settings or TargetSettings(nop_interval=0)
        self.lu = lu or FakeLu()
        if registry is None:
            registry = TargetRegistry()
            registry.add(Target(IQN, "vol1", self.lu))  # type: ignore[arg-type]
        self.registry = registry
        self.sessions = sessions if sessions is not None else SessionTable()
        self.now = 0.0
        self.conn = Connection(self.settings, registry, self.sessions, now=self.now, peer="test")
        self.reader = target_reader(max_data_segment_length=1 << 24)
        self.isid = isid
        self.cmd_sn = 1
        self.next_itt = 1
        self.hd = self.dd = False
        self.auto = True
        self.events: list[object] = []
        self.executing: list[ExecuteScsi] = []
        self.closed: str | None = None

    # --- plumbing ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Any]:
        self.conn.receive_data(data, self.now)
        return self.collect()

    def send(self, pdu: object) -> list[Any]:
        return self.feed(encode_bytes(pdu, header_digest=self.hd, data_digest=self.dd))  # type: ignore[arg-type]

    def collect(self) -> list[Any]:
        while (ev := self.conn.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, ExecuteScsi):
                self.executing.append(ev)
            elif isinstance(ev, CloseConnection):
                self.closed = ev.reason
        while self.auto and self.executing:
            ev = self.executing.pop(0)
            self.finish(ev)
        return self.responses()

    def finish(self, ev: ExecuteScsi, result: ScsiResult | None = None) -> None:
        if result is None:
            result = no_such_lun(ev.request) if ev.lu is None else run_now(ev.lu.execute(ev.request))
        self.conn.complete(ev.task_id, result, self.now)
        while (e := self.conn.next_event()) is not None:
            self.events.append(e)
            if isinstance(e, ExecuteScsi):
                self.executing.append(e)
            elif isinstance(e, CloseConnection):
                self.closed = e.reason

    def responses(self) -> list[Any]:
        out = []
        self.reader.feed(b"".join(self.conn.data_to_send()))
        while (pdu := self.reader.next_pdu()) is not None:
            out.append(pdu)
            if isinstance(pdu, LoginResponse) and pdu.transit and pdu.nsg == 3 and pdu.status_class == 0:
                self.reader.header_digest = self.hd = "HeaderDigest=CRC32C" in pdu.data.decode()
                self.reader.data_digest = self.dd = "DataDigest=CRC32C" in pdu.data.decode()
        return out

    def itt(self) -> int:
        itt = self.next_itt
        self.next_itt += 1
        return itt

    # --- requests ------------------------------------------------------------------------------

    def login(self, session_type: str = "Normal", **keys: str) -> LoginResponse:
        pairs = {"InitiatorName": INIT, "SessionType": session_type}
        if session_type == "Normal":
            pairs["TargetName"] = IQN
        pairs.update(LOGIN_KEYS if session_type == "Normal" else {})
        pairs.update(keys)
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs.items())
        request = LoginRequest(True, False, 1, 3, 0, 0, self.isid, 0, self.itt(), 0, self.cmd_sn, 0, text)
        out = self.send(request)
        assert len(out) == 1 and isinstance(out[0], LoginResponse)
        return out[0]

    def command(
        self, cdb: bytes, *, edtl: int = 0, read: bool = False, write: bool = False, data: bytes = b"",
        final: bool = True, immediate: bool = False, lun: int = 0, cmd_sn: int | None = None,
        itt: int | None = None,
    ) -> ScsiCommand:
        if cmd_sn is None:
            cmd_sn = self.cmd_sn
            if not immediate:
                self.cmd_sn += 1
        itt = self.itt() if itt is None else itt
        return ScsiCommand(immediate, final, read, write, 1, lun, itt, edtl, cmd_sn, 0, cdb, data)

    def logged_in(self, **keys: str) -> Initiator:
        resp = self.login(**keys)
        assert resp.status_class == 0, resp
        assert self.conn.phase is Phase.FULL_FEATURE
        return self


def normal(target_settings: TargetSettings | None = None, **keys: str) -> Initiator:
    return Initiator(target_settings).logged_in(**keys)


def _only(out: list[object], kind: type) -> list[Any]:
    return [p for p in out if isinstance(p, kind)]


# --- login ------------------------------------------------------------------------------------------


def test_login_enters_full_feature_phase_and_reports_the_session() -> None:
    ini = Initiator()
    resp = ini.login()
    assert resp.status_class == 0 and resp.tsih != 0
    logged = _only(ini.events, LoggedIn)
    assert len(logged) == 1 and logged[0].displaced is None
    session = logged[0].session
    assert session.nexus == Nexus(INIT, ISID, IQN, 1)
    assert ini.sessions.get(resp.tsih) is session
    assert ini.conn.exp_cmd_sn == 1 and ini.conn.max_cmd_sn == 1 + ini.settings.cmd_window - 1


def test_failed_login_sends_the_response_then_closes() -> None:
    ini = Initiator()
    resp = ini.login(TargetName="iqn.2026-11.io.sparrow:nope")
    assert (resp.status_class, resp.status_detail) == (2, 3)
    assert ini.closed is not None and ini.conn.phase is Phase.CLOSED
    assert len(ini.sessions) == 0


def test_login_timeout() -> None:
    ini = Initiator(TargetSettings(login_timeout=15.0))
    assert ini.conn.next_deadline() == 15.0
    ini.conn.handle_timer(14.0)
    assert ini.conn.phase is Phase.LOGIN
    ini.conn.handle_timer(15.0)
    ini.collect()
    assert ini.closed == "login timeout"


def test_non_login_pdu_during_login_is_rejected_and_closes() -> None:
    ini = Initiator()
    out = ini.send(NopOut(True, 0, 1, RESERVED_TAG, 1, 0))
    assert _only(out, Reject)[0].reason == 0x04
    assert ini.closed is not None


def test_digests_are_switched_on_after_the_final_login_response() -> None:
    ini = normal(HeaderDigest="CRC32C", DataDigest="CRC32C")
    assert ini.hd and ini.dd
    out = ini.send(ini.command(READ10, edtl=BLOCK, read=True))
    data_in = _only(out, DataIn)
    assert len(data_in) == 1 and data_in[0].status_present


# --- reads ------------------------------------------------------------------------------------------


def test_read_is_split_by_the_initiators_max_recv_data_segment_length() -> None:
    ini = normal(MaxRecvDataSegmentLength="512")
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
    stat_sn = ini.conn.stat_sn
    out = ini.send(ini.command(cdb, edtl=8 * BLOCK, read=True))
    pdus = _only(out, DataIn)
    assert len(out) == len(pdus) == 8
    assert [p.data_sn for p in pdus] == list(range(8))
    assert [p.buffer_offset for p in pdus] == [i * 512 for i in range(8)]
    assert all(len(p.data) == 512 for p in pdus)
    assert b"".join(p.data for p in pdus) == bytes(i & 0xFF for i in range(8 * BLOCK))
    assert [p.status_present for p in pdus] == [False] * 7 + [True]
    last = pdus[-1]
    assert last.final and last.status == 0 and last.stat_sn == stat_sn and not last.underflow
    assert ini.conn.stat_sn == stat_sn + 1
    assert all(p.exp_cmd_sn == 2 for p in pdus)


def test_read_sequences_end_at_max_burst_length() -> None:
    ini = normal(MaxRecvDataSegmentLength="512", MaxBurstLength="1024", FirstBurstLength="1024")
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0])
    pdus = _only(ini.send(ini.command(cdb, edtl=4 * BLOCK, read=True)), DataIn)
    assert [p.final for p in pdus] == [False, True, False, True]


def test_check_condition_goes_in_a_scsi_response_with_sense() -> None:
    ini = normal()
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])
    ini.lu.result = lambda req: ScsiResult(ScsiStatus.CHECK_CONDITION, sense=sense)
    out = ini.send(ini.command(READ10, edtl=BLOCK, read=True))
    assert not _only(out, DataIn)
    (resp,) = _only(out, ScsiResponse)
    assert resp.status == 2 and resp.data == sense and resp.exp_data_sn == 0


def test_data_with_bad_status_is_followed_by_a_scsi_response() -> None:
    ini = normal()
    ini.lu.result = lambda req: ScsiResult(ScsiStatus.CHECK_CONDITION, b"x" * 100, sense=b"\x70" + bytes(17))
    out = ini.send(ini.command(READ10, edtl=BLOCK, read=True))
    (din,) = _only(out, DataIn)
    assert not din.status_present and din.final
    (resp,) = _only(out, ScsiResponse)
    assert resp.exp_data_sn == 1 and resp.underflow and resp.residual == BLOCK - 100


# libiscsi test_read10_residuals.c / test_read10_invalid.c
@pytest.mark.parametrize(
    ("cdb", "edtl", "got", "flag", "residual"),
    [
        (READ10, 0, 0, "overflow", BLOCK),
        (READ10, 10000, BLOCK, "underflow", 10000 - BLOCK),
        (READ10, 200, 200, "overflow", BLOCK - 200),
        (READ10_2, BLOCK, BLOCK, "overflow", BLOCK),
        (READ10, BLOCK, BLOCK, None, 0),
    ],
)
def test_read_residuals(cdb: bytes, edtl: int, got: int, flag: str | None, residual: int) -> None:
    ini = normal()
    out = ini.send(ini.command(cdb, edtl=edtl, read=True))
    data = b"".join(bytes(p.data) for p in _only(out, DataIn))
    assert len(data) == got
    status = _only(out, DataIn)[-1] if got else _only(out, ScsiResponse)[0]
    assert status.status == 0
    assert status.overflow == (flag == "overflow")
    assert status.underflow == (flag == "underflow")
    assert status.residual == residual


def test_read_flagged_as_write_is_executed_without_data_in() -> None:
    """libiscsi test_read10_invalid: READ10 with the W bit and a block of data -> GOOD."""
    ini = normal()
    out = ini.send(ini.command(READ10, edtl=BLOCK, write=True, data=b"w" * BLOCK))
    assert not _only(out, DataIn)
    (resp,) = _only(out, ScsiResponse)
    assert resp.status == 0 and not resp.overflow and not resp.underflow


def test_lun_other_than_zero_gets_no_lu() -> None:
    ini = normal()
    ini.auto = False
    ini.send(ini.command(TUR, lun=1 << 48))
    (ev,) = ini.executing
    assert ev.lu is None and ev.request.lun == 1
    assert lun_number(0x4001 << 48) == 1 and lun_number(1) == -1


# --- writes -----------------------------------------------------------------------------------------


def test_write_with_all_data_immediate() -> None:
    ini = normal()
    out = ini.send(ini.command(WRITE10, edtl=BLOCK, write=True, data=b"a" * BLOCK))
    (resp,) = _only(out, ScsiResponse)
    assert resp.status == 0 and resp.exp_data_sn == 0
    assert bytes(ini.lu.requests[0].data_out) == b"a" * BLOCK


def test_write_with_immediate_unsolicited_and_solicited_data() -> None:
    ini = normal(TargetSettings(nop_interval=0, max_outstanding_r2t=2), InitialR2T="No",
                 FirstBurstLength="4096", MaxBurstLength="4096", MaxOutstandingR2T="2")
    payload = bytes(i * 7 & 0xFF for i in range(16384))
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 32, 0])
    cmd = ini.command(cdb, edtl=len(payload), write=True, data=payload[:1024], final=False)
    assert ini.send(cmd) == []
    out = ini.send(DataOut(False, 0, cmd.itt, RESERVED_TAG, 0, 0, 1024, payload[1024:2048]))
    assert out == []
    out = ini.send(DataOut(True, 0, cmd.itt, RESERVED_TAG, 0, 1, 2048, payload[2048:4096]))
    r2ts = _only(out, R2T)
    assert [(r.r2t_sn, r.buffer_offset, r.desired_length) for r in r2ts] == [(0, 4096, 4096), (1, 8192, 4096)]
    assert not ini.lu.requests
    out = []
    for r in r2ts:
        for i, off in enumerate(range(r.buffer_offset, r.buffer_offset + 4096, 2048)):
            out += ini.send(DataOut(off + 2048 == r.buffer_offset + 4096, 0, cmd.itt, r.ttt, 0, i, off,
                                    payload[off : off + 2048]))
    r2ts = _only(out, R2T)
    assert [(r.r2t_sn, r.buffer_offset) for r in r2ts] == [(2, 12288)]
    out = ini.send(DataOut(True, 0, cmd.itt, r2ts[0].ttt, 0, 0, 12288, payload[12288:]))
    (resp,) = _only(out, ScsiResponse)
    assert resp.status == 0 and resp.exp_data_sn == 3
    assert bytes(ini.lu.requests[0].data_out) == payload


def test_write_with_r2t_only() -> None:
    ini = normal(MaxBurstLength="1024", FirstBurstLength="1024")
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 4, 0])
    cmd = ini.command(cdb, edtl=2048, write=True)
    (r2t,) = _only(ini.send(cmd), R2T)
    assert (r2t.buffer_offset, r2t.desired_length, r2t.itt) == (0, 1024, cmd.itt)
    assert ini.conn.task_state(cmd.itt) is TaskState.COLLECTING_DATA
    (r2t2,) = _only(ini.send(DataOut(True, 0, cmd.itt, r2t.ttt, 0, 0, 0, b"1" * 1024)), R2T)
    assert r2t2.r2t_sn == 1 and r2t2.buffer_offset == 1024 and r2t2.ttt != r2t.ttt
    out = ini.send(DataOut(True, 0, cmd.itt, r2t2.ttt, 0, 0, 1024, b"2" * 1024))
    (resp,) = _only(out, ScsiResponse)
    assert resp.status == 0 and resp.underflow is False
    assert bytes(ini.lu.requests[0].data_out) == b"1" * 1024 + b"2" * 1024


def test_write_with_zero_edtl_reports_overflow() -> None:
    """libiscsi test_write10_residuals: WRITE10 of one block with EDTL 0 -> GOOD, overflow 512."""
    ini = normal()
    out = ini.send(ini.command(WRITE10, edtl=0, write=True))
    (resp,) = _only(out, ScsiResponse)
    assert resp.status == 0 and resp.overflow and resp.residual == BLOCK
    assert bytes(ini.lu.requests[0].data_out) == b""


def test_write_with_more_edtl_than_the_cdb_reports_underflow() -> None:
    ini = normal()
    out = ini.send(ini.command(WRITE10, edtl=10000, write=True, data=b"w" * 8192))
    (r2t,) = _only(out, R2T)
    out = ini.send(DataOut(True, 0, r2t.itt, r2t.ttt, 0, 0, 8192, b"w" * (10000 - 8192)))
    (resp,) = _only(out, ScsiResponse)
    assert resp.underflow and resp.residual == 10000 - BLOCK


@pytest.mark.parametrize(
    ("mutate", "why", "asc"),
    [
        (lambda d: replace(d, data_sn=1), "DataSN", 0x4B),
        (lambda d: replace(d, data_sn=0xFFFFFFFF), "DataSN", 0x4B),
        (lambda d: replace(d, buffer_offset=512), "range", 0x0C),
        (lambda d: replace(d, ttt=0x4242), "Target Transfer Tag", 0x4B),
        (lambda d: replace(d, data=b"x" * 1536), "range", 0x0C),
    ],
)
def test_bad_data_out_fails_the_task_and_keeps_the_connection(
    mutate: Callable[[DataOut], DataOut], why: str, asc: int
) -> None:
    """libiscsi test_iscsi_datasn_invalid: the command must fail, the session must go on."""
    ini = normal()
    cmd = ini.command(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0]), edtl=1024, write=True)
    (r2t,) = _only(ini.send(cmd), R2T)
    out = ini.send(mutate(DataOut(False, 0, cmd.itt, r2t.ttt, 0, 0, 0, b"x" * 512)))
    assert _only(out, Reject)[0].reason == 0x04
    (resp,) = _only(out, ScsiResponse)
    assert resp.itt == cmd.itt and resp.status == 2
    assert resp.data[2] == 0x0B and resp.data[12] == asc          # ABORTED COMMAND
    assert ini.closed is None and why in ini.conn.data_errors[-1]
    assert not ini.lu.requests
    # the rest of its data is dropped silently; the next command works
    assert ini.send(DataOut(True, 0, cmd.itt, r2t.ttt, 0, 1, 512, b"x" * 512)) == []
    assert _only(ini.send(ini.command(TUR)), ScsiResponse)[0].status == 0


@pytest.mark.parametrize(
    ("blocks", "data_sns"),
    [
        (2, [0, 0]),             # two Data-Out PDUs with DataSN 0
        (1, [27]),
        (1, [0xFFFFFFFF]),       # DataSN -1
        (2, [1, 0]),             # in reverse order
    ],
)
def test_libiscsi_datasn_invalid_cases_on_unsolicited_data(blocks: int, data_sns: list[int]) -> None:
    """libiscsi test_iscsi_datasn_invalid as it runs against us: InitialR2T=No, the initiator sends
    no immediate data and 512-byte Data-Out PDUs (TTT 0xffffffff). Each WRITE(10) must end in an
    error (the test asserts only that it is not GOOD); later commands on the session must work."""
    ini = normal(InitialR2T="No", MaxRecvDataSegmentLength="512")
    cdb = bytes([0x2A, 0, 0, 0, 0, 100, 0, 0, blocks, 0])
    cmd = ini.command(cdb, edtl=blocks * BLOCK, write=True, final=False)
    assert ini.send(cmd) == []
    out: list[object] = []
    for i, data_sn in enumerate(data_sns):
        out += ini.send(DataOut(i == blocks - 1, 0, cmd.itt, RESERVED_TAG, 0, data_sn, i * BLOCK,
                                b"\xa6" * BLOCK))
    assert [r.reason for r in _only(out, Reject)] == [0x04]            # protocol error, once
    (resp,) = _only(out, ScsiResponse)
    assert resp.itt == cmd.itt and resp.status == 2 and resp.data[2] == 0x0B and resp.data[12] == 0x4B
    assert not ini.lu.requests and ini.closed is None
    assert _only(ini.send(ini.command(TUR)), ScsiResponse)[0].status == 0


def test_failed_task_answers_in_cmdsn_order() -> None:
    ini = normal()
    write = ini.command(WRITE10, edtl=BLOCK, write=True)
    tur = ini.command(TUR)
    (r2t,) = _only(ini.send(write), R2T)
    assert ini.send(tur) == []
    out = ini.send(DataOut(True, 0, write.itt, r2t.ttt, 0, 5, 0, b"w" * BLOCK))
    assert [p.itt for p in _only(out, ScsiResponse)] == [write.itt, tur.itt]


def test_unsolicited_data_out_with_initial_r2t_yes_is_rejected() -> None:
    ini = normal()
    out = ini.send(ini.command(WRITE10, edtl=BLOCK, write=True, final=False))
    assert _only(out, Reject)[0].reason == 0x04
    assert ini.conn.exp_cmd_sn == 2   # the rejected command's CmdSN is used up


def test_immediate_data_without_w_bit_is_invalid() -> None:
    ini = normal()
    out = ini.send(ini.command(READ10, edtl=BLOCK, read=True, data=b"x" * 4))
    assert _only(out, Reject)[0].reason == 0x09


def test_duplicate_itt_is_task_in_progress() -> None:
    ini = normal()
    cmd = ini.command(WRITE10, edtl=BLOCK, write=True)
    ini.send(cmd)
    out = ini.send(ini.command(READ10, edtl=BLOCK, read=True, itt=cmd.itt))
    assert _only(out, Reject)[0].reason == 0x07


# --- command numbering ------------------------------------------------------------------------------


def test_commands_are_released_in_cmdsn_order() -> None:
    ini = normal()
    first = ini.command(READ10, edtl=BLOCK, read=True)
    second = ini.command(READ10_2, edtl=2 * BLOCK, read=True)
    assert ini.send(second) == []
    assert ini.conn.exp_cmd_sn == 1 and ini.conn.task_state(second.itt) is TaskState.AWAITING_CMDSN
    out = ini.send(first)
    assert [p.itt for p in _only(out, DataIn)] == [first.itt, second.itt]
    assert ini.conn.exp_cmd_sn == 3
    assert [len(r.data_out) for r in ini.lu.requests] == [0, 0]
    assert [bytes(r.cdb[:10]) for r in ini.lu.requests] == [READ10, READ10_2]


def test_a_read_waits_for_an_earlier_write_to_collect_its_data() -> None:
    ini = normal()
    write = ini.command(WRITE10, edtl=BLOCK, write=True)
    read = ini.command(READ10, edtl=BLOCK, read=True)
    (r2t,) = _only(ini.send(write), R2T)
    assert ini.send(read) == []
    assert ini.conn.task_state(read.itt) is TaskState.READY
    out = ini.send(DataOut(True, 0, write.itt, r2t.ttt, 0, 0, 0, b"w" * BLOCK))
    assert [r.cdb[0] for r in ini.lu.requests] == [0x2A, 0x28]
    assert isinstance(out[0], ScsiResponse) and isinstance(out[1], DataIn)


@pytest.mark.parametrize("offset", [128, 129, 1000, 0xFFFFFFFF])
def test_commands_outside_the_window_are_dropped_silently(offset: int) -> None:
    """RFC 7143 3.2.2.1; libiscsi test_iscsi_cmdsn_toohigh / toolow."""
    ini = normal(TargetSettings(nop_interval=0, cmd_window=128))
    assert ini.conn.max_cmd_sn == 128
    out = ini.send(ini.command(TUR, cmd_sn=(1 + offset) & 0xFFFFFFFF))
    assert out == [] and not ini.lu.requests
    out = ini.send(ini.command(TUR))
    assert len(_only(out, ScsiResponse)) == 1


def test_duplicate_cmdsn_is_dropped() -> None:
    ini = normal()
    ini.send(ini.command(TUR, cmd_sn=3))
    assert ini.send(ini.command(TUR, cmd_sn=3)) == []
    assert ini.conn.exp_cmd_sn == 1


def test_immediate_commands_bypass_the_gap() -> None:
    ini = normal()
    ini.send(ini.command(TUR, cmd_sn=5))
    out = ini.send(ini.command(READ10, edtl=BLOCK, read=True, immediate=True))
    assert len(_only(out, DataIn)) == 1
    assert ini.conn.exp_cmd_sn == 1


def test_max_cmd_sn_moves_with_exp_cmd_sn() -> None:
    ini = normal(TargetSettings(nop_interval=0, cmd_window=4))
    (resp,) = _only(ini.send(ini.command(TUR)), ScsiResponse)
    assert (resp.exp_cmd_sn, resp.max_cmd_sn) == (2, 5)


# --- NOP --------------------------------------------------------------------------------------------


def test_nop_out_ping_is_echoed() -> None:
    ini = normal()
    stat_sn = ini.conn.stat_sn
    (nop,) = ini.send(NopOut(True, 0, 0x99, RESERVED_TAG, ini.cmd_sn, 0, b"hello"))
    assert isinstance(nop, NopIn) and nop.itt == 0x99 and nop.ttt == RESERVED_TAG and nop.data == b"hello"
    assert nop.stat_sn == stat_sn and ini.conn.stat_sn == stat_sn + 1
    assert ini.send(NopOut(True, 0, RESERVED_TAG, RESERVED_TAG, ini.cmd_sn, 0)) == []


def test_non_immediate_nop_out_uses_a_cmdsn() -> None:
    ini = normal()
    out = ini.send(NopOut(False, 0, 0x99, RESERVED_TAG, ini.cmd_sn, 0))
    assert len(out) == 1 and ini.conn.exp_cmd_sn == 2


def test_idle_connection_is_pinged_then_closed() -> None:
    ini = normal(TargetSettings(nop_interval=5.0, nop_timeout=15.0))
    assert ini.conn.next_deadline() == 5.0
    ini.conn.handle_timer(4.0)
    assert ini.responses() == []
    ini.conn.handle_timer(5.0)
    (ping,) = ini.responses()
    assert isinstance(ping, NopIn) and ping.itt == RESERVED_TAG and ping.ttt != RESERVED_TAG
    assert ping.stat_sn == ini.conn.stat_sn   # a ping does not advance StatSN
    assert ini.conn.next_deadline() == 20.0
    ini.conn.handle_timer(19.9)
    ini.collect()
    assert ini.closed is None
    ini.conn.handle_timer(20.0)
    ini.collect()
    assert ini.closed == "nop timeout"


def test_an_answered_ping_keeps_the_connection() -> None:
    ini = normal(TargetSettings(nop_interval=5.0, nop_timeout=15.0))
    ini.conn.handle_timer(5.0)
    (ping,) = ini.responses()
    ini.now = 6.0
    assert ini.send(NopOut(True, 0, RESERVED_TAG, ping.ttt, ini.cmd_sn, 0)) == []
    assert ini.conn.next_deadline() == 11.0
    ini.conn.handle_timer(20.0)
    assert isinstance(ini.responses()[0], NopIn) and ini.closed is None


# --- task management --------------------------------------------------------------------------------


def _tmf(ini: Initiator, function: int, *, ref: int = RESERVED_TAG, ref_cmd_sn: int = 0, lun: int = 0,
         immediate: bool = True) -> TaskManagementRequest:
    cmd_sn = ini.cmd_sn
    if not immediate:
        ini.cmd_sn += 1
    return TaskManagementRequest(immediate, function, lun, ini.itt(), ref, cmd_sn, 0, ref_cmd_sn, 0)


def test_abort_task_while_executing_waits_and_suppresses_the_response() -> None:
    ini = normal()
    ini.auto = False
    cmd = ini.command(WRITE10, edtl=BLOCK, write=True, data=b"w" * BLOCK)
    ini.send(cmd)
    assert len(ini.executing) == 1
    assert ini.send(_tmf(ini, 1, ref=cmd.itt, ref_cmd_sn=cmd.cmd_sn)) == []   # held
    ini.finish(ini.executing.pop())
    (resp,) = ini.responses()
    assert isinstance(resp, TaskManagementResponse) and resp.response == 0
    assert ini.conn.active_tasks == 0


def test_abort_task_while_executing_asks_to_cancel_and_answers_once_cancelled() -> None:
    ini = normal()
    ini.auto = False
    cmd = ini.command(WRITE10, edtl=BLOCK, write=True, data=b"w" * BLOCK)
    ini.send(cmd)
    (ev,) = ini.executing
    assert ini.send(_tmf(ini, 1, ref=cmd.itt, ref_cmd_sn=cmd.cmd_sn)) == []   # held
    assert _only(ini.events, CancelExecution) == [CancelExecution((ev.task_id,))]
    ini.conn.aborted(ev.task_id, ini.now)
    (resp,) = ini.responses()
    assert isinstance(resp, TaskManagementResponse) and resp.response == 0 and resp.itt != cmd.itt
    assert ini.conn.active_tasks == 0
    ini.conn.complete(ev.task_id, ScsiResult(ScsiStatus.GOOD), ini.now)    # a late result: dropped
    ini.conn.aborted(ev.task_id, ini.now)
    assert ini.responses() == []


def test_lun_reset_waits_for_every_cancelled_execution() -> None:
    """SAM-5 7.1: the TMF response follows the last aborted command out of the SCSI layer, whether
    that command was cancelled or finished before the cancellation reached it."""
    ini = normal()
    ini.auto = False
    ini.send(ini.command(WRITE10, edtl=BLOCK, write=True, data=b"a" * BLOCK))
    ini.send(ini.command(READ10, edtl=BLOCK, read=True))
    first, second = ini.executing
    assert ini.send(_tmf(ini, 5)) == []
    assert _only(ini.events, CancelExecution) == [CancelExecution((first.task_id, second.task_id))]
    ini.conn.complete(second.task_id, ScsiResult(ScsiStatus.GOOD, b"r" * BLOCK), ini.now)
    assert ini.responses() == []
    ini.conn.aborted(first.task_id, ini.now)
    (resp,) = ini.responses()
    assert isinstance(resp, TaskManagementResponse) and resp.response == 0


def test_tmf_that_aborts_nothing_executing_asks_for_no_cancellation() -> None:
    ini = normal()
    cmd = ini.command(WRITE10, edtl=BLOCK, write=True)
    ini.send(cmd)                                  # collecting data, not executing
    (resp,) = ini.send(_tmf(ini, 2))
    assert resp.response == 0 and not _only(ini.events, CancelExecution)


def test_execution_cancelled_without_an_abort_sends_no_response() -> None:
    ini = normal()
    ini.auto = False
    cmd = ini.command(TUR)
    ini.send(cmd)
    (ev,) = ini.executing
    ini.conn.aborted(ev.task_id, ini.now)
    assert ini.responses() == [] and ini.conn.task_state(cmd.itt) is None
    ini.auto = True
    assert _only(ini.send(ini.command(TUR)), ScsiResponse)[0].status == 0


def test_abort_task_collecting_data_answers_at_once_and_drops_its_data() -> None:
    ini = normal()
    cmd = ini.command(WRITE10, edtl=BLOCK, write=True)
    (r2t,) = _only(ini.send(cmd), R2T)
    (resp,) = ini.send(_tmf(ini, 1, ref=cmd.itt, ref_cmd_sn=cmd.cmd_sn))
    assert isinstance(resp, TaskManagementResponse) and resp.response == 0
    assert ini.send(DataOut(True, 0, cmd.itt, r2t.ttt, 0, 0, 0, b"w" * BLOCK)) == []
    assert not ini.lu.requests


def test_abort_task_of_a_finished_task_is_task_does_not_exist() -> None:
    ini = normal()
    cmd = ini.command(TUR)
    ini.send(cmd)
    (resp,) = ini.send(_tmf(ini, 1, ref=cmd.itt, ref_cmd_sn=cmd.cmd_sn))
    assert resp.response == 1


def test_abort_task_of_a_command_not_yet_received_counts_its_cmdsn() -> None:
    """RFC 7143 11.5.1: RefCmdSN in the window and below the TMF's CmdSN -> function complete."""
    ini = normal()
    lost = ini.command(TUR)                        # never sent
    later = ini.command(TUR)
    ini.send(later)
    out = ini.send(_tmf(ini, 1, ref=lost.itt, ref_cmd_sn=lost.cmd_sn))
    (resp,) = _only(out, TaskManagementResponse)
    assert resp.response == 0
    assert ini.conn.exp_cmd_sn == 3                # the gap is filled, the later command ran
    assert [p.itt for p in _only(out, ScsiResponse)] == [later.itt]


@pytest.mark.parametrize(("function", "kind"), [(2, None), (4, None), (5, ResetKind.LUN)])
def test_task_set_functions_abort_this_sessions_tasks(function: int, kind: ResetKind | None) -> None:
    ini = normal()
    a = ini.command(WRITE10, edtl=BLOCK, write=True)
    ini.send(a)
    (resp,) = ini.send(_tmf(ini, function))
    assert resp.response == 0
    assert ini.conn.active_tasks == 0
    assert [k for k, _ in ini.lu.resets] == ([kind] if kind else [])


def test_lun_reset_of_an_unknown_lun() -> None:
    ini = normal()
    (resp,) = ini.send(_tmf(ini, 5, lun=3 << 48))
    assert resp.response == 2 and not ini.lu.resets


def test_target_warm_reset_asks_the_server_for_the_other_sessions() -> None:
    ini = normal()
    (resp,) = ini.send(_tmf(ini, 6))
    assert resp.response == 0
    (ev,) = _only(ini.events, TargetResetRequested)
    assert ev.iqn == IQN and ev.kind is ResetKind.TARGET_WARM and ev.origin_session is ini.conn.session
    assert ini.lu.resets == [(ResetKind.TARGET_WARM, ini.conn.session.nexus)]
    assert ini.closed is None


def test_target_cold_reset_closes_after_the_response() -> None:
    ini = normal()
    (resp,) = ini.send(_tmf(ini, 7))
    assert resp.response == 0
    assert _only(ini.events, TargetResetRequested)[0].kind is ResetKind.TARGET_COLD
    assert ini.closed == "target cold reset"


@pytest.mark.parametrize(("function", "code"), [(3, 5), (8, 4), (0, 255), (15, 255)])
def test_unsupported_tmfs(function: int, code: int) -> None:
    ini = normal()
    (resp,) = ini.send(_tmf(ini, function))
    assert resp.response == code


def test_abort_all_tasks_suppresses_responses() -> None:
    ini = normal()
    ini.auto = False
    ini.send(ini.command(TUR))
    ini.conn.abort_all_tasks()
    ev = ini.executing.pop()
    ini.collect()
    assert _only(ini.events, CancelExecution) == [CancelExecution((ev.task_id,))]
    ini.finish(ev)
    assert ini.responses() == []


# --- logout, text, SNACK, discovery -------------------------------------------------------------------


def test_logout_closes_the_session() -> None:
    ini = normal()
    session = ini.conn.session
    (resp,) = ini.send(LogoutRequest(False, 0, ini.itt(), 0, ini.cmd_sn, 0))
    assert isinstance(resp, LogoutResponse) and resp.response == 0
    assert ini.closed == "logout" and ini.conn.phase is Phase.LOGGED_OUT
    assert len(ini.sessions) == 0 and session is not None and session.closed
    assert ini.lu.lost == [session.nexus]
    ini.conn.connection_lost(1.0)
    assert ini.lu.lost == [session.nexus]   # reported once


def test_logout_for_recovery_is_not_supported_at_erl0() -> None:
    ini = normal()
    (resp,) = ini.send(LogoutRequest(True, 2, ini.itt(), 0, ini.cmd_sn, 0))
    assert resp.response == 2 and ini.closed is None


def test_connection_lost_ends_the_session_and_drops_late_results() -> None:
    ini = normal()
    ini.auto = False
    ini.send(ini.command(TUR))
    ini.conn.connection_lost(1.0)
    assert len(ini.lu.lost) == 1 and len(ini.sessions) == 0
    ini.finish(ini.executing.pop())
    assert ini.responses() == []


def test_text_send_targets_in_a_normal_session() -> None:
    ini = normal()
    (resp,) = ini.send(TextRequest(True, True, False, 0, ini.itt(), RESERVED_TAG, ini.cmd_sn, 0,
                                   b"SendTargets=All\0"))
    assert isinstance(resp, TextResponse) and resp.final
    assert resp.data == f"TargetName={IQN}\0".encode()


def test_long_text_answer_continues_with_the_ttt() -> None:
    lu = FakeLu()
    registry = TargetRegistry()
    for i in range(40):
        registry.add(Target(f"{IQN}-{i:02d}", "v", lu))  # type: ignore[arg-type]
    ini = Initiator(registry=registry, lu=lu)
    ini.logged_in(SessionType="Discovery", MaxRecvDataSegmentLength="512")
    itt = ini.itt()
    got = b""
    ttt = RESERVED_TAG
    data = b"SendTargets=All\0"
    for _ in range(10):
        (resp,) = ini.send(TextRequest(True, True, False, 0, itt, ttt, ini.cmd_sn, 0, data))
        assert isinstance(resp, TextResponse) and len(resp.data) <= 512
        got += resp.data
        if resp.final:
            break
        assert resp.cont and resp.ttt != RESERVED_TAG
        ttt, data = resp.ttt, b""
    assert got.count(b"TargetName=") == 40


def test_discovery_session_rejects_scsi_commands() -> None:
    ini = Initiator().logged_in(SessionType="Discovery")
    assert ini.conn.session is not None and ini.conn.session.nexus is None
    out = ini.send(ini.command(TUR))
    assert _only(out, Reject)[0].reason == 0x04 and not ini.lu.requests
    (nop,) = ini.send(NopOut(True, 0, 5, RESERVED_TAG, ini.cmd_sn, 0))
    assert isinstance(nop, NopIn)


def test_snack_at_erl0_is_a_protocol_error() -> None:
    ini = normal()
    (rej,) = ini.send(SnackRequest(0, 0, 1, RESERVED_TAG, 0, 0, 0))
    assert isinstance(rej, Reject) and rej.reason == 0x04 and rej.header[0] == 0x10
    assert ini.closed is None


def test_unknown_opcode_in_full_feature_phase_is_rejected() -> None:
    ini = normal()
    bogus = bytearray(encode_bytes(NopOut(True, 0, 1, RESERVED_TAG, 1, 0)))
    bogus[0] = 0x1D
    (rej,) = ini.feed(bytes(bogus))
    assert rej.reason == 0x05 and ini.closed is None


def test_login_request_in_full_feature_phase_is_rejected() -> None:
    ini = normal()
    out = ini.send(LoginRequest(True, False, 1, 3, 0, 0, ISID, 0, 9, 0, 1, 0, b""))
    assert _only(out, Reject)[0].reason == 0x04


# --- digests ----------------------------------------------------------------------------------------


def test_header_digest_error_closes() -> None:
    ini = normal(HeaderDigest="CRC32C")
    wire = bytearray(encode_bytes(ini.command(TUR), header_digest=True))
    wire[30] ^= 1
    assert ini.feed(bytes(wire)) == []
    assert ini.closed == "header digest error"


def test_data_digest_error_on_data_out_fails_the_task_with_a_crc_error() -> None:
    ini = normal(DataDigest="CRC32C")
    cmd = ini.command(WRITE10, edtl=BLOCK, write=True)
    (r2t,) = _only(ini.send(cmd), R2T)
    data_out = DataOut(True, 0, cmd.itt, r2t.ttt, 0, 0, 0, b"w" * BLOCK)
    wire = bytearray(encode_bytes(data_out, data_digest=True))
    wire[100] ^= 1
    out = ini.feed(bytes(wire))
    assert _only(out, Reject)[0].reason == 0x02
    (resp,) = _only(out, ScsiResponse)
    assert resp.status == 2 and resp.data[2] == 0x0B and resp.data[12:14] == b"\x47\x05"
    assert not ini.lu.requests and ini.closed is None


def test_data_digest_error_on_a_command_discards_it_without_its_cmdsn() -> None:
    ini = normal(DataDigest="CRC32C")
    cmd = ini.command(WRITE10, edtl=BLOCK, write=True, data=b"w" * BLOCK)
    wire = bytearray(encode_bytes(cmd, data_digest=True))
    wire[60] ^= 1
    assert _only(ini.feed(bytes(wire)), Reject)[0].reason == 0x02
    assert ini.conn.exp_cmd_sn == 1
    out = ini.send(cmd)   # the retry
    assert _only(out, ScsiResponse)[0].status == 0


# --- sessions across connections --------------------------------------------------------------------


def test_a_second_login_with_the_same_isid_reinstates_the_session() -> None:
    sessions = SessionTable()
    lu = FakeLu()
    registry = TargetRegistry()
    registry.add(Target(IQN, "vol1", lu))  # type: ignore[arg-type]
    first = Initiator(sessions=sessions, registry=registry, lu=lu).logged_in()
    second = Initiator(sessions=sessions, registry=registry, lu=lu).logged_in()
    (ev,) = _only(second.events, LoggedIn)
    assert ev.displaced is first.conn.session
    assert lu.lost == [Nexus(INIT, ISID, IQN, 1)]
    first.conn.connection_lost(1.0)
    assert len(lu.lost) == 1 and sessions.get(ev.session.tsih) is ev.session


# --- state tables -----------------------------------------------------------------------------------


def test_moves_outside_the_tables_are_errors() -> None:
    task = Task(1, ScsiCommand(False, True, False, False, 1, 0, 1, 0, 1, 0, TUR), 0)
    with pytest.raises(IllegalTransition):
        task.move(TaskInput.COMPLETE)
    task.move(TaskInput.ACCEPT_COMPLETE)
    task.move(TaskInput.RELEASE)
    task.move(TaskInput.COMPLETE)
    assert task.state is TaskState.DONE
    with pytest.raises(IllegalTransition):
        task.move(TaskInput.ABORT)
    assert all(new is not Phase.LOGIN for new in PHASE_TRANSITIONS.values())
    assert all(old is not TaskState.DONE for old, _ in TASK_TRANSITIONS)


# --- robustness ---------------------------------------------------------------------------------------


def _valid_stream(ini: Initiator) -> list[bytes]:
    pdus: list[object] = [
        ini.command(READ10, edtl=BLOCK, read=True),
        ini.command(WRITE10, edtl=BLOCK, write=True, data=b"w" * 100),
        DataOut(True, 0, 2, 1, 0, 0, 100, b"w" * 412),
        NopOut(True, 0, 0x50, RESERVED_TAG, 3, 0, b"ping"),
        TaskManagementRequest(True, 1, 0, 0x51, 1, 3, 0, 1, 0),
        TextRequest(True, True, False, 0, 0x52, RESERVED_TAG, 3, 0, b"SendTargets=All\0"),
        SnackRequest(0, 0, 1, RESERVED_TAG, 0, 0, 0),
        LogoutRequest(True, 0, 0x53, 0, 3, 0),
    ]
    return [encode_bytes(p) for p in pdus]  # type: ignore[arg-type]


def _fuzz(chunks: list[bytes], byte_by_byte: bool) -> None:
    ini = normal(TargetSettings(nop_interval=0, max_recv_data_segment_length=8192))
    stream = b"".join(chunks)
    if byte_by_byte:
        for i in range(len(stream)):
            ini.feed(stream[i : i + 1])
    else:
        ini.feed(stream)
    ini.conn.handle_timer(100.0)
    ini.collect()
    assert ini.conn.internal_errors == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_never_escape_receive_data(junk: bytes, byte_by_byte: bool) -> None:
    _fuzz([junk], byte_by_byte)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_mutated_pdu_streams_never_escape_receive_data(data: st.DataObject, byte_by_byte: bool) -> None:
    chunks = _valid_stream(Initiator())
    picked = data.draw(st.lists(st.sampled_from(chunks), min_size=1, max_size=6))
    stream = bytearray(b"".join(picked))
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(stream)))
        stream = stream[:cut]
    _fuzz([bytes(stream)], byte_by_byte and len(stream) < 800)
