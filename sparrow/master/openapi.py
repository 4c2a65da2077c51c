"""The master API's OpenAPI 3.1 document: built here, checked in beside this module as
``openapi.json`` (reviewed in diffs), and served as those bytes at ``GET /openapi.json`` (no token
needed, like ``/healthz``).

What the code already defines is taken from it, not written again: the enums (node state, the
controller's status kinds, roles, health, sync state, token roles), the limits (replicas, block
sizes, ``?wait``, the name and id patterns), which routes need no token (``PUBLIC_PATHS``; one
that has an action too, ``/healthz``, takes an optional credential that opens its full answer), the
action each route needs (``ROUTE_ACTIONS``: ``x-sparrow-action``) and the audit verb of each
mutating route (``audit.VERBS``: ``x-sparrow-audit-verb``). The shapes of the bodies are written
here, once, as JSON Schema; objects are closed (``additionalProperties: false``), so a field the
API answers that this document does not name is a violation.

Kept true by tests: ``tests/unit/test_openapi.py`` (the checked-in file is this module's output;
it is a valid OpenAPI 3.1 document; every route the app registers is documented and every
documented route is registered) and the validation middleware (sparrow.master.openapi_check) that
the test harness turns on in every daemon, which checks each request and answer of the whole test
suite against the document.

**Adding a route** (or a field, or a status):

1. Register the handler in the app as usual (and its row in ``auth.ROUTE_ACTIONS`` and, if it
   changes anything, ``audit.VERBS``).
2. Add an :class:`Operation` to :data:`OPERATIONS` below: method, path, ``operation_id``, a
   summary, the request body's schema (a name in :data:`SCHEMAS`, or None) and each status it
   answers, with the body's schema name (None: no body). 401 and 403 are added to every route
   that needs a token, 400/408/413 to every route with a body, 503 to every mutating route.
   New body shapes go in :data:`SCHEMAS`; a new field goes in its schema's ``properties`` (and
   ``required`` when it is always there).
3. ``make openapi`` (``python -m sparrow.master.openapi --write``) rewrites ``openapi.json``;
   ``python -m sparrow.master.openapi --check`` (a unit test) fails while the file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from frontend.scsi.lubase import AccessState
from sparrow.auth.tokens import NAME_MAX, TENANT_PATTERN, TOKEN_ID_PATTERN, Role
from sparrow.cluster.controller import MAX_REPLICAS, MIN_REPLICAS, StatusKind
from sparrow.cluster.explain import Reason
from sparrow.cluster.messages import (
    BLOCK_SIZES,
    NODE_ID_PATTERN,
    VOLUME_ID_PATTERN,
    VOLUME_NAME_PATTERN,
    Health,
)
from sparrow.cluster.messages import Role as CopyRole
from sparrow.cluster.nodeidentity import Admission
from sparrow.cluster.observations import NodeState
from sparrow.health import DEGRADED, OK, UNHEALTHY
from sparrow.master.api import MAX_WAIT
from sparrow.master.audit import READ_METHODS, VERBS
from sparrow.master.auth import PUBLIC_PATHS, ROUTE_ACTIONS
from sparrow.master.moves_api import PUBLISH_TIMEOUT
from sparrow.metricsauth import SCRAPE_PREFIX, SCRAPE_TOKEN_ROUTE

#: The document's path in the package, and the route that serves it.
DOCUMENT = "openapi.json"
ROUTE = "/openapi.json"
OPENAPI_VERSION = "3.1.0"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    if "$ref" in schema:
        return {"oneOf": [schema, {"type": "null"}]}
    kind = schema["type"]
    out = {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}
    if "enum" in schema:
        out["enum"] = [*schema["enum"], None]
    return out


def _enum(values: Iterable[object]) -> Schema:
    return {"type": "string", "enum": [str(getattr(v, "value", v)) for v in values]}


def _obj(required: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None) -> Schema:
    """A closed object: ``required`` fields always present, ``optional`` ones may be."""
    properties = {**required, **(optional or {})}
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def _pattern(regex: str) -> Schema:
    return {"type": "string", "pattern": f"^{regex}$"}


STRING: Schema = {"type": "string"}
TEXT = _nullable(STRING)
COUNT: Schema = {"type": "integer", "minimum": 0}
BOOL: Schema = {"type": "boolean"}
SIZE_IN: Schema = {
    "type": ["integer", "string"],
    "description": 'Bytes, or a string such as "64MiB" (sparrow.sizes)',
    "minimum": 1,
}
CHAP_NAME: Schema = {"type": "string", "minLength": 1}

#: Every body shape, by name (``#/components/schemas/NAME``).
SCHEMAS: dict[str, Schema] = {
    "Error": _obj({"error": {**STRING, "description": "One line: what was wrong"}}),
    "VolumeName": {**_pattern(VOLUME_NAME_PATTERN.pattern), "maxLength": 63},
    "NodeId": {**_pattern(NODE_ID_PATTERN.pattern), "maxLength": 63},
    "VolumeCreate": _obj(
        {"name": _ref("VolumeName")},
        {
            "size": {
                **SIZE_IN,
                "description": SIZE_IN["description"] + "; optional only with a backing on `sparrow serve`",
            },
            "block_size": {"type": "integer", "enum": list(BLOCK_SIZES), "default": 512},
            "replicas": {"type": "integer", "minimum": MIN_REPLICAS, "maximum": MAX_REPLICAS, "default": 1},
            "physical_block_size": _nullable({"type": "integer", "enum": list(BLOCK_SIZES)}),
            "chap_user": _nullable(CHAP_NAME),
            "chap_secret": _nullable({**CHAP_NAME, "writeOnly": True}),
            "chap_mutual_user": _nullable(CHAP_NAME),
            "chap_mutual_secret": _nullable({**CHAP_NAME, "writeOnly": True}),
            "backing": _nullable(
                {**STRING, "pattern": "^/", "description": "A device's absolute path (admin)"}
            ),
        },
    ),
    "VolumeResize": _obj({"size": SIZE_IN}),
    "VolumeUpdate": _obj(
        {},
        {
            "chap": {"type": "null", "description": "null: CHAP off"},
            "chap_user": CHAP_NAME,
            "chap_secret": {**CHAP_NAME, "writeOnly": True},
            "chap_mutual_user": _nullable(CHAP_NAME),
            "chap_mutual_secret": _nullable({**CHAP_NAME, "writeOnly": True}),
        },
    ),
    "ClusterUpdate": _obj(
        {},
        {
            "discovery_chap": {"type": "null", "description": "null: discovery CHAP off"},
            "discovery_chap_user": CHAP_NAME,
            "discovery_chap_secret": {**CHAP_NAME, "writeOnly": True},
            "discovery_chap_mutual_user": _nullable(CHAP_NAME),
            "discovery_chap_mutual_secret": _nullable({**CHAP_NAME, "writeOnly": True}),
        },
    ),
    "ClusterSettings": _obj({"discovery_chap": _nullable(_obj({"user": STRING, "mutual_user": TEXT}))}),
    "Failover": _obj(
        {}, {"to": {**_nullable(_ref("NodeId")), "description": "The new primary (else the best)"}}
    ),
    "Rebuild": _obj({"replica": {**_ref("NodeId"), "description": "The copy to replace"}}),
    "Primary": _obj({"node_id": _ref("NodeId"), "portal": STRING}),
    "Copy": _obj(
        {
            "node_id": _ref("NodeId"),
            "role": _enum(r for r in CopyRole if r is not CopyRole.NONE),
            "state": _enum(NodeState),
            "observed_epoch": _nullable(COUNT),
            "observed_role": _nullable(_enum(CopyRole)),
            "health": _nullable(_enum(Health)),
            "converged": _nullable(BOOL),
            "write_position": _nullable(COUNT),
            "sync": _enum(["in_sync", "syncing", "stale"]),
            "resync": _nullable(_obj({"done_bytes": COUNT, "total_bytes": COUNT})),
        }
    ),
    "Volume": _obj(
        {
            "name": _ref("VolumeName"),
            "volume_id": _pattern(VOLUME_ID_PATTERN.pattern),
            "serial": STRING,
            "naa": STRING,
            "size": {"type": "integer", "minimum": 1},
            "block_size": {"type": "integer", "enum": list(BLOCK_SIZES)},
            "physical_block_size": _nullable({"type": "integer", "enum": list(BLOCK_SIZES)}),
            "chap": _nullable(_obj({"user": STRING, "mutual_user": TEXT})),
            "backing": TEXT,
            "replicas_wanted": {"type": "integer", "minimum": MIN_REPLICAS, "maximum": MAX_REPLICAS},
            "created_at": {**STRING, "format": "date-time"},
            "iqn": STRING,
            "lun": {"type": "integer", "const": 0},
            "epoch": {**COUNT, "description": "0: never assigned"},
            "primary": _nullable(_ref("Primary")),
            "replicas": {"type": "array", "items": _ref("Copy")},
            "served": {**BOOL, "description": "The primary serves the current epoch"},
            "paused": {**BOOL, "description": "The operator paused it (`status` says once applied)"},
            "status": {**TEXT, "description": "The controller's reason (null: not stepped yet)"},
            "status_kind": _nullable(_enum(StatusKind)),
            "url": TEXT,
        }
    ),
    "VolumeList": _obj({"volumes": {"type": "array", "items": _ref("Volume")}}),
    "Node": _obj(
        {
            "node_id": _ref("NodeId"),
            "state": _enum(NodeState),
            "incarnation": COUNT,
            "last_heartbeat_age": _nullable({"type": "number", "minimum": 0}),
            "iscsi_portal": STRING,
            "replication": STRING,
            "http": STRING,
            "capacity_bytes": COUNT,
            "free_bytes": _nullable(COUNT),
            "skipped": {
                "type": "array",
                "items": _ref("SkippedVolume"),
                "description": "Volumes the node did not load at its start, and why",
            },
            "draining": BOOL,
            "drain_status": TEXT,
            "node_key": {**_nullable(_ref("NodeKey")), "description": "null: bound at its next Hello"},
            "admission": {
                **_nullable(_enum(Admission)),
                "description": "pending: awaiting `sparrow node approve`, nothing placed on it; "
                "null: no key bound yet",
            },
        }
    ),
    "NodeKey": {**_pattern("[0-9a-f]{64}"), "description": "An Ed25519 public key, 64 hex digits"},
    "SkippedVolume": _obj({"name": STRING, "reason": STRING}),
    "Rekey": _obj(
        {},
        {
            "key": {
                **_nullable(_pattern(r"\s*[0-9a-fA-F]{64}\s*")),
                "description": "The key to pin (either case); null or absent: trust on first use",
            }
        },
    ),
    "Rekeyed": _obj({"node_id": _ref("NodeId"), "node_key": _nullable(_ref("NodeKey"))}),
    "Approve": _obj(
        {},
        {
            "key": {
                **_nullable(_pattern(r"\s*[0-9a-fA-F]{64}\s*")),
                "description": "The key to approve (either case); null or absent: the key the "
                "pending node proved",
            }
        },
    ),
    "Approved": _obj({"node_id": _ref("NodeId"), "node_key": _ref("NodeKey"), "admission": _enum(Admission)}),
    "Finding": _obj(
        {
            "reason": _enum(Reason),
            "text": STRING,
            "action": {**TEXT, "description": "What an operator can do (null: it resolves itself)"},
            "node": _nullable(_ref("NodeId")),
            "since_seconds": _nullable({"type": "number", "minimum": 0}),
            "since": _nullable({**STRING, "format": "date-time"}),
            "facts": {"type": "object", "description": "The finding's figures, by name"},
        }
    ),
    "Explanation": _obj(
        {
            "volume": _ref("VolumeName"),
            "volume_id": _pattern(VOLUME_ID_PATTERN.pattern),
            "served": BOOL,
            "reason": {**_enum(Reason), "description": "The headline finding's"},
            "summary": STRING,
            "findings": {"type": "array", "items": _ref("Finding"), "minItems": 1},
            "unsupported_commands": {
                "type": "array",
                "items": _obj(
                    {
                        "node": _ref("NodeId"),
                        "opcode": {"type": "integer", "minimum": 0, "maximum": 255},
                        "service_action": _nullable(COUNT),
                        "count": COUNT,
                        "last_initiator": STRING,
                    }
                ),
            },
            "skipped_at_start": {
                "type": "array",
                "items": _obj({"node": _ref("NodeId"), "reason": STRING}),
            },
        }
    ),
    "NodeList": _obj({"nodes": {"type": "array", "items": _ref("Node")}}),
    "Drain": _obj({"node_id": _ref("NodeId"), "draining": BOOL, "drain_status": TEXT}),
    "ScrapeToken": _obj(
        {"token": {**_pattern(SCRAPE_PREFIX + "[0-9a-f]{64}"), "description": "sparrow.metricsauth"}}
    ),
    "TokenCreate": _obj(
        {"role": _enum(Role)},
        {
            "tenant": _nullable(_pattern(TENANT_PATTERN.pattern)),
            "name": _nullable({"type": "string", "minLength": 1, "maxLength": NAME_MAX}),
        },
    ),
    "Token": _obj(
        {
            "id": _pattern(TOKEN_ID_PATTERN.pattern),
            "role": _enum(Role),
            "tenant": TEXT,
            "name": TEXT,
            "created_at": {"type": "number", "description": "Unix time"},
            "revoked_at": _nullable({"type": "number"}),
        }
    ),
    "TokenList": _obj({"tokens": {"type": "array", "items": _ref("Token")}}),
    "VolumeProblem": _obj({"volume_id": STRING, "name": TEXT, "reason": STRING}),
    "TaskFailure": _obj({"task": STRING, "error": STRING, "at": {"type": "number"}}),
    "Health": _obj(
        {
            "status": _enum([OK, DEGRADED, UNHEALTHY]),
            "reasons": {"type": "array", "items": STRING},
            "volumes_not_served": {"type": "array", "items": _ref("VolumeProblem")},
            "tasks_failed": {"type": "array", "items": _ref("TaskFailure")},
            "nodes": COUNT,
            "nodes_alive": COUNT,
            "volumes": COUNT,
            "volumes_paused": {"type": "array", "items": _ref("PausedVolume")},
        },
        {
            "offline": {
                "type": "array",
                "items": _ref("OfflineVolume"),
                "description": "`sparrow serve`: local volumes that failed to load",
            },
            "node": {**_ref("NodeHealth"), "description": "`sparrow serve`: the local node's own health"},
        },
    ),
    "PublicHealth": _obj(
        {
            "status": _enum([OK, DEGRADED, UNHEALTHY]),
            "reasons": {
                "type": "array",
                "items": STRING,
                "description": "Without names: how many volumes are not served, which task failed",
            },
            "counts": _obj(
                {"volumes": COUNT, "volumes_not_served": COUNT, "tasks_failed": COUNT},
                {
                    "nodes": COUNT,
                    "nodes_alive": COUNT,
                    "volumes_paused": COUNT,
                    "offline": COUNT,
                    "fences": COUNT,
                },
            ),
        }
    ),
    "HealthAnswer": {
        "oneOf": [_ref("PublicHealth"), _ref("Health")],
        "description": "Without a credential: PublicHealth (names nothing); with a credential that "
        "opens /metrics: Health, in full",
    },
    "OfflineVolume": _obj({"name": STRING, "path": STRING, "reason": STRING}),
    "PausedVolume": _obj(
        {
            "volume_id": STRING,
            "name": STRING,
            "applied": {**BOOL, "description": "The primary serves the paused epoch"},
        }
    ),
    "NodeHealth": _obj(
        {
            "status": _enum([OK, DEGRADED, UNHEALTHY]),
            "reasons": {"type": "array", "items": STRING},
            "volumes_not_served": {"type": "array", "items": _ref("VolumeProblem")},
            "tasks_failed": {"type": "array", "items": _ref("TaskFailure")},
            "node_id": _ref("NodeId"),
            "incarnation": COUNT,
            "master": _obj({"address": STRING, "connected": BOOL, "last_error": TEXT}),
            "lease": _obj({"valid": BOOL, "remaining_seconds": {"type": "number"}}),
            "fences": COUNT,
            "last_error": TEXT,
            "volumes": {
                "type": "array",
                "items": _obj(
                    {
                        "volume_id": STRING,
                        "name": STRING,
                        "iqn": STRING,
                        "access_state": _enum(s.name.lower() for s in AccessState),
                        "paused": BOOL,
                    }
                ),
            },
            "offline": {"type": "array", "items": _ref("OfflineVolume")},
        }
    ),
}

# The token's secret is in the answer of a create only (shown once).
SCHEMAS["NewToken"] = {
    **SCHEMAS["Token"],
    "properties": {**SCHEMAS["Token"]["properties"], "token": {**STRING, "description": "Shown once"}},
    "required": [*SCHEMAS["Token"]["required"], "token"],
}

PARAMETERS: dict[str, Schema] = {
    "VolumeName": {"name": "name", "in": "path", "required": True, "schema": _ref("VolumeName")},
    "NodeId": {"name": "node_id", "in": "path", "required": True, "schema": _ref("NodeId")},
    "TokenId": {"name": "id", "in": "path", "required": True, "schema": _pattern(TOKEN_ID_PATTERN.pattern)},
    "Wait": {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "Seconds to wait for the volume to be served (0 to the maximum)",
        "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
    },
}

#: The status codes every error body answers with, and what each means.
ERRORS: dict[int, str] = {
    400: "Bad request: the reason in one line",
    401: "No valid bearer token (WWW-Authenticate: Bearer)",
    403: "The token's role or tenant does not allow this",
    404: "No such volume, node or token",
    408: "The request body did not arrive in time (sparrow.httplimits)",
    409: "Cannot be done now: why not",
    413: "The request body is too large",
    503: "The audit log cannot be written: nothing changed (sparrow.master.audit)",
}

TEXT_PLAIN = "text/plain"


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: ``responses`` maps each status it answers to its body's schema name (None: no
    body; a status in :data:`ERRORS` with None gets the Error body)."""

    method: str
    path: str
    operation_id: str
    summary: str
    responses: Mapping[int, str | None]
    request: str | None = None
    parameters: tuple[str, ...] = ()
    description: str | None = None
    tags: tuple[str, ...] = ()


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST", "/v1/volumes", "createVolume", "Create a volume",
        {200: "Volume", 201: "Volume", 409: None}, request="VolumeCreate", parameters=("Wait",),
        tags=("volumes",),
        description="With ?wait, answers once the volume is served, the controller says it cannot "
        "place it, or at the deadline (201 either way: `status` says why it is not served). A retry "
        "with the same parameters answers 200 with the existing volume; another create of the name "
        "409, naming each field that differs (secrets named, never shown).",
    ),
    Operation("GET", "/v1/volumes", "listVolumes", "List volumes (a tenant token: its own)",
              {200: "VolumeList"}, tags=("volumes",)),
    Operation("GET", "/v1/volumes/{name}", "getVolume", "Inspect a volume",
              {200: "Volume", 404: None}, parameters=("VolumeName",), tags=("volumes",)),
    Operation("DELETE", "/v1/volumes/{name}", "deleteVolume", "Delete a volume",
              {204: None, 404: None}, parameters=("VolumeName",), tags=("volumes",)),
    Operation(
        "PATCH", "/v1/volumes/{name}", "updateVolume", "Change a volume's export settings (CHAP)",
        {200: "Volume", 404: None}, request="VolumeUpdate", parameters=("VolumeName",), tags=("volumes",),
        description="CHAP on, changed or off (`{\"chap\": null}`) for new logins; sessions already "
        "logged in are kept; no new epoch.",
    ),
    Operation(
        "POST", "/v1/volumes/{name}/pause", "pauseVolume", "Take a volume out of service (NOT READY)",
        {200: "Volume", 404: None}, parameters=("VolumeName", "Wait"), tags=("volumes",),
        description="Recorded before the answer; published under a new epoch. With ?wait, answers "
        "once the primary has applied it, or at the deadline.",
    ),
    Operation(
        "POST", "/v1/volumes/{name}/resume", "resumeVolume", "Return a paused volume to service",
        {200: "Volume", 404: None}, parameters=("VolumeName", "Wait"), tags=("volumes",),
    ),
    Operation(
        "POST", "/v1/volumes/{name}/resize", "resizeVolume", "Grow a volume (a new epoch)",
        {200: "Volume", 404: None, 409: None}, request="VolumeResize",
        parameters=("VolumeName", "Wait"), tags=("volumes",),
    ),
    Operation(
        "POST", "/v1/volumes/{name}/failover", "failoverVolume", "Planned failover",
        {200: "Volume", 202: "Volume", 404: None, 409: None}, request="Failover",
        parameters=("VolumeName", "Wait"), tags=("volumes", "moves"),
        description="200 once the new primary is published (with ?wait: once it serves); 202 when "
        f"the control loop has not published it within {PUBLISH_TIMEOUT:g} s (still queued).",
    ),
    Operation(
        "POST", "/v1/volumes/{name}/rebuild", "rebuildVolume", "Replace a copy with a fresh one",
        {200: "Volume", 202: "Volume", 404: None, 409: None}, request="Rebuild",
        parameters=("VolumeName",), tags=("volumes", "moves"),
    ),
    Operation("GET", "/v1/volumes/{name}/explain", "explainVolume",
              "Why the volume is in its state, in words and as fields",
              {200: "Explanation", 404: None}, parameters=("VolumeName",), tags=("volumes",)),
    Operation("GET", "/v1/nodes", "listNodes", "List nodes", {200: "NodeList"}, tags=("nodes",)),
    Operation(
        "DELETE", "/v1/nodes/{node_id}", "forgetNode", "Forget a dead node that holds no copy",
        {204: None, 404: None, 409: None}, parameters=("NodeId",), tags=("nodes",),
    ),
    Operation("POST", "/v1/nodes/{node_id}/drain", "drainNode", "Move every copy off a node",
              {200: "Drain", 404: None}, parameters=("NodeId",), tags=("nodes", "moves")),
    Operation("POST", "/v1/nodes/{node_id}/undrain", "undrainNode", "Let a node take new copies again",
              {200: "Drain", 404: None}, parameters=("NodeId",), tags=("nodes", "moves")),
    Operation(
        "POST", "/v1/nodes/{node_id}/rekey", "rekeyNode", "Rebind a dead node's id to a key, or to none",
        {200: "Rekeyed", 404: None, 409: None}, request="Rekey", parameters=("NodeId",), tags=("nodes",),
    ),
    Operation(
        "POST", "/v1/nodes/{node_id}/approve", "approveNode",
        "Approve a pending node's key, or a node's key ahead of its first Hello",
        {200: "Approved", 404: None, 409: None}, request="Approve", parameters=("NodeId",),
        tags=("nodes",),
    ),
    Operation("GET", "/v1/cluster", "getClusterSettings", "The cluster's settings (discovery CHAP)",
              {200: "ClusterSettings"}, tags=("cluster",)),
    Operation("PATCH", "/v1/cluster", "updateClusterSettings", "Change the discovery CHAP (admin)",
              {200: "ClusterSettings"}, request="ClusterUpdate", tags=("cluster",)),
    Operation("POST", "/v1/tokens", "createToken", "Mint a token (its secret is shown once)",
              {201: "NewToken"}, request="TokenCreate", tags=("tokens",)),
    Operation("GET", "/v1/tokens", "listTokens", "List tokens (never their secrets)",
              {200: "TokenList"}, tags=("tokens",)),
    Operation("DELETE", "/v1/tokens/{id}", "revokeToken", "Revoke a token at once",
              {204: None, 404: None}, parameters=("TokenId",), tags=("tokens",)),
    Operation("GET", "/metrics", "getMetrics",
              "Prometheus text exposition (the scrape token, or a token with no tenant)",
              {200: TEXT_PLAIN}, tags=("monitoring",),
              description="Opens to `Authorization: Bearer` with the scrape token (`sparrow metrics "
              "token`) or an API token with no tenant (a tenant token: 403: the metrics name every "
              "tenant's volumes); anyone under `--public-metrics` (labs only)."),
    Operation("GET", SCRAPE_TOKEN_ROUTE, "getScrapeToken", "The scrape token of every /metrics (admin)",
              {200: "ScrapeToken", 404: None}, tags=("monitoring",),
              description="For `sparrow top`, which reads each node's /metrics with it. It is derived "
              "from the cluster secret and changes only with it: revoking the token that asked "
              "does not take it back."),
    Operation(
        "GET", "/healthz", "getHealth", "Health (no token: without names)",
        {200: "HealthAnswer", 503: "HealthAnswer"}, tags=("monitoring",),
        description="503 with status `unhealthy` while a volume is not served or a task has failed. "
        "Without `Authorization`, the answer names nothing (PublicHealth: status, reasons without "
        "names, counts). With a credential it is judged as for /metrics (the scrape token or a "
        "token with no tenant; 401, 403) and the answer is in full (Health); in full to anyone "
        "under `--public-metrics`.",
    ),
    Operation("GET", ROUTE, "getOpenApi", "This document (no token)", {200: "application/json"},
              tags=("monitoring",)),
)  # fmt: skip


