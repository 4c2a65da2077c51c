"""The asyncio layer of the iSCSI target: it only moves bytes.

Each TCP connection gets one sans-IO ``Connection`` core. This module feeds it bytes, writes what it
returns, runs the one timer it asks for, and awaits SCSI execution on the logical unit. Protocol
decisions live in ``frontend.iscsi``; SCSI decisions in ``frontend.scsi``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Coroutine, Generator, Iterable
from functools import partial
from typing import Any, cast

import structlog

from frontend.internal_errors import Where, caught
from frontend.iscsi.connection import (
    AwaitForwarded,
    CancelExecution,
    CloseConnection,
    Connection,
    ExecuteScsi,
    LoggedIn,
    LoginRejected,
    TargetResetRequested,
)
from frontend.iscsi.params import SessionType
from frontend.iscsi.session import Session, SessionTable
from frontend.metrics import FrontendMetrics, NoMetrics
from frontend.scsi.commands import MetricKind, metric_kind
from frontend.scsi.lu import LogicalUnit, ResetKind, no_such_lun
from frontend.scsi.sense import INTERNAL_TARGET_FAILURE, CheckCondition, SenseKey
from frontend.scsi.types import ScsiRequest, ScsiResult, ScsiStatus
from frontend.target import TargetRegistry, TargetSettings

log = structlog.get_logger("sparrow.iscsi")

#: SPARROW_FAST_PATH=0 sends every command through the general path (debugging, A/B measurement).
FAST_PATH = os.environ.get("SPARROW_FAST_PATH", "1") != "0"

#: Connections beyond this many are closed as soon as they are accepted.
MAX_CONNECTIONS = 1024
#: Connections from one address that may be without a Normal session at once (logging in, or in
#: a discovery session: neither needs a credential when the target asks for none); a new one from
#: that address past this is closed as soon as it is accepted. A flood of idle connections from
#: one host so holds this many of MAX_CONNECTIONS, not all of them; a Normal session's connection
#: counts only against MAX_CONNECTIONS (one host may serve many volumes).
MAX_UNBOUND_PER_ADDRESS = 32
#: Stop reading from a connection while this many bytes wait in its socket buffer.
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: Seconds a connection we close may take to hand its last bytes to the peer (a login reject, a
#: logout response); one whose peer does not read them is then aborted, its buffers freed.
CLOSE_LINGER = 2.0

#: Login status (class << 8 | detail, RFC 7143 11.13.5) -> the metric label for the failure.
_LOGIN_FAILURE_REASONS = {
    0x0200: "initiator_error",
    0x0201: "authentication_failed",
    0x0202: "authorization_failed",
    0x0203: "target_not_found",
    0x0205: "unsupported_version",
    0x0206: "too_many_connections",
    0x0207: "missing_parameter",
    0x020A: "session_does_not_exist",
    0x020B: "invalid_request",
}


class IscsiServer:
    """Accepts iSCSI connections and serves the targets in ``registry``."""

    def __init__(
        self,
        registry: TargetRegistry,
        settings: TargetSettings,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics: FrontendMetrics = metrics or NoMetrics()
        self.sessions = SessionTable()
        self._server: asyncio.base_events.Server | None = None
        self._protocols: set[IscsiProtocol] = set()
        #: Connections without a Normal session, by peer address (MAX_UNBOUND_PER_ADDRESS).
        self._unbound: dict[str, int] = {}
        self._closing = False

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: IscsiProtocol(self), host, port, reuse_address=True, backlog=256
        )

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 (a drain deadline, not a cancel scope)
        """Stop accepting, let in-flight SCSI commands finish within ``timeout``, close the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        protocols = list(self._protocols)
        for p in protocols:
            p.stop_reading()
        pending = [t for p in protocols for t in p.tasks]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for p in protocols:
            p.close("target shutting down")
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):  # not wait_for: 3.11's can swallow a cancellation
                    await self._server.wait_closed()

    # --- called by protocols ---------------------------------------------------------------

    def accepted(self, protocol: IscsiProtocol, address: str) -> str | None:
        """None if ``protocol`` (from ``address``) may be served, else why not."""
        if self._closing:
            return "shutting down"
        if len(self._protocols) >= MAX_CONNECTIONS:
            return f"{MAX_CONNECTIONS} connections open"
        unbound = self._unbound.get(address, 0)
        if unbound >= MAX_UNBOUND_PER_ADDRESS:
            return f"{unbound} connections from {address} without a session"
        self._protocols.add(protocol)
        self._unbound[address] = unbound + 1
        protocol.unbound_from = address
        return None

    def bound(self, protocol: IscsiProtocol) -> None:
        """``protocol`` has a Normal session: it no longer counts against its address's cap."""
        address = protocol.unbound_from
        if address is None:
            return
        protocol.unbound_from = None
        left = self._unbound.get(address, 1) - 1
        if left > 0:
            self._unbound[address] = left
        else:
            self._unbound.pop(address, None)

    def forget(self, protocol: IscsiProtocol) -> None:
        if protocol in self._protocols:
            self.bound(protocol)
        self._protocols.discard(protocol)

    def protocol_of(self, session: Session) -> IscsiProtocol | None:
        for p in self._protocols:
            if p.session is session:
                return p
        return None

    def protocols_of_target(self, iqn: str) -> Iterable[IscsiProtocol]:
        return [p for p in self._protocols if p.session is not None and p.session.params.target_name == iqn]


