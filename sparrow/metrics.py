"""Prometheus metrics: the daemon's implementation of ``frontend.metrics.FrontendMetrics``.

All collectors live on one dedicated ``CollectorRegistry`` per PrometheusMetrics (never the global
default registry), so several daemons in one test process do not share counters.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

#: Latency buckets for block I/O, from 50 µs (page-cache hit) to 10 s (a stalled fdatasync).
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

OPS = ("read", "write", "other")
SESSION_KINDS = ("normal", "discovery")


class VolumeMetrics(Protocol):
    """What the node's volume layer reports (PrometheusMetrics implements it)."""

    def volume_served(self, volume: str, size: int) -> None: ...

    def volume_removed(self, volume: str) -> None: ...

    def set_offline(self, count: int) -> None: ...


class _IoStats:
    """Counts for one (volume, op), kept as plain numbers: the event loop is the only writer, so the
    per-command path needs no lock. ``IoCollector`` turns them into metric families at scrape time."""

    __slots__ = ("buckets", "count", "nbytes", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.nbytes = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf


class IoCollector(Collector):
    """Exports the per-volume command counters and latency histogram (a prometheus-client Collector)."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], _IoStats] = {}

    def collect(self) -> Iterator[Metric]:
        commands = CounterMetricFamily(
            "sparrow_scsi_commands", "SCSI commands completed", labels=["volume", "op"]
        )
        nbytes = CounterMetricFamily(
            "sparrow_scsi_bytes", "Bytes moved by SCSI commands", labels=["volume", "op"]
        )
        latency = HistogramMetricFamily(
            "sparrow_scsi_command_seconds",
            "Time from a SCSI command's arrival to its status",
            labels=["volume", "op"],
        )
        bounds = [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
        for (volume, op), st in sorted(self.stats.items()):
            commands.add_metric([volume, op], st.count)
            if op != "other":
                nbytes.add_metric([volume, op], st.nbytes)
            cumulative = list(itertools.accumulate(st.buckets))
            latency.add_metric([volume, op], list(zip(bounds, cumulative, strict=True)), st.seconds)
        yield commands
        yield nbytes
        yield latency


class PrometheusMetrics:
    """Counters and histograms per volume and operation, sessions by kind, login failures by reason."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.io = IoCollector()
        self.registry.register(self.io)
        self.sessions = Gauge(
            "sparrow_iscsi_sessions", "Open iSCSI sessions", ["kind"], registry=self.registry
        )
        self.login_failures = Counter(
            "sparrow_iscsi_login_failures", "Failed iSCSI logins", ["reason"], registry=self.registry
        )
        self.volume_size = Gauge(
            "sparrow_volume_size_bytes", "Size of each served volume", ["volume"], registry=self.registry
        )
        self.volumes_offline = Gauge(
            "sparrow_volumes_offline", "Volumes that failed to open at startup", registry=self.registry
        )
        self.internal_errors = Counter(
            "sparrow_internal_errors",
            "Bugs caught inside the iSCSI core (logged with their traceback)",
            ["where"],
            registry=self.registry,
        )
        self.unsupported_commands = Counter(
            "sparrow_scsi_unsupported",
            "SCSI commands answered INVALID COMMAND OPERATION CODE, by volume, opcode and service "
            "action (hex; empty for an opcode without one)",
            ["volume", "opcode", "service_action"],
            registry=self.registry,
        )
        for kind in SESSION_KINDS:
            self.sessions.labels(kind=kind).set(0)

    # --- FrontendMetrics ---------------------------------------------------------------------

    def command_done(self, volume: str, op: str, nbytes: int, seconds: float) -> None:
        st = self.io.stats.get((volume, op))
        if st is None:
            st = self.io.stats[(volume, op)] = _IoStats()
        st.count += 1
        st.nbytes += nbytes
        st.seconds += seconds
        st.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def session_opened(self, kind: str) -> None:
        self.sessions.labels(kind=kind).inc()

    def session_closed(self, kind: str) -> None:
        self.sessions.labels(kind=kind).dec()

    def login_failed(self, reason: str) -> None:
        self.login_failures.labels(reason=reason).inc()

    def internal_error(self, where: str) -> None:
        self.internal_errors.labels(where=where).inc()

    # --- volumes (called by the node's volume layer, NodeVolumes) ---------------------------

    def volume_served(self, volume: str, size: int) -> None:
        self.volume_size.labels(volume=volume).set(size)
        for op in OPS:  # export zeros so rate() works from the first scrape
            self.io.stats.setdefault((volume, op), _IoStats())

    def volume_removed(self, volume: str) -> None:
        """Drop the volume's series so a deleted volume does not linger in every scrape."""
        for op in OPS:
            self.io.stats.pop((volume, op), None)
        with contextlib.suppress(KeyError):
            self.volume_size.remove(volume)

    def set_offline(self, count: int) -> None:
        self.volumes_offline.set(count)

    def unsupported_command(self, volume: str, opcode: int, service_action: int | None) -> None:
        """One command the volume's LU answered as unsupported (sparrow.node.diagnostics)."""
        sa = "" if service_action is None else f"0x{service_action:02x}"
        self.unsupported_commands.labels(volume=volume, opcode=f"0x{opcode:02x}", service_action=sa).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its Content-Type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
