"""``sparrow serve``: a master and one node in one process, the one-command default for one machine.

The same code paths as a cluster (docs/cluster.md, "Embedded mode"): the master
(:func:`sparrow.master.daemon.start_master`) listens for heartbeats on ``127.0.0.1`` (a port of
its own choosing), the node :data:`NODE_ID` (:func:`sparrow.node.daemon.start_node`) heartbeats to
it over loopback, and every volume is placed, given an epoch and served through the Publisher, the
Adapter and the lease like anywhere else. One data directory, one lock, laid out as the union of a
master's and a node's: ``authority.sqlite3`` (the master), ``volumes/`` (the volumes, where the
single-node daemon kept them), ``cluster/`` and ``node.json`` (the node's epochs and incarnation).

What the single-node daemon did and a plain master cannot, the master's API asks of the node in
its process (:class:`EmbeddedNode`, ``sparrow.master.api.LocalNode``): a backing device is checked,
and sized when no size is given, before the volume is recorded; ``volume delete`` deletes the data
(the node's ``Convergence.destroy``); ``/healthz`` reports the volumes that failed to load.

Startup: lock, open the authority, load the node's state and volumes (primaries fenced), adopt the
volumes the authority does not know yet (:func:`adopt`), start the control loop, bind the HTTP API
(the master's, with the node's iSCSI metrics on its ``/metrics``), start heartbeating, wait until
every volume is served (at most :data:`READY_TIMEOUT`), create the demo volume if asked, and only
then ``READY=1``. Shutdown (SIGTERM or SIGINT): ``STOPPING=1``, the HTTP API stops, the node stops
(heartbeat, iSCSI drain, flush, close), then the master; exit 0, or 1 if a flush failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import structlog

from frontend.target import TargetSettings
from sparrow import systemd
from sparrow.cluster.authority import AuthorityError, VolumeRecord
from sparrow.cluster.lease import LeaseConfig
from sparrow.cluster.messages import InvalidMessage, VolumeChap
from sparrow.clustersecret import serve_secret
from sparrow.config import Config, ConfigError, HostPort
from sparrow.httpjson import ApiError
from sparrow.lifecycle import (
    StartupError,
    StopSignals,
    begin_shutdown,
    bound_address,
    lock_data_dir,
    notify,
    run_daemon,
    start_http,
)
from sparrow.master.api import MasterApi, MasterMetrics, build_app, served, volume_json
from sparrow.master.auth import bootstrap
from sparrow.master.control import ControlLoop
from sparrow.master.daemon import MasterConfig, MasterRuntime, start_master
from sparrow.metrics import PrometheusMetrics
from sparrow.node.convergence import target_chap
from sparrow.node.daemon import Node, NodeConfig, start_node
from sparrow.sizes import format_size
from sparrow.supervision import TaskSupervisor
from store.blockstore import StoreError
from store.volumes import BackingNotAllowed, Volume, validate_name

log = structlog.get_logger("sparrow.daemon")

#: The node id of the node inside ``sparrow serve``.
NODE_ID = "local"
#: Heartbeats over loopback are cheap: a short interval makes a new volume served within a second.
TIMING = LeaseConfig(heartbeat_interval=0.25, lease_seconds=5.0, dead_after=8.0, margin=1.0, fence_margin=0.5)
#: The portal group tag of the node's one portal group.
TPGT = 1
#: Seconds startup waits for every volume to be served before saying READY=1 anyway.
READY_TIMEOUT = 10.0


def target_settings(config: Config) -> TargetSettings:
    """The iSCSI target settings from the configuration (the portals are filled in once bound)."""
    return TargetSettings(
        portals=(),
        tpgt=TPGT,
        nop_interval=config.nop_interval,
        nop_timeout=config.nop_timeout,
    )


async def seed_discovery_chap(control: ControlLoop, config: Config) -> VolumeChap | None:
    """The TOML ``[iscsi.discovery_chap]`` is the discovery CHAP's first value: recorded in the
    authority when it never held one; after that the authority's (``sparrow cluster update``)
    wins. Returns the discovery CHAP in force."""
    recorded, chap = await asyncio.to_thread(control.store.discovery_chap)
    if not recorded and config.discovery_chap is not None:
        chap = VolumeChap(config.discovery_chap.user, config.discovery_chap.secret, None, None)
        await asyncio.to_thread(control.store.set_discovery_chap, chap)
        control.discovery_chap = chap
    return chap


def run(config: Config) -> int:
    """Run ``sparrow serve`` on uvloop until SIGTERM/SIGINT. Returns the process exit code."""
    return run_daemon(serve(config), "daemon")


class EmbeddedNode:
    """The master API's ``LocalNode``: the node in this process."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def health(self) -> Mapping[str, Any]:
        return self.node.health()

    async def check_create(self, name: str, size: int | None, block_size: int, backing: str | None) -> int:
        try:
            validate_name(name)
            if backing is not None:
                return await self.node.manager.probe_backing(backing, block_size=block_size, size=size)
        except BackingNotAllowed as e:
            raise ApiError(403, str(e)) from None
        except StoreError as e:
            raise ApiError(400, str(e)) from None
        if size is None:
            raise ApiError(400, "missing field 'size' (bytes, or a string such as \"64MiB\")")
        return size

    async def destroy(self, volume_id: str | None, name: str) -> None:
        node = self.node
        if volume_id is None:
            if not any(e.name == name for e in node.offline):
                raise ApiError(404, f"no volume named {name!r}")
            await node.manager.delete(name)
        else:
            await node.convergence.destroy(volume_id, name)
        node.offline = [e for e in node.offline if e.name != name]
        node.metrics.set_offline(len(node.offline))


