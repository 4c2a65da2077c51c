"""One iSCSI connection, target side, without I/O (RFC 7143): login phase, then full-feature phase.

The asyncio layer drives it like h11 / aioquic::

    conn.receive_data(data, now)           # never raises: errors become Reject PDUs / CloseConnection
    while (event := conn.next_event()) is not None: ...   # ExecuteScsi, LoggedIn, ...
    transport.writelines(conn.data_to_send())
    conn.complete(task_id, result, now)    # the SCSI layer finished an ExecuteScsi
    conn.aborted(task_id, now)             # ... or stopped it after a CancelExecution
    loop.call_at(conn.next_deadline(), ...) -> conn.handle_timer(now)
    conn.connection_lost(now)

Behaviour, with the RFC 7143 section each rule comes from:

- Phases (``Phase``, table ``PHASE_TRANSITIONS``): LOGIN -> FULL_FEATURE -> LOGGED_OUT -> CLOSED.
  Login drives ``login.LoginMachine``; digests are switched on for the PDUs after the final Login
  Response (6.3, 13.1). A login that fails sends its response, then closes.
- Command numbering (3.2.2.1, 4.2.2.1): a non-immediate command is *received* when its CmdSN is in
  [ExpCmdSN, MaxCmdSN]; it is silently dropped outside that window or as a duplicate. ExpCmdSN
  advances over contiguous CmdSNs; MaxCmdSN = ExpCmdSN + cmd_window - 1 is in every response.
  Immediate commands (I bit) bypass ordering. SCSI commands are released to the SCSI layer
  (``ExecuteScsi``) strictly in CmdSN order, each once its Data-Out is complete; data for a later
  command is solicited and collected meanwhile.
- Tasks move through ``tasks.TASK_TRANSITIONS``. Plain READ/WRITE(10/16) take the fast path
  (``fastpath.py``; ``_fast_take``, ``_fast_run``), which sends the same bytes as the rest of this
  module would.
- Write data (4.2.5, 11.7, 11.8; the rules in ``dataout.DataOutCollector``): immediate data
  (ImmediateData=Yes), unsolicited Data-Out (InitialR2T=No) up to FirstBurstLength, then R2Ts of at
  most MaxBurstLength, at most MaxOutstandingR2T at a time. DataSN (per sequence), BufferOffset and
  TTT are checked; ERL 0 has no within-command recovery (7.1.4), so a broken sequence ends the task:
  Reject (protocol error), the rest of its data dropped, CHECK CONDITION / ABORTED COMMAND
  (11.4.7.2). The connection stays (libiscsi's iSCSIDataSnInvalid sends several such commands on one
  session).
- Digests (7.8): a header digest error closes the connection (no sync layer to find the next PDU).
  A data digest error is answered with Reject 0x02 and the PDU discarded; for a Data-Out the task
  goes on collecting and then ends with CHECK CONDITION, ABORTED COMMAND / PROTOCOL SERVICE CRC ERROR
  (7.8 option b, the one ERL 0 allows); a command with bad immediate data is discarded without
  consuming its CmdSN (the initiator retries it).
- Responses (11.4, 11.8): Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength, F bit at
  the end of each MaxBurstLength sequence, DataSN from 0; GOOD status without sense rides in the last
  Data-In (S bit, phase collapse), anything else in a SCSI Response with the sense after its 2-byte
  SenseLength. Residuals compare the EDTL with ``ScsiResult.transfer_length``; data is cut to EDTL.
- NOP (11.18, 11.19): NOP-Out with an ITT is answered; idle for ``nop_interval`` -> NOP-In ping;
  nothing received within ``nop_timeout`` after it -> close.
- Task management (11.5, 11.6): ``tmf.TMF_RULES``, applied by ``_on_tmf``. Aborted tasks send no
  response; a TMF response waits until every task it aborted while executing has left the SCSI
  layer. So that it need not wait for a long command (SANITIZE, a big WRITE SAME), the TMF emits
  ``CancelExecution`` for those tasks; the asyncio layer cancels them and reports each with
  ``aborted(task_id, now)`` (or ``complete``, if the command finished first). The response goes out
  once the last of them has come back (SAM-5 7.1: FUNCTION COMPLETE only after the affected commands
  are aborted).
- Logout (11.14, 11.15), Text (11.10, via ``discovery.TextNegotiation``), SNACK at ERL 0 -> Reject
  protocol error. Discovery sessions accept only Text, Logout and NOP-Out (others: Reject).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from frontend.constructors import positional_constructor
from frontend.internal_errors import Where, caught
from frontend.iscsi.dataout import PROTOCOL_SERVICE_CRC_ERROR, DataOutCollector
from frontend.iscsi.discovery import TextNegotiation
from frontend.iscsi.errors import (
    DataDigestError,
    HeaderDigestError,
    IllegalTransition,
    PduError,
    RejectReason,
    TextRequestRejected,
)
from frontend.iscsi.fastpath import COMMAND_FIELDS, READ_FLAGS, WRITE_FLAGS, ResponseBatch, plain_command
from frontend.iscsi.login import LoginFailed, LoginMachine, LoginSucceeded
from frontend.iscsi.params import SessionParams, SessionType
from frontend.iscsi.pdu import (
    BHS_LENGTH,
    LOGIN_MAX_DATA_SEGMENT_LENGTH,
    R2T,
    RESERVED_TAG,
    Data,
    DataOut,
    InitiatorPdu,
    LoginRequest,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    PduReader,
    Reject,
    ScsiCommand,
    SnackRequest,
    TargetPdu,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    decode,
    encode,
    encode_data_in,
    encode_scsi_response,
)
from frontend.iscsi.session import Session, SessionTable
from frontend.iscsi.tasks import ACTIVE, Task, TaskInput, TaskState
from frontend.iscsi.tmf import HeldResponses, HeldTmfResponse, TmfResponse, TmfScope, rule_for
from frontend.metrics import FrontendMetrics, NoMetrics
from frontend.scsi.lu import LogicalUnit, ResetKind
from frontend.scsi.sense import Asc, SenseKey, fixed_sense
from frontend.scsi.types import Nexus, ScsiRequest, ScsiResult, ScsiStatus, TaskAttr
from frontend.target import Target, TargetRegistry, TargetSettings

SN_MASK: Final = 0xFFFFFFFF
#: How many tags of aborted or dropped tasks we remember, so that their late Data-Out is dropped
#: silently instead of rejected.
FORGOTTEN_TAGS: Final = 256



def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic, RFC 1982 with SERIAL_BITS = 32 (RFC 7143 4.2.2.1)."""
    return a != b and ((b - a) & SN_MASK) < 0x80000000


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecuteScsi:
    """Run ``request`` on ``lu`` (None: a LUN we do not have; use ``lu.no_such_lun``), then call
    ``Connection.complete(task_id, result, now)``."""

    task_id: int
    lu: LogicalUnit | None
    request: ScsiRequest