class IscsiProtocol(asyncio.Protocol):
    """One TCP connection: bytes in, bytes out, one timer, SCSI tasks awaited."""

    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.session: Session | None = None
        #: Executions that suspended, by the core's task id (those that did not never need a Task).
        self._running: dict[int, asyncio.Task[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closing = False
        self._reading_paused = False
        self._flush_scheduled = False
        self._lost = False
        #: The peer address this connection counts against while it has no Normal session.
        self.unbound_from: str | None = None
        self.log = log

    @property
    def tasks(self) -> Iterable[asyncio.Task[None]]:
        """The SCSI executions in flight that an orderly shutdown waits for."""
        return self._running.values()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but they are one.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.log = log.bind(peer=peer_text)
        address = str(peer[0]) if isinstance(peer, tuple) else peer_text
        refused = self.server.accepted(self, address)
        if refused is not None:
            self.log.warning("connection refused", reason=refused)
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.conn = Connection(
            self.server.settings,
            self.server.registry,
            self.server.sessions,
            now=self.loop.time(),
            peer=peer_text,
            metrics=self.server.metrics,
            fast_path=FAST_PATH,
        )
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.conn is None or self._closing:
            return
        self.conn.receive_data(data, self.loop.time())
        self._pump()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
        if self.conn is not None:
            self.conn.connection_lost(self.loop.time())
        if self.session is not None:
            self.server.metrics.session_closed(self.session.params.session_type.value.lower())
            self.log.info("connection closed", reason=str(exc) if exc else "peer closed")
        self.server.forget(self)

    def pause_writing(self) -> None:
        self.stop_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._reading_paused and not self._closing:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- helpers used by the server ----------------------------------------------------------

    def stop_reading(self) -> None:
        if self.transport is not None and not self._reading_paused and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def close(self, reason: str) -> None:
        if self.transport is None or self._closing:
            return
        self._closing = True
        self.log.info("closing connection", reason=reason)
        self._flush()
        self.transport.close()  # after the buffered bytes are sent
        if self.transport.get_write_buffer_size():
            self.loop.call_later(CLOSE_LINGER, self._abort_unless_gone, reason)

    def _abort_unless_gone(self, reason: str) -> None:
        """The peer has not read what ``close`` left to send: abort (module constant CLOSE_LINGER)."""
        if self.transport is not None and not self._lost:
            self.log.warning("aborting connection: its last bytes were not read", reason=reason)
            self.transport.abort()

    def abort_all_tasks(self) -> None:
        if self.conn is not None:
            self.conn.abort_all_tasks()
            self._pump()

    # --- the pump ----------------------------------------------------------------------------

    def _pump(self, *, flush_now: bool = True) -> None:
        """Handle every event the core has, then write what it produced.

        ``flush_now=False`` (a task completing on its own) defers the write to the next loop
        iteration, so completions that land in the same iteration share one writelines call.
        """
        conn = self.conn
        if conn is None:
            return
        while (event := conn.next_event()) is not None:
            if isinstance(event, ExecuteScsi):
                self._start(event)
            elif isinstance(event, LoggedIn):
                self._logged_in(event)
            elif isinstance(event, LoginRejected):
                self._login_rejected(event)
            elif isinstance(event, CancelExecution):
                self._cancel(event)
            elif isinstance(event, TargetResetRequested):
                self._target_reset(event)
            elif isinstance(event, AwaitForwarded):
                event.lu.forwarded(event.ticket).add_done_callback(
                    partial(self._forwarded_done, event.batch, event.lu)
                )
            elif isinstance(event, CloseConnection):
                self.close(event.reason)
                return
        if flush_now:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        self._arm_timer()

    def _start(self, event: ExecuteScsi) -> None:
        """Run a SCSI command eagerly: most finish without suspending (inline I/O), and those need
        no asyncio Task at all. One that suspends continues in a Task (as 3.12's eager tasks do)."""
        coro = self._execute(event.task_id, event.lu, event.request)
        try:
            suspended_on = coro.send(None)
        except StopIteration:
            return
        rest = _Resumed(coro, suspended_on)
        task = self.loop.create_task(self._finish(rest))
        self._running[event.task_id] = task
        task.add_done_callback(partial(self._execution_done, event.task_id, rest))

    async def _finish(self, rest: _Resumed) -> None:
        await rest
        self._pump(flush_now=False)

    def _forwarded_done(self, batch: int, lu: LogicalUnit, done: asyncio.Future[None]) -> None:
        """Fast-path writes forwarded to replicas (``AwaitForwarded``) may be answered; the
        responses of one loop iteration leave in one writelines, as completions do."""
        if self.conn is None or self._closing:
            return
        try:
            error = asyncio.CancelledError() if done.cancelled() else done.exception()
            sense = lu.forwarded_sense(error)  # nothing cancels it: one that is, is a bug
        except Exception as e:  # a bug in the SCSI layer: the connection goes, logged and counted
            caught(Where.SCSI, e, self.server.metrics, batch=batch)
            self.close(f"internal error: {type(e).__name__}: {e}")
            return
        self.conn.forwarded_done(batch, sense, self.loop.time())
        self._pump(flush_now=False)

    def _cancel(self, event: CancelExecution) -> None:
        """A TMF aborted these tasks: stop their executions. Each reports to the core when its Task
        has ended (``_execution_done``), so the held TMF response follows the aborted commands out
        of the SCSI layer (RFC 7143 11.5; SAM-5 7.1). Executions that never suspended have already
        reported; ids not found here are those."""
        running = self._running
        for task_id in event.task_ids:
            task = running.get(task_id)
            if task is not None:
                task.cancel()

    def _execution_done(self, task_id: int, rest: _Resumed, task: asyncio.Task[None]) -> None:
        del self._running[task_id]
        if not task.cancelled():
            return
        # Cancelled before its first step the Task never entered ``rest``: end the execution here
        # (a no-op for one that already unwound).
        rest.close()
        if self.conn is not None and not self._closing:
            self.conn.aborted(task_id, self.loop.time())
            self._pump(flush_now=False)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.conn is None or self.transport is None or self.transport.is_closing():
            return
        out = self.conn.data_to_send()
        if out:
            self.transport.writelines(out)

    def _arm_timer(self) -> None:
        assert self.conn is not None
        deadline = self.conn.next_deadline()
        if deadline == self._timer_at:
            return
        if deadline is not None and self._timer_at is not None and deadline > self._timer_at:
            # The idle deadline moves with every PDU received. Keep the armed timer: when it fires
            # early the core does nothing (handle_timer checks `now`) and the timer is armed again.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and not self._closing:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.conn is not None and not self._closing:
            self.conn.handle_timer(self.loop.time())
            self._pump()

    async def _execute(self, task_id: int, lu: LogicalUnit | None, request: ScsiRequest) -> None:
        started = time.perf_counter()
        try:
            if lu is None:
                result = no_such_lun(request)
            else:
                result = await lu.execute(request)
        except Exception as e:  # a bug in the SCSI layer must not take the connection down silently
            caught(Where.SCSI, e, self.server.metrics, cdb=bytes(request.cdb).hex())
            result = _internal_error()
        if lu is not None:
            kind = metric_kind(request.cdb)
            nbytes = len(result.data) if kind is MetricKind.READ else len(request.data_out)
            self.server.metrics.command_done(
                lu.identity.volume, kind.value, nbytes, time.perf_counter() - started
            )
        if self.conn is not None and not self._closing:
            self.conn.complete(task_id, result, self.loop.time())

    def _logged_in(self, event: LoggedIn) -> None:
        self.session = event.session
        params = event.session.params
        kind = params.session_type.value.lower()
        self.server.metrics.session_opened(kind)
        if params.session_type is SessionType.NORMAL:
            self.server.bound(self)
        self.log = self.log.bind(initiator=params.initiator_name, target=params.target_name or "discovery")
        self.log.info("logged in", session_type=kind, tsih=params.tsih)
        if event.displaced is not None:
            old = self.server.protocol_of(event.displaced)
            if old is not None and old is not self:
                old.close("session reinstated by a new login")

    def _login_rejected(self, event: LoginRejected) -> None:
        status = event.status_class << 8 | event.status_detail
        if event.status_class == 0x01:  # redirection (RFC 7143 11.13.5): the login goes elsewhere
            self.server.metrics.login_failed("redirected")
            self.log.info("login redirected", status=f"0x{status:04x}", reason=event.reason)
            return
        self.server.metrics.login_failed(_LOGIN_FAILURE_REASONS.get(status, "other"))
        self.log.warning("login rejected", status=f"0x{status:04x}", reason=event.reason)

    def _target_reset(self, event: TargetResetRequested) -> None:
        for p in self.server.protocols_of_target(event.iqn):
            if p is self:
                continue
            p.abort_all_tasks()
            if event.kind is ResetKind.TARGET_COLD:
                p.close("target cold reset")


class _Resumed:
    """Awaitable continuation of a coroutine that was already stepped once and yielded ``first``.

    Awaiting it inside a Task hands ``first`` (the future the coroutine is blocked on) to the Task,
    then keeps driving the coroutine, passing values and exceptions (cancellation) through.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self._coro = coro
        self._first = first

    def close(self) -> None:
        """Abandon the coroutine where it is suspended (GeneratorExit runs its ``finally`` blocks)."""
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        coro, to_yield = self._coro, self._first
        while True:
            try:
                sent = yield to_yield
            except BaseException as exc:  # thrown into the Task: forward it to the coroutine
                try:
                    to_yield = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                to_yield = coro.send(sent)
            except StopIteration:
                return


def _internal_error() -> ScsiResult:
    cc = CheckCondition(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE)
    return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=cc.fixed_sense())
