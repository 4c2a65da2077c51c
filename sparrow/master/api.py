"""The master's control API: JSON over HTTP (aiohttp), plus /metrics and /healthz.

    POST   /v1/volumes         {name, size, block_size?=512, replicas?=1,
                                physical_block_size?, chap_user?, chap_secret?,
                                chap_mutual_user?, chap_mutual_secret?, backing?} -> 201 volume
                               (200 with the existing volume when a live one of that name has
                               these parameters; 409 naming each that differs otherwise)
    POST   /v1/volumes/{name}/resize  {size}  (grow only; a new epoch)         -> 200 volume
    GET    /v1/volumes                                                         -> 200 {"volumes": [volume...]}
    GET    /v1/volumes/{name}                                                  -> 200 volume
    DELETE /v1/volumes/{name}                                                  -> 204
    GET    /v1/nodes                                                           -> 200 {"nodes": [node...]}
    DELETE /v1/nodes/{node_id} (admin) forget a dead node that holds no copy   -> 204 (409: why not)
    POST   /v1/nodes/{node_id}/rekey (admin) {key?} rebind its identity      -> 200 (nodekeys_api)
    POST   /v1/nodes/{node_id}/approve (admin) {key?} admit it as a member   -> 200 (nodekeys_api)
    GET    /metrics            Prometheus text exposition (the master's own registry): the scrape
                               token or a token with no tenant (sparrow.metricsauth; 401, 403)
    GET    /v1/metrics/scrape-token (admin)  the nodes' scrape token        -> 200 {"token"} (sparrow top)
    GET    /openapi.json       this API's OpenAPI 3.1 document (sparrow.master.openapi: how to add a route)
    GET    /healthz            200 {"status": "ok"|"degraded", "reasons": [], "counts": {"volumes": N,
                               "volumes_not_served": N, "tasks_failed": N, "nodes": N, ...}}; 503 with
                               "status": "unhealthy" and the reasons (no names) while a volume is not
                               served or a task has failed (sparrow.health.public_health). Sent with a
                               credential that opens /metrics (else 401, 403), in full:
                               200 {"status", "nodes": N, "nodes_alive": N, "volumes": N,
                               "reasons": [], "volumes_not_served": [], "tasks_failed": [],
                               "volumes_paused": []} (embedded: plus "offline": [...] and "node": {...})

``?wait=SECONDS`` on create and resize (0..60; the CLI sends 10): answer once the volume is served
at its current epoch -- its primary has reported the epoch, the role and convergence -- or when
the controller says it cannot place it, or at the deadline; the answer is the volume as it then is
(201/200 either way: the volume was recorded; ``status`` says why it is not served yet).

``size`` is bytes or a string such as "64MiB" (sparrow.sizes); ``replicas`` is 1..3. A size larger
than the largest capacity any node has reported (its Hello's ``capacity_bytes``, now or in an
earlier run; not a forgotten node's, nor a pending one's) is refused with 400; before any node has
reported one, the size is not checked (the volume waits, unplaced, like any other). A volume on a
``backing`` device is not checked: the device holds the data, not the node's data directory. The
volume id is minted here (``uuid4().hex``). CHAP is validated (sparrow.httpjson): both halves or
none, mutual only with one-way, the mutual secret different from the initiator's (RFC 7143 9.2.1).
``backing`` (an absolute path on the node) is meant for the embedded one-node mode, where the
master checks it on its own node (:class:`LocalNode`) and takes the device's size when ``size`` is
omitted; a master without a local node requires ``size`` (it cannot look at a node's device). A
resize grows only, to a multiple of the block size, and publishes the volume's next epoch (same
placement, new size); the same size changes nothing.

A volume (see :func:`volume_json`); secrets are never returned::

    {"name", "volume_id", "serial", "naa" (both derived from volume_id: the same on every node),
     "size", "block_size", "physical_block_size" (null: block_size),
     "chap": {"user", "mutual_user"} | null, "backing": path | null,
     "paused": the operator paused it (its status says once it is applied),
     "replicas_wanted", "created_at" (ISO 8601 UTC),
     "iqn", "lun": 0,
     "epoch": int (0: never assigned),
     "primary": {"node_id", "portal"} | null,
     "replicas": [{"node_id", "role": "primary"|"replica", "state": "alive"|"dead",
                   "observed_epoch", "observed_role", "health", "converged", "write_position"}],
                  (observed_* ... null when the node has reported nothing for the volume)
     "served": true once the primary serves the current epoch (see ``?wait``),
     "status": the controller's reason or null, "status_kind": "ok"|"unplaced"|...,
     "url": "iscsi://PRIMARY_PORTAL/IQN/0" | null}

A node (see :func:`node_json`)::

    {"node_id", "state": "alive"|"dead", "incarnation", "last_heartbeat_age" (seconds | null),
     "iscsi_portal", "replication", "http", "capacity_bytes", "free_bytes" (null if not heard since
     the master started), "draining": bool, "drain_status": what the drain does or waits for | null,
     "node_key": the public key bound to the node id (64 hex digits) | null: bound at its next Hello,
     "admission": "approved" | "pending" (awaiting ``sparrow node approve``: nothing placed on it)
                  | null (no key bound yet)}

The operator verbs (failover, rebuild, drain, undrain): sparrow.master.moves_api. Why a volume is
in its state (``GET /v1/volumes/{name}/explain``): sparrow.master.explain_api. ``GET /v1/nodes``
also lists each node's ``skipped``: the volumes it did not load at start, ``[{"name", "reason"}]``.
Pause, resume, update of export settings (PATCH) and the create's idempotency:
sparrow.master.volume_verbs_api.
The cluster's settings (discovery CHAP, GET/PATCH /v1/cluster): sparrow.master.settings_api.

Every route but /healthz (whose full answer needs a credential, as /metrics) and /openapi.json
needs a bearer token (sparrow.master.auth: 401 without a
valid one, 403 when its role or tenant does not allow the request); a tenant token lists and
sees only its own volumes. ``backing`` needs an admin token and a path under the allowed backing
prefixes (``MasterApi.backing_policy``; none by default: 403), checked by name here and, resolved,
by the node that opens it (store.backing); a volume on a backing is never resized (400).

Errors are ``{"error": "<one line>"}`` with 400, 401, 403, 404, 409 or 500 (sparrow.httpjson), and
503 for a mutating call when the audit log cannot be written (sparrow.master.audit: nothing changed). Handlers
run on the event loop; SQLite writes (an fsync each) go to a worker thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from frontend.target import DEFAULT_BASE_IQN
from sparrow.auth.tokens import Action, can_see
from sparrow.cluster.authority import (
    AuthorityError,
    InvalidAuthorityRecord,
    NodeHoldsCopy,
    UnknownToken,
    UnknownVolume,
    VolumeExists,
    VolumeRecord,
)
from sparrow.cluster.controller import MAX_REPLICAS, MIN_REPLICAS, StatusKind, TopologyController
from sparrow.cluster.messages import Assignment, InvalidMessage, SyncState, VolumeChap, check_chap_name
from sparrow.cluster.nodeidentity import key_text
from sparrow.cluster.observations import NodeState, NodeView
from sparrow.health import (
    VolumeProblem,
    health_response,
    master_problems,
    paused_volumes,
    public_health,
    summary,
    unserved_reason,
)
from sparrow.httpjson import ApiError, chap_fields, errors_middleware, json_object, size_field, string_field
from sparrow.master.audit import AuditLog, audit_middlewares
from sparrow.master.auth import (
    FULL_HEALTH_KEY,
    AuthContext,
    add_token_routes,
    auth_middleware,
    principal,
    require,
)
from sparrow.master.control import ControlLoop
from sparrow.metricsauth import SCRAPE_TOKEN_ROUTE, MetricsDoor
from sparrow.sizes import format_size
from sparrow.supervision import TaskSupervisor
from store.backing import NO_BACKING, BackingPolicy
from store.volumes import naa_from_uuid, serial_from_uuid

log = structlog.get_logger("sparrow.master.api")

_CREATE_FIELDS = frozenset(
    {
        "name",
        "size",
        "block_size",
        "replicas",
        "physical_block_size",
        "chap_user",
        "chap_secret",
        "chap_mutual_user",
        "chap_mutual_secret",
        "backing",
    }
)
_RESIZE_FIELDS = frozenset({"size"})


class MasterMetrics:
    """The master's Prometheus metrics, on a registry of their own.

    ``sparrow_master_nodes{state}`` and ``sparrow_master_volumes{status}`` are computed at scrape
    time from the control loop (:meth:`bind`); the counters are incremented by the daemon.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        #: Its own registry, or a shared one (the embedded mode adds the node's metrics to it).
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.epochs_published = Counter(
            "sparrow_master_epochs_published", "Assignment epochs published", registry=self.registry
        )
        self.heartbeats_received = Counter(
            "sparrow_master_heartbeats_received", "Heartbeats received from nodes", registry=self.registry
        )
        self.protocol_errors = Counter(
            "sparrow_master_heartbeat_protocol_errors",
            "Node connections closed for a protocol error",
            ["code"],
            registry=self.registry,
        )
        self.refused_connections = Counter(
            "sparrow_master_refused_connections",
            "Heartbeat connections refused: failed authentication, handshake cap or timeout, or a "
            "node id alive under another incarnation",
            ["reason"],
            registry=self.registry,
        )
        self._collector = _StateCollector()
        self.registry.register(self._collector)

    def bind(self, control: ControlLoop, clock: Callable[[], float]) -> None:
        self._collector.control = control
        self._collector.clock = clock

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector(Collector):
    """Nodes by state and volumes by status, counted at scrape time."""

    def __init__(self) -> None:
        self.control: ControlLoop | None = None
        self.clock: Callable[[], float] = time.monotonic

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("sparrow_master_nodes", "Nodes known to the master", labels=["state"])
        volumes = GaugeMetricFamily(
            "sparrow_master_volumes", "Volumes by the controller's status", labels=["status"]
        )
        pending = GaugeMetricFamily(
            "sparrow_master_nodes_pending",
            "Nodes whose key no one approved yet: heartbeats taken, nothing placed on them "
            "(sparrow node approve; docs/cluster.md, Node admission)",
        )
        unserved = GaugeMetricFamily(
            "sparrow_master_volumes_unserved",
            "Live volumes not served at their current epoch: no primary, primary dead, fenced, "
            "transitioning or not converged (sparrow.health)",
        )
        by_state = dict.fromkeys((s.value for s in NodeState), 0)
        by_status = dict.fromkeys((k.value for k in StatusKind), 0)
        not_served = 0
        if self.control is not None:
            now = self.clock()
            for view in self.control.observations.nodes(now):
                by_state[view.state.value] += 1
            for status in self.control.statuses().values():
                by_status[status.kind.value] += 1
            not_served = sum(
                unserved_reason(self.control, v.volume_id, now) is not None for v in self.control.desired()
            )
        unserved.add_metric([], not_served)
        yield unserved
        pending.add_metric([], 0 if self.control is None else len(self.control.node_keys.pending()))
        yield pending
        for state, count in by_state.items():
            nodes.add_metric([state], count)
        for status_kind, count in by_status.items():
            volumes.add_metric([status_kind], count)
        yield nodes
        yield volumes


