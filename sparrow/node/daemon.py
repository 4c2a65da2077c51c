"""``sparrow node``: a cluster node's startup, main loop and shutdown (docs/cluster.md).

Startup: lock the data directory, load the node's key (``DATA_DIR/node.key``, made on the first
start: sparrow.nodekey), load the persisted epochs and roles (``DATA_DIR/cluster/``) and start a
new incarnation, load every volume, open the volumes the node held before a restart
(primaries fenced: a restarted node serves as primary only after an Ack confirms it), bind the
iSCSI listener and the HTTP listener (``/metrics``, behind the scrape token of
sparrow.metricsauth, and ``/healthz`` only), start the heartbeat
client, and only then tell systemd ``READY=1``. The master is not needed to start: the node
listens, fenced, and keeps trying to reach it.

Shutdown (SIGTERM or SIGINT), as ``sparrow serve``: ``STOPPING=1``, stop heartbeating, stop the
HTTP listener, stop accepting iSCSI connections and let in-flight SCSI commands finish
(``SHUTDOWN_TIMEOUT``), stop the convergence worker, fdatasync and close every volume, release the
lock, exit 0 (1 if a flush failed). A startup failure is one line on stderr and exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from frontend.server import IscsiServer
from frontend.target import DEFAULT_BASE_IQN, ChapConfig, Portal, TargetRegistry, TargetSettings
from sparrow import systemd
from sparrow.cluster.adapter import Adapter
from sparrow.cluster.channel import ClusterSecret, SecretError
from sparrow.cluster.lease import DEFAULT_FENCE_MARGIN, LeaseClock
from sparrow.cluster.masteridentity import MasterPin, parse_master_key
from sparrow.cluster.messages import NODE_ID_PATTERN, Hello
from sparrow.cluster.nodeidentity import key_text
from sparrow.cluster.nodestate import NodeState
from sparrow.clustersecret import NO_SECRET, secret_from_flag
from sparrow.config import (
    _WILDCARDS,
    ConfigError,
    HostPort,
    LogFormat,
    host_primary_address,
    parse_host_port,
)
from sparrow.health import health_response, node_problems, summary
from sparrow.lifecycle import (
    StartupError,
    StopSignals,
    begin_shutdown,
    bound_port,
    lock_data_dir,
    notify,
    os_reason,
    run_daemon,
    start_http,
)
from sparrow.masterpin import save_pin, startup_pin
from sparrow.metrics import PrometheusMetrics
from sparrow.metricsauth import MetricsDoor
from sparrow.node.convergence import Convergence, NodeVolumes
from sparrow.node.diagnostics import NodeDiagnostics, skipped_volumes
from sparrow.node.heartbeat_client import HeartbeatClient, HeartbeatSession
from sparrow.node.replicated_store import Forwarding
from sparrow.node.replication import ReplicaServer, start_replica_server
from sparrow.node.resync import DEFAULT_RESYNC_RATE
from sparrow.node.sessions import SHUTDOWN_TIMEOUT, ServerSessions
from sparrow.nodekey import node_key
from sparrow.replication.protocol import DEFAULT_ACK_TIMEOUT
from sparrow.sizes import parse_size
from sparrow.supervision import TaskSupervisor
from store.backing import BackingPolicy
from store.blockstore import StoreError
from store.volumes import VolumeLoadError, VolumeManager

log = structlog.get_logger("sparrow.node")

DEFAULT_NODE_ISCSI = HostPort("0.0.0.0", 3260)
DEFAULT_NODE_REPLICATION = HostPort("0.0.0.0", 3291)
DEFAULT_NODE_HTTP = HostPort("127.0.0.1", 3281)
#: The portal group tag of every node's one portal group.
TPGT = 1


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything ``sparrow node`` needs; build it with :func:`node_config` from flags."""

    data_dir: Path
    node_id: str
    master: HostPort
    iscsi: HostPort = DEFAULT_NODE_ISCSI
    replication: HostPort = DEFAULT_NODE_REPLICATION
    #: The replication address other nodes dial (``--advertise-replication``; None: the listen
    #: address, a wildcard host made this host's address), e.g. a NAT or a proxy in front.
    advertise_replication: HostPort | None = None
    http: HostPort = DEFAULT_NODE_HTTP
    base_iqn: str = DEFAULT_BASE_IQN
    heartbeat_interval: float = 1.0
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = "info"
    #: The key this node proves it holds to the master (sparrow.cluster.channel); required to start.
    cluster_secret: ClusterSecret | None = None
    #: Backing files and devices an assignment may name (store.backing; empty: none).
    allowed_backing: tuple[str, ...] = ()
    #: Seconds before its lease expires at which the node fences (sparrow.cluster.lease).
    fence_margin: float = DEFAULT_FENCE_MARGIN
    #: Seconds a replica may leave a forwarded write unacknowledged before it is reported behind.
    replication_ack_timeout: float = DEFAULT_ACK_TIMEOUT
    #: Wrap each volume's store so a primary forwards to its replicas (False: ``sparrow serve``,
    #: one copy, the plain store).
    forward_writes: bool = True
    #: Bytes per second of resync region copies this node sends, all volumes together (0: unlimited).
    resync_rate: int = DEFAULT_RESYNC_RATE
    #: The master key the operator pins (``--master-key``; sparrow.masterpin). None: the pin in
    #: the data directory, or the first master's (trust on first use).
    master_key: bytes | None = None
    #: ``--public-metrics``: /metrics without the scrape token (sparrow.metricsauth; labs only).
    public_metrics: bool = False


