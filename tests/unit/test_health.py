"""sparrow.health: what a node's /healthz counts as a volume it should serve and does not, and what
the answer without a credential keeps (no names)."""

from __future__ import annotations

import json
from typing import Any

from sparrow.cluster.messages import Health, Role, VolumeObservation
from sparrow.health import VolumeProblem, health_response, node_problems, public_health, summary
from sparrow.supervision import TaskFailure

A, B, C, D, E = ("a" * 32, "b" * 32, "c" * 32, "d" * 32, "e" * 32)


def _obs(volume_id: str, role: Role, health: Health, *, converged: bool = True) -> VolumeObservation:
    return VolumeObservation(volume_id, 1, role, health, 0, (), converged)


def test_a_node_counts_its_unserved_primaries_and_unreadable_state() -> None:
    observations = [
        _obs(A, Role.PRIMARY, Health.OK),  # served
        _obs(B, Role.PRIMARY, Health.DEGRADED),  # fenced
        _obs(C, Role.PRIMARY, Health.OFFLINE),  # not open
        _obs(D, Role.REPLICA, Health.OFFLINE),  # a replica serves nothing yet
        VolumeObservation(E, 0, Role.NONE, Health.FAILED, 0, (), converged=False),
        _obs("f" * 32, Role.PRIMARY, Health.OK, converged=False),
    ]
    problems = node_problems(observations, {B: "vb", C: "vc"})
    assert problems == [
        VolumeProblem(B, "vb", "primary fenced (no valid lease)"),
        VolumeProblem(C, "vc", "primary not open"),
        VolumeProblem(E, None, "its cluster state cannot be read"),
        VolumeProblem("f" * 32, None, "primary transitioning"),
    ]


def test_the_summary_is_ok_degraded_or_unhealthy_with_reasons() -> None:
    assert summary([], [])["status"] == "ok"
    assert summary([], [], degraded=True)["status"] == "degraded"
    failure = TaskFailure("fence-timer", "RuntimeError: boom", 1.0)
    body = summary([VolumeProblem(B, "vb", "primary fenced (no valid lease)")], [failure], degraded=True)
    assert body == {
        "status": "unhealthy",
        "reasons": [
            "volume vb: primary fenced (no valid lease)",
            "task fence-timer failed: RuntimeError: boom",
        ],
        "volumes_not_served": [{"volume_id": B, "name": "vb", "reason": "primary fenced (no valid lease)"}],
        "tasks_failed": [{"task": "fence-timer", "error": "RuntimeError: boom", "at": 1.0}],
    }


# --- the answer without a credential ------------------------------------------------------------

SECRET_NAMES = ("vol-secret", "iqn.2026-12.example:vol-secret", "node-7", "10.1.2.3", "/srv/vol-secret")


def _node_body() -> dict[str, Any]:
    """A node's full answer (the shape of Node.health) naming everything it can."""
    failure = TaskFailure("node-convergence", "OSError: /srv/vol-secret: no space", 1.0)
    problem = VolumeProblem(B, "vol-secret", "primary fenced (no valid lease)")
    return {
        **summary([problem], [failure], degraded=True),
        "node_id": "node-7",
        "incarnation": 3,
        "master": {"address": "10.1.2.3:3290", "connected": False, "last_error": "node-7 refused"},
        "lease": {"valid": False, "remaining_seconds": 0.0},
        "fences": 2,
        "last_error": "vol-secret: boom",
        "volumes": [
            {"volume_id": A, "name": "vol-secret", "iqn": "iqn.2026-12.example:vol-secret",
             "access_state": "standby", "paused": False},
        ],
        "offline": [{"name": "vol-secret", "path": "/srv/vol-secret", "reason": "corrupt"}],
    }  # fmt: skip


def test_a_nodes_public_answer_keeps_the_status_and_counts_and_names_nothing() -> None:
    body = _node_body()
    public = public_health(body)
    assert public == {
        "status": "unhealthy",
        "reasons": ["1 volume not served", "task node-convergence failed"],
        "counts": {"volumes": 1, "volumes_not_served": 1, "tasks_failed": 1, "fences": 2, "offline": 1},
    }
    text = json.dumps(public)
    assert not [name for name in SECRET_NAMES if name in text]
    assert A not in text and B not in text  # nor the volume ids
    assert health_response(public).status == health_response(body).status == 503


def test_a_masters_and_serves_public_answer_counts_nodes_volumes_and_paused() -> None:
    node = _node_body()
    body = {
        **summary([VolumeProblem(A, "vol-secret", "primary node-7 is not alive")] * 2, []),
        "nodes": 3,
        "nodes_alive": 2,
        "volumes": 5,
        "volumes_paused": [{"volume_id": C, "name": "vol-secret", "applied": True}],
        "offline": node["offline"],
        "node": node,
    }
    public = public_health(body)
    assert public["reasons"] == ["2 volumes not served"]
    assert public["counts"] == {
        "volumes": 5, "volumes_not_served": 2, "tasks_failed": 0, "nodes": 3, "nodes_alive": 2,
        "volumes_paused": 1, "offline": 1,
    }  # fmt: skip
    assert not [name for name in SECRET_NAMES if name in json.dumps(public)]
    ok = public_health({**summary([], []), "nodes": 1, "nodes_alive": 1, "volumes": 0, "volumes_paused": []})
    assert (ok["status"], ok["reasons"]) == ("ok", [])
    assert health_response(ok).status == 200