class LocalNode(Protocol):
    """The node running in the master's own process (``sparrow serve``, sparrow/embedded.py): what
    the API asks of it, so one machine keeps the behaviour of the earlier single-node daemon."""

    def health(self) -> Mapping[str, Any]:
        """The node's health; its ``offline`` list names the local volumes that failed to load."""
        ...

    async def check_create(self, name: str, size: int | None, block_size: int, backing: str | None) -> int:
        """Check a create against the local disk (name, backing device); the size to record (the
        backing's own size when ``size`` is None). Raises ApiError(400) with the reason."""
        ...

    async def destroy(self, volume_id: str | None, name: str) -> None:
        """Delete the local copy of a deleted volume (``volume_id`` None: a local volume that
        failed to load and was never adopted). Raises ApiError(404) when there is nothing to delete."""
        ...


@dataclass(frozen=True, slots=True)
class MasterApi:
    """What the handlers need. ``clock`` is the master's monotonic clock; ``wall_clock`` stamps
    ``created_at``/``deleted_at``."""

    control: ControlLoop
    metrics: MasterMetrics
    clock: Callable[[], float]
    base_iqn: str = DEFAULT_BASE_IQN
    wall_clock: Callable[[], float] = time.time
    #: The node in this process (embedded mode), None for a master of its own.
    local: LocalNode | None = None
    #: How often a ``?wait`` request looks at the volume again (seconds).
    poll_interval: float = 0.02
    #: Where a create's ``backing`` may point (store.backing; default: nowhere).
    backing_policy: BackingPolicy = NO_BACKING
    #: The daemon's tasks; their failures make /healthz unhealthy.
    supervisor: TaskSupervisor | None = None
    #: The audit trail of every mutating call (sparrow.master.audit); None: not audited (tests).
    audit: AuditLog | None = None
    #: Who may read /metrics besides an API token (sparrow.metricsauth); None: API tokens only,
    #: and no scrape token to hand out.
    metrics_door: MetricsDoor | None = None


