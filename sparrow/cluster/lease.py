"""Primary leases (docs/cluster.md, "Lease arithmetic").

A node may serve a volume as primary only while it holds a lease; the master may hand the volume
to another node only once it is sure that lease has run out. Clocks are never compared across
machines: each side measures durations on its own monotonic clock, and the arithmetic below makes
the node's lease end first.

Node (:class:`LeaseClock`, ``f`` = its fence margin)::

    sent(seq, now)                      sent_at[seq] = now           (heartbeat written)
    acked(seq, lease_seconds)           expires = sent_at[seq] + lease_seconds
    fence_deadline                      expires - f                  (the fence timer's instant)
    valid(now)                          now < expires - f            (may serve as primary)

Master (:class:`MasterLeases`)::

    granted(node, now, lease_seconds)   expires = max(expires, now + lease_seconds)   (Ack sent)
    safe_to_reassign(node, now)         now >= expires + margin

Why the node's lease ends first: heartbeat ``seq`` leaves the node at (true) time ``t0``; the
master receives it after ``d1 >= 0``, answers after processing ``p >= 0``, and the Ack reaches the
node after ``d2 >= 0``. The node's lease ends at ``t0 + L``; the master's view of it ends at
``t0 + d1 + p + L >= t0 + L``. The delays only ever shorten the node's lease. The master keeps the
*latest* expiry it ever granted a node (the max), because an Ack it sent may still be in flight or
may be the last one the node received. The ``margin`` covers clock-rate drift: if the node's clock
runs at rate ``r`` of the master's, the node's lease lasts ``L / r`` of master time, which stays
within ``L + margin`` for ``r >= L / (L + margin)`` (:attr:`LeaseConfig.max_rate_drift`).

The fence margin ``f`` makes the node stop serving *before* its lease ends, so that a fence timer
that fires late (a starved event loop) still lands inside the lease: the node fences at
``expires - f`` and is fenced by ``expires`` as long as the timer is less than ``f`` late. Every
"may I serve" question (:meth:`LeaseClock.valid`) has the margin applied, so it agrees with the
timer. The node must hear the next Ack before it stops serving:
``heartbeat_interval + fence_margin < lease_seconds`` (:class:`LeaseConfig`). docs/architecture.md,
"The fencing bound", puts the margins together.

A master that restarts has forgotten its grants; before reassigning anything it must treat every
known node as granted at its start time (call :meth:`MasterLeases.granted` for each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_duration(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number of seconds, not {value!r}")
    return float(value)


#: Seconds before its lease expires at which a node fences (``sparrow node --fence-margin``). A
#: tenth of the default 5 s lease: four times the worst fence measured on a starved host (127 ms
#: past the lease, 27 ms past the old lease + 100 ms budget; 0-3 ms normally), and it leaves 3.5 s
#: of serving after each Ack at the default 1 s heartbeat; it fits the test cluster's 2 s lease and
#: 0.25 s heartbeat too (1.5 s of serving per Ack).
DEFAULT_FENCE_MARGIN = 0.5


def check_fence_margin(fence_margin: float, *, lease_seconds: float, heartbeat_interval: float) -> float:
    """``fence_margin`` if a node using it can serve without a gap, else ValueError: the node stops
    serving ``fence_margin`` before its lease ends and must hear the next Ack (one heartbeat
    interval later) before that, so ``heartbeat_interval + fence_margin < lease_seconds``."""
    margin = _check_duration("fence_margin", fence_margin)
    if heartbeat_interval + margin >= lease_seconds:
        raise ValueError(
            f"heartbeat_interval + fence_margin ({heartbeat_interval} + {margin}) must be less than "
            f"lease_seconds ({lease_seconds}): a node stops serving fence_margin before its lease ends"
        )
    return margin


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Heartbeat and lease timing (seconds); the defaults are docs/cluster.md's.

    Rules: ``0 < heartbeat_interval < lease_seconds`` (a lease must outlast the gap to the next
    heartbeat), ``margin >= 0`` and ``lease_seconds + margin <= dead_after`` (so ``lease_seconds <
    dead_after``: by the time the master calls a node dead, its lease has run out), and
    :func:`check_fence_margin`: ``heartbeat_interval + fence_margin < lease_seconds``.

    ``margin`` is the master's (it waits that long past a lease before reassigning);
    ``fence_margin`` is the nodes' (each fences that long before its lease ends; ``sparrow serve``
    gives its node this one, and the master checks its lease leaves room for it).
    """

    heartbeat_interval: float = 1.0
    lease_seconds: float = 5.0
    dead_after: float = 8.0
    margin: float = 1.0
    fence_margin: float = DEFAULT_FENCE_MARGIN

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "lease_seconds", "dead_after", "margin", "fence_margin"):
            _check_duration(name, getattr(self, name))
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if self.lease_seconds <= self.heartbeat_interval:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must exceed "
                f"heartbeat_interval ({self.heartbeat_interval})"
            )
        if self.lease_seconds + self.margin > self.dead_after:
            raise ValueError(
                f"lease_seconds + margin ({self.lease_seconds} + {self.margin}) must not exceed "
                f"dead_after ({self.dead_after})"
            )
        check_fence_margin(
            self.fence_margin, lease_seconds=self.lease_seconds, heartbeat_interval=self.heartbeat_interval
        )

    @property
    def max_rate_drift(self) -> float:
        """How much slower than the master's the node's clock may run with leases still safe:
        ``margin / (lease_seconds + margin)`` (the node's rate must be >= 1 minus this)."""
        return self.margin / (self.lease_seconds + self.margin)


