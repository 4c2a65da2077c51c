"""Which targets this node exports, and the settings every connection shares.

In a cluster a target (one volume) is served by its primary only. The registry of every node knows
two kinds of entry:

- :class:`Target`: served here, by a local :class:`~frontend.scsi.lu.LogicalUnit`;
- :class:`RemoteTarget`: exists in the cluster but is served at another node's portal. A login to it
  is answered "target moved temporarily" with that portal (RFC 7143 11.13.5) and SendTargets lists
  that portal for it (RFC 7143 13.8), so an initiator that (re)connects to any node lands on the
  primary by itself.

A local target can be switched to "served elsewhere" and back with :meth:`TargetRegistry.redirect`
(the node's adapter does so when the master changes the volume's primary); it keeps its LU meanwhile.
"""

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
        """``host:port,tpgt``: the TargetAddress of a SendTargets record, which must carry the
        portal group tag (RFC 7143 13.8). IPv6 hosts are bracketed."""
        return f"{self.redirect_address()},{self.tpgt}"

    def redirect_address(self) -> str:
        """``host:port``: the TargetAddress of a redirect Login Response, where the comma and
        portal group tag must be omitted (RFC 7143 13.8)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    iqn: str
    volume: str
    lu: LogicalUnit
    chap: ChapConfig | None = None


@dataclass(frozen=True, slots=True)
class RemoteTarget:
    """A target that exists in the cluster but is served at ``portal`` (its primary), not here."""

    iqn: str
    volume: str
    portal: Portal


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """Limits and timers shared by all connections of one iSCSI listener."""

    portals: tuple[Portal, ...] = ()
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
    """The targets this node knows, by IQN: those it serves and those served elsewhere.

    One rule decides what a login or a SendTargets meets (:meth:`resolve`): an entry saying the
    target is served elsewhere (:meth:`add_remote`, :meth:`redirect`) wins over a local
    :class:`Target`. :meth:`add` never clears such an entry; serving a redirected target here again
    takes an explicit ``redirect(iqn, None)``, so a replica that opens its copy of a volume does
    not start serving it by accident.
    """

    _targets: dict[str, Target] = field(default_factory=dict)
    _elsewhere: dict[str, RemoteTarget] = field(default_factory=dict)
    #: The CHAP a discovery (SendTargets) session must pass (None: none). Set at any time: it
    #: applies to the next discovery login (a cluster node takes it from each Ack).
    discovery_chap: ChapConfig | None = None

    def add(self, target: Target) -> None:
        """Serve ``target`` here (replacing a local target of the same IQN)."""
        self._targets[target.iqn] = target

    def add_remote(self, remote: RemoteTarget) -> None:
        """Record that ``remote.iqn`` is served at ``remote.portal`` (replacing any earlier portal)."""
        self._elsewhere[remote.iqn] = remote

    def redirect(self, iqn: str, portal: Portal | None) -> None:
        """Switch the local target ``iqn`` to "served at ``portal``", or back to "served here" with
        None. Raises KeyError when no local target has that IQN (use :meth:`add_remote` for a
        volume this node does not hold). Sessions already open are not touched: fencing them is
        the LU's access state, closing them the caller's business."""
        target = self._targets[iqn]
        if portal is None:
            self._elsewhere.pop(iqn, None)
        else:
            self._elsewhere[iqn] = RemoteTarget(iqn, target.volume, portal)

    def remove(self, iqn: str) -> Target | None:
        """Forget ``iqn`` entirely (local target and any served-elsewhere entry); returns the local
        target, if there was one."""
        self._elsewhere.pop(iqn, None)
        return self._targets.pop(iqn, None)

    def get(self, iqn: str) -> Target | None:
        """The local target ``iqn``, whether or not it is currently redirected."""
        return self._targets.get(iqn)

    def remote(self, iqn: str) -> RemoteTarget | None:
        """Where ``iqn`` is served when that is not here, else None."""
        return self._elsewhere.get(iqn)

    def resolve(self, iqn: str) -> Target | RemoteTarget | None:
        """What a login to ``iqn`` meets: the served-elsewhere entry if any, else the local target."""
        return self._elsewhere.get(iqn) or self._targets.get(iqn)

    def __iter__(self) -> Iterator[Target | RemoteTarget]:
        """Every known IQN once, resolved as by :meth:`resolve`, in IQN order."""
        iqns = sorted(self._targets.keys() | self._elsewhere.keys())
        return iter([entry for iqn in iqns if (entry := self.resolve(iqn)) is not None])

    def __len__(self) -> int:
        return len(self._targets.keys() | self._elsewhere.keys())