API_KEY = web.AppKey("master", MasterApi)


def build_app(api: MasterApi) -> web.Application:
    errors = errors_middleware(AuthorityError, _AUTHORITY_STATUS, "authority error")
    authenticate = auth_middleware(api.control.store, api.metrics_door)
    middlewares = [errors, authenticate]
    if api.audit is not None:
        outer, inner = audit_middlewares(api.audit)
        middlewares = [outer, errors, authenticate, inner]
    from sparrow.master import openapi, openapi_check  # they describe this module's routes

    if openapi_check.enabled():  # the test harness: every answer checked against the document
        document = openapi_check.document_to_check(openapi.checked_in())
        middlewares = [openapi_check.validation_middleware(document), *middlewares]
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
    app[API_KEY] = api
    add_token_routes(app, AuthContext(api.control.store, api.wall_clock))
    app.router.add_post("/v1/volumes", create_volume)
    app.router.add_get("/v1/volumes", list_volumes)
    app.router.add_get("/v1/volumes/{name}", get_volume)
    app.router.add_delete("/v1/volumes/{name}", delete_volume)
    app.router.add_post("/v1/volumes/{name}/resize", resize_volume)
    app.router.add_get("/v1/nodes", list_nodes)
    app.router.add_delete("/v1/nodes/{node_id}", forget_node)
    from sparrow.master.moves_api import add_move_routes  # it builds on this module

    add_move_routes(app)
    from sparrow.master.nodekeys_api import add_node_key_routes

    add_node_key_routes(app)
    from sparrow.master.explain_api import add_explain_routes

    add_explain_routes(app)
    from sparrow.master.volume_verbs_api import add_volume_verb_routes  # it builds on this module

    add_volume_verb_routes(app)
    from sparrow.master.settings_api import add_settings_routes  # it builds on this module

    add_settings_routes(app)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get(SCRAPE_TOKEN_ROUTE, get_scrape_token)
    app.router.add_get("/healthz", healthz)
    openapi.add_openapi_route(app)
    return app


