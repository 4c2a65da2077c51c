"""Issue 10's volume verbs through the CLI against real daemons and real initiators.

1. Pause: a paused volume answers reads and writes with NOT READY, LOGICAL UNIT IS IN PROCESS OF
   BECOMING READY (02/04/01) -- a raw iSCSI session sees it on READ(10), libiscsi's iscsi-inq and
   qemu-io on the TEST UNIT READY after their login -- and /healthz stays 200 listing it in
   ``volumes_paused``. The pause is a new epoch; it survives kill -9 of the master, of the primary
   (the volume fails over, paused, to its in-sync replica), and of every process at once (the
   restarted primary comes back paused). Resume serves it again, data intact.
2. CHAP update without recreating: on (no CHAP refused), changed (the old secret refused, the new
   one accepted), off (no CHAP accepted); a session logged in before stays. The discovery CHAP,
   a cluster setting on the master: on (a SendTargets without it or with a wrong secret refused),
   off. Create idempotency: an
   identical retry exits 0 with the same volume, a create with other parameters is a one-line 409
   naming what differs. No secret in the audit log or any daemon's log.

Run: ``.venv/bin/pytest tests/integration/test_volume_verbs.py -v``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import BASE_IQN, TIMING, Cluster, http_get
from tests.integration.daemon import Daemon
from tests.integration.process import scrape_bearer
from tests.integration.rogue import secret_file
from tests.integration.test_node import GOOD, NOT_READY, UNIT_ATTENTION, Answer, RawSession, qemu_io
from tests.tools import require_tool, run, wait_for

pytestmark = pytest.mark.integration

PAUSED = (NOT_READY, 0x04, 0x01)


def read_answer(portal: str, volume: str) -> Answer:
    """One READ(10) on a fresh session, past the UNIT ATTENTIONs an access state change queues."""
    probe = RawSession(portal, f"{BASE_IQN}:{volume}")
    try:
        answer = probe.read10()
        return probe.read_past_unit_attentions() if answer.sense_key == UNIT_ATTENTION else answer
    finally:
        probe.close()


def sense_of(answer: Answer) -> tuple[int | None, int | None, int | None]:
    return (answer.sense_key, answer.asc, answer.ascq)


def wait_paused_at_primary(cluster: Cluster, volume: str) -> dict[str, Any]:
    """Wait until the volume's current primary answers READ with the pause's sense; its view."""

    def paused() -> dict[str, Any] | None:
        v = cluster.volume(volume)
        if v["primary"] is None or not v["served"]:
            return None
        try:
            answer = read_answer(v["primary"]["portal"], volume)
        except (OSError, AssertionError):
            return None
        return v if sense_of(answer) == PAUSED else None

    what = f"{volume} answering NOT READY 04/01 at its primary"
    return wait_for(paused, timeout=30, what=what, interval=0.2)


def test_pause_refuses_io_not_ready_and_survives_kill9_of_master_primary_and_all(
    make_cluster: Callable[..., Cluster],
) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    cluster = make_cluster(2)
    cluster.cli("volume", "create", "pv", "--size", "16MiB", "--replicas", "2")
    v = cluster.wait_converged("pv", epoch=1, copies=2)
    url = cluster.node(v["primary"]["node_id"]).url("pv")
    qemu_io(url, "write -P 0x5a 0 64k")

    started = time.monotonic()
    paused = json.loads(cluster.cli("volume", "pause", "pv", "--json").stdout)
    pause_took = time.monotonic() - started
    assert paused["paused"] is True and paused["epoch"] == 2, paused
    assert paused["status"] == "paused by the operator" and paused["served"] is True, paused
    answer = read_answer(v["primary"]["portal"], "pv")
    assert sense_of(answer) == PAUSED, answer
    # Real initiators: libiscsi (iscsi-inq, qemu-io) sees the NOT READY at its TEST UNIT READY
    # after the login and does not go on (it retries only a UNIT ATTENTION there).
    for command in ([iscsi_inq, url], [require_tool("qemu-io"), "-f", "raw", "-c", "read 0 4k", url]):
        refused = run(command, check=False)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 or "read " not in refused.stdout, said
        assert "NOT READY" in said and "0x0401" in said, said
    # Health: asked for, so no error; reported.
    status, body = http_get(cluster.master.api + "/healthz", headers=scrape_bearer(secret_file(cluster.root)))
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok", health
    assert [(p["name"], p["applied"]) for p in health["volumes_paused"]] == [("pv", True)]
    node_health = cluster.node(v["primary"]["node_id"]).health()
    assert [x["paused"] for x in node_health["volumes"] if x["name"] == "pv"] == [True]
    assert "\npaused:     yes\n" in cluster.cli("volume", "inspect", "pv").stdout
    explained = json.loads(cluster.cli("volume", "explain", "pv", "--json").stdout)
    assert explained["reason"] == "paused" and explained["served"] is False, explained
    assert explained["findings"][0]["action"] == "sparrow volume resume pv", explained
    again = json.loads(cluster.cli("volume", "pause", "pv", "--json").stdout)
    assert again["epoch"] == 2  # pausing a paused volume changes nothing

    # kill -9 of the master: the same epoch, still paused, nothing minted.
    cluster.master.kill9()
    cluster.master.restart()
    assert wait_paused_at_primary(cluster, "pv")["epoch"] == 2
    assert cluster.master.epochs_published() == 0

    # kill -9 of the primary: the volume fails over to its in-sync replica, paused.
    old = cluster.node(v["primary"]["node_id"])
    old.kill9()
    moved = wait_paused_at_primary(cluster, "pv")
    assert moved["primary"]["node_id"] != old.node_id and moved["epoch"] >= 3, moved
    old.restart()

    def both_in_sync() -> dict[str, Any] | None:
        view = cluster.volume("pv")
        copies = view["replicas"]
        ok = len(copies) == 2 and all(
            r["sync"] == "in_sync" and r["converged"] and r["observed_epoch"] == view["epoch"] for r in copies
        )
        return view if ok and view["served"] else None

    wait_for(both_in_sync, timeout=40, what="pv back to two in-sync copies", interval=0.2)

    # kill -9 of every process: the restarted primary comes back paused.
    epoch = cluster.volume("pv")["epoch"]
    cluster.master.kill9()
    for node in cluster.nodes.values():
        node.kill9()
    cluster.master.restart()
    for node in cluster.nodes.values():
        node.restart()
    back = wait_paused_at_primary(cluster, "pv")
    assert back["epoch"] >= epoch and back["paused"] is True, back

    # Resume: served again under a new epoch, the data intact.
    started = time.monotonic()
    resumed = json.loads(cluster.cli("volume", "resume", "pv", "--json").stdout)
    resume_took = time.monotonic() - started
    assert resumed["paused"] is False and resumed["epoch"] == back["epoch"] + 1, resumed
    primary = cluster.node(resumed["primary"]["node_id"])
    wait_for(
        lambda: read_answer(primary.portal, "pv").status == GOOD, timeout=15, what="pv served after resume"
    )
    qemu_io(primary.url("pv"), "read -P 0x5a 0 64k")
    status, body = http_get(cluster.master.api + "/healthz", headers=scrape_bearer(secret_file(cluster.root)))
    assert status == 200 and json.loads(body)["volumes_paused"] == []
    print(
        f"\nPAUSE: `volume pause` (CLI, waiting until applied) {pause_took:.2f} s, "
        f"`volume resume` {resume_took:.2f} s (heartbeat {TIMING.heartbeat} s)"
    )


def test_chap_update_takes_effect_for_new_logins_and_create_is_idempotent(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    cluster = make_cluster(1)
    created = json.loads(cluster.cli("volume", "create", "cv", "--size", "8MiB", "--json").stdout)
    node = cluster.node(created["primary"]["node_id"])
    portal = node.portal
    url = f"iscsi://{portal}/{BASE_IQN}:cv/0"

    def url_with(user: str, secret: str) -> str:
        return f"iscsi://{user}%{secret}@{portal}/{BASE_IQN}:cv/0"

    def logs_in(target: str) -> bool:
        return "SPARROW" in run([iscsi_inq, target], check=False, timeout=20).stdout

    assert logs_in(url)
    # A session logged in before the change is kept.
    before = RawSession(portal, f"{BASE_IQN}:cv")
    secrets = {"one": "first-secret-123", "two": "second-secret-45"}
    for name, secret in secrets.items():
        (tmp_path / name).write_text(secret + "\n")

    # On.
    chap_one = ("--chap-user", "alice", "--chap-secret-file", str(tmp_path / "one"))
    on = json.loads(cluster.cli("volume", "update", "cv", *chap_one, "--json").stdout)
    assert on["chap"] == {"user": "alice", "mutual_user": None} and on["epoch"] == created["epoch"], on
    wait_for(lambda: not logs_in(url), timeout=10, what="a login without CHAP refused")
    assert logs_in(url_with("alice", secrets["one"]))
    assert before.read10().status == GOOD  # logged in before: kept
    before.close()
    # Changed.
    cluster.cli("volume", "update", "cv", "--chap-user", "alice", "--chap-secret-file", str(tmp_path / "two"))
    old_refused = lambda: not logs_in(url_with("alice", secrets["one"]))  # noqa: E731
    wait_for(old_refused, timeout=10, what="the old secret refused")
    assert logs_in(url_with("alice", secrets["two"]))
    # The node keeps the master's CHAP in its volume record: restarted while the master is
    # stopped (no Ack), it exports with the current CHAP, not the one it was created with.
    record = node.data_dir / "volumes" / "cv.json"
    wait_for(lambda: secrets["two"] in record.read_text(), timeout=10, what="the new CHAP in the record")

    def inq(target: str) -> str:
        answer = run([iscsi_inq, target], check=False, timeout=20)
        return answer.stdout + answer.stderr

    cluster.master.sigstop()
    try:
        node.kill9()
        node.restart()
        assert "0x040a" in inq(url_with("alice", secrets["two"]))  # logged in, fenced: no Ack yet
        refused = inq(url_with("alice", secrets["one"]))
        assert "NOT READY" not in refused and "SPARROW" not in refused, refused  # refused at login
    finally:
        cluster.master.sigcont()
    wait_for(lambda: logs_in(url_with("alice", secrets["two"])), timeout=20, what="cv served again")
    # Off.
    off = cluster.cli("volume", "update", "cv", "--no-chap").stdout
    assert off == "volume cv: chap off\n"
    wait_for(lambda: logs_in(url), timeout=10, what="a login without CHAP accepted")
    bad = cluster.cli("volume", "update", "cv", "--no-chap", "--chap-user", "x", check=False)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1, bad.stderr

    # Create idempotency.
    again = json.loads(cluster.cli("volume", "create", "cv", "--size", "8MiB", "--json").stdout)
    assert again["volume_id"] == created["volume_id"]
    other = cluster.cli("volume", "create", "cv", "--size", "16MiB", "--replicas", "1", check=False)
    assert other.returncode == 1 and other.stderr == (
        "sparrow: error: volume cv exists with other parameters: size is 8388608 (8 MiB), "
        "asked 16777216 (16 MiB)\n"
    ), other.stderr

    # Discovery CHAP, the master's cluster setting: on (SendTargets without it refused), off.
    iscsi_ls = require_tool("iscsi-ls")
    secrets["disco"] = "discovery-secret-6"
    (tmp_path / "disco").write_text(secrets["disco"] + "\n")

    def discovers(auth: str = "") -> bool:
        listed = run([iscsi_ls, f"iscsi://{auth}{portal}"], check=False, timeout=20)
        return f"{BASE_IQN}:cv" in listed.stdout

    assert discovers()
    disco = ("--discovery-chap-user", "disco", "--discovery-chap-secret-file", str(tmp_path / "disco"))
    assert cluster.cli("cluster", "update", *disco).stdout == "discovery chap: user disco\n"
    wait_for(lambda: not discovers(), timeout=10, what="discovery without CHAP refused")
    assert discovers(f"disco%{secrets['disco']}@")
    assert not discovers("disco%wrong-secret-789@")
    assert json.loads(cluster.cli("cluster", "show", "--json").stdout) == {
        "discovery_chap": {"user": "disco", "mutual_user": None}
    }
    cluster.cli("cluster", "update", "--no-discovery-chap")
    wait_for(discovers, timeout=10, what="discovery without CHAP accepted again")

    # Secrets never in the audit log or any daemon's log.
    audit = (cluster.master.data_dir / "audit.jsonl").read_text()
    assert '"volume.update"' in audit
    texts = [audit, cluster.master.log(), *(n.log() for n in cluster.nodes.values())]
    for secret in secrets.values():
        assert not any(secret in text for text in texts), secret


def test_serve_records_its_toml_discovery_chap_once_and_the_cluster_setting_wins(tmp_path: Path) -> None:
    """``sparrow serve``: ``[iscsi.discovery_chap]`` applies from the start (before any Ack); it is
    recorded in the authority once; ``cluster update`` turns it off, and a restart with the same
    TOML keeps it off (the authority's value wins)."""
    iscsi_ls = require_tool("iscsi-ls")
    secret = "toml-discovery-secret-7"
    config = tmp_path / "sparrow.toml"
    config.write_text(f'[iscsi.discovery_chap]\nuser = "tomluser"\nsecret = "{secret}"\n')
    config.chmod(0o600)
    daemon = Daemon(tmp_path / "data", extra_args=("--config", str(config)))
    daemon.start()
    try:
        daemon.create_volume("dv", "8MiB")

        def discovers(auth: str = "") -> bool:
            listed = run([iscsi_ls, f"iscsi://{auth}{daemon.portal}"], check=False, timeout=20)
            return f"{BASE_IQN}:dv" in listed.stdout

        assert not discovers() and discovers(f"tomluser%{secret}@")
        assert daemon.cli("cluster", "show").stdout == "discovery chap: user tomluser\n"
        daemon.cli("cluster", "update", "--no-discovery-chap")
        wait_for(discovers, timeout=10, what="discovery without CHAP accepted")
        assert daemon.stop() == 0
        daemon.start()
        assert discovers() and daemon.cli("cluster", "show").stdout == "discovery chap: off\n"
        assert secret not in daemon.log()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            assert daemon.stop() == 0
