"""The volume directory end to end: a host may log in at any node's portal.

A real `sparrow master` and two real `sparrow node` processes (``tests.integration.cluster``). A
volume with one copy is placed on one node (the primary); the other node holds nothing of it, and
learns where it is served only from the directory in the master's Acks. The real initiators
(libiscsi's qemu-io, iscsi-inq, iscsi-ls) pointed at the OTHER node's portal must land on the
primary: its login is answered "target moved temporarily" with the primary's TargetAddress (RFC
7143 11.13.5) and its SendTargets lists the primary's portal for the volume (RFC 7143 13.8).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster import BASE_IQN, Cluster, Node
from tests.tools import require_tool, run, wait_for

pytestmark = pytest.mark.integration

VOLUME = "dirvol"
IQN = f"{BASE_IQN}:{VOLUME}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 2).start()
    try:
        yield c
    finally:
        codes = c.close()
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{c.logs()}"


def tool(*cmd: str, check: bool = True) -> str:
    proc = run(list(cmd), timeout=60, check=check)
    return proc.stdout + proc.stderr


def qemu_io(url: str, *commands: str) -> str:
    args = [require_tool("qemu-io"), "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    out = tool(*args, url)
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    return out


def remote_entries(node: Node) -> list[dict[str, object]]:
    """The node's "remote target" log records for the volume (the directory applied)."""
    return [e for e in node.events("remote target") if e.get("iqn") == IQN]


def send_targets(node: Node, *, luns: bool = True) -> list[str]:
    """``iscsi-ls -s`` at ``node``'s portal: the whole output, then the lines naming the volume.
    ``luns=False``: SendTargets alone (``-s`` also logs in to each target listed, and libiscsi
    retries such a login for ever when the target is deleted between the two)."""
    out = tool(require_tool("iscsi-ls"), *(("-s",) if luns else ()), f"iscsi://{node.portal}")
    return [out, *[ln for ln in out.splitlines() if IQN in ln]]


def test_a_host_may_log_in_at_any_nodes_portal(cluster: Cluster) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    require_tool("qemu-io")
    created = json.loads(
        cluster.cli("volume", "create", VOLUME, "--size", "16MiB", "--replicas", "1", "--json").stdout
    )
    volume_id = created["volume_id"]
    view = cluster.wait_converged(VOLUME, epoch=1, copies=1)
    primary = cluster.node(view["primary"]["node_id"])
    (other,) = [n for n in cluster.nodes.values() if n is not primary]
    assert view["primary"]["portal"] == primary.portal
    cluster.wait_serving(primary.node_id, volume_id)

    # The other node holds no copy, and knows the volume from the directory alone.
    wait_for(lambda: remote_entries(other), timeout=10, what=f"{other.node_id} told where {VOLUME} is")
    assert remote_entries(other)[-1]["portal"] == primary.portal
    assert other.access_state(volume_id) is None
    assert not (other.data_dir / "volumes" / f"{VOLUME}.img").exists()
    assert remote_entries(primary) == []  # the primary serves it; it never points elsewhere

    # A login at the other node lands on the primary: I/O through its URL is on the primary.
    qemu_io(other.url(VOLUME), "write -P 0x5a 0 64k", "write -P 0xa5 1M 4k")
    out = qemu_io(primary.url(VOLUME), "read -P 0x5a 0 64k", "read -P 0xa5 1M 4k", "read -P 0 64k 960k")
    assert out.count("read ") >= 3, out
    via_other = tool(iscsi_inq, "-e", "1", "-c", "128", other.url(VOLUME))
    via_primary = tool(iscsi_inq, "-e", "1", "-c", "128", primary.url(VOLUME))
    assert via_other == via_primary, (via_other, via_primary)  # the same unit serial number
    assert "serial" in via_other.lower(), via_other

    # SendTargets at the other node lists the primary's portal (and logs in there for the LUNs).
    out, *lines = send_targets(other)
    assert lines, out
    assert any(f"{primary.portal},1" in ln for ln in lines), out
    assert other.portal not in out, out  # the other node serves nothing: its portal is never offered
    assert "Lun:0" in out, out

    # SendTargets at the primary lists its own portal for the volume.
    out, *lines = send_targets(primary)
    assert any(f"{primary.portal},1" in ln for ln in lines), out

    assert len(send_targets(other, luns=False)) > 1  # SendTargets alone names it too

    # Deleted: the volume leaves the directory, and the other node forgets it.
    cluster.cli("volume", "delete", VOLUME)
    wait_for(
        lambda: len(send_targets(other, luns=False)) == 1,
        timeout=10,
        what=f"{VOLUME} gone from SendTargets at {other.node_id}",
        interval=0.2,
    )
    assert other.events("remote target forgotten"), other.log_tail()