# --- handlers ----------------------------------------------------------------------------------


async def create_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    body = await json_object(request, _CREATE_FIELDS)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "missing field 'name'" if name is None else "name must be a non-empty string")
    require(request, Action.VOLUME_WRITE, name)
    wait = _wait_seconds(request)
    block_size = _int(body, "block_size", 512, "block_size must be an integer (512 or 4096)")
    backing = string_field(body, "backing")
    if backing is not None:
        require(request, Action.VOLUME_BACKING, name)
        if not backing.startswith("/"):
            raise ApiError(400, f"backing: must be an absolute path, not {backing!r}")
        if not api.backing_policy.allows_name(backing):
            allowed = ", ".join(api.backing_policy.prefixes) or "none are allowed"
            raise ApiError(403, f"backing {backing} is not under an allowed backing prefix ({allowed})")
    size = size_field(body, required=api.local is None or backing is None)
    replicas = _int(body, "replicas", 1, f"replicas must be an integer ({MIN_REPLICAS}..{MAX_REPLICAS})")
    if not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
        raise ApiError(400, f"replicas must be {MIN_REPLICAS}..{MAX_REPLICAS}, not {replicas}")
    physical = body.get("physical_block_size")
    if physical is not None and (isinstance(physical, bool) or not isinstance(physical, int)):
        raise ApiError(400, "physical_block_size must be an integer (512 or 4096)")
    chap = _chap(body)
    from sparrow.master.volume_verbs_api import existing_for_create

    asked = {
        "size": size,
        "block_size": block_size,
        "replicas": replicas,
        "physical_block_size": physical,
        "chap": chap,
        "backing": backing,
    }
    existing = await existing_for_create(api, name, asked)
    if existing is not None:  # a retry of the create that made it: the volume as it is (200)
        await served(api, existing.volume_id, wait)
        return web.json_response(volume_json(api, existing), status=200)
    if api.local is not None:
        size = await api.local.check_create(name, size, block_size, backing)
    assert size is not None
    if backing is None:
        await _check_capacity(api, size)
    store = api.control.store
    try:
        record = await asyncio.to_thread(
            store.add_volume,
            name,
            size=size,
            block_size=block_size,
            replicas=replicas,
            created_at=api.wall_clock(),
            volume_id=_new_volume_id(),
            physical_block_size=physical,
            chap=chap,
            backing=backing,
        )
    except VolumeExists:
        existing = await existing_for_create(api, name, asked)  # a concurrent twin made it first
        if existing is None:
            raise
        await served(api, existing.volume_id, wait)
        return web.json_response(volume_json(api, existing), status=200)
    api.control.volume_added(record)
    log.info("volume created", volume=name, volume_id=record.volume_id, size=size, replicas=replicas)
    await served(api, record.volume_id, wait)
    return web.json_response(volume_json(api, record), status=201)