async def adopt(master: MasterRuntime, node: Node) -> None:
    """Record in the authority every local volume it does not know (a data directory of the
    single-node daemon, or a volume created before the authority was), with ``volume_id`` = the
    volume's own id, so its serial and NAA stay; the controller then places it on this node.
    A local copy of a volume the authority has deleted (a crash between the two halves of a
    delete) is deleted now."""
    known = {r.volume_id: r for r in await asyncio.to_thread(master.store.volumes, include_deleted=True)}
    for volume in node.manager.list():
        meta = volume.meta
        record = known.get(meta.volume_id)
        if record is not None and record.deleted_at is not None:
            log.info(
                "deleting the local copy of a deleted volume", volume=meta.name, volume_id=meta.volume_id
            )
            await node.convergence.destroy(meta.volume_id, meta.name)
        elif record is None:
            try:
                added = await asyncio.to_thread(_record_of, master, volume)
            except (AuthorityError, InvalidMessage) as e:
                log.error("volume not adopted", volume=meta.name, volume_id=meta.volume_id, reason=str(e))
                continue
            master.control.volume_added(added)
            log.info("volume adopted", volume=meta.name, volume_id=meta.volume_id)


def _volume_chap(volume: Volume) -> VolumeChap | None:
    chap = volume.meta.chap
    if chap is None:
        return None
    return VolumeChap(chap.user, chap.secret, chap.mutual_user, chap.mutual_secret)


def _record_of(master: MasterRuntime, volume: Volume) -> VolumeRecord:
    meta = volume.meta
    return master.store.add_volume(
        meta.name,
        size=meta.size,
        block_size=meta.block_size,
        replicas=1,
        created_at=meta.created_at,
        volume_id=meta.volume_id,
        physical_block_size=meta.physical_block_size,
        chap=_volume_chap(volume),
        backing=None if meta.backing is None else str(meta.backing),
    )


async def serve(config: Config) -> int:
    signals = StopSignals(asyncio.get_running_loop())
    stop = signals.event

    async with contextlib.AsyncExitStack() as cleanup:
        lock = lock_data_dir(config.data_dir)
        cleanup.callback(lock.release)

        try:
            secret = serve_secret(config.data_dir, config.cluster_secret_file)
        except ConfigError as e:
            raise StartupError(str(e)) from None
        metrics = PrometheusMetrics()
        supervisor = TaskSupervisor(metrics.registry)  # one for the master and the node
        supervisor.install(asyncio.get_running_loop())
        master_config = MasterConfig(
            data_dir=config.data_dir,
            listen=HostPort("127.0.0.1", 0),
            http=config.http,
            timing=TIMING,
            base_iqn=config.base_iqn,
            cluster_secret=secret,
            allowed_backing=config.allowed_backing,
            public_metrics=config.public_metrics,
        )
        master = await start_master(
            master_config, cleanup, metrics=MasterMetrics(metrics.registry), supervisor=supervisor
        )
        discovery = await seed_discovery_chap(master.control, config)
        node_config = NodeConfig(
            data_dir=config.data_dir,
            node_id=NODE_ID,
            master=master.listen,
            iscsi=config.iscsi,
            http=config.http,
            base_iqn=config.base_iqn,
            heartbeat_interval=TIMING.heartbeat_interval,
            fence_margin=TIMING.fence_margin,
            cluster_secret=secret,
            allowed_backing=config.allowed_backing,
            forward_writes=False,  # one copy: the plain store
            master_key=master.heartbeats.identity.public if master.heartbeats.identity else None,
        )
        node = await start_node(
            node_config,
            cleanup,
            settings=target_settings(config),
            portals=lambda port: config.advertised_portals(bound_port=port),
            metrics=metrics,
            supervisor=supervisor,
            discovery_chap=target_chap(discovery),
        )
        # The master's own node: its key is the data directory's, so it is pinned, never refused.
        assert node.heartbeat.identity is not None
        master.node_keys.rebind(NODE_ID, node.heartbeat.identity.public)
        await adopt(master, node)

        api = dataclasses.replace(master.api(), local=EmbeddedNode(node))
        runner = await start_http(
            build_app(api),
            config.http.host,
            config.http.port,
            cleanup,
            limits=config.http_limits,
            registry=metrics.registry,
        )
        http_bound = bound_address(runner.addresses, config.http)
        await bootstrap(master.store, http_bound)
        master.start_steps(stop)
        cleanup.push_async_callback(_end_steps, master, stop)  # only reached if a later step fails
        node.start_heartbeat(http_bound)

        records = await _with_demo_volume(api, config)
        offline = {e.name for e in node.offline}  # they cannot be served: do not wait for them
        if await _until_served(api, tuple(r for r in records if r.name not in offline), stop):
            log.info(
                "listening",
                iscsi=str(node.iscsi_portal),
                http=str(http_bound),
                heartbeats=str(master.listen),
                portals=[str(p) for p in node.portals],
                volumes=len(records),
                offline=len(node.offline),
                data_dir=str(config.data_dir),
            )
            count = len(records)
            notify(systemd.ready, f"serving {count} volume{'' if count == 1 else 's'} on {node.iscsi_portal}")
            demo = next(
                (r for r in records if config.demo_volume and r.name == config.demo_volume.name), None
            )
            if demo is not None:
                print(attach_instructions(volume_json(api, demo), http_bound), file=sys.stderr, flush=True)

        await stop.wait()

        # --- shutdown, step by step ---
        await begin_shutdown(cleanup, signals, runner)
        try:
            try:
                failed = await node.stop()
            finally:
                await master.stop()
        finally:
            lock.release()
        log.info("stopped", clean=not failed)
        return 1 if failed else 0
    raise AssertionError("unreachable")  # pragma: no cover  (mypy: the exit stack may swallow)


