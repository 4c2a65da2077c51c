"""The operator verbs on the CLI (sparrow.moves_cli) against an in-process master, and the resync
progress bar (sparrow.progress) as a pure function."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from typing import Any

import pytest

from sparrow.cli import CliError
from sparrow.cluster.messages import (
    Health,
    Heartbeat,
    Hello,
    ReplicaState,
    Role,
    SyncState,
    VolumeObservation,
)
from sparrow.master.control import ControlLoop
from sparrow.moves_cli import _wait
from sparrow.progress import Progress, progress_of, render
from tests.unit.test_master_cli import Clock, cli, master

__all__ = ["master"]  # the fixture

MiB = 1 << 20
GiB = 1 << 30

# -- the bar ---------------------------------------------------------------------------------------------


def volume(*copies: dict[str, Any]) -> dict[str, Any]:
    return {"replicas": [{"node_id": "n1", "sync": "in_sync"}, *copies]}


def test_progress_sums_the_syncing_copies_and_renders_a_bar() -> None:
    v = volume(
        {"node_id": "n2", "sync": "syncing", "resync": {"done_bytes": GiB // 4, "total_bytes": GiB}},
        {"node_id": "n3", "sync": "stale"},
    )
    p = progress_of([v])
    assert p == Progress(done_bytes=GiB // 4, total_bytes=GiB, syncing=1, unreported=0, stale=1)
    line = render("rebuild vol", p, width=200)
    assert (
        line == "rebuild vol [########......................]  25% 256 MiB / 1 GiB, 1 copy syncing, 1 stale"
    )
    assert render("rebuild vol", p, width=20) == line[:20]
    assert progress_of([v], nodes=("n3",)) == Progress(stale=1)


@pytest.mark.parametrize(
    "resync",
    [
        None,
        {},
        {"done_bytes": 5},
        {"done_bytes": "x", "total_bytes": 10},
        {"done_bytes": 1, "total_bytes": 0},
        7,
    ],
)
def test_a_copy_without_figures_degrades_to_a_count(resync: object) -> None:
    copy: dict[str, Any] = {"node_id": "n2", "sync": "syncing"}
    if resync is not None:
        copy["resync"] = resync
    p = progress_of([volume(copy)])
    assert p == Progress(syncing=1, unreported=1)
    assert p.fraction is None
    assert (
        render("x", p, 200) == "x [..............................] 1 copy syncing, 1 without progress figures"
    )


def test_done_beyond_total_is_full_and_nothing_to_show_says_waiting() -> None:
    copy = {"node_id": "n2", "sync": "syncing", "resync": {"done_bytes": 20, "total_bytes": 10}}
    assert progress_of([volume(copy)]).fraction == 1.0
    assert render("x", Progress(), 200) == "x [..............................] waiting"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def waiting(
    out: io.StringIO, views: list[dict[str, Any]], *, as_json: bool = False, wait: float = 10.0
) -> Any:
    now = [0.0]
    it = iter(views)
    args = argparse.Namespace(json=as_json, wait=wait)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    return _wait(
        args,
        out,
        "rebuild v",
        lambda: next(it),
        lambda v: v.get("done", False),
        "the copy in sync",
        clock=lambda: now[0],
        sleep=sleep,
    )


def test_wait_draws_the_bar_in_a_terminal_only() -> None:
    syncing = volume({"node_id": "n2", "sync": "syncing", "resync": {"done_bytes": 1, "total_bytes": 2}})
    views = [syncing, syncing, {"done": True}]
    tty = Tty()
    assert waiting(tty, list(views)) == {"done": True}
    assert tty.getvalue().count("\r") == 2 and " 50% " in tty.getvalue() and tty.getvalue().endswith("\n")
    for out, as_json in ((io.StringIO(), False), (Tty(), True)):
        assert waiting(out, list(views), as_json=as_json) == {"done": True}
        assert out.getvalue() == ""  # not a terminal, or --json: nothing but the final answer


def test_a_wait_that_runs_out_says_what_it_waited_for() -> None:
    stuck = {**volume({"node_id": "n2", "sync": "stale"}), "status": "rebuild the copy on n2: waiting"}
    with pytest.raises(
        CliError, match=r"timed out after 1s waiting for the copy in sync .*: rebuild the copy"
    ):
        waiting(io.StringIO(), [stuck] * 10, wait=1.0)


# -- against the master ----------------------------------------------------------------------------------


def report(control: ControlLoop, clock: Clock, vid: str, epoch: int, primary: str, *replicas: str) -> None:
    states = tuple(ReplicaState(n, SyncState.IN_SYNC, 0) for n in replicas)
    observed = {primary: VolumeObservation(vid, epoch, Role.PRIMARY, Health.OK, 0, states, True)}
    for node in replicas:
        observed[node] = VolumeObservation(vid, epoch, Role.REPLICA, Health.OK, 0, (), True)
    for node, obs in observed.items():
        control.observations.record(Heartbeat(seq=2, observations=(obs,)), node, clock())


async def three_copies(url: str, control: ControlLoop, clock: Clock) -> str:
    for node in ("n1", "n2", "n3"):
        h = Hello(node, 1, f"192.0.2.{node[1]}:3260", "192.0.2.4:7000", "192.0.2.4:8080", 1 << 40, 1 << 30)
        control.observations.record(h, node, clock())
        control.store.upsert_hello(h, seen_at=1.0)
        control.observations.record(Heartbeat(seq=1, observations=()), node, clock())
    code, out, err = await cli("volume", "create", "vol", "--size", "64MiB", "--replicas", "3", "--wait", "0",
                               "--json", "--api", url)  # fmt: skip
    assert code == 0, err
    vid: str = json.loads(out)["volume_id"]
    control.step(clock())
    report(control, clock, vid, 1, "n1", "n2", "n3")
    return vid


async def stepping(control: ControlLoop, clock: Clock, command: Any) -> tuple[int, str, str]:
    """Run a CLI command; step the control loop once it has queued its request."""
    task = asyncio.create_task(command)
    while not task.done():
        if any(control.moves.pending(v.volume_id) for v in control.desired()):
            control.step(clock())
        await asyncio.sleep(0.01)
    result: tuple[int, str, str] = task.result()
    return result


async def test_volume_failover_through_the_cli(master: tuple[str, ControlLoop, Clock]) -> None:
    url, control, clock = master
    await three_copies(url, control, clock)
    code, out, err = await stepping(
        control, clock, cli("volume", "failover", "vol", "--to", "n3", "--api", url)
    )
    assert (code, err) == (0, "")
    assert out == "volume vol: primary is n3 (epoch 2)\n"
    code, out, err = await cli("volume", "failover", "vol", "--to", "n1", "--api", url)
    assert code == 1 and out == ""
    assert err == "sparrow: error: the copy on n1 is not in sync (it may lack acknowledged writes)\n"


async def test_volume_failover_json(master: tuple[str, ControlLoop, Clock]) -> None:
    url, control, clock = master
    await three_copies(url, control, clock)
    code, out, err = await stepping(control, clock, cli("volume", "failover", "vol", "--json", "--api", url))
    assert code == 0, err
    answer = json.loads(out)
    assert answer["primary"]["node_id"] == "n2" and answer["epoch"] == 2


async def test_volume_rebuild_through_the_cli(master: tuple[str, ControlLoop, Clock]) -> None:
    url, control, clock = master
    await three_copies(url, control, clock)
    code, out, err = await stepping(
        control, clock, cli("volume", "rebuild", "vol", "--replica", "n2", "--api", url)
    )
    assert code == 0, err
    assert out.startswith("volume vol: rebuild the copy on n2: ") and out.count("\n") == 1
    code, _, err = await cli("volume", "rebuild", "vol", "--replica", "n1", "--api", url)
    assert (
        code == 1 and err.startswith("sparrow: error: a rebuild of the copy on n2") and err.count("\n") == 1
    )


async def test_node_drain_and_undrain_through_the_cli(master: tuple[str, ControlLoop, Clock]) -> None:
    url, control, clock = master
    await three_copies(url, control, clock)
    code, out, err = await cli("node", "drain", "n1", "--api", url)
    assert (code, out, err) == (0, "node n1 is draining: starting\n", "")
    control.step(clock())
    code, out, _ = await cli("node", "list", "--json", "--api", url)
    listed = {n["node_id"]: n for n in json.loads(out)}
    assert listed["n1"]["draining"] is True and listed["n3"]["draining"] is False
    code, out, _ = await cli("node", "undrain", "n1", "--json", "--api", url)
    assert json.loads(out) == {"node_id": "n1", "draining": False, "drain_status": None}
    code, _, err = await cli("node", "drain", "n9", "--api", url)
    assert (code, err) == (1, "sparrow: error: no node 'n9'\n")