def node_config(
    *,
    data_dir: str | None,
    node_id: str | None,
    master: str | None,
    iscsi: str | None = None,
    replication: str | None = None,
    http: str | None = None,
    heartbeat_interval: float | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    cluster_secret_file: str | None = None,
    allow_backing: tuple[str, ...] = (),
    fence_margin: float | None = None,
    replication_ack_timeout: float | None = None,
    advertise_replication: str | None = None,
    resync_rate: str | None = None,
    master_key: str | None = None,
    public_metrics: bool = False,
) -> NodeConfig:
    """Check the flags of ``sparrow node``; raises ConfigError(usage=True) naming the bad one."""
    if not data_dir:
        raise ConfigError("--data-dir is required", usage=True)
    if not node_id:
        raise ConfigError("--node-id is required", usage=True)
    if not NODE_ID_PATTERN.fullmatch(node_id):
        raise ConfigError(
            f"invalid node id {node_id!r} for --node-id: expected [a-z0-9][a-z0-9.-]{{0,62}}", usage=True
        )
    if not master:
        raise ConfigError("--master is required", usage=True)
    secret = secret_from_flag(cluster_secret_file)

    def address(text: str | None, what: str, default: HostPort) -> HostPort:
        if text is None:
            return default
        try:
            return parse_host_port(text, what=what)
        except ConfigError as e:
            raise ConfigError(str(e), usage=True) from None

    master_hp = address(master, "--master", DEFAULT_NODE_ISCSI)
    if master_hp.host in _WILDCARDS or master_hp.port == 0:
        raise ConfigError(
            f"invalid address {master!r} for --master: give the master's host and port", usage=True
        )
    interval = 1.0 if heartbeat_interval is None else heartbeat_interval
    if not interval > 0:
        raise ConfigError("--heartbeat-interval must be positive", usage=True)
    margin = DEFAULT_FENCE_MARGIN if fence_margin is None else fence_margin
    if not 0 <= margin < math.inf:
        raise ConfigError("--fence-margin must be a non-negative number of seconds", usage=True)
    ack_timeout = DEFAULT_ACK_TIMEOUT if replication_ack_timeout is None else replication_ack_timeout
    if not 0 < ack_timeout < math.inf:
        raise ConfigError("--replication-ack-timeout must be a positive number of seconds", usage=True)
    rate = DEFAULT_RESYNC_RATE
    if resync_rate is not None:
        try:
            rate = 0 if resync_rate.strip() == "0" else parse_size(resync_rate.removesuffix("/s"))
        except ValueError as e:
            raise ConfigError(f"invalid --resync-rate {resync_rate!r}: {e}", usage=True) from None
    pinned = None
    if master_key is not None:
        try:
            pinned = parse_master_key(master_key)
        except ValueError as e:
            raise ConfigError(f"invalid --master-key: {e}", usage=True) from None
    return NodeConfig(
        master_key=pinned,
        replication_ack_timeout=ack_timeout,
        resync_rate=rate,
        data_dir=Path(data_dir),
        node_id=node_id,
        master=master_hp,
        iscsi=address(iscsi, "--iscsi", DEFAULT_NODE_ISCSI),
        replication=address(replication, "--replication", DEFAULT_NODE_REPLICATION),
        advertise_replication=None
        if advertise_replication is None
        else address(advertise_replication, "--advertise-replication", DEFAULT_NODE_REPLICATION),
        http=address(http, "--http", DEFAULT_NODE_HTTP),
        heartbeat_interval=interval,
        log_format=LogFormat(log_format or "auto"),
        log_level=log_level or "info",
        cluster_secret=secret,
        allowed_backing=_backing_prefixes(allow_backing),
        fence_margin=margin,
        public_metrics=public_metrics,
    )


