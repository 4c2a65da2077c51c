"""``GET /v1/volumes/{name}/explain``: why the volume is in its state (sparrow.cluster.explain).

    GET /v1/volumes/{name}/explain  -> 200 {"volume", "volume_id", "served", "reason", "summary",
                                            "findings": [{"reason", "text", "action", "node",
                                                          "since_seconds", "since", "facts"}],
                                            "unsupported_commands": [{"node", "opcode",
                                                "service_action", "count", "last_initiator"}],
                                            "skipped_at_start": [{"node", "reason"}]}

Read-only; the token rules of ``GET /v1/volumes/{name}`` (``volume.read``, a tenant token only on
its own volumes: sparrow.master.auth.ROUTE_ACTIONS). ``reason`` is the headline finding's
(:class:`sparrow.cluster.explain.Reason`); ``since`` is UTC, ``since_seconds`` its age.
"""

from __future__ import annotations

from aiohttp import web

from sparrow.cluster.authority import VolumeRecord
from sparrow.cluster.explain import Paused, VolumeFacts, explain
from sparrow.master.api import API_KEY, MasterApi, _find


def add_explain_routes(app: web.Application) -> None:
    app.router.add_get("/v1/volumes/{name}/explain", explain_volume)


def paused(api: MasterApi, record: VolumeRecord) -> Paused | None:
    """Whether the volume is paused. Pause/resume is not on this branch: wire it here (from the
    volume's record or the control loop, with when it was paused on the master's monotonic clock
    and the token that did it) and the explanation's headline becomes ``paused``."""
    del api, record
    return None


def volume_facts(api: MasterApi, record: VolumeRecord) -> VolumeFacts:
    control = api.control
    return VolumeFacts(
        volume_id=record.volume_id,
        name=record.name,
        size=record.size,
        replicas=record.replicas,
        assignment=control.current(record.volume_id),
        published_at=control.published_at(record.volume_id),
        status=control.status(record.volume_id),
        draining=control.draining,
        paused=paused(api, record),
    )


async def explain_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    record = await _find(api, request.match_info["name"])
    control = api.control
    now = api.clock()
    explanation = explain(
        volume_facts(api, record), control.observations, control.leases, control.controller, now
    )
    return web.json_response(explanation.json(now, api.wall_clock()))
