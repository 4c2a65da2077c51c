"""Opt-in validation of the master API's traffic against its OpenAPI document (sparrow.master.openapi).

With ``SPARROW_OPENAPI_VALIDATE=1`` (or the path of another document) in its environment, a
master (``sparrow master``, ``sparrow serve``, or an app built in a test) puts
:func:`validation_middleware` outermost, so it sees each request and the answer actually sent
(after the errors, auth and audit middlewares). The test harness sets the variable for every
daemon it starts (tests/integration/process.py) and for the test process itself
(tests/conftest.py): every answer the test suite receives is checked.

For each request to a route the app has (not HEAD; the router's own 404/405 are left alone):

- the answer must be one the document describes for that operation and status (openapi-core
  response validation: status, content type, body schema; the schemas are closed, so an
  undocumented field is a violation too);
- a request the document says is invalid (body, parameters, bearer token) must not succeed: an
  answer below 400 to it is a violation. (A valid request may still be refused: the document
  cannot say everything the API checks, such as a size larger than any node.)

The check runs in a worker thread (it adds about 4 ms to an answer of one volume or a list of
ten on this machine: ``bench/openapi_check.py``), before the answer is sent, so a
violation is in the log before the client has its answer. A violation is logged as an error
(event :data:`VIOLATION_EVENT`; the integration fixtures fail a test whose daemon logged one) and
counted in this process (:func:`count`; tests/conftest.py fails the test). It is described
without values (only the field's path and the rule it broke, and the names of unexpected or
missing fields): a request or answer may carry a secret. The answer itself is sent unchanged.

openapi-core is a test dependency only: it is imported here when validation is turned on, never
otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from sparrow.httpjson import Handler

log = structlog.get_logger("sparrow.master.openapi")

#: The environment variable that turns validation on ("1").
VALIDATE_ENV = "SPARROW_OPENAPI_VALIDATE"
#: The log event of a violation (the integration fixtures look for it).
VIOLATION_EVENT = "openapi violation"
#: Logged once when the checker is put in place.
CHECKING_EVENT = "checking API traffic against the OpenAPI document"
#: jsonschema keywords whose message names fields only (never a value).
_NAMES_ONLY = frozenset({"additionalProperties", "required"})

_COUNT = 0


def count() -> int:
    """Violations found in this process so far (the test suite's check)."""
    return _COUNT


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(VALIDATE_ENV, "0") not in ("", "0")


def document_to_check(served: bytes, environ: Mapping[str, str] = os.environ) -> bytes:
    """What to check against: the served document (``1``), or the file the variable names (a test
    of the checker gives it a document that leaves something out)."""
    value = environ.get(VALIDATE_ENV, "")
    return served if value == "1" else Path(value).read_bytes()


def validation_middleware(document: bytes) -> Middleware:
    """The middleware checking traffic against ``document`` (an OpenAPI document's bytes)."""
    validator = OpenApiValidator(json.loads(document))
    log.info(CHECKING_EVENT, variable=VALIDATE_ENV)

    @web.middleware
    async def validate(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "HEAD" or request.match_info.http_exception is not None:
            return response
        body = await request.read() if response.status < 400 and request.body_exists else None
        try:  # jsonschema is slow (ms for a list of volumes): not on the event loop
            problems = await asyncio.to_thread(validator.problems, request, body, response)
        except Exception as e:  # the checker's own failure must not pass for a clean answer
            log.exception("openapi checker failed", path=request.path)
            problems = [f"the checker failed: {type(e).__name__}"]
        for problem in problems:
            _violation(request, response, problem)
        return response

    return validate


class OpenApiValidator:
    """openapi-core's validators for one document."""

    def __init__(self, document: dict[str, Any]) -> None:
        from openapi_core import OpenAPI  # a test dependency: only when validation is on

        self._openapi = OpenAPI.from_dict(document)

    def problems(self, request: web.Request, body: bytes | None, response: web.StreamResponse) -> list[str]:
        """What is wrong with this exchange (see the module docstring); empty when nothing is."""
        from openapi_core.contrib.aiohttp import AIOHTTPOpenAPIWebRequest, AIOHTTPOpenAPIWebResponse

        if not isinstance(response, web.Response):
            return [f"a streamed answer ({type(response).__name__}) cannot be checked"]
        wrapped = AIOHTTPOpenAPIWebRequest(request, body=body)
        out = []
        if response.status < 400:
            try:
                self._openapi.validate_request(wrapped)
            except Exception as e:
                out.append(f"answered {response.status} to a request the document refuses: {describe(e)}")
        try:
            self._openapi.validate_response(wrapped, AIOHTTPOpenAPIWebResponse(response))
        except Exception as e:
            out.append(f"answer {response.status} not in the document: {describe(e)}")
        return out


def describe(error: BaseException) -> str:
    """An openapi-core error in words that carry no value from the request or answer."""
    cause = error.__cause__
    schema_errors = getattr(cause, "schema_errors", None) or getattr(error, "schema_errors", None)
    if schema_errors is None:
        if getattr(cause, "value", None) is not None or getattr(error, "value", None) is not None:
            return type(error).__name__  # its message would quote the value
        return f"{type(error).__name__}: {error}"
    details = []
    for e in schema_errors:
        rule = e.message if e.validator in _NAMES_ONLY else f"fails {e.validator}={e.validator_value!r}"
        details.append(f"{e.json_path}: {rule}")
    return f"{type(error).__name__}: {'; '.join(details)}"


def _violation(request: web.Request, response: web.StreamResponse, problem: str) -> None:
    global _COUNT
    _COUNT += 1
    route = request.match_info.route.resource
    log.error(
        VIOLATION_EVENT,
        method=request.method,
        path=request.path,
        route=None if route is None else route.canonical,
        status=response.status,
        problem=problem,
    )


__all__ = ["VALIDATE_ENV", "VIOLATION_EVENT", "OpenApiValidator", "count", "enabled", "validation_middleware"]
