"""``sparrow master``: the master's startup, main loop and shutdown (docs/cluster.md).

Startup: lock the data directory (``store.lock.DataDirLock``), open ``DATA_DIR/authority.sqlite3``
(``AuthorityStore.open_in``), rebuild the state from it (``control.restore``: every known node is
treated as holding a lease granted now, observations start now), bind the heartbeat listener and
the HTTP API, write the bootstrap admin token on a first start (sparrow.master.auth), and only
then tell systemd ``READY=1``. The first control step runs after that.

Main loop: one control step every ``heartbeat_interval`` seconds (``ControlLoop.step_async``).

Shutdown (SIGTERM or SIGINT): ``STOPPING=1``; the control loop finishes the step it is in (a
publish is one SQLite transaction: it commits or it does not); the HTTP API stops; node connections
are closed; pending node upserts finish; the store is closed and the lock released; exit 0.

A startup failure is one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from frontend.target import DEFAULT_BASE_IQN
from sparrow import systemd
from sparrow.cluster.authority import AuthorityError, AuthorityStore
from sparrow.cluster.channel import ClusterSecret, SecretError
from sparrow.cluster.controller import DEFAULT_CONVERGE_DEADLINE, TopologyController
from sparrow.cluster.epochfloor import RESTORE_MARKER, EpochFloor
from sparrow.cluster.lease import LeaseConfig
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.cluster.messages import Assignment, Hello
from sparrow.cluster.nodeidentity import AdmissionPolicy, NodeKeys, key_text
from sparrow.cluster.publisher import Publisher
from sparrow.clustersecret import NO_SECRET
from sparrow.config import HostPort
from sparrow.lifecycle import (
    StartupError,
    StopSignals,
    begin_shutdown,
    bound_address,
    lock_data_dir,
    notify,
    os_reason,
    run_daemon,
    start_http,
)
from sparrow.master.api import MasterApi, MasterMetrics, build_app
from sparrow.master.audit import AuditError, AuditLog
from sparrow.master.auth import bootstrap
from sparrow.master.control import ControlLoop, restore
from sparrow.master.heartbeat_server import HeartbeatServer
from sparrow.masterkey import master_key
from sparrow.metricsauth import MetricsDoor
from sparrow.supervision import TaskSupervisor
from store.backing import BackingPolicy
from store.blockstore import StoreError

log = structlog.get_logger("sparrow.master")

DEFAULT_LISTEN = HostPort("0.0.0.0", 3290)
DEFAULT_HTTP = HostPort("127.0.0.1", 3280)
#: Seconds API requests in progress get on shutdown.
#: Seconds the control step in progress and pending node upserts get on shutdown.
STEP_SHUTDOWN_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class MasterConfig:
    data_dir: Path
    listen: HostPort = DEFAULT_LISTEN
    http: HostPort = DEFAULT_HTTP
    timing: LeaseConfig = field(default_factory=LeaseConfig)
    converge_deadline: float = DEFAULT_CONVERGE_DEADLINE
    base_iqn: str = DEFAULT_BASE_IQN
    #: The key nodes must prove they hold (sparrow.cluster.channel); required to start.
    cluster_secret: ClusterSecret | None = None
    #: Where a create's ``backing`` may point, by name (store.backing; the node checks it again).
    allowed_backing: tuple[str, ...] = ()
    #: What a node id's first key gets (``--admission``): held pending until ``sparrow node
    #: approve`` (the default), or approved at once (``open``: trust on first use, for labs).
    admission: AdmissionPolicy = AdmissionPolicy.APPROVE
    #: ``--public-metrics``: /metrics without a credential (sparrow.metricsauth; labs only).
    public_metrics: bool = False


def run(config: MasterConfig) -> int:
    """Run the master on uvloop until SIGTERM/SIGINT. Returns the process exit code."""
    return run_daemon(serve(config), "master")


class NodeRecorder:
    """Upserts each Hello in the authority store in a worker thread (an fsync), one at a time so a
    node's records land in the order its Hellos came. An upsert that fails is logged (a bug with
    its traceback, reported to ``supervisor``) and the next Hello is recorded all the same."""

    TASK = "node-recorder"

    def __init__(self, store: AuthorityStore, supervisor: TaskSupervisor | None = None) -> None:
        self.store = store
        self.supervisor = supervisor if supervisor is not None else TaskSupervisor()
        self._queue: asyncio.Queue[tuple[Hello, bool] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self.supervisor.spawn(self._run(), name=self.TASK)

    def hello(self, hello: Hello, approve: bool = False) -> None:
        """Record ``hello``; ``approve``: and the approval of its key (``Admitted.newly_approved``)."""
        self._queue.put_nowait((hello, approve))

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            hello, approve = item
            try:
                await asyncio.to_thread(self.store.upsert_hello, hello, seen_at=time.time(), approve=approve)
            except AuthorityError as e:
                log.error("cannot record node", node=hello.node_id, error=str(e))
            except Exception as e:
                self.supervisor.failed(self.TASK, e)
            else:
                self.supervisor.recovered(self.TASK)

    async def close(self, deadline: float) -> None:
        """Let the queued upserts finish (at most ``deadline`` seconds), then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        try:
            async with asyncio.timeout(deadline):  # not wait_for: 3.11's can swallow a cancellation
                await self._task
        except TimeoutError:
            log.warning("node upserts did not finish before shutdown")


