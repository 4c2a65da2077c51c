"""sparrow.cluster.lease: node and master lease arithmetic with injected clocks (no sleeps)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparrow.cluster.lease import (
    DEFAULT_FENCE_MARGIN,
    LeaseClock,
    LeaseConfig,
    MasterLeases,
    check_fence_margin,
)

# -- LeaseConfig ----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = LeaseConfig()
    assert (config.heartbeat_interval, config.lease_seconds, config.dead_after, config.margin) == (
        1.0,
        5.0,
        8.0,
        1.0,
    )
    assert config.max_rate_drift == pytest.approx(1 / 6)
    assert config.fence_margin == DEFAULT_FENCE_MARGIN == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"heartbeat_interval": 0.0},
        {"heartbeat_interval": -1.0},
        {"heartbeat_interval": 5.0},  # not shorter than the lease
        {"lease_seconds": 8.0},  # lease must end before the node is declared dead
        {"lease_seconds": 7.5},  # lease + margin > dead_after
        {"margin": -0.1},
        {"margin": 3.5},
        {"dead_after": math.inf},
        {"lease_seconds": math.nan},
        {"margin": True},
        {"fence_margin": -0.1},
        {"fence_margin": math.nan},
        {"fence_margin": 4.0},  # heartbeat 1 + fence margin 4 leaves no time to hear the next Ack
        {"heartbeat_interval": 4.5},  # ... nor does heartbeat 4.5 with the default fence margin
    ],
)
def test_config_rejects(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LeaseConfig(**kwargs)


def test_config_boundary_is_allowed() -> None:
    assert LeaseConfig(lease_seconds=7.0, margin=1.0, dead_after=8.0).lease_seconds == 7.0
    assert LeaseConfig(heartbeat_interval=1.0, fence_margin=3.99).fence_margin == 3.99
    assert LeaseConfig(fence_margin=0.0).fence_margin == 0.0


def test_the_test_clusters_and_serves_timings_fit_the_default_fence_margin() -> None:
    for heartbeat, lease in ((0.25, 2.0), (0.25, 5.0), (0.5, 2.0), (1.0, 5.0)):
        margin = check_fence_margin(DEFAULT_FENCE_MARGIN, lease_seconds=lease, heartbeat_interval=heartbeat)
        assert margin == 0.5
    with pytest.raises(ValueError, match="must be less than lease_seconds"):
        check_fence_margin(1.0, lease_seconds=2.0, heartbeat_interval=1.0)


# -- LeaseClock (node) ----------------------------------------------------------------------------


def test_no_lease_before_an_ack() -> None:
    clock = LeaseClock()
    assert clock.expires_at is None
    assert not clock.valid(0.0)
    assert clock.remaining(0.0) == 0.0
    clock.sent(1, 100.0)
    assert not clock.valid(100.0)


def test_lease_counts_from_the_send_time() -> None:
    clock = LeaseClock()
    clock.sent(1, 100.0)
    # The ack arrives 3 s later; the lease still started at 100.0.
    assert clock.acked(1, 5.0) == 105.0
    assert clock.expires_at == 105.0
    assert clock.valid(103.0)
    assert clock.valid(104.999)
    assert not clock.valid(105.0)  # valid(now) = now < expires
    assert clock.remaining(103.0) == 2.0
    assert clock.remaining(106.0) == 0.0


def test_the_fence_margin_ends_service_before_the_lease() -> None:
    clock = LeaseClock(fence_margin=0.5)
    assert clock.fence_deadline is None and not clock.valid(0.0)
    clock.sent(1, 100.0)
    assert clock.acked(1, 5.0) == 105.0  # the lease itself still ends at send + lease ...
    assert clock.expires_at == 105.0
    assert clock.fence_deadline == 104.5  # ... but service ends fence_margin earlier
    assert clock.valid(104.499)
    assert not clock.valid(104.5)  # every "may I serve" answers with the margin applied
    assert not clock.valid(104.9)
    assert clock.remaining(103.0) == 1.5
    assert clock.remaining(104.7) == 0.0


def test_a_lease_no_longer_than_the_fence_margin_never_serves() -> None:
    clock = LeaseClock(fence_margin=1.0)
    clock.sent(1, 100.0)
    clock.acked(1, 1.0)
    assert not clock.valid(100.0)


@pytest.mark.parametrize("margin", [-0.1, math.nan, math.inf])
def test_bad_fence_margins_are_refused(margin: float) -> None:
    with pytest.raises(ValueError):
        LeaseClock(fence_margin=margin)


def test_unknown_seq_is_ignored() -> None:
    clock = LeaseClock()
    clock.sent(1, 100.0)
    assert clock.acked(2, 5.0) is None
    assert clock.expires_at is None


def test_older_and_duplicate_acks_are_ignored() -> None:
    clock = LeaseClock()
    clock.sent(1, 100.0)
    clock.sent(2, 101.0)
    clock.sent(3, 102.0)
    assert clock.acked(2, 5.0) == 106.0
    assert clock.acked(1, 5.0) is None  # older than the applied one
    assert clock.acked(2, 9.0) is None  # duplicate
    assert clock.expires_at == 106.0
    assert clock.acked(3, 5.0) == 107.0


def test_newest_ack_wins_even_when_it_shortens() -> None:
    clock = LeaseClock()
    clock.sent(1, 100.0)
    clock.sent(2, 101.0)
    clock.acked(1, 10.0)
    assert clock.expires_at == 110.0
    assert clock.acked(2, 1.0) == 102.0
    assert not clock.valid(103.0)


def test_zero_lease_is_no_lease() -> None:
    clock = LeaseClock()
    clock.sent(1, 100.0)
    assert clock.acked(1, 0.0) == 100.0
    assert not clock.valid(100.0)


def test_old_seqs_are_forgotten() -> None:
    clock = LeaseClock(max_outstanding=3)
    for seq in range(1, 6):
        clock.sent(seq, float(seq))
    assert clock.acked(2, 5.0) is None  # forgotten: only 3, 4, 5 are remembered
    assert clock.acked(3, 5.0) == 8.0
    clock.sent(6, 6.0)
    assert clock.acked(6, 5.0) == 11.0


def test_seqs_must_increase() -> None:
    clock = LeaseClock()
    clock.sent(5, 1.0)
    with pytest.raises(ValueError):
        clock.sent(5, 2.0)
    with pytest.raises(ValueError):
        clock.sent(4, 2.0)


@pytest.mark.parametrize("lease", [-1.0, math.nan, math.inf])
def test_bad_lease_durations_are_refused(lease: float) -> None:
    clock = LeaseClock()
    clock.sent(1, 0.0)
    with pytest.raises(ValueError):
        clock.acked(1, lease)


def test_max_outstanding_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LeaseClock(max_outstanding=0)


# -- MasterLeases ---------------------------------------------------------------------------------


def test_never_granted_is_safe() -> None:
    leases = MasterLeases()
    assert leases.expires_at("node-1") is None
    assert leases.safe_to_reassign("node-1", 0.0)


def test_safe_only_after_lease_plus_margin() -> None:
    leases = MasterLeases(margin=1.0)
    assert leases.granted("node-1", 100.0, 5.0) == 105.0
    assert leases.expires_at("node-1") == 105.0
    assert not leases.safe_to_reassign("node-1", 105.0)
    assert not leases.safe_to_reassign("node-1", 105.999)
    assert leases.safe_to_reassign("node-1", 106.0)
    # Per-call margin override.
    assert leases.safe_to_reassign("node-1", 105.0, margin=0.0)
    assert not leases.safe_to_reassign("node-1", 106.0, margin=2.0)
    # Other nodes are unaffected.
    assert leases.safe_to_reassign("node-2", 100.0)


def test_master_keeps_the_latest_expiry() -> None:
    # An Ack with a long lease may be the last one the node received; a later, shorter grant must
    # not make the master believe the lease ends sooner.
    leases = MasterLeases(margin=0.0)
    leases.granted("node-1", 100.0, 10.0)
    assert leases.granted("node-1", 101.0, 1.0) == 110.0
    assert not leases.safe_to_reassign("node-1", 109.0)
    leases.granted("node-1", 108.0, 5.0)
    assert leases.expires_at("node-1") == 113.0


def test_master_refuses_bad_durations() -> None:
    with pytest.raises(ValueError):
        MasterLeases(margin=-1.0)
    leases = MasterLeases()
    with pytest.raises(ValueError):
        leases.granted("node-1", 0.0, math.nan)


# -- safety properties ----------------------------------------------------------------------------
# Times are drawn on a 1/1024 s grid and offsets are whole seconds, so every sum below is exact in
# binary floating point and the properties hold with no tolerance.


def grid(low: float, high: float) -> st.SearchStrategy[float]:
    return st.integers(int(low * 1024), int(high * 1024)).map(lambda n: n / 1024)


delays = grid(0.0, 30.0)
offsets = st.integers(-(10**6), 10**6).map(float)


@given(t0=grid(0.0, 1e5), d1=delays, processing=delays, d2=delays, offset=offsets, lease=grid(0.0, 60.0))
def test_one_exchange_node_expiry_never_exceeds_master_expiry(
    t0: float, d1: float, processing: float, d2: float, offset: float, lease: float
) -> None:
    """Heartbeat sent at master-time t0, received after d1, acked after processing, the ack
    received after d2. The node's clock reads master time + offset (same rate). The node's expiry,
    translated to the master's clock, is no later than the master's, whatever the delays; and from
    the moment the master says "safe", the node is fenced.
    """
    node, master = LeaseClock(), MasterLeases(margin=0.0)
    node.sent(1, t0 + offset)
    grant_time = t0 + d1 + processing
    master_expiry = master.granted("node-1", grant_time, lease)
    ack_arrival = grant_time + d2
    node_expiry = node.acked(1, lease)
    assert node_expiry == t0 + offset + lease  # counted from the send, not the ack's arrival
    assert master_expiry == grant_time + lease
    assert node_expiry - offset <= master_expiry
    for probe in (t0, grant_time, ack_arrival, master_expiry, master_expiry + d2):
        if master.safe_to_reassign("node-1", probe):
            assert not node.valid(probe + offset)


@dataclass(frozen=True)
class Exchange:
    gap: float  # since the previous heartbeat was sent
    d1: float  # node send -> master receive
    processing: float  # master receive -> ack sent (the grant)
    d2: float  # ack sent -> node receive
    lease: float
    ack_lost: bool  # the ack never reaches the node (the master still granted)
    heartbeat_lost: bool  # the master never sees the heartbeat (no grant, no ack)


exchanges = st.builds(
    Exchange,
    gap=grid(0.001, 5.0),
    d1=delays,
    processing=grid(0.0, 2.0),
    d2=delays,
    lease=grid(0.0, 10.0),
    ack_lost=st.booleans(),
    heartbeat_lost=st.booleans(),
)


def violations(history: list[Exchange], *, offset: float, rate: float, margin: float) -> list[float]:
    """Run a history through a node and a master; return the master-clock times at which the
    master would reassign while the node still believes it holds the lease.

    The node's clock reads ``offset + rate * t`` at master time ``t``. Acks are delivered by arrival
    time, so they may arrive out of order. A violation can only begin where the master becomes
    safe (some grant's ``t + lease + margin``) or where the node's lease is renewed (an ack
    arrival), so those instants and every other event time are probed.
    """
    node, master = LeaseClock(), MasterLeases(margin=margin)
    events: list[tuple[float, int, int, float]] = []  # (time, kind 0=sent 1=grant 2=ack, seq, lease)
    probes: set[float] = set()
    send = 0.0
    for seq, ex in enumerate(history, 1):
        send += ex.gap
        events.append((send, 0, seq, 0.0))
        if ex.heartbeat_lost:
            continue
        grant = send + ex.d1 + ex.processing
        events.append((grant, 1, seq, ex.lease))
        probes.add(grant + ex.lease + margin)
        if not ex.ack_lost:
            events.append((grant + ex.d2, 2, seq, ex.lease))
    events.sort()
    probes.update(t for t, *_ in events)

    found: list[float] = []
    index = 0
    for probe in sorted(probes):
        while index < len(events) and events[index][0] <= probe:
            t, kind, seq, lease = events[index]
            index += 1
            if kind == 0:
                node.sent(seq, offset + rate * t)
            elif kind == 1:
                master.granted("node-1", t, lease)
            else:
                node.acked(seq, lease)
        if master.safe_to_reassign("node-1", probe) and node.valid(offset + rate * probe):
            found.append(probe)
    return found


@given(st.lists(exchanges, min_size=1, max_size=12), offsets)
@example(  # a long lease acked, then a shorter one whose ack is lost: the master must keep the long one
    [Exchange(1.0, 0.0, 0.0, 0.0, 10.0, False, False), Exchange(1.0, 0.0, 0.0, 0.0, 0.0, True, False)], 0.0
)
@example(  # acks overtaking each other
    [Exchange(1.0, 0.0, 0.0, 9.0, 8.0, False, False), Exchange(1.0, 0.0, 0.0, 0.0, 1.0, False, False)], 5.0
)
@settings(max_examples=300)
def test_any_history_master_safe_implies_node_fenced(history: list[Exchange], offset: float) -> None:
    """Lost heartbeats, lost acks, reordered acks, changing lease lengths, any delays: with equal
    clock rates the master never considers a lease over while the node still holds it, even with
    a zero margin."""
    assert violations(history, offset=offset, rate=1.0, margin=0.0) == []


@given(st.lists(exchanges, min_size=1, max_size=8), offsets, st.floats(0.0, 1.0))
def test_margin_covers_clock_rate_drift(history: list[Exchange], offset: float, slack: float) -> None:
    """A node clock running slower than the master's, down to rate 1 - max_rate_drift, is covered
    by the margin for leases up to the configured lease_seconds."""
    config = LeaseConfig()
    bounded = [
        Exchange(
            e.gap, e.d1, e.processing, e.d2, min(e.lease, config.lease_seconds), e.ack_lost, e.heartbeat_lost
        )
        for e in history
    ]
    slowest = 1.0 - config.max_rate_drift + 1e-6
    rate = slowest + slack * (1.5 - slowest)
    assert violations(bounded, offset=offset, rate=rate, margin=config.margin) == []


def test_without_enough_margin_a_slow_node_clock_is_unsafe() -> None:
    """The property tests above can fail: a node clock at half speed outlives the master's view."""
    history = [Exchange(1.0, 0.0, 0.0, 0.0, 5.0, ack_lost=False, heartbeat_lost=False)]
    assert violations(history, offset=0.0, rate=0.5, margin=1.0) != []
    assert violations(history, offset=0.0, rate=1.0, margin=0.0) == []


def test_a_node_that_counted_from_the_ack_would_be_unsafe() -> None:
    """Why the send time: sent at 0, received at 1, acked at once, the ack arrives at 3, lease 5.
    The master is safe from 6; a node stamping the ack's arrival would serve until 8."""
    master = MasterLeases(margin=0.0)
    master.granted("node-1", 1.0, 5.0)
    assert master.safe_to_reassign("node-1", 6.0)

    right = LeaseClock()
    right.sent(1, 0.0)
    right.acked(1, 5.0)
    assert not right.valid(6.0)

    wrong = LeaseClock()
    wrong.sent(1, 3.0)  # the arrival time of the ack, not the send time
    wrong.acked(1, 5.0)
    assert wrong.valid(6.0)