async def _with_demo_volume(api: MasterApi, config: Config) -> tuple[VolumeRecord, ...]:
    """The live volumes, after recording the demo volume (``--demo-volume``) if it is missing."""
    store = api.control.store
    records = await asyncio.to_thread(store.volumes)
    demo = config.demo_volume
    if demo is None or any(r.name == demo.name for r in records):
        return records
    record = await asyncio.to_thread(
        store.add_volume, demo.name, size=demo.size, block_size=512, replicas=1, created_at=api.wall_clock()
    )
    api.control.volume_added(record)
    return (*records, record)


async def _end_steps(master: MasterRuntime, stop: asyncio.Event) -> None:
    """After a failed start: end the control loop before the store it uses is closed."""
    stop.set()
    await master.end_steps()


async def _until_served(api: MasterApi, records: tuple[VolumeRecord, ...], stop: asyncio.Event) -> bool:
    """Wait until every volume is served (at most READY_TIMEOUT); False if ``stop`` came first."""
    waiting = asyncio.ensure_future(_served_all(api, records, READY_TIMEOUT))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
    for task in (waiting, stopping):
        task.cancel()
    await asyncio.gather(waiting, stopping, return_exceptions=True)
    return not stop.is_set()


async def _served_all(api: MasterApi, records: tuple[VolumeRecord, ...], within: float) -> None:
    """Wait (at most ``within`` seconds in all) until every volume is served; log the ones that
    are not."""
    deadline = api.clock() + within
    for record in records:
        # No giving up: until the node's first heartbeat the controller sees no live node.
        if not await served(api, record.volume_id, max(0.0, deadline - api.clock()), give_up=False):
            status = api.control.status(record.volume_id)
            log.warning(
                "volume not served yet",
                volume=record.name,
                status=None if status is None else status.reason,
            )


def attach_instructions(volume: Mapping[str, Any], api: HostPort) -> str:
    """What a person needs to attach ``volume`` (``sparrow.master.api.volume_json``)."""
    url = volume.get("url")
    if url is None:
        return f"\nVolume {volume['name']!r} is not served yet: {volume.get('status')}\n"
    portal = str(url).removeprefix("iscsi://").split("/", 1)[0]
    iqn = volume["iqn"]
    return "\n".join([
        "",
        f"Sparrow is serving volume {volume['name']!r} ({format_size(volume['size'])}) as {iqn}, LUN 0.",
        "",
        f"  iSCSI URL        {url}",
        "  Linux (open-iscsi):",
        f"    iscsiadm -m discovery -t sendtargets -p {portal}",
        f"    iscsiadm -m node -T {iqn} -p {portal} --login",
        "  QEMU / libiscsi:",
        f"    qemu-img info {url}",
        f"    qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' {url}",
        f"  Manage volumes   .venv/bin/sparrow volume list --api http://{api}",
        "",
        "Press Ctrl-C to stop (in-flight commands drain and every volume is flushed).",
        "",
    ])  # fmt: skip
