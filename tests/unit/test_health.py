"""sparrow.health: what a node's /healthz counts as a volume it should serve and does not."""

from __future__ import annotations

from sparrow.cluster.messages import Health, Role, VolumeObservation
from sparrow.health import VolumeProblem, node_problems, summary
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
