"""The operator's hand on node identity (docs/cluster.md, "Node identity"; docs/operations.md,
"Replacing a node's disk").

    POST /v1/nodes/{node_id}/rekey  {key?: 64 hex digits}                    -> 200 {node_id, node_key}

Rebinds the node id: to ``key`` (pinned: only that key is admitted, with no trust-on-first-use
window), or, without one, to none (the node's next Hello binds its key on first use). Refused with
409 while the node is alive (a live node keeps its identity; stop it first), 404 for a node the
master does not know or has forgotten, 400 for a key that is not an Ed25519 public key. Recorded in
the authority (``AuthorityStore.set_node_key``) before the master's bindings change and before it
answers; admin only (``node.write``, sparrow.master.auth), audited as ``node.rekey`` (the key is
public and logged).
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from sparrow.cluster.authority import UnknownNode
from sparrow.cluster.nodeidentity import key_text, parse_key_text
from sparrow.httpjson import ApiError, json_object, string_field
from sparrow.master.api import API_KEY

log = structlog.get_logger("sparrow.master.nodekeys")


def add_node_key_routes(app: web.Application) -> None:
    app.router.add_post("/v1/nodes/{node_id}/rekey", rekey_node)


async def rekey_node(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    node_id = request.match_info["node_id"]
    body = await json_object(request, frozenset({"key"}))
    text = string_field(body, "key")
    try:
        key = None if text is None else parse_key_text(text)
    except ValueError as e:
        raise ApiError(400, f"key: {e}") from None
    if api.control.observations.alive(node_id, api.clock()):
        raise ApiError(409, f"node {node_id!r} is alive; stop it (and wait until it is dead) first")
    try:
        await asyncio.to_thread(api.control.store.set_node_key, node_id, key)
    except UnknownNode:
        raise ApiError(404, f"no node {node_id!r}") from None
    if api.node_keys is not None:
        api.node_keys.rebind(node_id, key)
    shown = None if key is None else key_text(key)
    log.warning("node rekeyed", node=node_id, node_key=shown, pinned=key is not None)
    return web.json_response({"node_id": node_id, "node_key": shown})
