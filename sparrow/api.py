"""The management API: JSON over HTTP (aiohttp), plus /metrics and /healthz.

    POST   /v1/volumes                {name, size, block_size?, chap_user?, chap_secret?,
                                       chap_mutual_user?, chap_mutual_secret?, backing?,
                                       replicas? (1 only: a single node keeps one copy)}  -> 201 volume
    GET    /v1/volumes                                                         -> 200 {"volumes": [...]}
    GET    /v1/volumes/{name}                                                  -> 200 volume
    POST   /v1/volumes/{name}/resize  {size}       (grow only)                 -> 200 volume
    DELETE /v1/volumes/{name}                                                  -> 204
    GET    /metrics                   Prometheus text exposition
    GET    /healthz                   200 {"status": "ok"|"degraded", "volumes": N, "offline": [...]}

``size`` is a number of bytes or a string such as "64MiB" (sparrow.sizes). Every error is
``{"error": "<one line>"}`` with 400 (bad request), 404 (no such volume or route), 409 (name taken)
or 500. CHAP secrets are accepted, stored, and never returned.

The handlers are thin: they validate the JSON and call the VolumeService.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from sparrow.httpjson import ApiError, chap_fields, errors_middleware, json_object, size_field, string_field
from sparrow.metrics import PrometheusMetrics
from sparrow.service import VolumeInfo, VolumeService, VolumeSpec
from store.blockstore import StoreError
from store.volumes import ChapCredentials, InvalidVolume, VolumeExists, VolumeNotFound

log = structlog.get_logger("sparrow.api")

SERVICE_KEY = web.AppKey("service", VolumeService)
METRICS_KEY = web.AppKey("metrics", PrometheusMetrics)

#: Store errors that are the client's doing, and the status each one answers with.
_STORE_STATUS: tuple[tuple[type[StoreError], int], ...] = (
    (VolumeNotFound, 404),
    (VolumeExists, 409),
    (InvalidVolume, 400),
)

_CREATE_FIELDS = frozenset(
    {
        "name",
        "size",
        "block_size",
        "physical_block_size",
        "chap_user",
        "chap_secret",
        "chap_mutual_user",
        "chap_mutual_secret",
        "backing",
        "replicas",
    }
)
_RESIZE_FIELDS = frozenset({"size"})




def build_app(service: VolumeService, metrics: PrometheusMetrics) -> web.Application:
    errors = errors_middleware(StoreError, _STORE_STATUS, "store error")
    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app[SERVICE_KEY] = service
    app[METRICS_KEY] = metrics
    app.router.add_post("/v1/volumes", create_volume)
    app.router.add_get("/v1/volumes", list_volumes)
    app.router.add_get("/v1/volumes/{name}", get_volume)
    app.router.add_post("/v1/volumes/{name}/resize", resize_volume)
    app.router.add_delete("/v1/volumes/{name}", delete_volume)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    return app


# --- handlers ----------------------------------------------------------------------------------


async def create_volume(request: web.Request) -> web.Response:
    body = await json_object(request, _CREATE_FIELDS)
    _single_copy(body)
    name = string_field(body, "name", required=True)
    assert name is not None
    backing = string_field(body, "backing")
    size = size_field(body, required=backing is None)
    block_size = body.get("block_size", 512)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ApiError(400, "block_size must be an integer (512 or 4096)")
    physical = body.get("physical_block_size")
    if physical is not None and (isinstance(physical, bool) or not isinstance(physical, int)):
        raise ApiError(400, "physical_block_size must be an integer (512 or 4096)")
    spec = VolumeSpec(
        name=name,
        size=size,
        block_size=block_size,
        chap=_chap(body),
        backing=backing,
        physical_block_size=physical,
    )
    info = await request.app[SERVICE_KEY].create(spec)
    return web.json_response(volume_json(info), status=201)


async def list_volumes(request: web.Request) -> web.Response:
    return web.json_response({"volumes": [volume_json(v) for v in request.app[SERVICE_KEY].volumes()]})


async def get_volume(request: web.Request) -> web.Response:
    return web.json_response(volume_json(request.app[SERVICE_KEY].get(request.match_info["name"])))


async def resize_volume(request: web.Request) -> web.Response:
    body = await json_object(request, _RESIZE_FIELDS)
    size = size_field(body, required=True)
    assert size is not None
    info = await request.app[SERVICE_KEY].resize(request.match_info["name"], size)
    return web.json_response(volume_json(info))


async def delete_volume(request: web.Request) -> web.Response:
    await request.app[SERVICE_KEY].delete(request.match_info["name"])
    return web.Response(status=204)


async def get_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    offline = [{"name": e.name, "path": str(e.path), "reason": e.reason} for e in service.offline]
    return web.json_response(
        {"status": "degraded" if offline else "ok", "volumes": len(service.names()), "offline": offline}
    )


# --- JSON shapes -------------------------------------------------------------------------------


def volume_json(v: VolumeInfo) -> dict[str, Any]:
    """The public view of a volume (no secrets)."""
    urls = v.urls()
    return {
        "name": v.name,
        "uuid": v.uuid,
        "size": v.size,
        "block_size": v.block_size,
        "physical_block_size": v.physical_block_size,
        "serial": v.serial,
        "naa": v.naa,
        "backing": v.backing,
        "created_at": v.created_at,
        "iqn": v.iqn,
        "lun": v.lun,
        "portals": [_portal_text(p.host, p.port) for p in v.portals],
        "url": urls[0] if urls else None,
        "urls": urls,
        "chap": None if v.chap_user is None else {"user": v.chap_user, "mutual_user": v.chap_mutual_user},
        "sessions": v.sessions,
    }


def _portal_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- request parsing ---------------------------------------------------------------------------





def _single_copy(body: dict[str, Any]) -> None:
    """``replicas`` (the cluster master's field): this daemon keeps one copy, so 1 is accepted and
    ignored and anything else is refused."""
    replicas = body.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ApiError(400, "replicas must be a positive integer")
    if replicas > 1:
        raise ApiError(
            400,
            f"replicas={replicas} needs a cluster: this daemon serves a single copy of each volume "
            "(create replicated volumes through `sparrow master`)",
        )


def _chap(body: dict[str, Any]) -> ChapCredentials | None:
    fields = chap_fields(body)
    if fields is None:
        return None
    return ChapCredentials(fields.user, fields.secret, fields.mutual_user, fields.mutual_secret)


# --- errors ------------------------------------------------------------------------------------



