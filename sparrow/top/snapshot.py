"""What ``sparrow top`` shows, built from answers (sans-IO: no sockets, the clock passed in).

A :class:`Snapshot` is read from the master's ``GET /v1/nodes`` and ``GET /v1/volumes`` answers
(sparrow.master.api: ``node_json`` with ``draining``, ``volume_json``) and from each node's
``/metrics`` text: the per-volume counters ``sparrow_scsi_commands_total{volume,op}`` and
``sparrow_scsi_bytes_total{volume,op}`` (sparrow.metrics.IoCollector), kept per (node, volume, op)
because only the node serving a volume's primary counts its I/O, and the primary moves.

I/O rates need two snapshots: :func:`io_rates` takes the counters' increase over the time between
the two ``taken_at`` (monotonic seconds), per second, summed over nodes per volume. As Prometheus's
``rate()`` does, a counter that went down was reset (the node restarted): its increase is its new
value; a series missing from either snapshot (a node not scraped, a volume just served) adds
nothing, nor does a node's series for a listed volume it holds no copy of (what a node answers is
its word: it may not add to another node's volume). A volume none of whose series is in both
snapshots has no rate (shown as ``-``), which is not the same as a rate of 0.

Anything unexpected in an answer (a missing field, a wrong type) is skipped or shown as unknown,
never raised: the view is for a person looking at a cluster that may be half up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sparrow.cluster.messages import InvalidMessage, split_portal
from sparrow.termtext import printable

#: The node's per-volume counters (sparrow.metrics.IoCollector), by family name without ``_total``.
COMMANDS_FAMILY = "sparrow_scsi_commands"
BYTES_FAMILY = "sparrow_scsi_bytes"
#: The ops ``top`` shows a rate of (``other`` is every other SCSI command: not I/O).
IO_OPS = ("read", "write")
#: Addresses a daemon may bind that nobody can dial: the node's iSCSI portal host is used instead.
_ANY_HOSTS = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node as the master reports it (``GET /v1/nodes``)."""

    node_id: str
    state: str
    heartbeat_age: float | None = None
    capacity_bytes: int | None = None
    free_bytes: int | None = None
    draining: bool = False
    drain_status: str | None = None
    http: str | None = None
    iscsi_portal: str | None = None

    def metrics_url(self) -> str | None:
        """``http://HOST:PORT/metrics`` of the node (its Hello's ``http``); a wildcard host is
        replaced by its iSCSI portal's host. None: the master knows no address."""
        address = _portal(self.http)
        if address is None:
            return None
        host, port = address
        if host in _ANY_HOSTS:
            portal = _portal(self.iscsi_portal)
            if portal is None or portal[0] in _ANY_HOSTS:
                return None
            host = portal[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def _portal(text: str | None) -> tuple[str, int] | None:
    """``host:port`` as the master checks a Hello's addresses (split_portal), else None: an
    answer is not trusted to be only a host and a port (no path, user or fragment dialled)."""
    if not text:
        return None
    try:
        return split_portal(text)
    except InvalidMessage:
        return None


@dataclass(frozen=True, slots=True)
class CopyRow:
    """One copy of a volume (an entry of the volume's ``replicas``)."""

    node_id: str
    primary: bool
    alive: bool
    #: ``in_sync``, ``syncing`` or ``stale`` (the master's in-sync set; sparrow.master.api).
    sync: str
    resync_done: int | None = None
    resync_total: int | None = None

    @property
    def resync_fraction(self) -> float | None:
        if self.resync_done is None or not self.resync_total:
            return None
        return min(1.0, max(0.0, self.resync_done / self.resync_total))


@dataclass(frozen=True, slots=True)
class VolumeRow:
    """One volume (``GET /v1/volumes``)."""

    name: str
    size: int
    epoch: int
    primary: str | None
    copies: tuple[CopyRow, ...]
    replicas_wanted: int
    served: bool
    #: Why it is not served or not as wanted (the controller's reason); None: nothing to say.
    status: str | None = None


@dataclass(frozen=True, slots=True)
class IoCounter:
    """A (node, volume, op) series: commands completed and bytes moved, both monotonic."""

    commands: float
    nbytes: float


#: (node_id, volume name, op)
SeriesKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the master and the nodes said at ``taken_at`` (the caller's monotonic ``now``)."""

    taken_at: float
    volumes: tuple[VolumeRow, ...]
    nodes: tuple[NodeRow, ...] = ()
    #: Why there is no node list (a tenant token may not see nodes); None: there is one.
    nodes_error: str | None = None
    counters: Mapping[SeriesKey, IoCounter] = field(default_factory=dict)
    #: Nodes whose /metrics could not be read, and why.
    scrape_errors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IoRate:
    """Per second, over the time between two snapshots."""

    read_ops: float = 0.0
    write_ops: float = 0.0
    read_bytes: float = 0.0
    write_bytes: float = 0.0


# --- reading answers ---------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    """A string of an answer, its control characters escaped (sparrow.termtext): what a node
    reported reaches the frame, never the terminal raw."""
    return printable(value) if isinstance(value, str) else None


def _items(answer: Any, key: str) -> list[Mapping[str, Any]]:
    items = answer.get(key) if isinstance(answer, Mapping) else None
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def nodes_from_json(answer: Any) -> tuple[NodeRow, ...]:
    """``{"nodes": [...]}`` (``GET /v1/nodes``) -> rows, sorted by node id."""
    rows = []
    for n in _items(answer, "nodes"):
        node_id = _str(n.get("node_id"))
        if node_id is None:
            continue
        rows.append(
            NodeRow(
                node_id=node_id,
                state=_str(n.get("state")) or "?",
                heartbeat_age=_number(n.get("last_heartbeat_age")),
                capacity_bytes=_int(n.get("capacity_bytes")),
                free_bytes=_int(n.get("free_bytes")),
                draining=n.get("draining") is True,
                drain_status=_str(n.get("drain_status")),
                http=_str(n.get("http")),
                iscsi_portal=_str(n.get("iscsi_portal")),
            )
        )
    return tuple(sorted(rows, key=lambda r: r.node_id))


def _copy_from_json(c: Mapping[str, Any]) -> CopyRow | None:
    node_id = _str(c.get("node_id"))
    if node_id is None:
        return None
    resync = c.get("resync")
    figures = resync if isinstance(resync, Mapping) else {}
    return CopyRow(
        node_id=node_id,
        primary=c.get("role") == "primary",
        alive=c.get("state") == "alive",
        sync=_str(c.get("sync")) or "?",
        resync_done=_int(figures.get("done_bytes")),
        resync_total=_int(figures.get("total_bytes")),
    )


def volumes_from_json(answer: Any) -> tuple[VolumeRow, ...]:
    """``{"volumes": [...]}`` (``GET /v1/volumes``) -> rows, sorted by name."""
    rows = []
    for v in _items(answer, "volumes"):
        name = _str(v.get("name"))
        if name is None:
            continue
        primary = v.get("primary")
        copies = (_copy_from_json(c) for c in (v.get("replicas") or ()) if isinstance(c, Mapping))
        rows.append(
            VolumeRow(
                name=name,
                size=_int(v.get("size")) or 0,
                epoch=_int(v.get("epoch")) or 0,
                primary=_str(primary.get("node_id")) if isinstance(primary, Mapping) else None,
                copies=tuple(c for c in copies if c is not None),
                replicas_wanted=_int(v.get("replicas_wanted")) or 1,
                served=v.get("served") is True,
                status=_str(v.get("status")),
            )
        )
    return tuple(sorted(rows, key=lambda r: r.name))


def counters_from_metrics(node_id: str, text: str) -> dict[SeriesKey, IoCounter]:
    """The node's per-volume I/O counters from its ``/metrics`` exposition text. Raises
    ValueError when the text is not an exposition (the caller reports the node as not scraped)."""
    commands: dict[tuple[str, str], float] = {}
    nbytes: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        target = {COMMANDS_FAMILY: commands, BYTES_FAMILY: nbytes}.get(family.name)
        if target is None:
            continue
        for sample in family.samples:
            volume, op = sample.labels.get("volume"), sample.labels.get("op")
            if sample.name.endswith("_total") and volume is not None and op in IO_OPS:
                target[(volume, op)] = float(sample.value)
    return {
        (node_id, volume, op): IoCounter(count, nbytes.get((volume, op), 0.0))
        for (volume, op), count in commands.items()
    }


def snapshot(
    now: float,
    volumes_answer: Any,
    nodes_answer: Any = None,
    *,
    nodes_error: str | None = None,
    scrapes: Mapping[str, str] | None = None,
    scrape_errors: Mapping[str, str] | None = None,
) -> Snapshot:
    """A snapshot at ``now`` from the master's answers and the nodes' ``/metrics`` texts
    (``scrapes``: node id -> text). A text that does not parse becomes a scrape error."""
    counters: dict[SeriesKey, IoCounter] = {}
    errors = {node_id: printable(why) for node_id, why in (scrape_errors or {}).items()}
    for node_id, text in (scrapes or {}).items():
        try:
            counters.update(counters_from_metrics(node_id, text))
        except ValueError as e:
            errors[node_id] = printable(f"unreadable /metrics: {e}")
    return Snapshot(
        taken_at=now,
        volumes=volumes_from_json(volumes_answer),
        nodes=nodes_from_json(nodes_answer),
        nodes_error=None if nodes_error is None else printable(nodes_error),
        counters=counters,
        scrape_errors=errors,
    )


# --- rates -------------------------------------------------------------------------------------


def _increase(before: float, after: float) -> float:
    """A counter's increase; a counter that went down was reset to 0 in between."""
    return after - before if after >= before else after


def io_rates(previous: Snapshot, current: Snapshot) -> dict[str, IoRate]:
    """Per-volume read and write rates between two snapshots (module docstring). Empty when no time
    passed between them."""
    seconds = current.taken_at - previous.taken_at
    if seconds <= 0:
        return {}
    sums: dict[str, dict[str, float]] = {}
    holders = {v.name: {c.node_id for c in v.copies} for v in current.volumes}
    for key, after in current.counters.items():
        before = previous.counters.get(key)
        if before is None:
            continue
        node_id, volume, op = key
        if volume in holders and node_id not in holders[volume]:
            continue  # a node's counters for a volume it holds no copy of: not taken as fact
        total = sums.setdefault(volume, dict.fromkeys(("read_ops", "write_ops", "read_b", "write_b"), 0.0))
        total[f"{op}_ops"] += _increase(before.commands, after.commands)
        total[f"{op}_b"] += _increase(before.nbytes, after.nbytes)
    return {
        volume: IoRate(
            read_ops=t["read_ops"] / seconds,
            write_ops=t["write_ops"] / seconds,
            read_bytes=t["read_b"] / seconds,
            write_bytes=t["write_b"] / seconds,
        )
        for volume, t in sums.items()
    }


def metrics_targets(nodes: Iterable[NodeRow]) -> dict[str, str]:
    """Node id -> its ``/metrics`` URL, for the nodes the master counts alive (a dead node's
    counters are not read: the scrape would only wait out its timeout)."""
    targets = {}
    for node in nodes:
        url = node.metrics_url()
        if node.state == "alive" and url is not None:
            targets[node.node_id] = url
    return targets
