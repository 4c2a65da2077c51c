"""The master's audit trail: who changed what, and every epoch minted (docs/operations.md, "Audit").

One append-only file, ``DATA_DIR/audit.jsonl`` (mode 0600), one JSON object per line; each line is
written and fsync'ed before what it records takes effect:

- a mutating API call (any method but GET/HEAD/OPTIONS on a route the API has) is a ``call``
  line, written after authentication and **before the handler runs**; if it cannot be written the
  call is answered 503 and nothing changes. Its outcome is a ``result`` line with the same ``id``,
  written before the answer is sent (if that fails the answer is 503 too: the log then says the
  call was made, its outcome unknown). A call the auth middleware refuses (401, 403) changes
  nothing and is one ``call`` line that carries its ``status`` already::

    {"time": "2026-12-02T09:30:01.123Z", "type": "call", "id": "<16 hex>", "who": "<token id>" | null,
     "verb": "volume.create", "method": "POST", "path": "/v1/volumes", "volume": "db1" | null,
     "args": {"name": "db1", "size": "64MiB"}, "redacted": ["chap_secret"]}
    {"time": ..., "type": "result", "id": "<same>", "status": 201, "error": null}

  ``who`` is the token id of the authenticated principal (``PRINCIPAL_KEY``); for a 401 it is null
  and ``claimed`` holds the id the bearer token named, if it was well-formed. ``args`` are the
  path parameters, the ``wait`` query and the body fields named in :data:`PUBLIC_ARGS`; every other
  body field (CHAP secrets, anything unknown) is left out and only its name listed in
  ``redacted``. Error messages are kept, with any redacted value cut out. Response bodies (a new
  token) are never looked at.

- an epoch minted by the Publisher is an ``epoch`` line, written inside the publish transaction
  **before COMMIT** (so before any node can hear of the epoch); if it cannot be written the
  publish rolls back and no epoch is minted. A crash between the line and COMMIT leaves a line for
  an epoch that was never committed (the authority is the truth; the next publish mints that
  number again)::

    {"time": ..., "type": "epoch", "volume": "db1", "volume_id": "<hex>", "epoch": 7,
     "primary": "n2" | null, "copies": ["n2", "n1"], "in_sync": ["n2"], "reason": "..."}

``sparrow restore`` adds a ``restore`` line (sparrow.backup).

:func:`read_records` reads the file back (a torn last line from a crash is skipped) and joins each
call with its result; ``sparrow audit`` prints them (sparrow.opscli).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from sparrow.auth import tokens
from sparrow.auth.tokens import AuthError
from sparrow.cluster.messages import Assignment
from sparrow.httpjson import ApiError, Handler, error_response
from sparrow.httplimits import reads_body
from sparrow.master.auth import PRINCIPAL_KEY
from store.metadata import write_durably

log = structlog.get_logger("sparrow.master.audit")

AUDIT_FILE = "audit.jsonl"
FILE_MODE = 0o600

#: Methods that change nothing: never audited.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: (method, route) -> the verb an audit line names; a mutating route missing here is audited as
#: "METHOD ROUTE" (add a row with every new mutating route).
VERBS: dict[tuple[str, str], str] = {
    ("POST", "/v1/volumes"): "volume.create",
    ("POST", "/v1/volumes/{name}/resize"): "volume.resize",
    ("DELETE", "/v1/volumes/{name}"): "volume.delete",
    ("DELETE", "/v1/nodes/{node_id}"): "node.forget",
    ("POST", "/v1/tokens"): "token.create",
    ("DELETE", "/v1/tokens/{id}"): "token.revoke",
    ("POST", "/v1/volumes/{name}/failover"): "volume.failover",
    ("POST", "/v1/volumes/{name}/rebuild"): "volume.rebuild",
    ("POST", "/v1/nodes/{node_id}/drain"): "node.drain",
    ("POST", "/v1/nodes/{node_id}/undrain"): "node.undrain",
    ("POST", "/v1/nodes/{node_id}/rekey"): "node.rekey",
    ("POST", "/v1/nodes/{node_id}/approve"): "node.approve",
    ("POST", "/v1/volumes/{name}/pause"): "volume.pause",
    ("POST", "/v1/volumes/{name}/resume"): "volume.resume",
    ("PATCH", "/v1/volumes/{name}"): "volume.update",
    ("PATCH", "/v1/cluster"): "cluster.update",
}

#: Body fields whose values are written to the log. Every other field's value is left out (its
#: name goes to ``redacted``): an allowlist, so a new secret field is safe by default.
PUBLIC_ARGS = frozenset(
    {
        "name",
        "size",
        "block_size",
        "replicas",
        "physical_block_size",
        "chap_user",
        "chap_mutual_user",
        "chap",
        "discovery_chap_user",
        "discovery_chap_mutual_user",
        "discovery_chap",
        "backing",
        "role",
        "tenant",
        "to",
        "replica",
        "key",
    }
)
#: Query parameters written to the log.
PUBLIC_QUERY = frozenset({"wait"})
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_ERROR = 400


class AuditError(Exception):
    """The audit log cannot be written (full disk, unwritable or removed file): the change it was
    to record must not happen. The API answers 503."""

    status = 503


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends lines to ``path`` durably (write, fsync), one writer thread at a time.

    The file is opened for each line (``O_APPEND``, never created after :meth:`open_in`): a log
    that was removed fails loudly instead of being recreated in silence."""

    def __init__(self, path: Path, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall_clock = wall_clock
        self._lock = threading.Lock()

    @classmethod
    def open_in(cls, data_dir: Path, *, wall_clock: Callable[[], float] = time.time) -> AuditLog:
        """The data directory's audit log, created (0600, directory fsync'ed) if missing; an
        existing one is kept and set to 0600. Raises AuditError."""
        path = data_dir / AUDIT_FILE
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise AuditError(f"cannot open the audit log {path}: {e.strerror or e}") from None
        return cls(path, wall_clock=wall_clock)

    def append(self, record: Mapping[str, Any]) -> None:
        """Blocking: write ``record`` (stamped with ``time``) as one line and fsync it. Raises
        AuditError; then nothing (or a torn line the reader skips) was written."""
        line = json.dumps({"time": _iso(self._wall_clock()), **record}, separators=(",", ":"))
        data = (line + "\n").encode()
        with self._lock:
            try:
                write_durably(self.path, data, os.O_APPEND)  # never created here: see open()
            except OSError as e:
                raise AuditError(f"cannot write the audit log {self.path}: {e.strerror or e}") from None

    # -- what the Publisher calls ----------------------------------------------------------------

    def epoch_minted(self, assignment: Assignment, reason: str) -> None:
        """Blocking: the ``epoch`` line for ``assignment`` (called before its COMMIT)."""
        self.append(
            {
                "type": "epoch",
                "volume": assignment.name,
                "volume_id": assignment.volume_id,
                "epoch": assignment.epoch,
                "primary": assignment.primary,
                "copies": list(assignment.replicas),
                "in_sync": list(assignment.in_sync),
                "reason": reason,
            }
        )


# --- what a call's line says ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallArgs:
    """A call's arguments as the log shows them, and the secret values to cut out of messages."""

    args: dict[str, Any]
    redacted: tuple[str, ...]
    secrets: tuple[str, ...]


def call_args(match_info: Mapping[str, str], query: Mapping[str, str], body: bytes) -> CallArgs:
    """Split a request into loggable arguments and withheld ones (see :data:`PUBLIC_ARGS`)."""
    args: dict[str, Any] = dict(match_info)
    args.update({k: v for k, v in query.items() if k in PUBLIC_QUERY})
    redacted: list[str] = []
    secrets: list[str] = []
    try:
        data = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        if body:
            redacted.append("<body: not a JSON object>")
        return CallArgs(args, tuple(redacted), _secret_values(body.decode("utf-8", "replace")))
    for key, value in data.items():
        scalar = value is None or isinstance(value, bool | int | float | str)
        if key in PUBLIC_ARGS and scalar:
            args[key] = value
        else:
            redacted.append(key if _FIELD_NAME.fullmatch(key) else "<field>")
            secrets.extend(_secret_values(value))
    return CallArgs(args, tuple(redacted), tuple(secrets))


def _secret_values(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, dict):
        return tuple(s for v in value.values() for s in _secret_values(v)) + tuple(
            s for k in value for s in _secret_values(k)
        )
    if isinstance(value, list):
        return tuple(s for v in value for s in _secret_values(v))
    return ()


def scrub(message: str, secrets: tuple[str, ...]) -> str:
    """``message`` with every withheld value cut out, at most MAX_ERROR characters."""
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "<redacted>")
    return message[:MAX_ERROR]