#: The control loop's task name (TaskSupervisor, /healthz, sparrow_task_failures_total).
CONTROL_TASK = "control-loop"


async def control_task(
    control: ControlLoop,
    clock: Callable[[], float],
    interval: float,
    stop: asyncio.Event,
    supervisor: TaskSupervisor | None = None,
) -> None:
    """One control step per ``interval`` (sooner when a primary's lease may be reassigned
    before that, ``ControlLoop.next_step_at``) until ``stop`` is set; a step in progress is
    finished."""
    supervisor = supervisor if supervisor is not None else TaskSupervisor()
    while not stop.is_set():
        try:
            await control.step_async(clock)
        except Exception as e:
            # A bug or an I/O error must not silently end the control loop: report and go on.
            supervisor.failed(CONTROL_TASK, e)
        else:
            supervisor.recovered(CONTROL_TASK)
        now = clock()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(control.next_step_at(now, interval) - now):
                await stop.wait()


@dataclass
class MasterRuntime:
    """The running parts of a master, for ``sparrow master`` and the embedded ``sparrow serve``."""

    config: MasterConfig
    store: AuthorityStore
    control: ControlLoop
    metrics: MasterMetrics
    recorder: NodeRecorder
    heartbeats: HeartbeatServer
    #: The heartbeat listener's bound address (the configured port, or the one port 0 got).
    listen: HostPort
    clock: Callable[[], float]
    supervisor: TaskSupervisor
    #: DATA_DIR/audit.jsonl: every mutating API call and every epoch minted (sparrow.master.audit).
    audit: AuditLog | None = None
    steps: asyncio.Task[None] | None = None
    #: Who may read /metrics besides an API token (sparrow.metricsauth).
    metrics_door: MetricsDoor | None = None

    @property
    def node_keys(self) -> NodeKeys:
        """The node identity bindings and approvals the heartbeat server admits Hellos by
        (sparrow.cluster.nodeidentity): the control loop's, the one copy."""
        return self.control.node_keys

    def api(self) -> MasterApi:
        return MasterApi(
            control=self.control,
            metrics=self.metrics,
            clock=self.clock,
            base_iqn=self.config.base_iqn,
            backing_policy=BackingPolicy(self.config.allowed_backing),
            supervisor=self.supervisor,
            audit=self.audit,
            metrics_door=self.metrics_door,
        )

    def start_steps(self, stop: asyncio.Event) -> None:
        """Start the control loop: one step every heartbeat interval until ``stop`` is set."""
        interval = self.config.timing.heartbeat_interval
        steps = control_task(self.control, self.clock, interval, stop, self.supervisor)
        self.steps = self.supervisor.spawn(steps, name=CONTROL_TASK)

    async def end_steps(self) -> None:
        """Wait (at most STEP_SHUTDOWN_TIMEOUT) for the control loop to finish the step it is in;
        the ``stop`` event given to :meth:`start_steps` must be set."""
        if self.steps is not None:
            try:
                async with asyncio.timeout(STEP_SHUTDOWN_TIMEOUT):
                    await self.steps
            except TimeoutError:
                log.warning("control step did not finish before shutdown")

    async def stop(self) -> None:
        """Finish the control step in progress (``stop`` must be set), close the node connections,
        let the pending node upserts finish, close the store."""
        await self.end_steps()
        await self.heartbeats.close()
        await self.recorder.close(STEP_SHUTDOWN_TIMEOUT)
        self.store.close()


def epoch_floor(config: MasterConfig, now: float) -> EpochFloor:
    """The epoch floor (sparrow.cluster.epochfloor); holding every assignment for ``dead_after``
    from ``now`` when ``sparrow restore`` left its marker (removed once the hold is over)."""
    timing = config.timing
    marker = config.data_dir / RESTORE_MARKER
    if not marker.exists():
        return EpochFloor(timing.lease_seconds, timing.margin)
    hold = max(timing.dead_after, timing.lease_seconds + timing.margin)
    log.warning("restored authority: no assignment announced until every node reported", hold=hold)

    def hold_over() -> None:
        marker.unlink(missing_ok=True)
        log.info("restore hold over: assignments announced again (epochs above what the nodes reported)")

    return EpochFloor(timing.lease_seconds, timing.margin, hold_until=now + hold, on_hold_end=hold_over)