class LeaseClock:
    """The node's view of its lease, on the node's monotonic clock.

    ``sent(seq, now)`` records when heartbeat ``seq`` was written; ``acked(seq, lease_seconds)``
    sets ``expires_at = sent_at[seq] + lease_seconds`` -- counted from the *send*, so the lease
    ends on the node no later than the master believes it does. Acks for a seq never sent, already
    forgotten, or not newer than the last applied ack are ignored. The newest ack wins even if it
    shortens the lease (a shorter lease is always safe). At most ``max_outstanding`` unacked sends
    are remembered; older ones are forgotten (their acks are then ignored, which only shortens).

    ``fence_margin`` (the node daemon passes its ``--fence-margin``; 0 here, for the bare
    arithmetic) moves the end of service before the end of the lease: :attr:`fence_deadline` =
    ``expires_at - fence_margin``, and :meth:`valid` and :meth:`remaining` count to it.
    """

    def __init__(self, max_outstanding: int = 64, *, fence_margin: float = 0.0) -> None:
        if max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        self._max_outstanding = max_outstanding
        self.fence_margin = _check_duration("fence_margin", fence_margin)
        self._sent_at: dict[int, float] = {}
        self._last_sent: int | None = None
        self._last_acked: int | None = None
        self._expires_at: float | None = None
        self._fence_deadline: float | None = None

    def sent(self, seq: int, now: float) -> None:
        """Heartbeat ``seq`` was written at ``now``. Seqs must increase."""
        if self._last_sent is not None and seq <= self._last_sent:
            raise ValueError(f"heartbeat seq {seq} does not follow {self._last_sent}")
        self._last_sent = seq
        self._sent_at[seq] = now
        while len(self._sent_at) > self._max_outstanding:
            del self._sent_at[next(iter(self._sent_at))]  # dicts keep insertion (= seq) order

    def acked(self, seq: int, lease_seconds: float) -> float | None:
        """Apply the Ack for ``seq``; returns the new expiry, or None if the ack was ignored."""
        lease = _check_duration("lease_seconds", lease_seconds)
        sent_at = self._sent_at.get(seq)
        if sent_at is None or (self._last_acked is not None and seq <= self._last_acked):
            return None
        self._last_acked = seq
        self._expires_at = sent_at + lease
        self._fence_deadline = self._expires_at - self.fence_margin
        for old in [s for s in self._sent_at if s <= seq]:
            del self._sent_at[old]
        return self._expires_at

    @property
    def last_acked(self) -> int | None:
        """The seq of the last Ack applied (None before any)."""
        return self._last_acked

    @property
    def expires_at(self) -> float | None:
        """When the lease ends on this node's clock; None if no ack was ever applied."""
        return self._expires_at

    @property
    def fence_deadline(self) -> float | None:
        """When the node stops serving: ``expires_at - fence_margin``; None before any ack."""
        return self._fence_deadline

    def valid(self, now: float) -> bool:
        """``now < fence_deadline``: the node may act as primary. False before any ack."""
        return self._fence_deadline is not None and now < self._fence_deadline

    def remaining(self, now: float) -> float:
        """Seconds the node may still serve at ``now``, to the fence deadline (0.0 when past it
        or never granted)."""
        if self._fence_deadline is None:
            return 0.0
        return max(0.0, self._fence_deadline - now)


class MasterLeases:
    """The master's record of the leases it granted, on the master's monotonic clock.

    ``granted(node_id, now, lease_seconds)`` is called when an Ack carrying a lease is sent (after
    the heartbeat arrived, so after the node sent it); it keeps the latest expiry ever granted,
    ``max(previous, now + lease_seconds)``. ``safe_to_reassign(node_id, now)`` is true only when
    ``now >= expires_at + margin``, i.e. ``now >= granted_at + lease_seconds + margin`` for the
    grant that ends last. A node never granted a lease is safe.
    """

    def __init__(self, margin: float = 1.0) -> None:
        self.margin = _check_duration("margin", margin)
        self._expires_at: dict[str, float] = {}

    def granted(self, node_id: str, now: float, lease_seconds: float) -> float:
        """Record a lease sent to ``node_id`` at ``now``; returns the node's (possibly later) expiry."""
        expires = now + _check_duration("lease_seconds", lease_seconds)
        previous = self._expires_at.get(node_id)
        if previous is not None and previous > expires:
            expires = previous
        self._expires_at[node_id] = expires
        return expires

    def expires_at(self, node_id: str) -> float | None:
        """The latest expiry granted to ``node_id``; None if never granted."""
        return self._expires_at.get(node_id)

    def safe_to_reassign(self, node_id: str, now: float, margin: float | None = None) -> bool:
        """True when no lease of ``node_id`` can still be running: ``now >= expires_at + margin``.

        ``margin`` defaults to the one given at construction.
        """
        expires = self._expires_at.get(node_id)
        if expires is None:
            return True
        extra = self.margin if margin is None else _check_duration("margin", margin)
        return now >= expires + extra
