"""``sparrow serve``: the daemon's startup, main loop and shutdown, as three separate steps.

Startup: lock the data directory, load every volume (a corrupt one is logged and left offline; the
rest serve), create the demo volume if asked and missing, export each volume as a target, bind the
iSCSI listener and the HTTP API, and only then tell systemd ``READY=1``.

Shutdown (SIGTERM or SIGINT): ``STOPPING=1``, stop the HTTP API, stop accepting iSCSI connections
and let in-flight SCSI commands finish (``SHUTDOWN_TIMEOUT``), fdatasync every volume, close the
volumes, release the lock, exit 0 (1 if a flush failed: data may not be durable).

A startup failure is one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from frontend.server import IscsiServer
from frontend.target import ChapConfig, Portal, TargetRegistry, TargetSettings
from sparrow import systemd
from sparrow.api import build_app
from sparrow.config import Config, HostPort
from sparrow.lifecycle import StartupError, StopSignals, lock_data_dir, os_reason, run_daemon, start_http
from sparrow.metrics import PrometheusMetrics
from sparrow.service import VolumeInfo, VolumeService, VolumeSpec
from sparrow.sizes import format_size
from store.blockstore import StoreError
from store.volumes import VolumeManager

log = structlog.get_logger("sparrow.daemon")

#: Seconds in-flight SCSI commands get to finish on SIGTERM (the unit's TimeoutStopSec is larger).
SHUTDOWN_TIMEOUT = 10.0
#: Seconds in-flight commands of a deleted volume get before its connections are closed.
DISCONNECT_TIMEOUT = 5.0
#: Seconds API requests in progress get on shutdown.
TPGT = 1



def run(config: Config) -> int:
    """Run the daemon on uvloop until SIGTERM/SIGINT. Returns the process exit code."""
    return run_daemon(serve(config), "daemon")



class ServerSessions:
    """SessionControl over IscsiServer: count and disconnect the connections logged in to a target."""

    def __init__(self, server: IscsiServer, timeout: float = DISCONNECT_TIMEOUT) -> None:
        self.server = server
        self.timeout = timeout

    def session_count(self, iqn: str) -> int:
        return len(list(self.server.protocols_of_target(iqn)))

    async def disconnect(self, iqn: str, reason: str) -> None:
        protocols = list(self.server.protocols_of_target(iqn))
        for p in protocols:
            p.stop_reading()
        pending = [t for p in protocols for t in p.tasks]
        if pending:
            await asyncio.wait(pending, timeout=self.timeout)
        for p in protocols:
            p.close(reason)


def target_settings(config: Config, portals: Iterable[HostPort]) -> TargetSettings:
    discovery = ChapConfig(initiator=config.discovery_chap) if config.discovery_chap is not None else None
    return TargetSettings(
        portals=tuple(Portal(p.host, p.port, TPGT) for p in portals),
        discovery_chap=discovery,
        tpgt=TPGT,
        nop_interval=config.nop_interval,
        nop_timeout=config.nop_timeout,
    )


async def serve(config: Config) -> int:
    signals = StopSignals(asyncio.get_running_loop())
    stop = signals.event

    async with contextlib.AsyncExitStack() as cleanup:
        lock = lock_data_dir(config.data_dir)
        cleanup.callback(lock.release)

        metrics = PrometheusMetrics()
        registry = TargetRegistry()
        portals = config.advertised_portals()
        settings = target_settings(config, portals)
        server = IscsiServer(registry, settings, metrics)
        manager = VolumeManager(config.data_dir)
        service = VolumeService(
            manager,
            registry,
            base_iqn=config.base_iqn,
            portals=settings.portals,
            tpgt=TPGT,
            metrics=metrics,
            sessions=ServerSessions(server),
        )
        cleanup.push_async_callback(service.close)
        try:
            await service.open_all()
        except (StoreError, OSError) as e:
            raise StartupError(f"cannot open the volumes in {config.data_dir}: {e}") from None

        demo = config.demo_volume
        if demo is not None and demo.name not in service.names():
            try:
                await service.create(VolumeSpec(name=demo.name, size=demo.size))
            except (StoreError, OSError) as e:
                raise StartupError(f"cannot create demo volume {demo.name!r}: {e}") from None

        try:
            await server.start(config.iscsi.host, config.iscsi.port)
        except OSError as e:
            raise StartupError(f"cannot listen for iSCSI on {config.iscsi}: {os_reason(e)}") from None
        cleanup.push_async_callback(server.shutdown, 0.0)  # only reached if a later step fails
        iscsi_bound = _bound(server.sockets, config.iscsi)
        if config.iscsi.port == 0 or any(p.port == 0 for p in config.advertise):
            portals = config.advertised_portals(bound_port=iscsi_bound.port)
            settings = dataclasses.replace(
                settings, portals=tuple(Portal(p.host, p.port, TPGT) for p in portals)
            )
            server.settings = settings
            service.portals = settings.portals

        runner = await start_http(build_app(service, metrics), config.http.host, config.http.port, cleanup)
        http_bound = _bound_addresses(runner.addresses, config.http)

        for info in service.volumes():
            log.info("serving volume", volume=info.name, size=format_size(info.size), url=info.urls()[0])
        log.info(
            "listening",
            iscsi=str(iscsi_bound),
            http=str(http_bound),
            portals=[str(p) for p in portals],
            volumes=len(service.names()),
            offline=len(service.offline),
            data_dir=str(config.data_dir),
        )
        count = len(service.names())
        _notify(systemd.ready, f"serving {count} volume{'' if count == 1 else 's'} on {iscsi_bound}")
        if demo is not None:
            print(attach_instructions(service.get(demo.name), http_bound), file=sys.stderr, flush=True)

        await stop.wait()

        # --- shutdown: the exit stack is emptied by hand, in order, so each step is logged ---
        cleanup.pop_all()
        log.info("stopping", signal=signals.first)
        _notify(systemd.stopping, "draining")
        await runner.cleanup()
        await server.shutdown(timeout=SHUTDOWN_TIMEOUT)
        failed = await service.flush_all()
        for name, err in failed:
            log.error("flush failed", volume=name, error=str(err))
        try:
            await service.close()
        finally:
            lock.release()
        log.info("stopped", clean=not failed)
        return 1 if failed else 0
    raise AssertionError("unreachable")  # pragma: no cover  (mypy: the exit stack may swallow)


def attach_instructions(volume: VolumeInfo, api: HostPort) -> str:
    """What a person needs to attach ``volume``, printed once the daemon is ready."""
    url = volume.urls()[0]
    portal = url.removeprefix("iscsi://").split("/", 1)[0]
    return "\n".join([
        "",
        f"Sparrow is serving volume {volume.name!r} ({format_size(volume.size)}) as {volume.iqn}, LUN 0.",
        "",
        f"  iSCSI URL        {url}",
        "  Linux (open-iscsi):",
        f"    iscsiadm -m discovery -t sendtargets -p {portal}",
        f"    iscsiadm -m node -T {volume.iqn} -p {portal} --login",
        "  QEMU / libiscsi:",
        f"    qemu-img info {url}",
        f"    qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' {url}",
        f"  Manage volumes   .venv/bin/sparrow volume list --api http://{api}",
        "",
        "Press Ctrl-C to stop (in-flight commands drain and every volume is flushed).",
        "",
    ])




def _notify(send: Callable[[str], bool], status: str) -> None:
    try:
        send(status)
    except OSError as e:
        log.warning("sd_notify failed", error=str(e))


def _bound(sockets: Iterable[Any], configured: HostPort) -> HostPort:
    for s in sockets:
        name = s.getsockname()
        if isinstance(name, tuple):
            return HostPort(configured.host, int(name[1]))
    return configured


def _bound_addresses(addresses: Iterable[Any], configured: HostPort) -> HostPort:
    for name in addresses:
        if isinstance(name, tuple):
            return HostPort(configured.host, int(name[1]))
    return configured
