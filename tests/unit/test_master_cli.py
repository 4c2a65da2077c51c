"""The CLI's cluster additions: `sparrow node list`, `volume create --replicas`, `volume inspect`
against the master's API, and `sparrow master` flag checks. The API runs in-process (aiohttp
TestServer); the CLI runs in a worker thread."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from sparrow.cli import build_parser, main
from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.lease import LeaseConfig
from sparrow.cluster.messages import Health, Heartbeat, Hello, Role, SkippedVolume, VolumeObservation
from sparrow.config import HostPort
from sparrow.master.api import MasterApi, MasterMetrics, build_app
from sparrow.master.auth import bootstrap_admin
from sparrow.master.control import ControlLoop, restore
from store.backing import BackingPolicy

MiB = 1 << 20


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def cli(*argv: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(run, *argv)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, ControlLoop, Clock]]:
    store = AuthorityStore.open_in(tmp_path)
    clock = Clock()
    control = restore(store, LeaseConfig(), clock())
    metrics = MasterMetrics()
    api = MasterApi(control=control, metrics=metrics, clock=clock, backing_policy=BackingPolicy.of(["/dev"]))
    server = TestServer(build_app(api))
    await server.start_server()
    monkeypatch.delenv("SPARROW_TOKEN", raising=False)
    monkeypatch.setenv("SPARROW_CREDENTIALS", str(tmp_path / "credentials.json"))
    bootstrap_admin(store, HostPort(server.host, server.port or 0))
    yield str(server.make_url("")).rstrip("/"), control, clock
    await server.close()
    store.close()


def node_reports(control: ControlLoop, node_id: str, incarnation: int, now: float) -> None:
    h = Hello(node_id, incarnation, "192.0.2.4:3260", "192.0.2.4:7000", "192.0.2.4:8080", 1 << 40, 1 << 30)
    control.observations.record(h, node_id, now)
    control.store.upsert_hello(h, seen_at=1.0)
    control.observations.record(Heartbeat(seq=1, observations=()), node_id, now)


async def test_create_with_replicas_and_inspect_against_the_master(
    master: tuple[str, ControlLoop, Clock],
) -> None:
    url, control, clock = master
    node_reports(control, "n1", 42, clock())
    code, out, err = await cli(
        "volume", "create", "vol1", "--size", "64MiB", "--replicas", "1", "--wait", "0", "--api", url
    )
    assert (code, err) == (0, "")
    assert "epoch:" in out and "vol1" in out  # the cluster-shaped summary, not a KeyError
    (record,) = control.store.volumes()
    assert record.replicas == 1

    code, out, err = await cli(
        "volume", "create", "vol2", "--size", "64MiB", "--replicas", "2", "--wait", "0", "--api", url
    )
    assert code == 0, err
    assert {v.name: v.replicas for v in control.store.volumes()} == {"vol1": 1, "vol2": 2}

    control.step(clock())
    code, out, err = await cli("volume", "inspect", "vol1", "--json", "--api", url)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["epoch"] == 1 and shown["primary"] == {"node_id": "n1", "portal": "192.0.2.4:3260"}
    assert shown["url"] == "iscsi://192.0.2.4:3260/iqn.2026-11.io.sparrow:vol1/0"
    code, out, _ = await cli("volume", "inspect", "vol1", "--api", url)
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["epoch"].strip() == "1"
    assert lines["primary"].strip() == "n1 at 192.0.2.4:3260"
    code, out, _ = await cli("volume", "list", "--api", url)
    assert code == 0 and "vol1" in out and "vol2" in out


async def test_node_list_table_and_json(master: tuple[str, ControlLoop, Clock]) -> None:
    url, control, clock = master
    code, out, _ = await cli("node", "list", "--api", url)
    assert (code, out) == (0, "no nodes\n")
    node_reports(control, "n1", 42, clock())
    clock.now += 1.25
    code, out, err = await cli("node", "list", "--api", url)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == [
        "NODE",
        "STATE",
        "INCARNATION",
        "LAST-HEARTBEAT",
        "PORTAL",
        "DRAINING",
        "ADMISSION",
    ]
    assert row.split() == ["n1", "alive", "42", "1.2s", "ago", "192.0.2.4:3260", "no", "-"]  # no key bound
    code, out, _ = await cli("node", "list", "--json", "--api", url)
    nodes: list[dict[str, Any]] = json.loads(out)
    assert [(n["node_id"], n["state"], n["last_heartbeat_age"]) for n in nodes] == [("n1", "alive", 1.25)]


async def test_volume_explain_in_words_and_as_json(master: tuple[str, ControlLoop, Clock]) -> None:
    url, control, clock = master
    node_reports(control, "n1", 42, clock())
    code, _, err = await cli("volume", "create", "vol1", "--size", "64MiB", "--wait", "0", "--api", url)
    assert code == 0, err
    control.step(clock())
    (record,) = control.store.volumes()
    error = "VolumeExists: volume 'vol1' already exists"
    seen = VolumeObservation(record.volume_id, 1, Role.PRIMARY, Health.OK, 0, (), False, error)
    skipped = (SkippedVolume("vol1", "corrupt record: bad checksum"),)
    control.observations.record(Heartbeat(2, (seen,), skipped), "n1", clock())
    clock.now += 2.5
    code, out, err = await cli("volume", "explain", "vol1", "--json", "--api", url)
    assert code == 0, err
    body = json.loads(out)
    assert (body["reason"], body["served"], body["findings"][0]["node"]) == ("stuck", False, "n1")
    assert body["findings"][0]["facts"]["error"] == error
    assert body["skipped_at_start"] == [{"node": "n1", "reason": "corrupt record: bad checksum"}]
    code, out, err = await cli("volume", "explain", "vol1", "--api", url)
    assert code == 0, err
    assert out.splitlines()[0] == "volume vol1: NOT served (stuck)"
    assert "node n1 has not converged on epoch 1 for 2.5 s: VolumeExists" in out and "what to do:" in out
    code, out, _ = await cli("node", "list", "--json", "--api", url)
    assert json.loads(out)[0]["skipped"] == [{"name": "vol1", "reason": "corrupt record: bad checksum"}]
    code, _, err = await cli("volume", "explain", "nope", "--api", url)
    assert code == 1 and "no volume named 'nope'" in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("master",), "--data-dir"),
        (("master", "--data-dir", "/tmp/x", "--listen", "nope"), "invalid address 'nope' for --listen"),
        (("master", "--data-dir", "/tmp/x", "--lease", "0.5"), "lease_seconds (0.5) must exceed"),
        (("master", "--data-dir", "/tmp/x", "--dead-after", "3"), "must not exceed dead_after"),
        (  # the nodes fence 0.5 s (the default fence margin) before the lease: no time to renew
            ("master", "--data-dir", "/tmp/x", "--lease", "1", "--heartbeat-interval", "0.6"),
            "heartbeat_interval + fence_margin (0.6 + 0.5) must be less than lease_seconds (1.0)",
        ),
        (("master", "--data-dir", "/tmp/x", "--lease", "-1"), "invalid duration '-1'"),
        (("volume", "create", "v", "--size", "1MiB", "--replicas", "4"), "invalid choice: 4"),
        (
            ("master", "--data-dir", "/tmp/x"),
            "--cluster-secret-file is required: make a secret with `sparrow secret",
        ),
        (
            ("master", "--data-dir", "/tmp/x", "--cluster-secret-file", "/nonexistent/s"),
            "cluster secret file /nonexistent/s does not exist",
        ),
    ],
)
def test_bad_flags_are_usage_errors(argv: tuple[str, ...], fragment: str) -> None:
    code, out, err = run(*argv)
    assert code == 2, err
    assert out == ""
    assert fragment in err and err.count("\n") == 1


def test_secret_generate_writes_a_0600_secret_once(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    code, out, err = run("secret", "generate", str(path))
    assert code == 0, err
    assert str(path) in out
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().strip()) == 64
    before = path.read_bytes()
    code, _, err = run("secret", "generate", str(path))
    assert code == 1 and "exists; not overwritten" in err and err.count("\n") == 1
    assert path.read_bytes() == before
    path.chmod(0o644)
    code, _, err = run("master", "--data-dir", str(tmp_path), "--cluster-secret-file", str(path))
    assert code == 2 and "accessible by group or others" in err


def test_the_node_command_keeps_its_subcommands() -> None:
    args = build_parser().parse_args(["node", "list", "--json", "--api", "http://h:1"])
    assert args.json and args.api == "http://h:1"
    assert args.func.__name__ == "cmd_node_list"
    # `sparrow node` without a subcommand stays the node daemon's own command.
    plain = build_parser().parse_args(["node", "--node-id", "n1"])
    assert plain.func.__name__ != "cmd_node_list"


async def test_create_with_every_flag_and_resize_against_the_master(
    master: tuple[str, ControlLoop, Clock],
) -> None:
    url, control, clock = master
    node_reports(control, "n1", 42, clock())
    code, out, err = await cli(
        "volume", "create", "vol1", "--size", "64MiB", "--block-size", "512", "--physical-block-size", "4096",
        "--chap-user", "iqn.host", "--chap-secret", "initiator-secret",
        "--chap-mutual-user", "target", "--chap-mutual-secret", "target-secret-9",
        "--backing", "/dev/sdz", "--replicas", "1", "--json", "--wait", "0", "--api", url,
    )  # fmt: skip
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert (shown["physical_block_size"], shown["chap"], shown["backing"]) == (
        4096, {"user": "iqn.host", "mutual_user": "target"}, "/dev/sdz",
    )  # fmt: skip
    assert "initiator-secret" not in out and "target-secret-9" not in out
    (first,) = control.step(clock()).published
    assert first.chap is not None and first.chap.mutual_secret == "target-secret-9"

    # A volume on a backing is never resized (its file or device is never grown).
    code, out, err = await cli("volume", "resize", "vol1", "--size", "96MiB", "--wait", "0", "--api", url)
    assert (code, out) == (1, "") and "is never resized" in err

    code, out, err = await cli("volume", "create", "vol2", "--size", "64MiB", "--wait", "0", "--api", url)
    assert (code, err) == (0, "")
    control.step(clock())
    code, out, err = await cli("volume", "resize", "vol2", "--size", "96MiB", "--wait", "0", "--api", url)
    assert (code, err) == (0, "")
    assert out == f"volume vol2 is now 96 MiB ({96 * MiB} bytes)\n"
    current = next(a for a in control.assignments_for("n1") if a.name == "vol2")
    assert (current.size, current.epoch) == (96 * MiB, 2)
    code, out, err = await cli("volume", "resize", "vol2", "--size", "32MiB", "--api", url)
    assert code == 1 and "only grow" in err


async def test_create_waits_and_says_when_the_volume_is_not_served(
    master: tuple[str, ControlLoop, Clock],
) -> None:
    url, control, _ = master
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, out, err = await cli("volume", "create", "lonely", "--size", "1MiB", "--wait", "0.3", "--api", url)
    assert loop.time() - started >= 0.3  # nobody placed it: the master answered at the deadline
    assert code == 0 and "lonely" in out  # the volume was recorded ...
    assert err == "sparrow: warning: volume lonely is not served yet: not placed yet\n"  # ... not served
    assert [r.name for r in control.store.volumes()] == ["lonely"]


def test_inspect_text_shows_each_copy_sync_state_and_resync_progress() -> None:
    from sparrow.cli import _print_volume

    volume: dict[str, Any] = {
        "name": "vol1",
        "size": 1 << 30,
        "block_size": 512,
        "replicas_wanted": 3,
        "volume_id": "0" * 32,
        "epoch": 7,
        "primary": {"node_id": "n1", "portal": "192.0.2.4:3260"},
        "replicas": [
            {"node_id": "n1", "role": "primary", "state": "alive", "sync": "in_sync", "resync": None},
            {
                "node_id": "n2",
                "role": "replica",
                "state": "alive",
                "sync": "syncing",
                "resync": {"done_bytes": 256 * MiB, "total_bytes": 1 << 30},
            },
            {"node_id": "n3", "role": "replica", "state": "dead", "sync": "stale", "resync": None},
        ],
    }
    out = io.StringIO()
    _print_volume(volume, out, as_json=False)
    lines = dict(line.split(":", 1) for line in out.getvalue().splitlines())
    assert lines["copies"].strip() == (
        "n1 (primary, alive, in sync), n2 (replica, alive, syncing 256 MiB of 1 GiB), "
        "n3 (replica, dead, stale)"
    )


def test_master_key_prints_the_key_nodes_pin_and_never_makes_one(tmp_path: Path) -> None:
    from sparrow.cluster.nodeidentity import key_text
    from sparrow.masterkey import MASTER_KEY_NAME, master_identity

    code, out, err = run("master", "key", "--data-dir", str(tmp_path))
    assert code == 1 and out == "" and "master key" in err and err.count("\n") == 1
    assert not (tmp_path / MASTER_KEY_NAME).exists()
    public = key_text(master_identity(tmp_path).public)  # as the master's first start makes it
    assert run("master", "key", "--data-dir", str(tmp_path)) == (0, public + "\n", "")
    code, out, _ = run("master", "key", "--data-dir", str(tmp_path), "--json")
    assert code == 0 and json.loads(out) == {"master_key": public}
    assert MASTER_KEY_NAME not in out and (tmp_path / MASTER_KEY_NAME).read_text().strip() not in out


@pytest.mark.parametrize("key", ["nothex", "ab" * 31, "00" * 32 + "00"])
def test_a_bad_master_key_for_a_node_is_a_usage_error(tmp_path: Path, key: str) -> None:
    secret = tmp_path / "s"
    assert run("secret", "generate", str(secret))[0] == 0
    code, out, err = run(
        "node", "--data-dir", str(tmp_path), "--node-id", "n1", "--master", "127.0.0.1:1",
        "--cluster-secret-file", str(secret), "--master-key", key,
    )  # fmt: skip
    assert code == 2 and out == "" and "invalid --master-key" in err and err.count("\n") == 1
