"""Volume verbs of the master's API that change a volume in place (issue 10; docs/cluster.md,
"Pause and resume", "Updating export settings").

    POST  /v1/volumes/{name}/pause   ?wait=SECONDS                      -> 200 volume
    POST  /v1/volumes/{name}/resume  ?wait=SECONDS                      -> 200 volume
    PATCH /v1/volumes/{name}  {chap_user, chap_secret, chap_mutual_user?, chap_mutual_secret?}
                              | {chap: null}   (CHAP on or changed | off)  -> 200 volume

**Pause / resume** record the operator's wish in the authority (``volumes.paused``, schema v7)
before they answer; the control loop's next step asks for the same placement with the wish
(sparrow.cluster.pause) and the Publisher mints the epoch: nothing here publishes. With
``?wait`` (0..60 s; the CLI sends 10) the answer comes once the current assignment carries the
wish and its primary has applied it (``served``), or at the deadline (200 either way: the wish is
recorded; ``status`` says what is pending). Pausing a paused volume (or resuming a running one)
changes nothing and answers the same.

**PATCH** is a partial update of the volume resource (RFC 5789): the body names only what
changes, and what it may change are the export settings that need no new epoch (today CHAP).
Resize stays ``POST .../resize``: it is an action that mints an epoch and grows data, not an
attribute to set. CHAP fields are validated as at create (both halves or none, mutual only with
one-way, the mutual secret different: RFC 7143 9.2.1); ``{"chap": null}`` turns CHAP off. The
new CHAP is in the authority when the answer comes and in every Ack from then on; the node
re-registers the target at once (node.convergence): new logins need the new secret, sessions
already logged in are kept (a login is authenticated once, RFC 7143 12; dropping them would
fail every initiator's I/O to rotate a secret). Secrets are never in an answer, the audit log
(sparrow.master.audit's allowlist) or a log line.

**Create idempotency** (:func:`create_differences`, used by ``POST /v1/volumes``): a create of a
live volume's name with the same parameters answers 200 (not 201) with the existing volume; with
other parameters, 409 naming each field that differs (secrets compared, never shown).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web

from sparrow.cluster.authority import VolumeRecord
from sparrow.cluster.messages import VolumeChap
from sparrow.cluster.pause import PAUSING_REASON, RESUMING_REASON
from sparrow.httpjson import ApiError, json_object
from sparrow.master.api import API_KEY, MasterApi, _chap, _find, _wait_seconds, is_served, volume_json
from sparrow.sizes import format_size

log = structlog.get_logger("sparrow.master.volume_verbs")

_CHAP_FIELDS = frozenset({"chap_user", "chap_secret", "chap_mutual_user", "chap_mutual_secret"})
_UPDATE_FIELDS = _CHAP_FIELDS | {"chap"}


def add_volume_verb_routes(app: web.Application) -> None:
    app.router.add_post("/v1/volumes/{name}/pause", pause_volume)
    app.router.add_post("/v1/volumes/{name}/resume", resume_volume)
    app.router.add_patch("/v1/volumes/{name}", update_volume)


# --- pause and resume ----------------------------------------------------------------------------


async def pause_volume(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def resume_volume(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


def pause_applied(api: MasterApi, record: VolumeRecord) -> bool:
    """True once the volume's current assignment carries the wish, its primary serves that epoch
    (sparrow.health) and the control loop has stepped since (its status no longer says "pausing"
    or "resuming"); a volume not placed yet has nothing to apply."""
    assignment = api.control.current(record.volume_id)
    if assignment is None or assignment.primary is None:
        return True
    status = api.control.status(record.volume_id)
    pending = status is not None and status.reason in (PAUSING_REASON, RESUMING_REASON)
    return assignment.paused == record.paused and is_served(api, record.volume_id) and not pending


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    api = request.app[API_KEY]
    wait = _wait_seconds(request)
    record = await _find(api, request.match_info["name"])
    if record.paused != paused:
        record = await asyncio.to_thread(api.control.store.set_paused, record.volume_id, paused)
        what = "volume paused" if paused else "volume resumed"
        log.info(what, volume=record.name, volume_id=record.volume_id)
    api.control.volume_changed(record)
    try:
        async with asyncio.timeout(wait):
            while True:
                if pause_applied(api, record):
                    break
                await asyncio.sleep(api.poll_interval)
    except TimeoutError:
        pass
    return web.json_response(volume_json(api, record))


# --- update of export settings -------------------------------------------------------------------


async def update_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    body = await json_object(request, _UPDATE_FIELDS)
    if not body:
        raise ApiError(400, f"nothing to update: give {', '.join(sorted(_UPDATE_FIELDS))}")
    if "chap" in body:
        if body["chap"] is not None:
            raise ApiError(400, "chap: only null (CHAP off); set CHAP with chap_user and chap_secret")
        if _CHAP_FIELDS & body.keys():
            raise ApiError(400, "chap: null turns CHAP off; it cannot come with chap_* fields")
        chap = None
    else:
        chap = _chap(body)
        if chap is None:
            raise ApiError(400, "chap_user and chap_secret are needed (or chap: null to turn CHAP off)")
    record = await _find(api, request.match_info["name"])
    if record.chap != chap:
        record = await asyncio.to_thread(api.control.store.set_chap, record.volume_id, chap)
        api.control.volume_changed(record)
        log.info(
            "volume CHAP updated",
            volume=record.name,
            volume_id=record.volume_id,
            chap=chap is not None,
            mutual=chap is not None and chap.mutual_user is not None,
        )
    return web.json_response(volume_json(api, record))


# --- create idempotency --------------------------------------------------------------------------


def create_differences(
    existing: VolumeRecord,
    *,
    size: int | None,
    block_size: int,
    replicas: int,
    physical_block_size: int | None,
    chap: VolumeChap | None,
    backing: str | None,
) -> list[str]:
    """What a create asks for that ``existing`` (the live volume of that name) does not have, one
    phrase per field, in the create body's order; empty when the create is a retry of the one
    that made it. ``size`` None (a backing's own size) matches any size. Secrets are compared but
    only named, never shown."""
    out: list[str] = []

    def differs(field: str, have: object, asked: object, show: bool = True) -> None:
        if have != asked:
            out.append(f"{field} is {have!r}, asked {asked!r}" if show else f"{field} differs")

    if size is not None and size != existing.size:
        out.append(
            f"size is {existing.size} ({format_size(existing.size)}), asked {size} ({format_size(size)})"
        )
    differs("block_size", existing.block_size, block_size)
    differs("replicas", existing.replicas, replicas)
    differs("physical_block_size", existing.physical_block_size, physical_block_size)
    have, asked = existing.chap, chap
    differs("chap_user", None if have is None else have.user, None if asked is None else asked.user)
    differs(
        "chap_secret", None if have is None else have.secret, None if asked is None else asked.secret, False
    )
    differs(
        "chap_mutual_user",
        None if have is None else have.mutual_user,
        None if asked is None else asked.mutual_user,
    )
    differs(
        "chap_mutual_secret",
        None if have is None else have.mutual_secret,
        None if asked is None else asked.mutual_secret,
        False,
    )
    differs("backing", existing.backing, backing)
    return out


async def existing_for_create(api: MasterApi, name: str, asked: Mapping[str, Any]) -> VolumeRecord | None:
    """The live volume ``name`` when a create with ``asked`` (the :func:`create_differences`
    keywords) is a retry of the one that made it; None when there is no such volume; raises
    ApiError(409) naming what differs when there is one with other parameters."""
    for record in await asyncio.to_thread(api.control.store.volumes):
        if record.name == name:
            different = create_differences(record, **asked)
            if different:
                raise ApiError(409, f"volume {name} exists with other parameters: {'; '.join(different)}")
            return record
    return None
