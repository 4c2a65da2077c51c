"""Bearer-token authentication of the master's HTTP API (``sparrow master`` and ``sparrow serve``).

Every request except ``/healthz`` and ``/openapi.json`` (:data:`PUBLIC_PATHS`) must carry
``Authorization: Bearer <token>`` (sparrow.auth.tokens). ``GET /metrics`` takes the scrape token
too (sparrow.metricsauth: its :class:`~sparrow.metricsauth.MetricsDoor` says, counts its 401s,
and opens to anyone under ``--public-metrics``), else an API token with no tenant (a tenant
token: 403, the metrics name every tenant's volumes). ``GET /healthz`` answers anyone, without
names (sparrow.health.public_health); a request that sends a credential asks for the full answer
and is judged by the same rules as ``/metrics`` (:data:`METRICS_DOOR_PATHS`; admitted, it carries
``request[FULL_HEALTH_KEY]``). :func:`auth_middleware` answers

- 401 with ``WWW-Authenticate: Bearer`` for a missing, malformed, unknown or revoked token;
- 403 when the token's role or tenant does not allow the route (:data:`ROUTE_ACTIONS`: method and
  route -> the action it needs; a route missing from the table needs ``admin`` and no tenant);

before the handler runs, so nothing changes on a 401 or 403. Otherwise the request carries its
:class:`~sparrow.auth.tokens.Principal` under :data:`PRINCIPAL_KEY` (``request[PRINCIPAL_KEY]``;
:func:`principal` reads it). A route with ``{name}`` is checked against the token's tenant here;
a handler that learns a volume name from the body, or lists volumes, applies the tenant rule itself
(:func:`require`, ``sparrow.auth.tokens.can_see``).

Token routes (admin, no tenant)::

    POST   /v1/tokens       {role, tenant?, name?}  -> 201 {id, token (shown once), role, tenant, name,
                                                           created_at, revoked_at}
    GET    /v1/tokens                               -> 200 {"tokens": [{id, role, tenant, name, created_at}]}
    DELETE /v1/tokens/{id}                          -> 204 (it stops working at once; 404: no such token)

Bootstrap (:func:`bootstrap_admin`): on a master's first start, when the authority has never held
a token, an admin token is minted and written to the credentials file of the user running the
daemon (sparrow.auth.credentials), keyed by the URL of the bound API, so the CLI of the same user
finds it by itself. Lost it? Stop the daemon and run ``sparrow token create --data-dir DIR --role
admin`` (it takes the data directory's lock and prints a new token).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from sparrow.auth import tokens
from sparrow.auth.credentials import CredentialsError, credentials_path, http_url, store_token
from sparrow.auth.tokens import Action, AuthError, Principal, TokenRecord
from sparrow.cluster.authority import AuthorityStore
from sparrow.config import HostPort
from sparrow.httpjson import ApiError, Handler, error_response, json_object, string_field
from sparrow.lifecycle import StartupError
from sparrow.metricsauth import FULL_HEALTH, SCRAPE_TOKEN_ROUTE, MetricsDoor

log = structlog.get_logger("sparrow.master.auth")

#: Paths anyone may GET (health, and the API's OpenAPI document): no token needed (/healthz then
#: names nothing; a credential sent to it is judged: :data:`METRICS_DOOR_PATHS`).
HEALTH_PATH = "/healthz"
PUBLIC_PATHS = frozenset({HEALTH_PATH, "/openapi.json"})
#: The path the scrape token also opens (sparrow.metricsauth).
METRICS_PATH = "/metrics"
#: The routes behind the /metrics door (sparrow.metricsauth): the scrape token, or an API token
#: that may do their action (``metrics.read``: no tenant). /healthz only when a credential is sent.
METRICS_DOOR_PATHS = frozenset({METRICS_PATH, HEALTH_PATH})

#: (method, route) -> the action it needs. Add a row with every new route (a route missing here
#: needs an admin token with no tenant).
ROUTE_ACTIONS: dict[tuple[str, str], Action] = {
    ("GET", "/v1/volumes"): Action.VOLUME_READ,
    ("POST", "/v1/volumes"): Action.VOLUME_WRITE,
    ("GET", "/v1/volumes/{name}"): Action.VOLUME_READ,
    ("GET", "/v1/volumes/{name}/explain"): Action.VOLUME_READ,
    ("DELETE", "/v1/volumes/{name}"): Action.VOLUME_WRITE,
    ("POST", "/v1/volumes/{name}/resize"): Action.VOLUME_WRITE,
    ("GET", "/v1/nodes"): Action.NODE_READ,
    ("DELETE", "/v1/nodes/{node_id}"): Action.NODE_WRITE,
    ("POST", "/v1/nodes/{node_id}/rekey"): Action.NODE_WRITE,
    ("POST", "/v1/nodes/{node_id}/approve"): Action.NODE_WRITE,
    ("POST", "/v1/volumes/{name}/failover"): Action.VOLUME_WRITE,
    ("POST", "/v1/volumes/{name}/rebuild"): Action.VOLUME_WRITE,
    ("POST", "/v1/nodes/{node_id}/drain"): Action.NODE_DRAIN,
    ("POST", "/v1/nodes/{node_id}/undrain"): Action.NODE_DRAIN,
    ("POST", "/v1/volumes/{name}/pause"): Action.VOLUME_WRITE,
    ("POST", "/v1/volumes/{name}/resume"): Action.VOLUME_WRITE,
    ("PATCH", "/v1/volumes/{name}"): Action.VOLUME_WRITE,
    ("GET", "/v1/cluster"): Action.NODE_READ,
    ("PATCH", "/v1/cluster"): Action.NODE_WRITE,
    ("GET", "/v1/tokens"): Action.TOKEN_MANAGE,
    ("POST", "/v1/tokens"): Action.TOKEN_MANAGE,
    ("DELETE", "/v1/tokens/{id}"): Action.TOKEN_MANAGE,
    ("GET", METRICS_PATH): Action.METRICS_READ,
    # Public, but its full answer (asked for by sending a credential) names volumes like /metrics.
    ("GET", HEALTH_PATH): Action.METRICS_READ,
    # Admin only: a scrape token outlives the revoked API token that asked for it.
    ("GET", SCRAPE_TOKEN_ROUTE): Action.ADMIN,
}

PRINCIPAL_KEY = web.RequestKey("sparrow.principal", Principal)
#: Set (True) on a /healthz request whose credential opened the /metrics door: the full answer.
FULL_HEALTH_KEY = web.RequestKey("sparrow.full_health", bool)


@dataclass(frozen=True, slots=True)
class AuthContext:
    store: AuthorityStore
    wall_clock: Callable[[], float] = time.time


AUTH_KEY = web.AppKey("sparrow.auth", AuthContext)


def principal(request: web.Request) -> Principal:
    """Who sent ``request`` (set by :func:`auth_middleware`)."""
    return request[PRINCIPAL_KEY]


def require(request: web.Request, action: Action, volume_name: str | None = None) -> None:
    """Raise ApiError(403) unless the request's token may do ``action`` (on ``volume_name``)."""
    try:
        tokens.authorize(principal(request), action, volume_name)
    except AuthError as e:
        raise ApiError(e.status, str(e)) from None