async def list_volumes(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    records = await asyncio.to_thread(api.control.store.volumes)
    who = principal(request)
    return web.json_response({"volumes": [volume_json(api, r) for r in records if can_see(who, r.name)]})


async def get_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    return web.json_response(volume_json(api, await _find(api, request.match_info["name"])))


async def resize_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    body = await json_object(request, _RESIZE_FIELDS)
    size = _required_size(body)
    wait = _wait_seconds(request)
    record = await _find(api, request.match_info["name"])
    if record.backing is not None and size != record.size:
        raise ApiError(400, f"volume {record.name} is backed by {record.backing}: it is never resized")
    old_size = record.size
    record, assignment = await asyncio.to_thread(api.control.resize_volume, record.volume_id, size)
    api.control.resized(record, assignment, api.clock())
    log.info(
        "volume resized",
        volume=record.name,
        volume_id=record.volume_id,
        old_size=old_size,
        size=record.size,
        epoch=None if assignment is None else assignment.epoch,
    )
    await served(api, record.volume_id, wait)
    return web.json_response(volume_json(api, record))


async def delete_volume(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    name = request.match_info["name"]
    try:
        record = await _find(api, name)
    except ApiError:
        if api.local is None:
            raise
        await api.local.destroy(None, name)  # a local volume that failed to load, never adopted
        log.info("volume deleted", volume=name, volume_id=None)
        return web.Response(status=204)
    await asyncio.to_thread(api.control.store.delete_volume, record.volume_id, deleted_at=api.wall_clock())
    api.control.volume_deleted(record.volume_id, record.name)
    if api.local is not None:
        await api.local.destroy(record.volume_id, record.name)
    log.info("volume deleted", volume=record.name, volume_id=record.volume_id)
    return web.Response(status=204)


async def list_nodes(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    records = await asyncio.to_thread(api.control.store.nodes)
    now = api.clock()
    views = {v.node_id: v for v in api.control.observations.nodes(now)}
    nodes: list[dict[str, Any]] = [node_json(views[node_id]) for node_id in sorted(views)]
    from sparrow.master.moves_api import drain_status

    draining = {r.node_id: r.draining for r in records}
    node_keys = api.control.node_keys
    for node in nodes:
        heartbeat = api.control.observations.heartbeat(node["node_id"])
        skipped = () if heartbeat is None else heartbeat.skipped
        node["skipped"] = [{"name": v.name, "reason": v.reason} for v in skipped]
        node["draining"] = draining.get(node["node_id"], False)
        node["drain_status"] = drain_status(api, node["node_id"], node["draining"])
    for record in records:
        if record.node_id not in views:
            # Known from an earlier run, not heard from since this master started.
            nodes.append(
                {
                    "node_id": record.node_id,
                    "state": NodeState.DEAD.value,
                    "incarnation": record.incarnation,
                    "last_heartbeat_age": None,
                    "iscsi_portal": record.addresses.iscsi_portal,
                    "replication": record.addresses.replication,
                    "http": record.addresses.http,
                    "capacity_bytes": record.capacity,
                    "free_bytes": None,
                    "skipped": [],
                    "draining": record.draining,
                    "drain_status": drain_status(api, record.node_id, record.draining),
                }
            )
    for node in nodes:
        key = node_keys.key(str(node["node_id"]))
        admission = node_keys.admission(str(node["node_id"]))
        node["node_key"] = None if key is None else key_text(key)
        node["admission"] = None if admission is None else admission.value
    nodes.sort(key=lambda n: str(n["node_id"]))
    return web.json_response({"nodes": nodes})


async def forget_node(request: web.Request) -> web.Response:
    """Forget a dead node that holds no copy: its authority record (deleted, or marked forgotten
    when the assignment history names it; AuthorityStore.forget_node) and its observations."""
    api = request.app[API_KEY]
    node_id = request.match_info["node_id"]
    control = api.control
    if control.observations.alive(node_id, api.clock()):
        raise ApiError(409, f"node {node_id!r} is alive; stop it (and wait until it is dead) first")
    try:
        recorded = await asyncio.to_thread(control.store.forget_node, node_id, forgotten_at=api.wall_clock())
    except NodeHoldsCopy as e:
        raise ApiError(409, str(e)) from None
    observed = control.observations.forget(node_id)
    control.node_keys.drop(node_id)  # the authority dropped it (and its approval): a new node next
    if not (recorded or observed):
        raise ApiError(404, f"no node {node_id!r}")
    log.info("node forgotten", node=node_id, record=None if recorded is None else recorded.value)
    return web.Response(status=204)


async def get_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[API_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_scrape_token(request: web.Request) -> web.Response:
    """The scrape token of the nodes' /metrics (sparrow.metricsauth), for ``sparrow top``; admin."""
    door = request.app[API_KEY].metrics_door
    token = door.token if door is not None else None
    if token is None:
        raise ApiError(404, "this master has no scrape token")
    log.info("scrape token handed out", by=principal(request).token_id)
    return web.json_response({"token": token})


async def healthz(request: web.Request) -> web.Response:
    """Unhealthy (503) while a volume is not served or a task has failed (sparrow.health); in full
    only to a credential that opens /metrics (sparrow.master.auth), else without names."""
    api = request.app[API_KEY]
    now = api.clock()
    views = api.control.observations.nodes(now)
    alive = sum(1 for v in views if v.state is NodeState.ALIVE)
    health: dict[str, Any] = {
        "nodes": len(views),
        "nodes_alive": alive,
        "volumes": len(api.control.desired()),
    }
    problems = master_problems(api.control, now)
    degraded = False
    if api.local is not None:
        node = dict(api.local.health())
        health["offline"] = node.get("offline", [])
        health["node"] = node
        degraded = node.get("status") != "ok" or bool(health["offline"]) or alive == 0
        seen = {p.volume_id for p in problems}
        for p in node.get("volumes_not_served", []):  # what the node knows first (a fence)
            if p["volume_id"] not in seen:
                problems.append(VolumeProblem(p["volume_id"], p["name"], f"node: {p['reason']}"))
    failures = () if api.supervisor is None else api.supervisor.failures()
    health["volumes_paused"] = paused_volumes(api.control)
    body = {**summary(problems, failures, degraded=degraded), **health}
    return health_response(body if request.get(FULL_HEALTH_KEY, False) else public_health(body))


# --- JSON shapes -------------------------------------------------------------------------------


def volume_json(api: MasterApi, record: VolumeRecord) -> dict[str, Any]:
    """The public view of a volume: what the operator asked for, what is published, what is observed."""
    control = api.control
    assignment = control.current(record.volume_id)
    status = control.status(record.volume_id)
    iqn = f"{api.base_iqn}:{record.name}"
    primary = None
    url = None
    if assignment is not None and assignment.primary is not None and assignment.primary_portal is not None:
        primary = {"node_id": assignment.primary, "portal": assignment.primary_portal}
        url = f"iscsi://{assignment.primary_portal}/{iqn}/0"
    return {
        "name": record.name,
        "volume_id": record.volume_id,
        "serial": serial_from_uuid(record.volume_id),
        "naa": naa_from_uuid(record.volume_id),
        "size": record.size,
        "block_size": record.block_size,
        "physical_block_size": record.physical_block_size,
        "chap": None
        if record.chap is None
        else {"user": record.chap.user, "mutual_user": record.chap.mutual_user},
        "backing": record.backing,
        "paused": record.paused,
        "replicas_wanted": record.replicas,
        "created_at": _iso(record.created_at),
        "iqn": iqn,
        "lun": 0,
        "epoch": 0 if assignment is None else assignment.epoch,
        "primary": primary,
        "replicas": [] if assignment is None else _replicas_json(api, assignment),
        "served": is_served(api, record.volume_id),
        "status": None if status is None else status.reason,
        "status_kind": None if status is None else status.kind.value,
        "url": url,
    }


#: Controller verdicts a ``?wait`` does not wait out: only an operator (or a node) changes them.
_HOPELESS = frozenset({StatusKind.NOT_ENOUGH_NODES, StatusKind.NO_ELIGIBLE_REPLICA, StatusKind.STUCK})
MAX_WAIT = 60.0


def is_served(api: MasterApi, volume_id: str) -> bool:
    """True when the volume's primary has reported its current epoch, as primary, converged and
    serving (health OK: a fenced primary reports DEGRADED), in a heartbeat the master still
    counts as alive."""
    return unserved_reason(api.control, volume_id, api.clock()) is None


async def served(api: MasterApi, volume_id: str, wait: float, *, give_up: bool = True) -> bool:
    """Wait up to ``wait`` seconds (event-loop time) for :func:`is_served` (see the module
    docstring); with ``give_up``, stop early when the controller says it cannot place the volume."""
    try:
        async with asyncio.timeout(wait):
            while not is_served(api, volume_id):
                status = api.control.status(volume_id)
                if give_up and status is not None and status.kind in _HOPELESS:
                    return False
                await asyncio.sleep(api.poll_interval)
    except TimeoutError:
        return False
    return True


def _wait_seconds(request: web.Request) -> float:
    text = request.query.get("wait")
    if text is None:
        return 0.0
    try:
        wait = float(text)
    except ValueError:
        raise ApiError(400, f"wait must be a number of seconds, not {text!r}") from None
    if not 0 <= wait <= MAX_WAIT:
        raise ApiError(400, f"wait must be 0..{MAX_WAIT:g} seconds, not {text}")
    return wait


def _replicas_json(api: MasterApi, assignment: Assignment) -> list[dict[str, Any]]:
    observations = api.control.observations
    now = api.clock()
    # A copy outside the in-sync set that the serving primary reports SYNCING is being resynced.
    report = TopologyController.primary_report(assignment, observations)
    syncing = {
        r.node_id: r
        for r in (() if report is None else report.replica_states)
        if r.state is SyncState.SYNCING and r.node_id not in assignment.in_sync
    }
    out = []
    for node_id in assignment.replicas:
        obs = observations.observation(node_id, assignment.volume_id)
        resync = syncing.get(node_id)
        out.append(
            {
                "node_id": node_id,
                "role": "primary" if node_id == assignment.primary else "replica",
                "state": (NodeState.ALIVE if observations.alive(node_id, now) else NodeState.DEAD).value,
                "observed_epoch": None if obs is None else obs.epoch,
                "observed_role": None if obs is None else obs.role.value,
                "health": None if obs is None else obs.health.value,
                "converged": None if obs is None else obs.converged,
                "write_position": None if obs is None else obs.write_position,
                # The in-sync set the master recorded at this epoch (issue 8, "Inspect"):
                # "stale" copies may lack acknowledged writes; "syncing" ones are being copied to.
                "sync": "in_sync"
                if node_id in assignment.in_sync
                else ("syncing" if resync is not None else "stale"),
                "resync": None
                if resync is None
                else {"done_bytes": resync.resync_done, "total_bytes": resync.resync_total},
            }
        )
    return out


def node_json(view: NodeView) -> dict[str, Any]:
    """One ``observations.NodeView`` as JSON."""
    age = view.last_heartbeat_age
    return {
        "node_id": view.node_id,
        "state": view.state.value,
        "incarnation": view.incarnation,
        "last_heartbeat_age": None if age is None else round(age, 3),
        "iscsi_portal": view.iscsi_portal,
        "replication": view.replication,
        "http": view.http,
        "capacity_bytes": view.capacity_bytes,
        "free_bytes": view.free_bytes,
    }


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _new_volume_id() -> str:
    return uuid.uuid4().hex


# --- request parsing ---------------------------------------------------------------------------


async def _find(api: MasterApi, name: str) -> VolumeRecord:
    for record in await asyncio.to_thread(api.control.store.volumes):
        if record.name == name:
            return record
    raise ApiError(404, f"no volume named {name!r}")


async def _check_capacity(api: MasterApi, size: int) -> None:
    """Refuse (400) a size larger than the largest capacity any node has reported; see the module
    docstring (no node reported yet: not checked)."""
    records = await asyncio.to_thread(api.control.store.nodes)
    capacities = {r.node_id: r.capacity for r in records}
    for view in api.control.observations.nodes(api.clock()):
        capacities[view.node_id] = view.capacity_bytes
    for node_id in api.control.node_keys.pending():  # no member yet: its word is not taken
        capacities.pop(node_id, None)
    if capacities and size > max(capacities.values()):
        largest = max(capacities.values())
        raise ApiError(
            400,
            f"size {size} bytes ({format_size(size)}) is larger than any node can hold: the largest "
            f"capacity a node has reported is {largest} bytes ({format_size(largest)})",
        )


def _int(body: Mapping[str, Any], key: str, default: int, message: str) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, message)
    return value


def _chap(body: Mapping[str, Any]) -> VolumeChap | None:
    """The volume's CHAP from the create body (RFC 7143 12.1.3; 9.2.1 checked by VolumeChap)."""
    fields = chap_fields(body)
    if fields is None:
        return None
    try:
        check_chap_name("user", fields.user)
        if fields.mutual_user is not None:
            check_chap_name("mutual_user", fields.mutual_user)
        return VolumeChap(fields.user, fields.secret, fields.mutual_user, fields.mutual_secret)
    except InvalidMessage as e:
        raise ApiError(400, f"chap_{e}") from None


# --- errors ------------------------------------------------------------------------------------

#: Authority errors that are the client's doing, and the status each one answers with.
_AUTHORITY_STATUS: tuple[tuple[type[AuthorityError], int], ...] = (
    (UnknownVolume, 404),
    (UnknownToken, 404),
    (VolumeExists, 409),
    (InvalidAuthorityRecord, 400),
)


def _required_size(body: Mapping[str, Any]) -> int:
    size = size_field(body, required=True)
    assert size is not None
    return size