def _backing_prefixes(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return BackingPolicy.of(prefixes).prefixes
    except ValueError as e:
        raise ConfigError(f"--allow-backing: {e}", usage=True) from None


def advertised(
    listen: HostPort, bound_port: int | None = None, primary_address: Callable[[], str] | None = None
) -> HostPort:
    """The address others reach a listener at: a wildcard host becomes this host's primary address,
    port 0 the port actually bound."""
    host = listen.host
    if host in _WILDCARDS:
        host = (primary_address or host_primary_address)()
    port = bound_port if bound_port is not None else listen.port
    return HostPort(host, port)


def filesystem_bytes(path: Path) -> tuple[int, int]:
    """(capacity, free-to-unprivileged) bytes of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


# -- the process ---------------------------------------------------------------------------------------


def run(config: NodeConfig) -> int:
    """Run the node on uvloop until SIGTERM/SIGINT. Returns the process exit code."""
    return run_daemon(serve(config), "node")


@dataclass
class Node:
    """The running parts of one node, for the HTTP handlers and the shutdown (``sparrow node``, and
    the node half of the embedded ``sparrow serve``)."""

    config: NodeConfig
    incarnation: int
    lease: LeaseClock
    convergence: Convergence
    volumes: NodeVolumes
    heartbeat: HeartbeatClient
    loop: asyncio.AbstractEventLoop
    server: IscsiServer
    manager: VolumeManager
    metrics: PrometheusMetrics
    #: The portals initiators reach this node at (the first one is announced to the master).
    portals: tuple[HostPort, ...]
    #: The node's tasks (heartbeat, convergence, fence timer); a failure makes /healthz unhealthy.
    supervisor: TaskSupervisor
    #: The volumes in the data directory that failed to load (left alone, reported).
    offline: list[VolumeLoadError] = field(default_factory=list)
    #: The address announced as the node's HTTP endpoint (set once the listener is bound).
    http: HostPort | None = None

    @property
    def iscsi_portal(self) -> HostPort:
        return self.portals[0]

    def start_heartbeat(self, http: HostPort) -> None:
        """Announce ``http`` as this node's HTTP address and start heartbeating to the master."""
        self.http = http
        self.heartbeat.start()

    async def stop(self) -> list[tuple[str, Exception]]:
        """Stop heartbeating, drain the iSCSI listener (in-flight commands get SHUTDOWN_TIMEOUT),
        stop the convergence worker, fdatasync and close every volume. Returns the flushes that
        failed (every volume is tried)."""
        await self.heartbeat.stop()
        await self.server.shutdown(timeout=SHUTDOWN_TIMEOUT)
        await self.convergence.close()
        failed: list[tuple[str, Exception]] = []
        for volume in self.manager.list():
            try:
                await volume.store.flush()
            except Exception as e:
                failed.append((volume.meta.name, e))
                log.error("flush failed", volume=volume.meta.name, error=str(e))
        await self.manager.close()
        return failed

    def health(self) -> dict[str, Any]:
        """The node's health (sparrow.health): ``status`` is ``unhealthy`` while a volume it holds
        as primary is not served or a task has failed, ``degraded`` while it has no master
        connection, a plan failed or a local volume failed to load; ``reasons`` says why."""
        now = self.loop.time()
        valid = self.lease.valid(now)
        exported = [
            {
                "volume_id": e.volume_id,
                "name": e.name,
                "iqn": e.iqn,
                "access_state": e.lu.access_state.name.lower(),
                "paused": e.lu.paused,
            }
            for e in self.volumes
        ]
        degraded = not self.heartbeat.connected or self.convergence.last_error is not None or self.offline
        names = {e.volume_id: e.name for e in self.volumes}
        problems = node_problems(self.convergence.observations(now), names)
        return {
            **summary(problems, self.supervisor.failures(), degraded=bool(degraded)),
            "node_id": self.config.node_id,
            "incarnation": self.incarnation,
            "master": {
                "address": str(self.config.master),
                "connected": self.heartbeat.connected,
                "last_error": self.heartbeat.last_error,
            },
            "lease": {"valid": valid, "remaining_seconds": round(self.lease.remaining(now), 3)},
            "fences": len(self.convergence.fences),
            "last_error": self.convergence.last_error,
            "volumes": exported,
            "offline": [{"name": e.name, "path": e.path, "reason": e.reason} for e in self.offline],
        }


class NodeCollector(Collector):
    """Lease, master connection and fence counts, read at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        now = self.node.loop.time()
        yield GaugeMetricFamily(
            "sparrow_node_lease_valid",
            "1 while the node holds a valid lease",
            value=self.node.lease.valid(now),
        )
        yield GaugeMetricFamily(
            "sparrow_node_lease_remaining_seconds",
            "Seconds left to serve: to the lease's expiry minus the fence margin",
            value=self.node.lease.remaining(now),
        )
        yield GaugeMetricFamily(
            "sparrow_node_master_connected",
            "1 while connected to the master",
            value=self.node.heartbeat.connected,
        )
        yield CounterMetricFamily(
            "sparrow_node_fences",
            "Times the node fenced its primaries",
            value=len(self.node.convergence.fences),
        )
        yield CounterMetricFamily(
            "sparrow_node_acks", "Acks applied to the lease", value=self.node.heartbeat.acks
        )


NODE_KEY = web.AppKey("node", Node)
METRICS_KEY = web.AppKey("metrics", PrometheusMetrics)
DOOR_KEY = web.AppKey("metrics door", MetricsDoor)


def build_node_app(node: Node, metrics: PrometheusMetrics, door: MetricsDoor) -> web.Application:
    """The node's HTTP surface: ``GET /metrics`` (Prometheus text; only through ``door``,
    sparrow.metricsauth) and ``GET /healthz`` (JSON, public)."""
    app = web.Application(client_max_size=1024)
    app[NODE_KEY] = node
    app[METRICS_KEY] = metrics
    app[DOOR_KEY] = door
    app.router.add_get("/metrics", _get_metrics)
    app.router.add_get("/healthz", _healthz)
    return app


async def _get_metrics(request: web.Request) -> web.Response:
    authorization = request.headers.get("Authorization")
    if not request.app[DOOR_KEY].admits(authorization):
        return request.app[DOOR_KEY].refuse(authorization)
    body, content_type = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return health_response(request.app[NODE_KEY].health())


async def start_node(
    config: NodeConfig,
    cleanup: contextlib.AsyncExitStack,
    *,
    settings: TargetSettings | None = None,
    portals: Callable[[int | None], tuple[HostPort, ...]] | None = None,
    metrics: PrometheusMetrics | None = None,
    supervisor: TaskSupervisor | None = None,
    discovery_chap: ChapConfig | None = None,
) -> Node:
    """Load the cluster state and the volumes of ``config.data_dir`` (locked by the caller), reopen
    what the node held (primaries fenced) and bind the iSCSI listener. The heartbeat starts with
    :meth:`Node.start_heartbeat`. ``settings`` are the target settings (portals are filled in),
    ``portals`` maps the bound iSCSI port to the advertised portals (default: the listen address,
    a wildcard replaced by this host's address). ``cleanup`` undoes a failed start. The node's
    tasks run under ``supervisor`` (default: a new one, on the metrics' registry).
    ``discovery_chap`` is asked of discovery sessions until the first Ack says the cluster's."""
    loop = asyncio.get_running_loop()
    if config.cluster_secret is None:
        raise StartupError(NO_SECRET)
    try:
        identity, made = node_key(config.data_dir)
    except SecretError as e:
        raise StartupError(str(e)) from None
    log.info("node key", node_key=key_text(identity.public), made=made)
    try:
        pin = await asyncio.to_thread(startup_pin, config.data_dir, config.master_key)
    except SecretError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"cannot write the master pin in {config.data_dir}: {e.strerror or e}") from None
    if pin.replaced is not None:
        log.warning(
            "master key re-pinned by the operator",
            master_key=key_text(pin.key) if pin.key else None,
            replaced=key_text(pin.replaced),
        )
    log.info(
        "master key pin",
        master_key=None if pin.key is None else key_text(pin.key),
        source=pin.source,
    )
    state = NodeState(config.data_dir)
    try:
        problems = await state.load_async()
        record = await state.begin_incarnation_async(config.node_id, time.time_ns())
    except (StoreError, OSError) as e:
        raise StartupError(f"cannot load the cluster state in {config.data_dir}: {e}") from None
    for problem in problems:
        log.error(
            "cluster state unreadable",
            volume_id=problem.volume_id,
            path=problem.path,
            reason=problem.reason,
        )

    manager = VolumeManager(config.data_dir, backing_policy=BackingPolicy(config.allowed_backing))
    cleanup.push_async_callback(manager.close)
    try:
        offline = await manager.load_all()  # the manager logs the volumes it could not load
    except (StoreError, OSError) as e:
        raise StartupError(f"cannot open the volumes in {config.data_dir}: {e}") from None

    metrics = metrics if metrics is not None else PrometheusMetrics()
    supervisor = supervisor if supervisor is not None else TaskSupervisor(metrics.registry)
    metrics.set_offline(len(offline))
    registry = TargetRegistry(discovery_chap=discovery_chap)
    settings = settings if settings is not None else TargetSettings(portals=(), tpgt=TPGT)
    server = IscsiServer(registry, settings, metrics)
    assert config.cluster_secret is not None  # node_config requires it
    forwarding = None
    if config.forward_writes:
        forwarding = Forwarding(
            config.node_id,
            config.cluster_secret,
            ack_timeout=config.replication_ack_timeout,
            clock=loop.time,
            resync_rate=config.resync_rate,
            registry=metrics.registry,
        )
        cleanup.push_async_callback(forwarding.close)
    volumes = NodeVolumes(
        manager,
        registry,
        base_iqn=config.base_iqn,
        tpgt=settings.tpgt,
        metrics=metrics,
        sessions=ServerSessions(server),
        forwarding=forwarding,
        diagnostics=NodeDiagnostics(metrics.unsupported_command),
    )
    lease = LeaseClock(fence_margin=config.fence_margin)
    adapter = Adapter(config.node_id, state)
    convergence = Convergence(adapter, volumes, lease, supervisor=supervisor)
    cleanup.push_async_callback(convergence.close)
    convergence.start()  # reopens what this node held, primaries fenced
    await convergence.idle()

    try:
        await server.start(config.iscsi.host, config.iscsi.port)
    except OSError as e:
        raise StartupError(f"cannot listen for iSCSI on {config.iscsi}: {os_reason(e)}") from None
    cleanup.push_async_callback(server.shutdown, 0.0)
    bound = bound_port(server.sockets)
    advertised_portals = portals(bound) if portals is not None else (advertised(config.iscsi, bound),)
    server.settings = dataclasses.replace(
        settings, portals=tuple(Portal(p.host, p.port, settings.tpgt) for p in advertised_portals)
    )

    def hello() -> Hello:
        capacity, free = filesystem_bytes(config.data_dir)
        return Hello(
            node_id=config.node_id,
            incarnation=record.incarnation,
            iscsi_portal=str(advertised_portals[0]),
            replication=str(config.advertise_replication or advertised(config.replication)),
            http=str(node.http if node.http is not None else config.http),
            capacity_bytes=capacity,
            free_bytes=free,
        )

    heartbeat = HeartbeatClient(
        (config.master.host, config.master.port),
        HeartbeatSession(lease, MasterPin(pin.key)),
        secret=config.cluster_secret,
        hello=hello,
        observations=convergence.observations,
        on_ack=convergence.on_ack,
        interval=config.heartbeat_interval,
        supervisor=supervisor,
        identity=identity,
        skipped=lambda: skipped_volumes(node.offline),
        on_pinned=lambda key: save_pin(config.data_dir, key),
        registry=metrics.registry,
    )
    cleanup.push_async_callback(heartbeat.stop)
    if forwarding is not None:
        forwarding.on_lagging = heartbeat.send_now
        forwarding.stream_key = convergence.stream_key
    node = Node(
        config,
        record.incarnation,
        lease,
        convergence,
        volumes,
        heartbeat,
        loop,
        server,
        manager,
        metrics,
        advertised_portals,
        supervisor,
        list(offline),
    )
    metrics.registry.register(NodeCollector(node))
    return node


async def _start_replication(node: Node) -> ReplicaServer:
    """The replication listener (``--replication``; docs/replication.md). Only ``sparrow node``
    listens: in ``sparrow serve`` every volume has one copy."""
    config = node.config
    assert config.cluster_secret is not None  # start_node refuses to start without it
    try:
        return await start_replica_server(
            host=config.replication.host,
            port=config.replication.port,
            secret=config.cluster_secret,
            state=node.convergence.adapter.state,
            volumes=node.volumes,
            registry=node.metrics.registry,
            stream_key=lambda volume_id, epoch: node.convergence.stream_key(volume_id, epoch, config.node_id),
        )
    except OSError as e:
        raise StartupError(f"cannot listen for replication on {config.replication}: {os_reason(e)}") from None


async def serve(config: NodeConfig) -> int:
    signals = StopSignals(asyncio.get_running_loop())
    stop = signals.event

    async with contextlib.AsyncExitStack() as cleanup:
        lock = lock_data_dir(config.data_dir)
        cleanup.callback(lock.release)
        node = await start_node(config, cleanup)
        node.supervisor.install(asyncio.get_running_loop())
        assert config.cluster_secret is not None  # start_node refuses to start without it
        door = MetricsDoor.of(
            config.cluster_secret, public=config.public_metrics, registry=node.metrics.registry
        )
        app = build_node_app(node, node.metrics, door)
        runner = await start_http(
            app, config.http.host, config.http.port, cleanup, registry=node.metrics.registry
        )
        replication = await _start_replication(node)
        cleanup.push_async_callback(replication.close)
        node.start_heartbeat(advertised(config.http, bound_port(runner.addresses)))

        log.info(
            "node listening",
            node_id=config.node_id,
            incarnation=node.incarnation,
            iscsi=str(node.iscsi_portal),
            http=str(node.http),
            replication=str(config.replication),
            master=str(config.master),
            volumes=len(node.volumes.exported()),
            data_dir=str(config.data_dir),
        )
        listening = f"node {config.node_id} listening on {node.iscsi_portal}; master {config.master}"
        notify(systemd.ready, listening)

        await stop.wait()

        # --- shutdown, step by step ---
        await begin_shutdown(cleanup, signals, runner)
        await replication.close()  # no replica write lands after the stores' last flush
        try:
            failed = await node.stop()
        finally:
            lock.release()
        log.info("stopped", clean=not failed)
        return 1 if failed else 0
    raise AssertionError("unreachable")  # pragma: no cover