def verb(method: str, route: str) -> str:
    return VERBS.get((method, route), f"{method} {route}")


def is_mutating(request: web.Request) -> str | None:
    """The canonical route of a mutating request to a route the API has (None: not audited)."""
    if request.method in READ_METHODS:
        return None
    resource = request.match_info.route.resource
    return None if resource is None else resource.canonical


# --- the middlewares -----------------------------------------------------------------------------

_CALL_KEY = web.RequestKey("sparrow.audit.call", str)
_SECRETS_KEY = web.RequestKey("sparrow.audit.secrets", tuple)


def audit_middlewares(audit: AuditLog) -> tuple[Middleware, Middleware]:
    """``(outer, inner)``: the app's middlewares must be ``[outer, errors, authenticate, inner]``.

    ``inner`` runs after authentication: it writes the ``call`` line before the handler (503 if
    it cannot). ``outer`` sees the final status (errors already turned into answers): it writes
    the ``result`` line, or, for a call refused by authentication, the one ``call`` line with its
    status."""

    @web.middleware
    async def inner(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = is_mutating(request)
        if route is None:
            return await handler(request)
        who = request[PRINCIPAL_KEY]
        call = await _call_line(request, route, who.token_id)
        call_id = uuid.uuid4().hex[:16]
        try:
            await asyncio.to_thread(audit.append, {**call.line, "id": call_id})
        except AuditError as e:
            log.error("audit log unwritable: call refused", error=str(e), verb=call.line["verb"])
            raise ApiError(503, f"{e}; the call was not made (nothing changed)") from None
        request[_CALL_KEY] = call_id
        request[_SECRETS_KEY] = call.secrets
        try:
            return await handler(request)
        except AuditError as e:  # an epoch the handler tried to mint (resize) was not audited
            raise ApiError(503, f"{e}; nothing changed") from None

    reads_body(inner)  # the guard's body timeout goes in front of it (sparrow.httplimits)

    @web.middleware
    async def outer(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        call_id = request.get(_CALL_KEY)
        route = is_mutating(request)
        try:
            if call_id is not None:
                error = _error_of(response, request.get(_SECRETS_KEY, ()))
                await asyncio.to_thread(
                    audit.append, {"type": "result", "id": call_id, "status": response.status, "error": error}
                )
            elif route is not None and response.status in (401, 403):
                who = request.get(PRINCIPAL_KEY)
                call = await _call_line(request, route, None if who is None else who.token_id)
                line = {**call.line, "id": uuid.uuid4().hex[:16], "status": response.status}
                line["error"] = _error_of(response, call.secrets)
                if who is None:
                    line["claimed"] = _claimed_token_id(request)
                await asyncio.to_thread(audit.append, line)
        except AuditError as e:
            log.error("audit log unwritable: outcome not recorded", error=str(e), path=request.path)
            return error_response(503, f"{e}; the call was recorded as made, its outcome was not")
        return response

    return outer, inner


@dataclass(frozen=True, slots=True)
class _Call:
    line: dict[str, Any]
    secrets: tuple[str, ...]


async def _call_line(request: web.Request, route: str, who: str | None) -> _Call:
    try:
        body = await request.read()
    except web.HTTPException:
        body = b""
    parsed = call_args(request.match_info, request.query, body)
    volume = parsed.args.get("name") if route.startswith("/v1/volumes") else None
    line: dict[str, Any] = {
        "type": "call",
        "who": who,
        "verb": verb(request.method, route),
        "method": request.method,
        "path": route,
        "volume": volume if isinstance(volume, str) else None,
        "args": parsed.args,
        "redacted": list(parsed.redacted),
    }
    return _Call(line, parsed.secrets)


def _error_of(response: web.StreamResponse, secrets: tuple[str, ...]) -> str | None:
    if response.status < 400 or not isinstance(response, web.Response):
        return None
    if not isinstance(response.body, bytes):
        return None
    try:
        message = json.loads(response.body).get("error")
    except (ValueError, AttributeError):
        return None
    return scrub(message, secrets) if isinstance(message, str) else None


def _claimed_token_id(request: web.Request) -> str | None:
    try:
        token_id, _ = tokens.parse(tokens.bearer_token(request.headers.get("Authorization")))
    except AuthError:
        return None
    return token_id


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record as ``sparrow audit`` shows it: a call joined with its result, or an epoch."""

    time: str
    type: str  # "call" | "epoch" | "restore"
    fields: dict[str, Any]

    @property
    def volume(self) -> str | None:
        volume = self.fields.get("volume")
        return volume if isinstance(volume, str) else None

    def json(self) -> dict[str, Any]:
        return {"time": self.time, "type": self.type, **self.fields}


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete JSON line of the log, in order (a torn or unreadable line is skipped)."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            try:
                line = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(line, dict) and isinstance(line.get("time"), str):
                yield line


def read_records(path: Path) -> list[AuditRecord]:
    """Calls (each joined with its result: ``status`` null when none was recorded) and epochs, in
    the order the calls were made and the epochs minted."""
    records: list[AuditRecord] = []
    calls: dict[str, dict[str, Any]] = {}
    for line in read_lines(path):
        kind = line.pop("type", None)
        when = line.pop("time")
        if kind == "call":
            line.setdefault("status", None)
            line.setdefault("error", None)
            records.append(AuditRecord(when, "call", line))
            if isinstance(line.get("id"), str):
                calls[line["id"]] = line
        elif kind == "result":
            call = calls.get(str(line.get("id")))
            if call is not None:
                call["status"] = line.get("status")
                call["error"] = line.get("error")
        elif kind in ("epoch", "restore"):
            records.append(AuditRecord(when, kind, line))
    return records


def parse_time(text: str, now: float) -> str:
    """``--since``: an ISO 8601 time (UTC unless it says otherwise) or a duration back from ``now``
    ("90s", "15m", "2h", "7d"); returns the ISO form the records are compared with."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return _iso(now - seconds)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: {text!r} is neither an ISO 8601 time nor a duration like 15m") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _iso(when.timestamp())


def select(records: list[AuditRecord], *, since: str | None, volume: str | None) -> list[AuditRecord]:
    return [
        r for r in records if (since is None or r.time >= since) and (volume is None or r.volume == volume)
    ]


def format_record(record: AuditRecord) -> str:
    """One line for people."""
    f = record.fields
    if record.type == "epoch":
        copies = ",".join(f.get("copies") or []) or "-"
        return (
            f"{record.time}  epoch  {f.get('volume')} epoch {f.get('epoch')} "
            f"primary {f.get('primary') or '-'} copies {copies}  ({f.get('reason') or ''})"
        )
    if record.type == "restore":
        return (
            f"{record.time}  restore  authority restored from {f.get('backup')} "
            f"({f.get('volumes')} volumes, highest epoch {f.get('max_epoch')})"
        )
    args = " ".join(f"{k}={json.dumps(v)}" for k, v in (f.get("args") or {}).items())
    redacted = f.get("redacted") or []
    if redacted:
        args += f" [withheld: {','.join(redacted)}]"
    status = "?" if f.get("status") is None else str(f["status"])
    who = f.get("who") or f"anonymous(claimed {f.get('claimed') or '-'})"
    error = f"  error: {f['error']}" if f.get("error") else ""
    return f"{record.time}  {status:>3}  {who}  {f.get('verb')} {args}{error}"
