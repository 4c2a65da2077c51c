"""A node that redirects a volume's logins elsewhere closes the sessions logged in to it
(sparrow.node.convergence.NodeVolumes.redirect): a demoted primary's initiators log in again and
follow the redirect instead of retrying a standby LU; the forwarding stands down first."""

from __future__ import annotations

from pathlib import Path

from frontend.target import Portal, TargetRegistry
from sparrow.cluster.adapter import OpenVolume
from sparrow.node.convergence import NodeVolumes
from store.volumes import VolumeManager

VOL = "cd" * 16
NAME = "vol-r"
IQN = f"iqn.2026-11.io.sparrow:{NAME}"


class FakeSessions:
    def __init__(self, count: int) -> None:
        self.count = count
        self.closed: list[tuple[str, str]] = []

    def session_count(self, iqn: str) -> int:
        return self.count if iqn == IQN else 0

    async def disconnect(self, iqn: str, reason: str) -> None:
        self.closed.append((iqn, reason))
        self.count = 0


class FakeForwarding:
    def __init__(self) -> None:
        self.stood_down: list[str] = []

    def wrap(self, volume_id: str, store: object, *, dirty: object = None) -> object:
        return store

    def stand_down(self, volume_ids: object) -> None:
        self.stood_down.extend(volume_ids)  # type: ignore[call-overload]


async def volumes(tmp_path: Path, sessions: FakeSessions, forwarding: FakeForwarding) -> NodeVolumes:
    manager = VolumeManager(tmp_path)
    await manager.load_all()
    registry = TargetRegistry()
    nv = NodeVolumes(manager, registry, base_iqn="iqn.2026-11.io.sparrow", sessions=sessions,
                     forwarding=forwarding)  # type: ignore[arg-type]  # fmt: skip
    await nv.open_volume(OpenVolume(VOL, NAME, 1 << 20, 512))
    return nv


async def test_redirecting_elsewhere_stands_down_and_closes_the_sessions(tmp_path: Path) -> None:
    sessions, forwarding = FakeSessions(2), FakeForwarding()
    nv = await volumes(tmp_path, sessions, forwarding)
    await nv.redirect(VOL, None)  # served here: nothing closed
    assert sessions.closed == [] and forwarding.stood_down == []
    await nv.redirect(VOL, "127.0.0.9:3260")
    assert forwarding.stood_down == [VOL]
    assert sessions.closed == [(IQN, "volume served at 127.0.0.9:3260")]
    assert nv.registry.resolve(IQN).portal == Portal("127.0.0.9", 3260, 1)  # type: ignore[union-attr]
    await nv.manager.close()


async def test_a_redirect_with_no_session_closes_nothing(tmp_path: Path) -> None:
    sessions, forwarding = FakeSessions(0), FakeForwarding()
    nv = await volumes(tmp_path, sessions, forwarding)
    await nv.redirect(VOL, "127.0.0.9:3260")
    assert sessions.closed == [] and forwarding.stood_down == []
    await nv.manager.close()