def _response(status: int, body: str | None) -> Schema:
    if body is None and status in ERRORS:
        return {"$ref": f"#/components/responses/{status}"}
    description = ERRORS.get(status) if body is None else None
    answer: Schema = {"description": description or _STATUS_TEXT.get(status, str(status))}
    if body == TEXT_PLAIN:
        answer["content"] = {TEXT_PLAIN: {"schema": STRING}}
    elif body == "application/json":
        answer["content"] = {"application/json": {"schema": {"type": "object"}}}
    elif body is not None:
        answer["content"] = {"application/json": {"schema": _ref(body)}}
    return answer


_STATUS_TEXT = {200: "OK", 201: "Created", 202: "Accepted: still queued", 204: "Done", 503: "Unhealthy"}


def _operation(op: Operation) -> Schema:
    public = op.path in PUBLIC_PATHS
    # A public route with an action in ROUTE_ACTIONS: a credential is optional and opens more.
    optional = public and (op.method, op.path) in ROUTE_ACTIONS
    statuses: dict[int, str | None] = dict(op.responses)
    if not public or optional:
        statuses.setdefault(401, None)
        statuses.setdefault(403, None)
    if op.request is not None:
        for status in (400, 408, 413):
            statuses.setdefault(status, None)
    if op.method not in READ_METHODS:
        statuses.setdefault(503, None)
    out: Schema = {"operationId": op.operation_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.tags:
        out["tags"] = list(op.tags)
    if op.parameters:
        out["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in op.parameters]
    if op.request is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.request)}},
        }
    out["responses"] = {str(s): _response(s, statuses[s]) for s in sorted(statuses)}
    if optional:
        out["security"] = [{}, {"bearer": []}]
    if public and not optional:
        out["security"] = []
    else:
        out["x-sparrow-action"] = str(ROUTE_ACTIONS[(op.method, op.path)])
    verb = VERBS.get((op.method, op.path))
    if verb is not None:
        out["x-sparrow-audit-verb"] = verb
    return out