async def start_master(
    config: MasterConfig,
    cleanup: contextlib.AsyncExitStack,
    *,
    metrics: MasterMetrics | None = None,
    supervisor: TaskSupervisor | None = None,
) -> MasterRuntime:
    """Open the authority store in ``config.data_dir`` (locked by the caller), rebuild the state
    from it and bind the heartbeat listener. The control loop is started by the caller
    (:meth:`MasterRuntime.start_steps`) once everything else is up. ``cleanup`` undoes a failed start.
    The master's tasks run under ``supervisor`` (default: a new one, on the metrics' registry)."""
    loop = asyncio.get_running_loop()
    if config.cluster_secret is None:
        raise StartupError(NO_SECRET)
    try:
        store = AuthorityStore.open_in(config.data_dir)
    except (AuthorityError, StoreError) as e:
        raise StartupError(str(e)) from None
    except Exception as e:  # sqlite3.Error, OSError
        raise StartupError(f"cannot open the authority database in {config.data_dir}: {e}") from None
    cleanup.callback(store.close)
    try:
        audit = AuditLog.open_in(config.data_dir)
    except AuditError as e:
        raise StartupError(str(e)) from None
    try:
        key = master_key(config.data_dir)
    except SecretError as e:
        raise StartupError(str(e)) from None
    identity = MasterIdentity.derive(key)
    # The key the nodes pin (`sparrow master key` prints it; docs/cluster.md, "Master identity").
    log.info("master key", master_key=key_text(identity.public))

    metrics = metrics if metrics is not None else MasterMetrics()
    supervisor = supervisor if supervisor is not None else TaskSupervisor(metrics.registry)
    clock = loop.time

    #: Set once the heartbeat server exists: a publish is pushed to the nodes at once.
    push: list[Callable[[], None]] = []

    def on_published(assignment: Assignment) -> None:
        metrics.epochs_published.inc()
        for send in push:
            send()

    timing = config.timing
    node_keys = NodeKeys(store.node_keys(), store.approvals(), config.admission)
    control = restore(
        store,
        timing,
        clock(),
        controller=TopologyController(
            converge_deadline=config.converge_deadline,
            margin=timing.margin,
            primary_silence=timing.lease_seconds + timing.margin,
        ),
        on_published=on_published,
        publisher=Publisher(store, on_mint=audit.epoch_minted),
        epoch_floor=epoch_floor(config, clock()),
    )
    control.node_keys = node_keys
    metrics.bind(control, clock)
    if config.admission is AdmissionPolicy.OPEN:
        log.warning("admission open: a node id's first key is approved on first use (labs only)")
    for node_id in sorted(node_keys.pending()):
        log.warning("node awaiting approval", node=node_id, approve=f"sparrow node approve {node_id}")
    recorder = NodeRecorder(store, supervisor)
    recorder.start()
    cleanup.push_async_callback(recorder.close, 1.0)
    heartbeats = HeartbeatServer(
        control,
        secret=config.cluster_secret,
        lease_seconds=timing.lease_seconds,
        clock=clock,
        on_hello=recorder.hello,
        on_heartbeat=metrics.heartbeats_received.inc,
        on_protocol_error=lambda code: metrics.protocol_errors.labels(code=code).inc(),
        on_refused=lambda reason: metrics.refused_connections.labels(reason=reason).inc(),
        idle_timeout=timing.dead_after,
        master_key=key,
        node_keys=node_keys,
        identity=identity,
    )
    try:
        await heartbeats.start(config.listen.host, config.listen.port)
    except OSError as e:
        raise StartupError(f"cannot listen for heartbeats on {config.listen}: {os_reason(e)}") from None
    cleanup.push_async_callback(heartbeats.close)
    push.append(heartbeats.push_assignments)
    listen = bound_address(heartbeats.sockets, config.listen)
    return MasterRuntime(
        config,
        store,
        control,
        metrics,
        recorder,
        heartbeats,
        listen,
        clock,
        supervisor,
        audit=audit,
        metrics_door=MetricsDoor.of(
            config.cluster_secret, public=config.public_metrics, registry=metrics.registry
        ),
    )


async def serve(config: MasterConfig) -> int:
    loop = asyncio.get_running_loop()
    signals = StopSignals(loop)
    stop = signals.event

    async with contextlib.AsyncExitStack() as cleanup:
        lock = lock_data_dir(config.data_dir)
        cleanup.callback(lock.release)
        master = await start_master(config, cleanup)
        master.supervisor.install(loop)
        app = build_app(master.api())
        runner = await start_http(
            app, config.http.host, config.http.port, cleanup, registry=master.metrics.registry
        )
        http_bound = bound_address(runner.addresses, config.http)
        await bootstrap(master.store, http_bound)

        timing = config.timing
        log.info(
            "master listening",
            heartbeats=str(master.listen),
            http=str(http_bound),
            volumes=len(master.control.desired()),
            data_dir=str(config.data_dir),
            heartbeat_interval=timing.heartbeat_interval,
            lease_seconds=timing.lease_seconds,
            dead_after=timing.dead_after,
        )
        notify(systemd.ready, f"master: heartbeats on {master.listen}, API on {http_bound}")

        master.start_steps(stop)
        await stop.wait()

        # --- shutdown, step by step ---
        await begin_shutdown(cleanup, signals, runner)
        try:
            await master.stop()
        finally:
            lock.release()
        log.info("stopped")
        return 0
    raise AssertionError("unreachable")  # pragma: no cover  (mypy: the exit stack may swallow)
