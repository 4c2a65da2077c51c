"""Which targets this node exports, and the settings every connection shares."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from frontend.scsi.lu import LogicalUnit

DEFAULT_BASE_IQN = "iqn.2026-11.io.sparrow"


@dataclass(frozen=True, slots=True)
class ChapSecret:
    user: str
    secret: str


@dataclass(frozen=True, slots=True)
class ChapConfig:
    """CHAP for one target (or for discovery).

    ``initiator``: the name and secret the initiator must prove (one-way CHAP).
    ``target``: the name and secret the target proves back when the initiator asks (mutual CHAP).
    """

    initiator: ChapSecret
    target: ChapSecret | None = None


@dataclass(frozen=True, slots=True)
class Portal:
    host: str
    port: int
    tpgt: int = 1

    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port},{self.tpgt}"


@dataclass(frozen=True, slots=True)
class Target:
    iqn: str
    volume: str
    lu: LogicalUnit
    chap: ChapConfig | None = None


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """Limits and timers shared by all connections of one iSCSI listener."""

    portals: tuple[Portal, ...] = ()
    discovery_chap: ChapConfig | None = None
    tpgt: int = 1
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 65536
    max_outstanding_r2t: int = 1
    cmd_window: int = 128
    nop_interval: float = 5.0
    nop_timeout: float = 15.0
    login_timeout: float = 15.0
    max_connections: int = 1


@dataclass
class TargetRegistry:
    """The targets this node serves, by IQN."""

    _targets: dict[str, Target] = field(default_factory=dict)

    def add(self, target: Target) -> None:
        self._targets[target.iqn] = target

    def remove(self, iqn: str) -> Target | None:
        return self._targets.pop(iqn, None)

    def get(self, iqn: str) -> Target | None:
        return self._targets.get(iqn)

    def __iter__(self) -> Iterator[Target]:
        return iter(sorted(self._targets.values(), key=lambda t: t.iqn))

    def __len__(self) -> int:
        return len(self._targets)