@dataclass(frozen=True, slots=True)
class CancelExecution:
    """A TMF, or another session's target reset, aborted these executing tasks (RFC 7143 11.5.1):
    stop running them, then report each with ``Connection.aborted(task_id, now)``. A task that
    finishes before it can be stopped may report with ``complete`` instead; either is final."""

    task_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """Login succeeded. ``displaced``: a session this login reinstated (RFC 7143 6.3.5); its
    connection must be closed. Its I_T nexus loss has already been reported to its LU."""

    session: Session
    displaced: Session | None


@dataclass(frozen=True, slots=True)
class TargetResetRequested:
    """A TARGET WARM/COLD RESET arrived on ``origin_session``: abort the tasks of the other sessions
    of target ``iqn`` (``abort_all_tasks``); for COLD also drop their connections."""

    iqn: str
    kind: ResetKind
    origin_session: Session


@dataclass(frozen=True, slots=True)
class LoginRejected:
    """The login failed with this status (RFC 7143 11.13.5); a CloseConnection follows."""

    status_class: int
    status_detail: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Send what ``data_to_send`` holds, then close the transport."""

    reason: str


@dataclass(frozen=True, slots=True)
class AwaitForwarded:
    """Fast-path writes the LU's store wrote and forwards to replicas (``LogicalUnit.write_fast``):
    once ``lu.forwarded(ticket)`` is done, call ``Connection.forwarded_done(batch, sense, now)``
    with ``lu.forwarded_sense`` of its outcome."""

    batch: int
    lu: LogicalUnit
    ticket: int


Event = (
    ExecuteScsi
    | CancelExecution
    | LoggedIn
    | LoginRejected
    | TargetResetRequested
    | CloseConnection
    | AwaitForwarded
)

_make_request = positional_constructor(ScsiRequest)
_make_execute = positional_constructor(ExecuteScsi)


# --- connection phases -----------------------------------------------------------------------------


class Phase(enum.Enum):
    """RFC 7143 6 (login phase), 4.3 (full-feature phase), 11.14 (logout)."""

    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"      # Logout Response sent; waiting for the transport to close
    CLOSED = "closed"

    __hash__ = object.__hash__  # members are singletons; enum's own hash is slow Python code


class PhaseInput(enum.Enum):
    LOGIN_SUCCEEDED = "login-succeeded"
    LOGOUT = "logout"
    CLOSE = "close"                # we decided to close (error, timeout, failed login, reset)
    CONNECTION_LOST = "connection-lost"

    __hash__ = object.__hash__  # members are singletons; enum's own hash is slow Python code


PHASE_TRANSITIONS: Final[dict[tuple[Phase, PhaseInput], Phase]] = {
    (Phase.LOGIN, PhaseInput.LOGIN_SUCCEEDED): Phase.FULL_FEATURE,
    (Phase.LOGIN, PhaseInput.CLOSE): Phase.CLOSED,
    (Phase.LOGIN, PhaseInput.CONNECTION_LOST): Phase.CLOSED,
    (Phase.FULL_FEATURE, PhaseInput.LOGOUT): Phase.LOGGED_OUT,
    (Phase.FULL_FEATURE, PhaseInput.CLOSE): Phase.CLOSED,
    (Phase.FULL_FEATURE, PhaseInput.CONNECTION_LOST): Phase.CLOSED,
    (Phase.LOGGED_OUT, PhaseInput.CLOSE): Phase.CLOSED,
    (Phase.LOGGED_OUT, PhaseInput.CONNECTION_LOST): Phase.CLOSED,
    (Phase.CLOSED, PhaseInput.CONNECTION_LOST): Phase.CLOSED,
}


class _Phantom:
    """A CmdSN counted as received without a command (RFC 7143 11.5.1 ABORT TASK rule; rejected
    commands)."""


_PHANTOM: Final = _Phantom()
_Pending = Task | NopOut | TaskManagementRequest | TextRequest | LogoutRequest | _Phantom


class LogoutReason(enum.IntEnum):
    """RFC 7143 11.14.1."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResult(enum.IntEnum):
    """RFC 7143 11.15.1."""

    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


def lun_number(raw: int) -> int:
    """The LUN of a single-level LUN structure (SAM-5 4.7: peripheral or flat addressing, bus 0).
    -1 for anything else (multi-level LUNs are not ours)."""
    if raw & 0xFFFFFFFFFFFF:
        return -1
    top = raw >> 48
    method = top >> 14
    if method == 0:
        return top & 0xFF if not top & 0x3F00 else -1
    if method == 1:
        return top & 0x3FFF
    return -1


#: RFC 7143 11.3.1 ATTR by value; the reserved values 5..7 are treated as SIMPLE.
_TASK_ATTRS: Final = (*TaskAttr, TaskAttr.SIMPLE, TaskAttr.SIMPLE, TaskAttr.SIMPLE)



# --- the connection ----------------------------------------------------------------------------------


