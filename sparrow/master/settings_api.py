"""The cluster's settings on the master's API (docs/cluster.md, "Discovery CHAP").

    GET   /v1/cluster                                                   -> 200 settings
    PATCH /v1/cluster  {discovery_chap_user, discovery_chap_secret,
                        discovery_chap_mutual_user?, discovery_chap_mutual_secret?}
                       | {discovery_chap: null}   (discovery CHAP on or changed | off) -> 200 settings

Settings: ``{"discovery_chap": {"user", "mutual_user"} | null}`` (secrets never returned).

The discovery CHAP is the master's, like every other piece of cluster state: recorded in the
authority (``cluster_settings``, schema v7) before the answer, carried by every Ack from then on
(ack v7), applied by each node to the next discovery (SendTargets) login; sessions already logged
in are kept. ``sparrow serve`` records its TOML ``[iscsi.discovery_chap]`` once, when the authority
never held a value (sparrow.embedded.seed_discovery_chap); then this route changes it. A node
restarted answers discovery as it was started (no CHAP for ``sparrow node``) until its first Ack
(one heartbeat). Reading needs ``node.read``, changing ``node.write`` (admin; no tenant token: the
setting is the whole cluster's).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import structlog
from aiohttp import web

from sparrow.cluster.messages import VolumeChap
from sparrow.httpjson import ApiError, json_object
from sparrow.master.api import API_KEY, MasterApi, _chap

log = structlog.get_logger("sparrow.master.settings")

_PREFIX = "discovery_"
_CHAP_FIELDS = frozenset(
    {
        "discovery_chap_user",
        "discovery_chap_secret",
        "discovery_chap_mutual_user",
        "discovery_chap_mutual_secret",
    }
)


def add_settings_routes(app: web.Application) -> None:
    app.router.add_get("/v1/cluster", get_settings)
    app.router.add_patch("/v1/cluster", update_settings)


def settings_json(api: MasterApi) -> dict[str, Any]:
    chap = api.control.discovery_chap
    return {"discovery_chap": None if chap is None else {"user": chap.user, "mutual_user": chap.mutual_user}}


async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(settings_json(request.app[API_KEY]))


async def update_settings(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    body = await json_object(request, _CHAP_FIELDS | {"discovery_chap"})
    chap: VolumeChap | None
    if "discovery_chap" in body:
        if body["discovery_chap"] is not None or _CHAP_FIELDS & body.keys():
            raise ApiError(400, "discovery_chap: only null (off), and alone")
        chap = None
    else:
        try:
            chap = _chap({k[len(_PREFIX) :]: v for k, v in body.items()})
        except ApiError as e:
            # The create body's names (chap_user ...) as this body spells them (discovery_chap_user).
            raise ApiError(e.status, re.sub(r"\bchap_", _PREFIX + "chap_", str(e))) from None
        if chap is None:
            raise ApiError(
                400, "discovery_chap_user and discovery_chap_secret are needed (or discovery_chap: null)"
            )
    if chap != api.control.discovery_chap:
        await asyncio.to_thread(api.control.store.set_discovery_chap, chap)
        api.control.discovery_chap = chap
        mutual = chap is not None and chap.mutual_user is not None
        log.info("discovery CHAP updated", chap=chap is not None, mutual=mutual)
    return web.json_response(settings_json(api))
