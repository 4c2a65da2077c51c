"""Finding the primary: a login at a node that does not serve a volume lands on the node that does.

Node A is a real `sparrow serve` process (the primary: it holds the volume). Node B is an in-process
``IscsiServer`` on 127.0.0.1:0 whose registry says where the volume is served: a ``RemoteTarget``
naming A's portal, or a local target switched with ``TargetRegistry.redirect``. Nothing in the
daemon can make B redirect yet (the cluster adapter will call ``redirect`` when the master changes a
volume's primary), so B is built here from the same frontend modules the daemon uses.

The initiators are the real ones (qemu-io, iscsi-inq, iscsi-ls, all libiscsi): B answers their
login with "target moved temporarily" + TargetAddress (RFC 7143 11.13.5), libiscsi reconnects to A
by itself, and the data must be on A. SendTargets at B must list A's portal for the volume.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from frontend.scsi.lu import LogicalUnit, LuIdentity
from frontend.server import IscsiServer
from frontend.target import Portal, RemoteTarget, Target, TargetRegistry, TargetSettings
from store.memstore import MemoryBlockStore
from tests.integration.daemon import BASE_IQN, Daemon
from tests.tools import require_tool, run

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB


@dataclass
class NodeB:
    """The in-process node that is not the primary."""

    server: IscsiServer
    registry: TargetRegistry
    port: int

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, volume: str, lun: int = 0) -> str:
        return f"iscsi://{self.portal}/{BASE_IQN}:{volume}/{lun}"


@pytest.fixture
async def node_b() -> AsyncIterator[NodeB]:
    registry = TargetRegistry()
    server = IscsiServer(registry, TargetSettings())
    await server.start("127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    # As the daemon does once bound: SendTargets names this node's real portal for its own targets.
    server.settings = dataclasses.replace(server.settings, portals=(Portal("127.0.0.1", port, 1),))
    yield NodeB(server, registry, port)
    await server.shutdown(5.0)


def a_portal(daemon: Daemon) -> Portal:
    return Portal("127.0.0.1", daemon.iscsi_port, 1)


async def tool(*cmd: str, check: bool = True) -> str:
    """Run a real initiator off the event loop (node B is served by this loop meanwhile)."""
    proc = await asyncio.to_thread(run, list(cmd), timeout=60, check=check)
    return proc.stdout + proc.stderr


async def qemu_io(url: str, *commands: str) -> str:
    args: list[str] = [require_tool("qemu-io"), "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = await tool(*args, url)
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    return out


async def test_login_at_a_node_that_is_not_the_primary_lands_on_the_primary(
    daemon: Daemon, node_b: NodeB
) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    require_tool("qemu-io")
    await asyncio.to_thread(daemon.create_volume, "moved", "16MiB")
    node_b.registry.add_remote(RemoteTarget(f"{BASE_IQN}:moved", "moved", a_portal(daemon)))

    # B holds no LU at all for this volume: any successful I/O through B's URL happened on A.
    await qemu_io(node_b.url("moved"), "write -P 0x5a 0 64k", "write -P 0xa5 1M 4k")
    out = await qemu_io(daemon.url("moved"), "read -P 0x5a 0 64k", "read -P 0xa5 1M 4k", "read -P 0 64k 960k")
    assert out.count("read ") >= 3, out

    # The device identity seen through B is A's volume.
    serial_via_b = await tool(iscsi_inq, "-e", "1", "-c", "128", node_b.url("moved"))
    serial_via_a = await tool(iscsi_inq, "-e", "1", "-c", "128", daemon.url("moved"))
    assert serial_via_b == serial_via_a
    assert daemon.inspect("moved")["serial"] in serial_via_b


async def test_send_targets_at_a_non_primary_lists_the_primarys_portal(daemon: Daemon, node_b: NodeB) -> None:
    iscsi_ls = require_tool("iscsi-ls")
    await asyncio.to_thread(daemon.create_volume, "listed", "8MiB")
    node_b.registry.add_remote(RemoteTarget(f"{BASE_IQN}:listed", "listed", a_portal(daemon)))
    out = await tool(iscsi_ls, "-s", f"iscsi://{node_b.portal}")
    target_lines = [ln for ln in out.splitlines() if f"{BASE_IQN}:listed" in ln]
    assert target_lines, out
    assert any(f"{daemon.portal},1" in ln for ln in target_lines), out
    assert node_b.portal not in out, out      # B serves nothing: its own portal is never offered
    # iscsi-ls -s logs in at the listed portal to report the LUNs: they come from A.
    assert "Lun:0" in out, out


async def test_an_initiator_follows_the_primary_as_it_changes(daemon: Daemon, node_b: NodeB) -> None:
    """B is the primary, then A, then B again; each new connection to B's portal reaches the
    primary of the moment. Each qemu-io run is a new login, as a reconnect is."""
    require_tool("qemu-io")
    await asyncio.to_thread(daemon.create_volume, "flip", "16MiB")
    iqn = f"{BASE_IQN}:flip"
    store = MemoryBlockStore(16 * MiB, 512)
    lu = LogicalUnit(store, LuIdentity(volume="flip", serial="b0b0b0b0b0b0b0b0", naa=os.urandom(16)))
    node_b.registry.add(Target(iqn, "flip", lu))

    # 1. B is the primary: the write lands on B; A's copy never sees it.
    await qemu_io(node_b.url("flip"), "write -P 0x11 0 64k")
    assert await store.read(0, 64 * KiB) == b"\x11" * (64 * KiB)
    await qemu_io(daemon.url("flip"), "read -P 0 0 64k")

    # 2. The primary moves to A: the same URL now reaches A.
    node_b.registry.redirect(iqn, a_portal(daemon))
    await qemu_io(node_b.url("flip"), "write -P 0x5a 0 64k")
    await qemu_io(daemon.url("flip"), "read -P 0x5a 0 64k")
    assert await store.read(0, 64 * KiB) == b"\x11" * (64 * KiB)   # B was not written

    # 3. Back to B.
    node_b.registry.redirect(iqn, None)
    await qemu_io(node_b.url("flip"), "read -P 0x11 0 64k")
