"""The operator's hand on node identity (docs/cluster.md, "Node identity", "Node admission";
docs/operations.md, "Adding a node", "Replacing a node's disk").

    POST /v1/nodes/{node_id}/rekey    {key?: 64 hex digits}                  -> 200 {node_id, node_key}
    POST /v1/nodes/{node_id}/approve  {key?: 64 hex digits}   -> 200 {node_id, node_key, admission}

Rebinds the node id: to ``key`` (pinned: only that key is admitted, with no trust-on-first-use
window), or, without one, to none (the node's next Hello binds its key on first use). Refused with
409 while the node is alive (a live node keeps its identity; stop it first), 404 for a node the
master does not know or has forgotten, 400 for a key that is not an Ed25519 public key. Recorded in
the authority (``AuthorityStore.set_node_key``) before the master's bindings change and before it
answers; admin only (``node.write``, sparrow.master.auth), audited as ``node.rekey`` (the key is
public and logged). A rekey to a key approves that key (the operator named it); a rekey to none
drops the node's approval: its next Hello is pending until approved.

Approve makes a node a member (placement target): without ``key``, the key the pending node
proved (404 when no key is bound to the node id: it has not said Hello; name the key); with
``key``, that key, ahead of the node's first Hello or instead of the key a pending node proved (the
node id is rebound to it: a connection that proved another key is closed at its next heartbeat).
Approving the key already approved is a no-op (200); another key for an approved node is refused
(409: that is a rekey, of a stopped node). Recorded in the authority (``approve_node``) before the
master's approvals change and before it answers; admin only (``node.write``), audited as
``node.approve``.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from sparrow.cluster.authority import UnknownNode
from sparrow.cluster.messages import InvalidMessage, check_node_id
from sparrow.cluster.nodeidentity import Admission, key_text, parse_key_text
from sparrow.httpjson import ApiError, json_object, string_field
from sparrow.master.api import API_KEY

log = structlog.get_logger("sparrow.master.nodekeys")


def add_node_key_routes(app: web.Application) -> None:
    app.router.add_post("/v1/nodes/{node_id}/rekey", rekey_node)
    app.router.add_post("/v1/nodes/{node_id}/approve", approve_node)


async def approve_node(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    node_id = request.match_info["node_id"]
    try:
        check_node_id("node_id", node_id)
    except InvalidMessage as e:
        raise ApiError(400, str(e)) from None
    key = await _asked_key(request)
    node_keys = api.control.node_keys
    bound = node_keys.key(node_id)
    if key is None:
        if bound is None:
            raise ApiError(
                404,
                f"no node {node_id!r} has said Hello; to approve it ahead, name its key with --key "
                "(the node logs it at start as `node key`)",
            )
        key = bound
    if node_keys.admission(node_id) is Admission.APPROVED and bound != key:
        raise ApiError(
            409,
            f"node {node_id!r} is approved with key {key_text(bound or b'')}; to change its key, stop it "
            f"and run `sparrow node rekey {node_id} --key {key_text(key)}`",
        )
    await asyncio.to_thread(api.control.store.approve_node, node_id, key, approved_at=api.wall_clock())
    replaced = bound is not None and bound != key
    node_keys.approve(node_id, key)
    log.warning(
        "node approved",
        node=node_id,
        node_key=key_text(key),
        replaced=None if not replaced else key_text(bound or b""),
    )
    return web.json_response(
        {"node_id": node_id, "node_key": key_text(key), "admission": Admission.APPROVED.value}
    )


async def rekey_node(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    node_id = request.match_info["node_id"]
    key = await _asked_key(request)
    if api.control.observations.alive(node_id, api.clock()):
        raise ApiError(409, f"node {node_id!r} is alive; stop it (and wait until it is dead) first")
    try:
        await asyncio.to_thread(api.control.store.set_node_key, node_id, key)
    except UnknownNode:
        raise ApiError(404, f"no node {node_id!r}") from None
    api.control.node_keys.rebind(node_id, key)
    shown = None if key is None else key_text(key)
    log.warning("node rekeyed", node=node_id, node_key=shown, pinned=key is not None)
    return web.json_response({"node_id": node_id, "node_key": shown})


async def _asked_key(request: web.Request) -> bytes | None:
    """The body's optional ``key`` (64 hex digits) of approve and rekey; 400 when it is not one."""
    text = string_field(await json_object(request, frozenset({"key"})), "key")
    try:
        return None if text is None else parse_key_text(text)
    except ValueError as e:
        raise ApiError(400, f"key: {e}") from None
