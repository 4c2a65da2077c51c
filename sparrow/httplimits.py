"""Bounded resources for every Sparrow HTTP listener (the master API, ``sparrow serve``, the node's
``/metrics`` and ``/healthz``): ``sparrow.lifecycle.start_http`` applies them to each one.

aiohttp's server has no timeout for reading a request's head or body: a client that sends its
headers a byte a second holds a connection (and a file descriptor) as long as it likes. (Its
``keepalive_timeout`` closes a connection that has been idle since its last response; aiohttp
3.14 also arms it when a connection opens, but it is not a header timeout and older releases do
not.) :class:`HttpGuard` adds, in one place:

- **A cap on open connections** (``max_connections``): a connection over the cap is closed at once
  (before a byte is read) and counted; the first refusal after the cap was reached is logged.
- **A header timeout** (``header_timeout``): the whole request head must arrive within that many
  seconds of the connection opening, or, on a kept-alive connection, of the first byte of the next
  request; otherwise the connection is closed and counted. Each connection's protocol is wrapped
  (:class:`GuardedConnection`, forwarding to aiohttp's own ``RequestHandler``); the head is known
  to be complete when the request reaches the guard's middleware, the innermost of the app's.
- **A body timeout** (``body_timeout``): the middleware reads a request's body (which the handler
  then finds already read) within that many seconds, or answers 408 and closes the connection.
- **An idle timeout** (``idle_timeout``, at least ``header_timeout``): aiohttp's
  ``keepalive_timeout``.
- **A send timeout** (the same ``idle_timeout``): a connection whose sends stay stalled that long
  (its transport paused writing: the peer reads nothing of its answers) is aborted. aiohttp waits
  on a stalled send without end, and its keep-alive timer does not run while a request is in
  progress: a client that pipelines requests for a large answer and reads none held its
  connection, and with the cap every connection, for as long as it liked.

Metrics: ``sparrow_http_connections`` (open now), ``sparrow_http_connections_closed_total{reason}``
with reason ``too_many_connections``, ``header_timeout``, ``body_timeout`` or ``send_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from sparrow.httpjson import Handler, error_response

log = structlog.get_logger("sparrow.http")

#: Reasons a connection is closed by the guard (the metric's ``reason`` label).
TOO_MANY = "too_many_connections"
HEADER_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
SEND_TIMEOUT = "send_timeout"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Seconds, and a count; see the module docstring. Config: ``[http]`` in the TOML file."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "idle_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number of seconds, not {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int):
            raise ValueError(f"max_connections must be an integer, not {self.max_connections!r}")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.idle_timeout < self.header_timeout:
            # aiohttp (3.14) also arms its keep-alive timer when a connection opens.
            raise ValueError("idle_timeout must be at least header_timeout")


class Phase(enum.Enum):
    """Where a connection is, for the header timer."""

    HEAD = "head"  # reading a request head: the header timer runs
    REQUEST = "request"  # the head arrived; the app has the request
    IDLE = "idle"  # between requests: aiohttp's keep-alive timer runs; a byte starts a HEAD


class GuardedConnection(asyncio.Protocol):
    """One HTTP connection: aiohttp's protocol (``inner``) behind the guard's header timer."""

    def __init__(self, guard: HttpGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.HEAD
        self._timer: asyncio.TimerHandle | None = None
        #: Armed while the transport has paused writing (the send timeout).
        self._send_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol: forwarded to aiohttp ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._cancel_send_timer()
        self.guard.closed(self)
        self.inner.connection_lost(exc)
        self.transport = None

    def pause_writing(self) -> None:
        if self._send_timer is None:
            loop = asyncio.get_running_loop()
            self._send_timer = loop.call_later(self.guard.limits.idle_timeout, self._send_timeout)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        self.inner.resume_writing()

    # -- the guard's view -------------------------------------------------------------------------

    def request_started(self) -> None:
        """The request's head arrived (the app has it)."""
        self.phase = Phase.REQUEST
        self._cancel()

    def request_done(self) -> None:
        self.phase = Phase.IDLE

    def close(self, reason: str) -> None:
        self._cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.guard.count(reason)
            self.transport.close()

    def _send_timeout(self) -> None:
        """Writing stayed paused for the idle timeout: abort (a close would wait for the flush)."""
        self._send_timer = None
        if self.transport is not None:
            self.guard.count(SEND_TIMEOUT)
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a reset: the kernel drops the unsent bytes too, not flush them
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _arm(self) -> None:
        self._cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.guard.limits.header_timeout, self._header_timeout)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self.phase is Phase.HEAD:
            self.close(HEADER_TIMEOUT)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made."""

    def __init__(self, guard: HttpGuard) -> None:
        self.guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.guard.count(TOO_MANY)
        transport.close()


class HttpGuard:
    """The limits of one HTTP listener, its open connections and its metrics (``registry``)."""

    def __init__(self, limits: HttpLimits, registry: CollectorRegistry | None = None) -> None:
        self.limits = limits
        self.connections: set[GuardedConnection] = set()
        self._refusing = False
        registry = registry if registry is not None else CollectorRegistry()
        self.closed_total = Counter(
            "sparrow_http_connections_closed",
            "HTTP connections closed by a limit (sparrow.httplimits), by reason",
            ["reason"],
            registry=registry,
        )
        for reason in (TOO_MANY, HEADER_TIMEOUT, BODY_TIMEOUT, SEND_TIMEOUT):
            self.closed_total.labels(reason=reason)
        open_now = Gauge("sparrow_http_connections", "Open HTTP connections", registry=registry)
        open_now.set_function(lambda: len(self.connections))

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for ``loop.create_server``, around aiohttp's (``runner.server``)."""

        def make() -> asyncio.Protocol:
            if len(self.connections) >= self.limits.max_connections:
                if not self._refusing:
                    self._refusing = True
                    log.warning("too many HTTP connections: refusing more", limit=self.limits.max_connections)
                return _Refused(self)
            self._refusing = False
            conn = GuardedConnection(self, inner())
            # Counted from here: a loop may accept several connections before any is "made".
            self.connections.add(conn)
            return conn

        return make

    def closed(self, conn: GuardedConnection) -> None:
        self.connections.discard(conn)

    def count(self, reason: str) -> None:
        self.closed_total.labels(reason=reason).inc()
        log.debug("HTTP connection closed", reason=reason)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The innermost middleware: the head has arrived; the body must arrive in time."""
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        guarded = conn if isinstance(conn, GuardedConnection) else None
        if guarded is not None:
            guarded.request_started()
        try:
            if request.body_exists:
                try:
                    async with asyncio.timeout(self.limits.body_timeout):
                        await request.read()  # kept by aiohttp: the handler's read() returns it
                except TimeoutError:
                    response = error_response(
                        408, f"request body not received within {self.limits.body_timeout:g} s"
                    )
                    response.force_close()
                    await response.prepare(request)
                    await response.write_eof()
                    if guarded is not None:
                        guarded.close(BODY_TIMEOUT)  # after the answer is flushed
                    else:
                        self.count(BODY_TIMEOUT)
                    return response
            return await handler(request)
        finally:
            if guarded is not None:
                guarded.request_done()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through ``guard`` (aiohttp's TCPSite otherwise)."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: HttpGuard, *, shutdown_timeout: float
    ) -> None:
        super().__init__(runner, shutdown_timeout=shutdown_timeout)
        self.host = host
        self.port = port
        self.guard = guard

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.factory(server), self.host, self.port, reuse_address=True
        )


_READS_BODY = "_sparrow_reads_body"

M = TypeVar("M")


def reads_body(middleware: M) -> M:
    """Mark a middleware that reads the request body (the audit's call line): :func:`install` puts
    the guard's body timeout in front of it, so a slow body is answered 408 there too."""
    setattr(middleware, _READS_BODY, True)
    return middleware


def install(app: web.Application, limits: HttpLimits, registry: CollectorRegistry | None) -> HttpGuard:
    """A guard for ``app`` (not yet set up): its middleware goes innermost (after authentication,
    so a request without credentials is refused before its body is read), but in front of the
    first middleware marked :func:`reads_body`."""
    guard = HttpGuard(limits, registry)
    middlewares = list(app.middlewares)
    at = next((i for i, m in enumerate(middlewares) if getattr(m, _READS_BODY, False)), len(middlewares))
    app.middlewares.insert(at, guard.middleware)
    return guard


__all__ = ["GuardedConnection", "GuardedSite", "HttpGuard", "HttpLimits", "install"]