class Connection:
    """The sans-IO core of one iSCSI connection (see the module docstring)."""

    def __init__(
        self,
        settings: TargetSettings,
        targets: TargetRegistry,
        sessions: SessionTable,
        *,
        now: float,
        peer: str = "",
        metrics: FrontendMetrics | None = None,
        fast_path: bool = True,
    ) -> None:
        self.settings = settings
        self.metrics: FrontendMetrics = metrics or NoMetrics()
        #: False: every command takes the general path (the tests compare the two).
        self.fast_path = fast_path
        #: The LU when the fast path is on for this connection (a normal session, with or without
        #: digests, whose LUN 0 store answers inline); fast commands received, not yet run
        #: (``_fast_take``).
        self._fast_lu: LogicalUnit | None = None
        self._fast: list[tuple[Data, Data, int, bool, int, int, int]] = []
        self._fast_itts: set[int] = set()
        #: Fast writes forwarded to replicas, not yet answered: per batch its (ITT, EDTL)s and
        #: start time; their ITTs (``AwaitForwarded``, ``forwarded_done``).
        self._forwarded: dict[int, tuple[list[tuple[int, int]], float]] = {}
        self._forwarded_itts: set[int] = set()
        self._next_batch = 1
        self.targets = targets
        self.sessions = sessions
        self.peer = peer
        self._phase = Phase.LOGIN
        self._reader: PduReader[InitiatorPdu] = PduReader(
            decode, max_data_segment_length=LOGIN_MAX_DATA_SEGMENT_LENGTH
        )
        self._login: LoginMachine | None = LoginMachine(settings, targets, sessions, now=now)
        self._out: list[bytes | memoryview] = []
        self._events: deque[Event] = deque()
        self._hd = False
        self._dd = False
        self._cid: int | None = None
        self.session: Session | None = None
        self.params: SessionParams | None = None
        self._target: Target | None = None
        self._nexus: Nexus | None = None
        self._text: TextNegotiation | None = None
        # sequence numbers
        self._stat_sn = 0
        self._exp_cmd_sn = 0
        self._window = max(1, settings.cmd_window)
        self.exp_stat_sn = 0
        # tasks
        self._next_task_id = 1
        self._next_ttt = 1
        self._tasks: dict[int, Task] = {}          # active tasks by ITT
        self._executing: dict[int, Task] = {}      # tasks handed to the SCSI layer, by task id
        self._pending: dict[int, _Pending] = {}    # received, CmdSN not reached yet, by CmdSN
        self._release: deque[Task] = deque()       # accepted non-immediate tasks in CmdSN order
        self._forgotten: deque[int] = deque(maxlen=FORGOTTEN_TAGS)
        self._held = HeldResponses()
        self._max_send = LOGIN_MAX_DATA_SEGMENT_LENGTH
        self._max_burst = settings.max_burst_length
        self._first_burst = settings.first_burst_length
        self._collector = DataOutCollector(self._send_r2t, self._new_ttt, max_burst=self._max_burst,
                                           max_r2t=1)
        self._immediate_data = True
        self._initial_r2t = True
        # timers
        self._last_rx = now
        self._ping_ttt: int | None = None
        self._ping_deadline = 0.0
        #: Why Data-Out sequences were broken (for logs and tests).
        self.data_errors: deque[str] = deque(maxlen=16)
        #: Exceptions that escaped a handler (bugs): logged and counted where caught
        #: (``_internal_error``); they close the connection.
        self.internal_errors: list[BaseException] = []
        self._handlers: dict[type, Callable[[object], None]] = {
            ScsiCommand: self._on_scsi_command,  # type: ignore[dict-item]
            DataOut: self._on_data_out,  # type: ignore[dict-item]
            NopOut: self._on_nop_out,  # type: ignore[dict-item]
            TaskManagementRequest: self._on_tmf_pdu,  # type: ignore[dict-item]
            TextRequest: self._on_command_pdu,  # type: ignore[dict-item]
            LogoutRequest: self._on_command_pdu,  # type: ignore[dict-item]
            SnackRequest: self._on_snack,  # type: ignore[dict-item]
            LoginRequest: self._on_login_in_ffp,  # type: ignore[dict-item]
        }

    # --- public API -------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def stat_sn(self) -> int:
        """The StatSN of the next status this connection sends."""
        return self._stat_sn

    @property
    def exp_cmd_sn(self) -> int:
        return self._exp_cmd_sn

    @property
    def max_cmd_sn(self) -> int:
        return (self._exp_cmd_sn + self._window - 1) & SN_MASK

    @property
    def active_tasks(self) -> int:
        return len(self._tasks)

    def task_state(self, itt: int) -> TaskState | None:
        task = self._tasks.get(itt)
        return task.state if task is not None else None

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes from the initiator. Never raises."""
        if self._phase is Phase.CLOSED:
            return
        self._last_rx = now
        self._ping_ttt = None
        try:
            self._receive(data, now)
        except Exception as e:  # a bug must not take the server down; the connection goes
            self._internal_error(Where.RECEIVE, e)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> list[bytes | memoryview]:
        out = self._out
        self._out = []
        return out

    def complete(self, task_id: int, result: ScsiResult, now: float) -> None:
        """The SCSI layer finished task ``task_id``. Dropped if the task was aborted meanwhile."""
        task = self._executing.pop(task_id, None)
        if task is None:
            return
        try:
            if task.state is TaskState.ABORTED:
                self._aborted_task_returned(task)
                return
            task.move(TaskInput.COMPLETE)
            if self._tasks.get(task.itt) is task:
                del self._tasks[task.itt]
            if self._phase is Phase.FULL_FEATURE:
                self._respond(task, result)
        except Exception as e:
            self._internal_error(Where.COMPLETE, e)

    def aborted(self, task_id: int, now: float) -> None:
        """The SCSI layer stopped task ``task_id`` without a result, as ``CancelExecution`` asked.
        No response is sent for it; a TMF response waiting for it may now go out."""
        task = self._executing.pop(task_id, None)
        if task is None:
            return
        try:
            self._abort(task, None)            # cancelled though not aborted here: still no response
            self._aborted_task_returned(task)
        except Exception as e:
            self._internal_error(Where.COMPLETE, e)

    def next_deadline(self) -> float | None:
        if self._phase is Phase.LOGIN:
            return self._login.deadline if self._login is not None else None
        if self._phase is Phase.FULL_FEATURE and self.settings.nop_interval > 0:
            if self._ping_ttt is not None:
                return self._ping_deadline
            return self._last_rx + self.settings.nop_interval
        return None

    def handle_timer(self, now: float) -> None:
        if self._phase is Phase.LOGIN:
            if self._login is not None and now >= self._login.deadline:
                self._close("login timeout")
            return
        if self._phase is not Phase.FULL_FEATURE or self.settings.nop_interval <= 0:
            return
        if self._ping_ttt is not None:
            if now >= self._ping_deadline:
                self._close("nop timeout")
            return
        if now >= self._last_rx + self.settings.nop_interval:
            self._ping_ttt = self._new_ttt()
            self._ping_deadline = now + self.settings.nop_timeout
            self._send(
                NopIn(0, RESERVED_TAG, self._ping_ttt, self._stat_sn, self._exp_cmd_sn, self.max_cmd_sn)
            )

    def connection_lost(self, now: float) -> None:
        """The transport is gone: abandon every task and end the session (ERL 0)."""
        self._move(PhaseInput.CONNECTION_LOST)
        self._abort_everything()
        self._held.clear()
        self._out = []
        self._end_session()

    def abort_all_tasks(self) -> None:
        """Abort every task of this connection without responses (another session's target reset);
        the executing ones are named in a ``CancelExecution``."""
        if self._phase is Phase.CLOSED:
            return
        executing: set[int] = set()
        for task in list(self._tasks.values()):
            self._abort(task, executing)
        self._cancel(executing)
        if self._forwarded:  # aborted too: no responses (their writes went on, as an executing task's)
            self._forwarded.clear()
            self._forwarded_itts.clear()
            try:
                self._receive(b"", self._last_rx)  # the PDUs held behind them
            except Exception as e:
                self._internal_error(Where.RECEIVE, e)

    def _internal_error(self, where: Where, e: Exception) -> None:
        """A bug: logged with its traceback and counted (internal_errors.py); the connection goes."""
        self.internal_errors.append(e)
        caught(where, e, self.metrics, peer=self.peer)
        self._close(f"internal error: {type(e).__name__}: {e}")

    # --- phases --------------------------------------------------------------------------------------

    def _move(self, event: PhaseInput) -> None:
        try:
            self._phase = PHASE_TRANSITIONS[(self._phase, event)]
        except KeyError:
            raise IllegalTransition(f"connection: {event.value} in phase {self._phase.value}") from None

    def _close(self, reason: str) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._move(PhaseInput.CLOSE)
        self._events.append(CloseConnection(reason))

    def _end_session(self) -> None:
        session = self.session
        if session is None:
            return
        if self.sessions.close(session) and session.nexus is not None and session.target is not None:
            session.target.lu.nexus_lost(session.nexus)

    # --- input ---------------------------------------------------------------------------------------

    def _receive(self, data: bytes | bytearray | memoryview, now: float) -> None:
        reader = self._reader
        try:
            reader.feed(data)
        except PduError as e:
            self._on_pdu_error(e)
            return
        while self._phase is Phase.LOGIN or self._phase is Phase.FULL_FEATURE:
            try:
                frame = reader.next_frame()
                if frame is None:
                    break
                bhs, segment, ahs = frame
                if self._fast_lu is not None and bhs[0] == 0x01 and not ahs and self._fast_take(bhs, segment):
                    continue
                if self._forwarded:
                    # Any other PDU waits until the forwarded writes before it are answered, as if
                    # it came after them (a TMF, a logout, a NOP then find them done).
                    reader.unread()
                    break
                pdu = reader.decode(bhs, segment, ahs)
            except PduError as e:
                if self._fast:
                    self._fast_demote(self._fast)
                self._on_pdu_error(e)
                continue
            if self._fast:
                self._fast_demote(self._fast)  # the general path sees every command before this PDU
            if self._phase is Phase.LOGIN:
                self._on_login_phase_pdu(pdu, now)
            else:
                self._dispatch(pdu)
        if self._fast:
            self._fast_run()
        self._pump_release()

    def _dispatch(self, pdu: InitiatorPdu) -> None:
        if self.params is not None and self.params.session_type is SessionType.DISCOVERY and not isinstance(
            pdu, (NopOut, TextRequest, LogoutRequest)
        ):
            self._reject(RejectReason.PROTOCOL_ERROR, self._reader.last_header())
            return
        self._handlers[type(pdu)](pdu)

    def _on_pdu_error(self, e: PduError) -> None:
        if isinstance(e, HeaderDigestError):
            self._close("header digest error")
            return
        if self._phase is Phase.LOGIN:
            self._reject(e.reason, e.header)
            self._close(f"bad PDU during login: {e}")
            return
        if isinstance(e, DataDigestError):
            self._reject(RejectReason.DATA_DIGEST_ERROR, e.header)
            self._on_data_digest_error(e)
            return
        self._reject(e.reason, e.header)
        if e.fatal:
            self._close(f"protocol error: {e}")

    def _on_data_digest_error(self, e: DataDigestError) -> None:
        """RFC 7143 7.8: the PDU is discarded. For a Data-Out the task must still end: account for
        the data and fail the task with a CRC error once all of it has arrived."""
        pdu = e.pdu
        if isinstance(pdu, DataOut):
            task = self._tasks.get(pdu.itt)
            if task is None:
                return
            length = int.from_bytes(e.header[5:8], "big")
            if task.failure is None:
                sense = fixed_sense(SenseKey.ABORTED_COMMAND, PROTOCOL_SERVICE_CRC_ERROR)
                task.failure = ScsiResult(ScsiStatus.CHECK_CONDITION, sense=sense)
            self._on_data_out(DataOut(pdu.final, pdu.lun, pdu.itt, pdu.ttt, pdu.exp_stat_sn, pdu.data_sn,
                                      pdu.buffer_offset, bytes(length)))

    # --- login phase -----------------------------------------------------------------------------------

    def _on_login_phase_pdu(self, pdu: InitiatorPdu, now: float) -> None:
        login = self._login
        if not isinstance(pdu, LoginRequest) or login is None:
            self._reject(RejectReason.PROTOCOL_ERROR, self._reader.last_header())
            self._close("non-login PDU during login")
            return
        if self._cid is None:
            self._cid = pdu.cid
        step = login.receive(pdu, now)
        self._send(step.response)
        self._stat_sn = login.next_stat_sn
        self._exp_cmd_sn = pdu.cmd_sn
        outcome = step.outcome
        if isinstance(outcome, LoginFailed):
            self._events.append(LoginRejected(outcome.status_class, outcome.status_detail, outcome.reason))
            self._close(f"login failed: {outcome.reason}")
        elif isinstance(outcome, LoginSucceeded):
            self._enter_full_feature(outcome)

    def _enter_full_feature(self, outcome: LoginSucceeded) -> None:
        params = outcome.params
        session, displaced = self.sessions.open(params, outcome.target, tpgt=self.settings.tpgt)
        if displaced is not None and displaced.nexus is not None and displaced.target is not None:
            displaced.target.lu.nexus_lost(displaced.nexus)
        self.session = session
        self.params = params
        self._target = outcome.target
        self._nexus = session.nexus
        self._login = None
        self._hd = params.header_digest
        self._dd = params.data_digest
        reader = self._reader
        reader.header_digest = params.header_digest
        reader.data_digest = params.data_digest
        reader.max_data_segment_length = params.max_recv_data_segment_length
        self._max_send = params.max_send_data_segment_length
        self._max_burst = params.max_burst_length
        self._first_burst = params.first_burst_length
        self._collector = DataOutCollector(self._send_r2t, self._new_ttt, max_burst=params.max_burst_length,
                                           max_r2t=params.max_outstanding_r2t)
        self._immediate_data = params.immediate_data
        self._initial_r2t = params.initial_r2t
        self._text = TextNegotiation(params, self.targets, self.settings)
        lu = outcome.target.lu if outcome.target is not None else None
        if (
            self.fast_path
            and params.session_type is SessionType.NORMAL
            and isinstance(lu, LogicalUnit)
            and lu.inline_io
        ):
            self._fast_lu = lu
        self._move(PhaseInput.LOGIN_SUCCEEDED)
        self._events.append(LoggedIn(session, displaced))

    def _on_login_in_ffp(self, pdu: LoginRequest) -> None:
        self._reject(RejectReason.PROTOCOL_ERROR, self._reader.last_header())

    # --- command numbering -----------------------------------------------------------------------------

    def _in_window(self, cmd_sn: int) -> bool:
        return ((cmd_sn - self._exp_cmd_sn) & SN_MASK) < self._window

    def _order(self, cmd_sn: int, item: _Pending) -> bool:
        """Queue a non-immediate command by CmdSN (RFC 7143 3.2.2.1). False if dropped."""
        if cmd_sn == self._exp_cmd_sn and not self._pending:   # the usual case: in order
            self._exp_cmd_sn = (cmd_sn + 1) & SN_MASK
            self._accept(item)
            return True
        if not self._in_window(cmd_sn) or cmd_sn in self._pending:
            return False
        self._pending[cmd_sn] = item
        self._drain()
        return True

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            item = pending.pop(self._exp_cmd_sn, None)
            if item is None:
                return
            self._exp_cmd_sn = (self._exp_cmd_sn + 1) & SN_MASK
            self._accept(item)
            if self._phase is not Phase.FULL_FEATURE:
                pending.clear()
                return

    def _accept(self, item: _Pending) -> None:
        if isinstance(item, Task):
            self._accept_task(item, ordered=True)
        elif isinstance(item, NopOut):
            self._nop_reply(item)
        elif isinstance(item, TaskManagementRequest):
            self._on_tmf(item)
        elif isinstance(item, TextRequest):
            self._on_text(item)
        elif isinstance(item, LogoutRequest):
            self._on_logout(item)

    def _on_command_pdu(self, pdu: TextRequest | LogoutRequest) -> None:
        self.exp_stat_sn = pdu.exp_stat_sn
        if pdu.immediate:
            self._accept(pdu)
        else:
            self._order(pdu.cmd_sn, pdu)

    def _consume_cmd_sn(self, cmd_sn: int, immediate: bool) -> None:
        """A rejected command still uses up its CmdSN, or the window would stall."""
        if not immediate:
            self._order(cmd_sn, _PHANTOM)

    # --- SCSI commands and Data-Out ----------------------------------------------------------------------

    # --- the fast path (fastpath.py; docs/architecture.md, "The fast path") ------------------------------
    #
    # A plain READ/WRITE is taken from its BHS (``_fast_take``) and run once the whole batch of bytes
    # received has been read (``_fast_run``), where the general path would run it: after every PDU
    # of the batch has been seen, in CmdSN order. Any other PDU first turns the fast commands taken so
    # far into general tasks (``_fast_demote``), so that it finds the state the general path would
    # show it; and so does a command the LU or the store cannot answer inline. Hence both paths send
    # the same bytes (tests/unit/test_fastpath.py).

    def _fast_take(self, bhs: Data, segment: Data) -> bool:
        """Take a SCSI Command PDU on the fast path if it is the plain case and nothing is queued
        before it (no command waiting for its CmdSN, for data or for release, no event not yet
        handed out, no TMF response held). False: the general path decodes it."""
        b1 = bhs[1]
        if b1 != READ_FLAGS and b1 != WRITE_FLAGS:
            return False
        _b0, _b1, _b2, _b3, _dl, lun, itt, edtl, cmd_sn, exp_stat_sn = COMMAND_FIELDS.unpack_from(bhs)
        if (
            lun
            or cmd_sn != self._exp_cmd_sn
            or self._pending
            or self._release
            or self._events
            or self._held
            or itt == RESERVED_TAG
            or itt in self._tasks
            or itt in self._fast_itts
            or itt in self._forwarded_itts
        ):
            return False
        plain = plain_command(bhs, b1)
        if plain is None:
            return False
        write, lba, n = plain
        if write:
            if len(segment) != edtl or not edtl or not self._immediate_data or edtl > self._first_burst:
                return False
        elif len(segment) or not edtl or edtl > self._max_send:
            return False
        self.exp_stat_sn = exp_stat_sn
        self._exp_cmd_sn = (cmd_sn + 1) & SN_MASK
        self._fast.append((bhs, segment, itt, write, lba, n, edtl))
        self._fast_itts.add(itt)
        return True

    def _fast_demote(self, entries: list[tuple[Data, Data, int, bool, int, int, int]]) -> None:
        """Make general tasks of fast commands taken but not run, in order (their CmdSNs are
        already counted, as ``_order`` counts an in-order command)."""
        self._fast = []
        self._fast_itts.clear()
        for bhs, segment, *_ in entries:
            cmd = self._reader.decode(bhs, segment, b"")
            assert isinstance(cmd, ScsiCommand)
            self._accept_task(self._new_task(cmd), ordered=True)

    def _fast_run(self) -> None:
        """Run the fast commands taken from this batch: inline on the LU, responses packed into one
        buffer. The first one the LU cannot answer inline goes, with those after it, to the general
        path."""
        entries = self._fast
        self._fast = []
        self._fast_itts.clear()
        lu = self._fast_lu
        nexus = self._nexus
        if self._phase is not Phase.FULL_FEATURE or lu is None or nexus is None:
            return
        started = time.perf_counter()
        exp_cmd_sn = self._exp_cmd_sn
        max_cmd_sn = (exp_cmd_sn + self._window - 1) & SN_MASK
        batch = ResponseBatch(len(entries), self._out, self._hd, self._dd)
        taken = done = reads = read_bytes = writes = write_bytes = ticket = 0
        forwarded: list[tuple[int, int]] = []
        for _bhs, segment, itt, write, lba, n, edtl in entries:
            if write:
                ticket_or_none = lu.write_fast(nexus, lba, n, segment)
                if ticket_or_none is None:
                    break
                taken += 1
                if ticket_or_none:  # forwarded to replicas: answered by ``forwarded_done``
                    ticket = ticket_or_none
                    forwarded.append((itt, edtl))
                    continue
                batch.response(itt, self._stat_sn, exp_cmd_sn, max_cmd_sn)
                writes += 1
                write_bytes += edtl
            else:
                data = lu.read_now(nexus, lba, n, edtl)
                if data is None:
                    break
                taken += 1
                batch.data_in(itt, data, self._stat_sn, exp_cmd_sn, max_cmd_sn)
                reads += 1
                read_bytes += edtl
            self._stat_sn = (self._stat_sn + 1) & SN_MASK
            done += 1
        batch.close()
        if forwarded:
            number = self._next_batch
            self._next_batch = number + 1
            self._forwarded[number] = (forwarded, started)
            self._forwarded_itts.update(itt for itt, _ in forwarded)
            self._events.append(AwaitForwarded(number, lu, ticket))
        if taken < len(entries):
            self._fast_demote(entries[taken:])
        if done:
            # One latency figure per command: the batch's time shared out (they ran back to back).
            each = (time.perf_counter() - started) / done
            volume = lu.identity.volume
            metrics = self.metrics
            for _ in range(reads):
                metrics.command_done(volume, "read", read_bytes // reads, each)
            for _ in range(writes):
                metrics.command_done(volume, "write", write_bytes // writes, each)

    def forwarded_done(self, batch: int, sense: bytes | None, now: float) -> None:
        """The forwarded writes of ``batch`` are answered: GOOD (``sense`` None), else CHECK
        CONDITION with ``sense`` (the bytes the general path sends for them); then the PDUs held
        behind the forwarded writes are read."""
        entry = self._forwarded.pop(batch, None)
        if entry is None:
            return
        try:
            writes, started = entry
            held = self._forwarded_itts
            for itt, _ in writes:
                held.discard(itt)
            if self._phase is not Phase.FULL_FEATURE:
                return
            exp_cmd_sn = self._exp_cmd_sn
            max_cmd_sn = self.max_cmd_sn
            if sense is None:
                out = ResponseBatch(len(writes), self._out, self._hd, self._dd)
                for itt, _ in writes:
                    out.response(itt, self._stat_sn, exp_cmd_sn, max_cmd_sn)
                    self._stat_sn = (self._stat_sn + 1) & SN_MASK
                out.close()
            else:
                for itt, _ in writes:
                    self._out += encode_scsi_response(
                        itt, int(ScsiStatus.CHECK_CONDITION), self._take_stat_sn(), exp_cmd_sn, max_cmd_sn,
                        0, 0, 0, sense, self._hd, self._dd,
                    )  # fmt: skip
            lu = self._fast_lu
            if lu is not None:
                seconds = time.perf_counter() - started
                for _, edtl in writes:
                    self.metrics.command_done(lu.identity.volume, "write", edtl, seconds)
            if not self._forwarded:
                self._receive(b"", now)
        except Exception as e:
            self._internal_error(Where.COMPLETE, e)

    def _new_task(self, cmd: ScsiCommand) -> Task:
        """A task for an acceptable command (``_check_command``), its immediate data stored."""
        task = Task(self._next_task_id, cmd, lun_number(cmd.lun))
        self._next_task_id += 1
        n = len(cmd.data)
        if cmd.write:
            task.unsolicited_limit = min(self._first_burst, cmd.expected_length)
            task.unsolicited_done = cmd.final or n >= task.unsolicited_limit
            if n:
                task.store(0, cmd.data)
        self._tasks[cmd.itt] = task
        return task

    def _on_scsi_command(self, cmd: ScsiCommand) -> None:
        self.exp_stat_sn = cmd.exp_stat_sn
        if not cmd.immediate and not self._in_window(cmd.cmd_sn):
            self._forgotten.append(cmd.itt)
            return  # RFC 7143 3.2.2.1: silently ignored
        if not cmd.immediate and cmd.cmd_sn in self._pending:
            return  # a duplicate within the window: ignored (RFC 7143 3.2.2.1)
        problem = self._check_command(cmd)
        if problem is not None:
            reason, _why = problem
            self._reject(reason, self._reader.last_header())
            self._consume_cmd_sn(cmd.cmd_sn, cmd.immediate)
            return
        task = self._new_task(cmd)
        if cmd.immediate:
            self._accept_task(task, ordered=False)
        else:
            self._order(cmd.cmd_sn, task)

    def _check_command(self, cmd: ScsiCommand) -> tuple[RejectReason, str] | None:
        """RFC 7143 11.3 rules for a new command; None when it is acceptable."""
        if cmd.itt == RESERVED_TAG:
            return RejectReason.INVALID_PDU_FIELD, "reserved ITT"
        if cmd.itt in self._tasks:
            return RejectReason.TASK_IN_PROGRESS, "ITT in use"
        n = len(cmd.data)
        if n:
            if not cmd.write:
                return RejectReason.INVALID_PDU_FIELD, "immediate data without the W bit"
            if not self._immediate_data:
                return RejectReason.PROTOCOL_ERROR, "immediate data with ImmediateData=No"
            if n > cmd.expected_length:
                return RejectReason.PROTOCOL_ERROR, "more immediate data than the EDTL"
            if n > self._first_burst:
                return RejectReason.PROTOCOL_ERROR, "immediate data beyond FirstBurstLength"
        if not cmd.final and (not cmd.write or self._initial_r2t):
            return RejectReason.PROTOCOL_ERROR, "unsolicited Data-Out announced but not allowed"
        return None

    def _accept_task(self, task: Task, *, ordered: bool) -> None:
        if task.state is not TaskState.AWAITING_CMDSN:
            return  # aborted while waiting for its CmdSN
        complete = task.data_complete
        task.move(TaskInput.ACCEPT_COMPLETE if complete else TaskInput.ACCEPT_NEEDS_DATA)
        if not complete:
            self._solicit(task)
        if ordered:
            self._release.append(task)
        elif complete:
            self._start(task)

    def _solicit(self, task: Task) -> None:
        self._collector.solicit(task)

    def _send_r2t(self, task: Task, ttt: int, r2t_sn: int, offset: int, length: int) -> None:
        self._send(R2T(task.cmd.lun, task.itt, ttt, self._stat_sn, self._exp_cmd_sn, self.max_cmd_sn,
                       r2t_sn, offset, length))

    def _on_data_out(self, pdu: DataOut) -> None:
        self.exp_stat_sn = pdu.exp_stat_sn
        task = self._tasks.get(pdu.itt)
        if task is None or task.state not in ACTIVE:
            if pdu.itt not in self._forgotten:
                self._reject(RejectReason.INVALID_PDU_FIELD, self._reader.last_header())
            return
        if task.discarding:
            return  # the task already failed: the rest of its data is dropped
        if not task.cmd.write or task.state is TaskState.EXECUTING or task.state is TaskState.READY:
            self._reject(RejectReason.PROTOCOL_ERROR, self._reader.last_header())
            return
        fault = self._collector.receive(task, pdu)
        if fault is not None:
            self._data_error(task, fault.code, fault.why)
            return
        self._data_arrived(task)

    def _data_arrived(self, task: Task) -> None:
        if task.state is TaskState.COLLECTING_DATA and task.data_complete:
            task.move(TaskInput.DATA_COMPLETE)
            if task.cmd.immediate:
                self._start(task)

    def _data_error(self, task: Task, code: Asc, why: str) -> None:
        """A Data-Out that breaks the task's data sequence (RFC 7143 11.7: DataSN, BufferOffset, TTT,
        F bit). ERL 0 has no within-command recovery (7.1.4), so the task ends, as 7.8 (b) ends a
        task at ERL 0: Reject the PDU, drop the rest of the task's data, and answer in CmdSN order
        with CHECK CONDITION, ABORTED COMMAND and an iSCSI ASC (11.4.7.2). The connection stays."""
        self._reject(RejectReason.PROTOCOL_ERROR, self._reader.last_header())
        self.data_errors.append(why)
        self._fail_task(task, code)

    def _fail_task(self, task: Task, code: Asc) -> None:
        if task.failure is None:
            sense = fixed_sense(SenseKey.ABORTED_COMMAND, code)
            task.failure = ScsiResult(ScsiStatus.CHECK_CONDITION, sense=sense)
        task.discarding = True
        self._forgotten.append(task.itt)   # its late Data-Out is dropped silently
        task.r2ts.clear()
        task.unsolicited_done = True
        task.received = max(task.received, task.cmd.expected_length)
        self._data_arrived(task)

    def _pump_release(self) -> None:
        """Hand READY tasks to the SCSI layer in CmdSN order."""
        release = self._release
        while release and self._phase is Phase.FULL_FEATURE:
            head = release[0]
            if head.state is TaskState.READY:
                release.popleft()
                self._start(head)
            elif head.state is TaskState.ABORTED or head.state is TaskState.DONE:
                release.popleft()
            else:
                return

    def _start(self, task: Task) -> None:
        task.move(TaskInput.RELEASE)
        self._executing[task.id] = task
        if task.failure is not None:
            self.complete(task.id, task.failure, self._last_rx)
            return
        cmd = task.cmd
        target = self._target
        nexus = self._nexus
        assert target is not None and nexus is not None
        # ScsiRequest(nexus, lun, cdb, data_out, expected_length, task_attr, read, write)
        request = _make_request(nexus, task.lun, cmd.cdb, task.buffer, cmd.expected_length,
                                _TASK_ATTRS[cmd.attr & 7], cmd.read, cmd.write)
        self._events.append(_make_execute(task.id, target.lu if task.lun == 0 else None, request))

    # --- responses -------------------------------------------------------------------------------------

    def _respond(self, task: Task, result: ScsiResult) -> None:
        """SCSI Response and Data-In for a finished task (RFC 7143 11.4, 11.7; residuals 11.4.5)."""
        cmd = task.cmd
        edtl = cmd.expected_length
        data = result.data
        transfer = result.transfer_length
        if transfer is None:
            transfer = len(data) if cmd.read else (task.received if cmd.write else 0)
        if transfer > edtl:
            flags, residual = 0x04, transfer - edtl      # O bit: residual overflow
        elif transfer < edtl:
            flags, residual = 0x02, edtl - transfer      # U bit: residual underflow
        else:
            flags = residual = 0
        status = int(result.status)
        sense = result.sense
        collapse = status == 0 and not sense
        data_sn = 0
        if cmd.read and edtl and data:
            view = data if isinstance(data, memoryview) else memoryview(data)
            if len(view) > edtl:
                view = view[:edtl]
            data_sn = self._send_data_in(task, view, status, collapse, flags, residual)
            if collapse:
                return
        elif cmd.write:
            data_sn = task.r2t_sn
        self._out += encode_scsi_response(
            cmd.itt, status, self._take_stat_sn(), self._exp_cmd_sn, self.max_cmd_sn, data_sn, flags,
            residual, bytes(sense) if sense else None, self._hd, self._dd,
        )

    def _send_data_in(
        self, task: Task, view: memoryview, status: int, collapse: bool, flags: int, residual: int
    ) -> int:
        """Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength, F at the end of each
        MaxBurstLength sequence; with ``collapse`` the last one carries the status (S bit)."""
        total = len(view)
        segment = max(1, self._max_send)
        itt = task.itt
        out = self._out
        hd = self._hd
        dd = self._dd
        exp_cmd_sn = self._exp_cmd_sn
        max_cmd_sn = self.max_cmd_sn
        if total <= segment and collapse:           # the common case: one PDU with status
            out += encode_data_in(itt, view, True, 0, 0, exp_cmd_sn, max_cmd_sn, hd, dd, status,
                                  self._take_stat_sn(), flags, residual)
            return 1
        burst = max(segment, self._max_burst)
        data_sn = 0
        offset = 0
        while offset < total:
            burst_end = min(offset + burst, total)
            while offset < burst_end:
                end = min(offset + segment, burst_end)
                if end == total and collapse:
                    out += encode_data_in(itt, view[offset:end], True, data_sn, offset, exp_cmd_sn,
                                          max_cmd_sn, hd, dd, status, self._take_stat_sn(), flags, residual)
                else:
                    out += encode_data_in(itt, view[offset:end], end == burst_end, data_sn, offset,
                                          exp_cmd_sn, max_cmd_sn, hd, dd)
                data_sn += 1
                offset = end
        return data_sn

    # --- NOP -----------------------------------------------------------------------------------------

    def _on_nop_out(self, pdu: NopOut) -> None:
        self.exp_stat_sn = pdu.exp_stat_sn
        if pdu.immediate:
            self._nop_reply(pdu)
        else:
            self._order(pdu.cmd_sn, pdu)

    def _nop_reply(self, pdu: NopOut) -> None:
        """RFC 7143 11.18, 11.19: a NOP-Out with an ITT is a ping to answer, echoing its data."""
        if pdu.itt == RESERVED_TAG:
            return  # an answer to our NOP-In, or a no-reply ping
        self._send(NopIn(pdu.lun, pdu.itt, RESERVED_TAG, self._take_stat_sn(), self._exp_cmd_sn,
                         self.max_cmd_sn, pdu.data[: self._max_send]))

    # --- task management (RFC 7143 11.5) -----------------------------------------------------------------

    def _on_tmf_pdu(self, pdu: TaskManagementRequest) -> None:
        self.exp_stat_sn = pdu.exp_stat_sn
        if pdu.immediate:
            self._on_tmf(pdu)
        else:
            self._order(pdu.cmd_sn, pdu)

    def _on_tmf(self, req: TaskManagementRequest) -> None:
        """Apply the function's rule (``tmf.TMF_RULES``): ABORT TASK aborts the referenced task;
        ABORT TASK SET / CLEAR TASK SET / LOGICAL UNIT RESET this session's tasks on the LUN;
        TARGET WARM/COLD RESET all of them and ask the server to abort the other sessions' tasks
        (COLD drops this connection after the response). The LU gets the rule's reset."""
        rule = rule_for(req.function)
        scope = rule.scope
        code = rule.response
        waiting: set[int] = set()
        if scope is TmfScope.REFERENCED_TASK:
            task = self._tasks.get(req.referenced_task_tag)
            if task is not None and task.state in ACTIVE:
                self._abort(task, waiting)
            elif self._in_window(req.ref_cmd_sn) and sn_lt(req.ref_cmd_sn, req.cmd_sn):
                # never received, though sent before the TMF: count its CmdSN as received (11.5.1)
                if req.ref_cmd_sn not in self._pending:
                    self._order(req.ref_cmd_sn, _PHANTOM)
            else:
                code = TmfResponse.TASK_DOES_NOT_EXIST
        elif scope is TmfScope.LUN:
            lun = lun_number(req.lun)
            if lun != 0:
                code = TmfResponse.LUN_DOES_NOT_EXIST
            else:
                for task in list(self._tasks.values()):
                    if task.lun == lun:
                        self._abort(task, waiting)
                if rule.reset is not None and self._target is not None:
                    self._target.lu.reset(rule.reset, self._nexus)
        elif scope is TmfScope.TARGET:
            assert rule.reset is not None
            for task in list(self._tasks.values()):
                self._abort(task, waiting)
            if self._target is not None and self.session is not None:
                self._target.lu.reset(rule.reset, self._nexus)
                self._events.append(TargetResetRequested(self._target.iqn, rule.reset, self.session))
            close_after = rule.reset is ResetKind.TARGET_COLD
            self._hold_or_send(HeldTmfResponse(req.itt, code, waiting, close_after=close_after))
            return
        self._hold_or_send(HeldTmfResponse(req.itt, code, waiting, close_after=False))

    def _hold_or_send(self, held: HeldTmfResponse) -> None:
        if held.waiting:
            self._held.hold(held)
            self._cancel(held.waiting)
        else:
            self._send_tmf_response(held)

    def _cancel(self, task_ids: set[int]) -> None:
        if task_ids:
            self._events.append(CancelExecution(tuple(sorted(task_ids))))

    def _send_tmf_response(self, held: HeldTmfResponse) -> None:
        if self._phase is not Phase.FULL_FEATURE:
            return
        self._send(TaskManagementResponse(held.response, held.itt, self._take_stat_sn(), self._exp_cmd_sn,
                                          self.max_cmd_sn))
        if held.close_after:
            self._close("target cold reset")

    def _abort(self, task: Task, waiting: set[int] | None) -> None:
        """Abort one task: no response will be sent for it."""
        if task.state not in ACTIVE:
            return
        was_executing = task.state is TaskState.EXECUTING
        if task.state is TaskState.AWAITING_CMDSN and self._pending.get(task.cmd.cmd_sn) is task:
            # it was received: its CmdSN still counts (the slot stays, empty)
            self._pending[task.cmd.cmd_sn] = _PHANTOM
        task.move(TaskInput.ABORT)
        task.r2ts.clear()
        if self._tasks.get(task.itt) is task:
            del self._tasks[task.itt]
        self._forgotten.append(task.itt)
        if was_executing and waiting is not None:
            waiting.add(task.id)

    def _abort_everything(self) -> None:
        for task in list(self._tasks.values()):
            self._abort(task, None)

    def _aborted_task_returned(self, task: Task) -> None:
        """An aborted task left the SCSI layer: send the TMF responses that were waiting only for it."""
        task.move(TaskInput.COMPLETE)
        if not self._held:
            return
        ready = self._held.task_returned(task.id)
        for held in ready:
            self._send_tmf_response(held)

    # --- text, logout, SNACK ---------------------------------------------------------------------------

    def _on_text(self, req: TextRequest) -> None:
        text = self._text
        if text is None:
            return
        try:
            step = text.receive(req, stat_sn=self._stat_sn, exp_cmd_sn=self._exp_cmd_sn,
                                max_cmd_sn=self.max_cmd_sn)
        except TextRequestRejected as e:
            self._reject(RejectReason(e.reject_reason), self._header_of(req))
            return
        self._stat_sn = (self._stat_sn + 1) & SN_MASK
        self._send(step.response)
        if step.max_send_data_segment_length is not None:
            self._max_send = step.max_send_data_segment_length

    def _on_logout(self, req: LogoutRequest) -> None:
        """RFC 7143 11.14: at ERL 0, closing the only connection closes the session."""
        if req.reason == LogoutReason.REMOVE_FOR_RECOVERY:
            self._send_logout_response(req, LogoutResult.RECOVERY_NOT_SUPPORTED)
            return
        if req.reason == LogoutReason.CLOSE_CONNECTION and req.cid != self._cid:
            self._send_logout_response(req, LogoutResult.CID_NOT_FOUND)
            return
        if req.reason not in (LogoutReason.CLOSE_SESSION, LogoutReason.CLOSE_CONNECTION):
            self._reject(RejectReason.INVALID_PDU_FIELD, self._header_of(req))
            return
        self._abort_everything()
        self._held.clear()
        self._send_logout_response(req, LogoutResult.SUCCESS)
        self._end_session()
        self._move(PhaseInput.LOGOUT)
        self._events.append(CloseConnection("logout"))

    def _send_logout_response(self, req: LogoutRequest, result: LogoutResult) -> None:
        params = self.params
        t2w = params.default_time2wait if params is not None else 0
        t2r = params.default_time2retain if params is not None else 0
        self._send(LogoutResponse(int(result), req.itt, self._take_stat_sn(), self._exp_cmd_sn,
                                  self.max_cmd_sn, t2w, t2r))

    def _on_snack(self, pdu: SnackRequest) -> None:
        """SNACK needs ErrorRecoveryLevel > 0 (RFC 7143 11.16); we run at ERL 0."""
        self._reject(RejectReason.PROTOCOL_ERROR, self._reader.last_header())

    # --- output helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _header_of(pdu: InitiatorPdu) -> bytes:
        """The BHS of ``pdu`` for a Reject (re-encoded: an ordered command may be processed while a
        later PDU is being read)."""
        return bytes(encode(pdu)[0][:BHS_LENGTH])

    def _take_stat_sn(self) -> int:
        sn = self._stat_sn
        self._stat_sn = (sn + 1) & SN_MASK
        return sn

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = ttt % 0xFFFFFFFE + 1        # never the reserved tag 0xffffffff, never 0
        return ttt

    def _reject(self, reason: RejectReason, header: bytes) -> None:
        """RFC 7143 11.17: the data segment is the rejected PDU's BHS."""
        if self._phase is Phase.CLOSED or self._phase is Phase.LOGGED_OUT:
            return
        self._send(Reject(int(reason), self._take_stat_sn(), self._exp_cmd_sn, self.max_cmd_sn, 0,
                          bytes(header[:BHS_LENGTH]).ljust(BHS_LENGTH, b"\0")))

    def _send(self, pdu: TargetPdu) -> None:
        self._out.extend(encode(pdu, header_digest=self._hd, data_digest=self._dd))
