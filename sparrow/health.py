"""What ``/healthz`` says, on the master (and ``sparrow serve``) and on a node: the truth.

A daemon is **unhealthy** (HTTP 503) while any volume that should be served is not, or while a
daemon task has failed (``sparrow.supervision``); the answer lists each reason. Otherwise it is
``ok`` (200), or ``degraded`` (200) for what does not stop a volume from being served (e.g. a
node that has lost its master but still holds a valid lease, or a local volume that failed to
load and the authority does not know).

Served, on the master (:func:`unserved_reason`, the one definition the API's ``served`` and
``?wait`` use too): the volume's primary has reported the current epoch, as primary, converged
and serving (health OK: a fenced primary reports DEGRADED), in a heartbeat the master still counts
as alive. On a node (:func:`node_problems`): every volume the node holds as primary is open and
serving (not fenced, not waiting for its first lease), and no volume's state is unreadable.

A paused volume (docs/cluster.md, "Pause and resume") is served in this sense once its primary has
applied the paused epoch: it answers NOT READY because the operator asked for it, which is no
fault. The health answer lists it in ``volumes_paused`` (:func:`paused_volumes`) and stays ``ok``.

Who reads what (docs/operations.md, "Health"): the answer above names volumes, IQNs, node ids, the
master's address and error texts, so it is given in full only to the credential that opens the
daemon's ``/metrics`` (sparrow.metricsauth: :meth:`~sparrow.metricsauth.MetricsDoor.asks_in_full`
says when a request asks for it). A caller without a credential (a load balancer, a systemd probe)
gets :func:`public_health`: the same status and HTTP code, reasons without names and counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sparrow.cluster.controller import VolumeStatus
from sparrow.cluster.messages import Assignment, Health, Role, VolumeObservation
from sparrow.cluster.observations import ObservationStore
from sparrow.supervision import TaskFailure

if TYPE_CHECKING:
    from sparrow.master.control import ControlLoop

OK = "ok"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class VolumeProblem:
    """A volume that should be served and is not, and why."""

    volume_id: str
    name: str | None
    reason: str

    def json(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id, "name": self.name, "reason": self.reason}


def unserved_reason(control: ControlLoop, volume_id: str, now: float) -> str | None:
    """Why the volume is not served at its current epoch (None: it is; see the module docstring)."""
    return unserved(control.current(volume_id), control.status(volume_id), control.observations, now)


def unserved(
    assignment: Assignment | None, status: VolumeStatus | None, observations: ObservationStore, now: float
) -> str | None:
    """:func:`unserved_reason` from the volume's current assignment, the controller's status and
    what the nodes reported (``sparrow.cluster.explain`` uses it too)."""
    if assignment is None or assignment.primary is None or assignment.primary_portal is None:
        if status is not None and status.reason:
            return f"no primary: {status.reason}"
        return "no primary: not placed yet"
    primary = assignment.primary
    if not observations.alive(primary, now):
        return f"primary {primary} is not alive"
    obs = observations.observation(primary, assignment.volume_id)
    if obs is None:
        return f"primary {primary} has not reported the volume yet"
    if obs.epoch != assignment.epoch or obs.role is not Role.PRIMARY or not obs.converged:
        return (
            f"transitioning: primary {primary} reports epoch {obs.epoch} as {obs.role.value}"
            f"{'' if obs.converged else ', not converged'} (published: epoch {assignment.epoch})"
        )
    if obs.health is not Health.OK:
        return f"primary {primary} is fenced (health {obs.health.value})"
    return None


def master_problems(control: ControlLoop, now: float) -> list[VolumeProblem]:
    """Every live volume the master knows that is not served, by name."""
    problems = []
    for volume in control.desired():
        reason = unserved_reason(control, volume.volume_id, now)
        if reason is not None:
            problems.append(VolumeProblem(volume.volume_id, volume.name, reason))
    return sorted(problems, key=lambda p: (p.name or "", p.volume_id))


def paused_volumes(control: ControlLoop) -> list[dict[str, Any]]:
    """The live volumes the operator paused, by name: ``{volume_id, name, applied}``, ``applied``
    once the current assignment carries the pause (the nodes are told; ``served`` says when the
    primary has applied it)."""
    out = []
    for volume in control.paused():
        assignment = control.current(volume.volume_id)
        applied = assignment is not None and assignment.paused
        out.append({"volume_id": volume.volume_id, "name": volume.name, "applied": applied})
    return sorted(out, key=lambda v: (str(v["name"]), str(v["volume_id"])))


def node_problems(observations: Iterable[VolumeObservation], names: Mapping[str, str]) -> list[VolumeProblem]:
    """The volumes a node holds as primary and does not serve, and those whose state it cannot
    read (``observations``: what its next heartbeat reports; ``names``: exported volumes' names)."""
    problems = []
    for obs in observations:
        name = names.get(obs.volume_id)
        if obs.health is Health.FAILED:
            problems.append(VolumeProblem(obs.volume_id, name, "its cluster state cannot be read"))
        elif obs.role is Role.PRIMARY and obs.health is not Health.OK:
            what = "fenced (no valid lease)" if obs.health is Health.DEGRADED else "not open"
            problems.append(VolumeProblem(obs.volume_id, name, f"primary {what}"))
        elif obs.role is Role.PRIMARY and not obs.converged:
            problems.append(VolumeProblem(obs.volume_id, name, "primary transitioning"))
    return problems


def summary(
    problems: Sequence[VolumeProblem], failures: Sequence[TaskFailure], *, degraded: bool = False
) -> dict[str, Any]:
    """``status``, ``reasons``, ``volumes_not_served`` and ``tasks_failed`` of a health answer."""
    reasons = [f"volume {p.name or p.volume_id}: {p.reason}" for p in problems]
    reasons += [f"task {f.task} failed: {f.error}" for f in failures]
    return {
        "status": UNHEALTHY if reasons else DEGRADED if degraded else OK,
        "reasons": reasons,
        "volumes_not_served": [p.json() for p in problems],
        "tasks_failed": [f.json() for f in failures],
    }


def public_health(body: Mapping[str, Any]) -> dict[str, Any]:
    """The answer without a credential, from the full one ``body`` (master, serve or node): the
    same ``status`` (so the same HTTP code), ``reasons`` that name nothing (how many volumes are
    not served; which task failed, by its name in the code, not its error) and ``counts``.

    Left out: volume names and ids, IQNs, paths, node ids (the answering node's too: a probe does
    not need it and an outsider learns the naming of the fleet), the master's address, incarnation
    and every error text (an exception's message may quote any of these)."""
    not_served = len(body["volumes_not_served"])
    tasks = [str(f["task"]) for f in body["tasks_failed"]]
    reasons = [f"{not_served} volume{'' if not_served == 1 else 's'} not served"] if not_served else []
    reasons += [f"task {task} failed" for task in tasks]
    volumes = body["volumes"]
    counts = {
        "volumes": volumes if isinstance(volumes, int) else len(volumes),
        "volumes_not_served": not_served,
        "tasks_failed": len(tasks),
    }
    for field in ("nodes", "nodes_alive", "fences"):
        if field in body:
            counts[field] = int(body[field])
    for field in ("volumes_paused", "offline"):
        if field in body:
            counts[field] = len(body[field])
    return {"status": body["status"], "reasons": reasons, "counts": counts}


def health_response(body: dict[str, Any]) -> web.Response:
    """``body`` (with a :func:`summary`) as JSON: 503 when it is unhealthy, else 200."""
    return web.json_response(body, status=503 if body["status"] == UNHEALTHY else 200)
