"""Prometheus metrics: the daemon's implementation of ``frontend.metrics.FrontendMetrics``.

All collectors live on one dedicated ``CollectorRegistry`` per PrometheusMetrics (never the global
default registry), so several daemons in one test process do not share counters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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


@dataclass(frozen=True, slots=True)
class _CommandSeries:
    """The labelled children of one (volume, op), cached for the per-command hot path."""

    count: Any
    nbytes: Any
    latency: Any


class PrometheusMetrics:
    """Counters and histograms per volume and operation, sessions by kind, login failures by reason."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.commands = Counter(
            "sparrow_scsi_commands", "SCSI commands completed", ["volume", "op"], registry=self.registry
        )
        self.bytes = Counter(
            "sparrow_scsi_bytes", "Bytes moved by SCSI commands", ["volume", "op"], registry=self.registry
        )
        self.latency = Histogram(
            "sparrow_scsi_command_seconds",
            "Time from a SCSI command's arrival to its status",
            ["volume", "op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
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
        for kind in SESSION_KINDS:
            self.sessions.labels(kind=kind).set(0)
        self._children: dict[tuple[str, str], _CommandSeries] = {}

    # --- FrontendMetrics ---------------------------------------------------------------------

    def command_done(self, volume: str, op: str, nbytes: int, seconds: float) -> None:
        # Called for every SCSI command: the labelled children are looked up once per (volume, op).
        children = self._children.get((volume, op))
        if children is None:
            children = self._children[(volume, op)] = _CommandSeries(
                self.commands.labels(volume=volume, op=op),
                self.bytes.labels(volume=volume, op=op),
                self.latency.labels(volume=volume, op=op),
            )
        children.count.inc()
        if nbytes:
            children.nbytes.inc(nbytes)
        children.latency.observe(seconds)

    def session_opened(self, kind: str) -> None:
        self.sessions.labels(kind=kind).inc()

    def session_closed(self, kind: str) -> None:
        self.sessions.labels(kind=kind).dec()

    def login_failed(self, reason: str) -> None:
        self.login_failures.labels(reason=reason).inc()

    # --- volumes (called by the VolumeService) -----------------------------------------------

    def volume_served(self, volume: str, size: int) -> None:
        self.volume_size.labels(volume=volume).set(size)
        for op in OPS:  # export zeros so rate() works from the first scrape
            self.commands.labels(volume=volume, op=op)
            self.latency.labels(volume=volume, op=op)
            if op != "other":
                self.bytes.labels(volume=volume, op=op)

    def volume_removed(self, volume: str) -> None:
        """Drop the volume's series so a deleted volume does not linger in every scrape."""
        for op in OPS:
            self._children.pop((volume, op), None)
        for collector in (self.commands, self.bytes, self.latency):
            for op in OPS:
                with contextlib.suppress(KeyError):
                    collector.remove(volume, op)
        with contextlib.suppress(KeyError):
            self.volume_size.remove(volume)

    def set_offline(self, count: int) -> None:
        self.volumes_offline.set(count)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its Content-Type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
