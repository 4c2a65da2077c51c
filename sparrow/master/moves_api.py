"""The operator verbs on the master's API (issue 8; the rules: sparrow.cluster.moves).

    POST /v1/volumes/{name}/failover  {to?}      planned failover          -> 200 volume (409: why not)
    POST /v1/volumes/{name}/rebuild   {replica}  copy a replica afresh     -> 200 volume (409: why not)
    POST /v1/nodes/{node_id}/drain               move everything off it    -> 200 node (404: unknown)
    POST /v1/nodes/{node_id}/undrain             take new copies again     -> 200 node

Each is an operator's request to the control loop (``ControlLoop.moves``), checked at once (409
with the one-line reason when it cannot be done now) and turned into an ordinary ask at the loop's
next step, which the Publisher mints an epoch for: nothing here publishes. ``failover`` and
``rebuild`` answer once their first ask is published (or with 409 if the loop gave it up meanwhile,
``MoveRefused``), at most :data:`PUBLISH_TIMEOUT` seconds later (202 then: still queued).
``failover?wait=SECONDS`` waits on until the new primary serves. ``drain`` and ``undrain`` are
recorded in the authority (schema v6) before they answer; the loop reads them at its next step.

Authorization (sparrow.master.auth.ROUTE_ACTIONS): the volume verbs need ``volume.write``
(operator or admin; a tenant token only on its own volumes), drain and undrain ``node.drain``
(operator or admin, no tenant token: nodes are shared).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from sparrow.cluster.authority import NodeRecord, UnknownNode
from sparrow.cluster.messages import Assignment
from sparrow.cluster.moves import FailoverRequest, MoveRefused, RebuildRequest
from sparrow.httpjson import ApiError, json_object, string_field
from sparrow.master.api import API_KEY, MasterApi, _find, _wait_seconds, served, volume_json

log = structlog.get_logger("sparrow.master.moves")

#: Seconds a failover or rebuild request waits for the control loop to publish its first ask.
PUBLISH_TIMEOUT = 10.0


def add_move_routes(app: web.Application) -> None:
    app.router.add_post("/v1/volumes/{name}/failover", failover_volume)
    app.router.add_post("/v1/volumes/{name}/rebuild", rebuild_volume)
    app.router.add_post("/v1/nodes/{node_id}/drain", drain_node)
    app.router.add_post("/v1/nodes/{node_id}/undrain", undrain_node)


def _assignment(api: MasterApi, volume_id: str, name: str) -> Assignment:
    assignment = api.control.current(volume_id)
    if assignment is None:
        raise ApiError(409, f"volume {name} is not placed yet")
    return assignment


async def _published(
    api: MasterApi,
    volume_id: str,
    request: FailoverRequest | RebuildRequest,
    done: Callable[[Assignment], bool],
) -> bool:
    """Wait until ``done(current assignment)`` (True), or raise 409 if the loop gave the request up;
    False after :data:`PUBLISH_TIMEOUT`."""
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            while True:
                current = api.control.current(volume_id)
                if current is not None and current.epoch > request.epoch and done(current):
                    return True
                refused = api.control.moves.refused.get(volume_id)
                if refused is not None and api.control.moves.pending(volume_id) is None:
                    raise ApiError(409, refused)
                await asyncio.sleep(api.poll_interval)
    except TimeoutError:
        return False


async def failover_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    body = await json_object(request, frozenset({"to"}))
    to = string_field(body, "to")
    wait = _wait_seconds(request)
    record = await _find(api, request.match_info["name"])
    control = api.control
    assignment = _assignment(api, record.volume_id, record.name)
    try:
        move = control.moves.request_failover(
            assignment, control.observations, api.clock(), to, control.draining
        )
    except MoveRefused as e:
        raise ApiError(409, str(e)) from None
    log.info("planned failover asked", volume=record.name, epoch=move.epoch, target=move.target)
    published = await _published(api, record.volume_id, move, lambda a: a.primary == move.target)
    if published and wait > 0:
        await served(api, record.volume_id, wait)
    return web.json_response(volume_json(api, record), status=200 if published else 202)


async def rebuild_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    body = await json_object(request, frozenset({"replica"}))
    node = string_field(body, "replica", required=True)
    assert node is not None
    record = await _find(api, request.match_info["name"])
    assignment = _assignment(api, record.volume_id, record.name)
    try:
        move = api.control.moves.request_rebuild(assignment, node, api.clock())
    except MoveRefused as e:
        raise ApiError(409, str(e)) from None
    log.info("rebuild asked", volume=record.name, epoch=move.epoch, replica=node)
    published = await _published(api, record.volume_id, move, lambda a: node not in a.replicas)
    return web.json_response(volume_json(api, record), status=200 if published else 202)


async def drain_node(request: web.Request) -> web.Response:
    return await _set_draining(request, True)


async def undrain_node(request: web.Request) -> web.Response:
    return await _set_draining(request, False)


async def _set_draining(request: web.Request, draining: bool) -> web.Response:
    api = request.app[API_KEY]
    node_id = request.match_info["node_id"]
    try:
        record = await asyncio.to_thread(api.control.store.set_draining, node_id, draining)
    except UnknownNode:
        raise ApiError(404, f"no node {node_id!r}") from None
    api.control.draining = api.control.draining | {node_id} if draining else api.control.draining - {node_id}
    log.info("node drain" if draining else "node undrain", node=node_id)
    return web.json_response(drain_json(api, record))


def drain_json(api: MasterApi, record: NodeRecord) -> dict[str, Any]:
    """What drain and undrain answer: the node, whether it is draining, and what the drain does."""
    return {
        "node_id": record.node_id,
        "draining": record.draining,
        "drain_status": drain_status(api, record.node_id, record.draining),
    }


def drain_status(api: MasterApi, node_id: str, draining: bool) -> str | None:
    """What the drain of ``node_id`` is doing or waiting for (None: not draining); before the
    control loop's first step after the drain began: "starting"."""
    if not draining:
        return None
    return api.control.moves.drain_status.get(node_id) or "starting"
