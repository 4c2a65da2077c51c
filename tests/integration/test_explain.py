"""``sparrow volume explain`` against real daemons (issue 10, "Diagnostics and explanations"): the
reason in each state a test can produce -- served, a dead primary with no eligible replica,
not enough space, a node that cannot converge, a volume skipped after a restart with a corrupt
record -- and the SCSI commands a real initiator (libiscsi: ``tests/tools/rawcdb.c``) sent that
Sparrow answered as unsupported, on the master's explain and the node's /metrics."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from frontend.internal_errors import INTERNAL_ERROR_EVENT
from tests.integration.cluster import Cluster
from tests.integration.daemon import Daemon
from tests.integration.gate import libiscsi_tool
from tests.tools import run, wait_for

pytestmark = pytest.mark.integration

HOST_A = "iqn.2026-12.test:host-a"
HOST_B = "iqn.2026-12.test:host-b"
MiB = 1 << 20


def rawcdb() -> Path:
    """The compiled rawcdb (tests/tools/rawcdb.c: a raw CDB through libiscsi)."""
    return libiscsi_tool("rawcdb")


def send_cdb(initiator: str, url: str, cdb: bytes) -> str:
    return run([str(rawcdb()), initiator, url, cdb.hex()], timeout=30).stdout.strip()


def explain(cluster: Cluster, volume: str) -> dict[str, Any]:
    return dict(json.loads(cluster.cli("volume", "explain", volume, "--json").stdout))


def wait_reason(cluster: Cluster, volume: str, reason: str, timeout: float = 20.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = explain(cluster, volume)
        return body if body["reason"] == reason else None

    return wait_for(check, timeout=timeout, what=f"explain {volume}: {reason}", interval=0.1)


def unsupported_total(text: str, volume: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sparrow_scsi_unsupported_total" and s.labels["volume"] == volume:
                out[(s.labels["opcode"], s.labels["service_action"])] = s.value
    return out


def test_unsupported_commands_from_a_real_initiator_then_a_dead_primary_with_no_eligible_replica(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(1)
    n1 = cluster.node("n1")
    cluster.cli("volume", "create", "db", "--size", "16MiB")
    body = explain(cluster, "db")
    assert (body["served"], body["reason"]) == (True, "served"), body
    assert body["findings"][0]["node"] == "n1" and body["unsupported_commands"] == []

    url = n1.url("db")
    # An opcode Sparrow does not implement, twice; an unknown service action of SERVICE ACTION IN(16).
    assert send_cdb(HOST_A, url, bytes([0xC1]) + bytes(5)) == "status=2 sense=5/20/00"
    assert send_cdb(HOST_B, url, bytes([0xC1]) + bytes(5)) == "status=2 sense=5/20/00"
    assert send_cdb(HOST_A, url, bytes([0x9E, 0x1E]) + bytes(14)) == "status=2 sense=5/20/00"
    expected = [
        {"node": "n1", "opcode": 0x9E, "service_action": 0x1E, "count": 1, "last_initiator": HOST_A},
        {"node": "n1", "opcode": 0xC1, "service_action": None, "count": 2, "last_initiator": HOST_B},
    ]
    wait_for(
        lambda: explain(cluster, "db")["unsupported_commands"] == expected or None,
        timeout=10,
        what="the unsupported commands in explain",
        interval=0.1,
    )
    assert unsupported_total(n1.metrics(), "db") == {("0x9e", "0x1e"): 1.0, ("0xc1", ""): 2.0}
    text = cluster.cli("volume", "explain", "db").stdout
    assert f"on n1: 0xc1 - x2 {HOST_B}" in text, text

    n1.kill9()
    body = wait_reason(cluster, "db", "no_eligible_replica")
    headline = body["findings"][0]
    assert body["served"] is False and headline["node"] == "n1"
    assert "the only copy is on n1" in headline["text"] and "bring n1 back" in headline["action"]
    assert headline["facts"]["copies"] == [{"node": "n1", "in_sync": True, "why": ["the primary itself"]}]
    print("\n" + cluster.cli("volume", "explain", "db").stdout)


def test_not_enough_space_a_node_that_cannot_converge_and_a_volume_skipped_after_a_restart(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(1)
    n1 = cluster.node("n1")
    [node] = cluster.node_list()
    capacity, free = node["capacity_bytes"], node["free_bytes"]
    if capacity - free < 64 * MiB:
        pytest.skip("the test filesystem has no room between free and capacity")
    # Larger than the node's free space, smaller than its capacity: recorded, never placed.
    size = (free + (capacity - free) // 2) // MiB * MiB
    cluster.cli("volume", "create", "huge", "--size", str(size), "--wait", "0")
    body = wait_reason(cluster, "huge", "not_enough_space")
    facts = body["findings"][0]["facts"]
    assert facts["size_bytes"] == size and facts["nodes_with_room"] == [] and facts["copies_needed"] == 1
    assert [n["node"] for n in facts["nodes"]] == ["n1"] and facts["nodes"][0]["free_bytes"] < size
    assert body["findings"][0]["action"].startswith("free space on a node")
    cluster.cli("volume", "delete", "huge")

    # A stray record of the name on the node: the node cannot create the volume.
    (n1.data_dir / "volumes" / "stray.json").write_text("not a volume record")
    cluster.cli("volume", "create", "stray", "--size", "16MiB", "--wait", "0")
    body = wait_reason(cluster, "stray", "stuck")
    headline = body["findings"][0]
    assert headline["node"] == "n1" and body["served"] is False
    assert headline["facts"]["error"].startswith("VolumeExists: "), headline
    assert headline["since"] is not None and headline["since_seconds"] >= 0

    # A served volume whose record is corrupted while the node is down: skipped at its restart.
    cluster.cli("volume", "create", "db", "--size", "16MiB")
    assert explain(cluster, "db")["served"] is True
    assert n1.term() == 0
    record = n1.data_dir / "volumes" / "db.json"
    data = bytearray(record.read_bytes())
    data[len(data) // 2] ^= 0xFF
    record.write_bytes(bytes(data))
    n1.restart()
    body = wait_reason(cluster, "db", "stuck")
    wait_for(lambda: explain(cluster, "db")["skipped_at_start"] or None, timeout=10, what="db skipped")
    body = explain(cluster, "db")
    [skipped] = body["skipped_at_start"]
    assert skipped["node"] == "n1" and "db.json" in skipped["reason"], skipped
    [node] = cluster.node_list()
    assert sorted(s["name"] for s in node["skipped"]) == ["db", "stray"], node["skipped"]
    text = cluster.cli("volume", "explain", "db").stdout
    assert text.startswith("volume db: NOT served (stuck)") and "skipped at start:" in text, text
    assert "n1 did not load its copy at start (corrupt record" in text, text
    print("\n" + text)


def test_sparrow_serve_explains_a_volume_whose_backing_it_cannot_open_after_a_restart(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    backing = allowed / "disk.img"
    backing.write_bytes(bytes(16 * MiB))
    daemon = Daemon(tmp_path / "data", extra_args=("--allow-backing", str(allowed)))
    daemon.start()
    try:
        daemon.cli("volume", "create", "bk", "--backing", str(backing))
        assert json.loads(daemon.cli("volume", "explain", "bk", "--json").stdout)["served"] is True
        assert daemon.stop() == 0
        backing.unlink()  # the device is gone when the daemon comes back
        daemon.start()

        def stuck() -> dict[str, Any] | None:
            body = json.loads(daemon.cli("volume", "explain", "bk", "--json").stdout)
            return body if body["reason"] == "stuck" and body["skipped_at_start"] else None

        body = wait_for(stuck, timeout=20, what="bk stuck and skipped", interval=0.1)
        [skipped] = body["skipped_at_start"]
        assert skipped["node"] == "local" and str(backing) in skipped["reason"], skipped
        headline = body["findings"][0]
        assert body["served"] is False and headline["node"] == "local" and headline["facts"]["error"]
        assert headline["action"].startswith("local did not load its copy at start")
    finally:
        if daemon.running:
            assert daemon.stop() == 0, daemon.log_tail()
    assert INTERNAL_ERROR_EVENT not in daemon.log()
