from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from frontend.internal_errors import INTERNAL_ERROR_EVENT
from sparrow.master.openapi_check import VIOLATION_EVENT
from tests.integration.cluster import TIMING, Cluster, Timing
from tests.integration.daemon import Daemon
from tests.integration.process import SPAWNED


@pytest.fixture(autouse=True)
def _no_openapi_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which any daemon (however the test started it) answered an API request
    outside the master's OpenAPI document (sparrow.master.openapi_check logs each violation)."""
    offsets = {proc: proc.log_size() for proc in SPAWNED}
    yield
    if request.node.get_closest_marker("openapi_violations_expected") is not None:
        return
    found = []
    for proc in SPAWNED:
        found += [
            f"{proc.name}: {line}"
            for line in proc.log_since(offsets.get(proc, 0)).splitlines()
            if VIOLATION_EVENT in line
        ]
    SPAWNED[:] = [p for p in SPAWNED if p.running]
    assert not found, "answers outside the OpenAPI document:\n" + "\n".join(found)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running `sparrow serve` on loopback with its own data dir; stopped (SIGTERM) afterwards."""
    d = Daemon(tmp_path / "data")
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        code = d.stop()
        assert code == 0, f"daemon exited {code} on SIGTERM:\n{d.log()}"
    assert INTERNAL_ERROR_EVENT not in d.log(), f"the iSCSI core caught an internal error:\n{d.log()}"


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(n, node_args=(), timing=TIMING)``: a started master and ``n`` nodes (each
    given the extra ``node_args``); all SIGTERMed afterwards, exit 0, and no internal error in any
    log."""
    clusters: list[Cluster] = []

    def make(n: int, node_args: tuple[str, ...] = (), timing: Timing = TIMING) -> Cluster:
        cluster = Cluster(tmp_path / f"c{len(clusters)}", n, timing, node_args=node_args)
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        codes = cluster.close()
        assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{cluster.logs()}"
        for proc in [cluster.master, *cluster.nodes.values()]:
            log = proc.log()
            assert INTERNAL_ERROR_EVENT not in log, f"the iSCSI core caught an internal error:\n{log}"