def _error(status: int, text: str) -> Schema:
    answer: Schema = {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
    if status == 401:
        challenge = {"description": 'Bearer realm="sparrow"', "required": True, "schema": STRING}
        answer["headers"] = {"WWW-Authenticate": challenge}
    return answer


def document() -> dict[str, Any]:
    """The document, built from :data:`OPERATIONS`, :data:`SCHEMAS` and the code's own tables."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Sparrow master API",
            "version": "1",
            "description": "The control API of a Sparrow master (`sparrow master`, `sparrow serve`). "
            "Every route but /healthz and /openapi.json needs `Authorization: Bearer TOKEN` (/metrics "
            "takes the scrape token too; /healthz answers in full only to such a credential); "
            "`x-sparrow-action` names what the token's role must allow, `x-sparrow-audit-verb` the "
            'verb the audit log records. Errors are `{"error": "<one line>"}`.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "responses": {str(status): _error(status, text) for status, text in ERRORS.items()},
        },
    }


def registered_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route ``app`` registers (HEAD goes with GET: not listed)."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def documented_routes(doc: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(method, path) of every operation in ``doc``."""
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def render() -> bytes:
    """The document as the checked-in file holds it."""
    return (json.dumps(document(), indent=2) + "\n").encode()


def checked_in() -> bytes:
    """The checked-in document (package data), as served."""
    return resources.files("sparrow.master").joinpath(DOCUMENT).read_bytes()


OPENAPI_KEY = web.AppKey("sparrow.openapi", bytes)


def add_openapi_route(app: web.Application) -> None:
    """``GET /openapi.json``: the checked-in document, read once here."""
    app[OPENAPI_KEY] = checked_in()
    app.router.add_get(ROUTE, get_openapi)


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparrow.master.openapi", description="The OpenAPI document"
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help=f"rewrite the checked-in {DOCUMENT}")
    group.add_argument("--check", action="store_true", help=f"exit 1 when {DOCUMENT} is stale")
    args = parser.parse_args(argv)
    path = resources.files("sparrow.master").joinpath(DOCUMENT)
    if args.write:
        with resources.as_file(path) as file:
            file.write_bytes(render())
        return 0
    if checked_in() != render():
        print(f"sparrow/master/{DOCUMENT} is stale: run `make openapi`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
