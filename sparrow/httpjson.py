"""The JSON conventions of Sparrow's HTTP APIs (the master's, which `sparrow serve` serves too).

Request bodies are JSON objects with a fixed set of fields; every failure is answered as
``{"error": "<one line>"}`` with its HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from sparrow.sizes import SizeError, parse_size

log = structlog.get_logger("sparrow.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request error that carries its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def json_object(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The request body: a JSON object with no field outside ``allowed``."""
    raw = await request.read()
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return data


def string_field(body: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"missing field {key!r}")
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{key} must be a non-empty string")
    return value


def size_field(body: Mapping[str, Any], *, required: bool) -> int | None:
    """``size``: bytes, or a string such as "64MiB" (sparrow.sizes)."""
    value = body.get("size")
    if value is None:
        if required:
            raise ApiError(400, "missing field 'size' (bytes, or a string such as \"64MiB\")")
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ApiError(400, 'size must be an integer number of bytes or a string such as "64MiB"')
    try:
        return parse_size(value)
    except SizeError as e:
        raise ApiError(400, str(e)) from None


@dataclass(frozen=True, slots=True)
class ChapFields:
    """The CHAP fields of a create request, with both halves of each pair present."""

    user: str
    secret: str
    mutual_user: str | None
    mutual_secret: str | None


def chap_fields(body: Mapping[str, Any]) -> ChapFields | None:
    """chap_user/chap_secret (one-way) and chap_mutual_user/chap_mutual_secret (mutual, only with
    one-way): each pair both or neither (RFC 7143 12.1.3)."""
    user = string_field(body, "chap_user")
    secret = string_field(body, "chap_secret")
    mutual_user = string_field(body, "chap_mutual_user")
    mutual_secret = string_field(body, "chap_mutual_secret")
    if (user is None) != (secret is None):
        raise ApiError(400, "CHAP needs both chap_user and chap_secret")
    if (mutual_user is None) != (mutual_secret is None):
        raise ApiError(400, "mutual CHAP needs both chap_mutual_user and chap_mutual_secret")
    if user is None or secret is None:
        if mutual_user is not None:
            raise ApiError(400, "mutual CHAP needs one-way CHAP too (chap_user and chap_secret)")
        return None
    return ChapFields(user, secret, mutual_user, mutual_secret)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def errors_middleware(
    domain: type[Exception], statuses: tuple[tuple[type[Exception], int], ...], what: str
) -> Middleware:
    """A middleware answering every failure as ``{"error": ...}``: ApiError with its status, a
    ``domain`` error with the status of its class in ``statuses`` (else 500, logged as ``what``),
    aiohttp's own errors with a readable message, and a bug with 500 and its traceback logged."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e.status, str(e))
        except domain as e:
            for cls, status in statuses:
                if isinstance(e, cls):
                    return error_response(status, str(e))
            log.error(what, method=request.method, path=request.path, error=str(e))
            return error_response(500, str(e))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = e.reason if e.status != 404 else f"no such endpoint: {request.method} {request.path}"
            if e.status == 405:
                message = f"method {request.method} not allowed on {request.path}"
            if e.status == 413:
                message = "request body too large"
            return error_response(e.status, message)
        except Exception as e:
            log.exception("API handler failed", method=request.method, path=request.path)
            return error_response(500, f"internal error: {type(e).__name__}: {e}")

    return errors