def unauthorized(message: str) -> web.Response:
    response = error_response(401, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="sparrow"'
    return response


def auth_middleware(store: AuthorityStore, door: MetricsDoor | None = None) -> Middleware:
    """``door``: the /metrics door (None: no scrape token; API tokens only, counted nowhere)."""
    metrics_door = door if door is not None else MetricsDoor(None)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        canonical = route.resource.canonical if route.resource is not None else None
        read = request.method in ("GET", "HEAD")
        authorization = request.headers.get("Authorization")
        health = canonical == HEALTH_PATH and read
        if canonical in PUBLIC_PATHS and read and not (health and metrics_door.asks_in_full(authorization)):
            return await handler(request)
        scrape = canonical in METRICS_DOOR_PATHS and read
        what = FULL_HEALTH if health else METRICS_PATH
        if health:
            request[FULL_HEALTH_KEY] = True  # the handler runs only if the door opens below
        if scrape and metrics_door.admits(authorization):
            return await handler(request)
        try:
            token_id, secret = tokens.parse(tokens.bearer_token(authorization))
            record = await asyncio.to_thread(store.token, token_id)
            who = tokens.verify(record, secret)
        except AuthError as e:
            return metrics_door.refuse(authorization, what) if scrape else unauthorized(str(e))
        request[PRINCIPAL_KEY] = who  # set before the route check: the audit names who was refused
        if canonical is not None:  # else no such endpoint: the handler answers 404/405
            method = "GET" if request.method == "HEAD" else request.method
            action = ROUTE_ACTIONS.get((method, canonical), Action.ADMIN)
            try:
                tokens.authorize(who, action, request.match_info.get("name"))
            except AuthError as e:
                log.info("request refused", token_id=who.token_id, method=request.method, path=request.path)
                return error_response(e.status, str(e))
        return await handler(request)

    return authenticate


def add_token_routes(app: web.Application, context: AuthContext) -> None:
    app[AUTH_KEY] = context
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_get("/v1/tokens", list_tokens)
    app.router.add_delete("/v1/tokens/{id}", revoke_token)


def token_json(record: TokenRecord) -> dict[str, Any]:
    """A token as the API shows it: never its secret nor the secret's hash."""
    return {
        "id": record.token_id,
        "role": record.role.value,
        "tenant": record.tenant,
        "name": record.name,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
    }


async def create_token(request: web.Request) -> web.Response:
    context = request.app[AUTH_KEY]
    body = await json_object(request, frozenset({"role", "tenant", "name"}))
    role = string_field(body, "role", required=True)
    try:
        new = tokens.mint(
            role, tenant=body.get("tenant"), name=body.get("name"), created_at=context.wall_clock()
        )
    except tokens.InvalidToken as e:
        raise ApiError(400, str(e)) from None
    await asyncio.to_thread(context.store.add_token, new.record)
    log.info(
        "token created",
        token_id=new.record.token_id,
        role=new.record.role.value,
        tenant=new.record.tenant,
        by=principal(request).token_id,
    )
    return web.json_response({**token_json(new.record), "token": new.plaintext}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    store = request.app[AUTH_KEY].store
    records = await asyncio.to_thread(store.tokens)
    return web.json_response({"tokens": [token_json(r) for r in records]})


async def revoke_token(request: web.Request) -> web.Response:
    context = request.app[AUTH_KEY]
    token_id = request.match_info["id"]
    if not tokens.TOKEN_ID_PATTERN.fullmatch(token_id):
        raise ApiError(404, f"no token {token_id!r}")
    await asyncio.to_thread(context.store.revoke_token, token_id, revoked_at=context.wall_clock())
    log.info("token revoked", token_id=token_id, by=principal(request).token_id)
    return web.Response(status=204)


# --- bootstrap ---------------------------------------------------------------------------------


def bootstrap_admin(store: AuthorityStore, http: HostPort, *, path: Path | None = None) -> Path | None:
    """On a first start (the authority has never held a token): mint an admin token and write it
    into the credentials file (``path``, default sparrow.auth.credentials.credentials_path()), keyed
    by the API URL of ``http``; the file first, then the hash, so a token is never recorded that
    nobody holds. Returns the file written (None: tokens exist). Raises CredentialsError."""
    if store.has_tokens():
        return None
    path = credentials_path() if path is None else path
    new = tokens.mint(tokens.Role.ADMIN, name="bootstrap", created_at=time.time())
    url = http_url(http.host, http.port)
    store_token(path, url, {"token": new.plaintext, "token_id": new.record.token_id, "role": "admin"})
    store.add_token(new.record)
    log.info("bootstrap admin token written", token_id=new.record.token_id, credentials=str(path), api=url)
    return path


async def bootstrap(store: AuthorityStore, http: HostPort) -> None:
    """:func:`bootstrap_admin` off the event loop; a failure is a one-line startup error."""
    try:
        await asyncio.to_thread(bootstrap_admin, store, http)
    except CredentialsError as e:
        raise StartupError(
            f"cannot write the bootstrap admin token: {e} (set SPARROW_CREDENTIALS to a writable file)"
        ) from None


__all__ = [
    "AUTH_KEY",
    "FULL_HEALTH_KEY",
    "HEALTH_PATH",
    "METRICS_DOOR_PATHS",
    "METRICS_PATH",
    "PRINCIPAL_KEY",
    "PUBLIC_PATHS",
    "ROUTE_ACTIONS",
    "AuthContext",
    "add_token_routes",
    "auth_middleware",
    "bootstrap",
    "bootstrap_admin",
    "principal",
    "require",
]
