"""A real cluster for integration tests: one `sparrow master` and N `sparrow node` processes.

Everything runs on loopback with short timings (:data:`TIMING`), each process with its own data
directory and free ports. Readiness is learned the way systemd learns it: each process gets its own
NOTIFY_SOCKET and is ready once it sends READY=1 (both daemons send it only once their listeners are
bound). Processes are spawned first and waited for afterwards, so N nodes start in parallel.

Each node's heartbeat connection goes through its own :class:`~tests.integration.proxy.FaultProxy`,
so a test can partition one node from the master (``cluster.proxy(node_id).cut()``) and knows when
the last node-to-master chunk crossed.

Per process: :meth:`Proc.kill9`, :meth:`Proc.term` (SIGTERM, returns the exit code),
:meth:`Proc.sigstop`, :meth:`Proc.sigcont`, :meth:`Proc.restart` (start again on the same data
directory and ports). Logs are JSON lines, appended across restarts, in ``ROOT/<name>.log``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.process import Proc, bearer, daemon_env, scrape_bearer
from tests.integration.proxy import FaultProxy
from tests.integration.rogue import secret_file
from tests.tools import free_port, run, wait_for

BASE_IQN = "iqn.2026-11.io.sparrow"


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds; the master gets the first four, each node the heartbeat interval and the fence
    margin (it fences that long before its lease expires)."""

    heartbeat: float = 0.25
    lease: float = 2.0
    dead_after: float = 3.5
    margin: float = 0.5
    fence_margin: float = 0.5


TIMING = Timing()


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=timeout
        ) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def metric(text: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


class Master(Proc):
    def __init__(self, root: Path, timing: Timing) -> None:
        super().__init__("master", root)
        self.timing = timing
        self.listen_port = free_port()
        self.http_port = free_port()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    def command(self) -> list[str]:
        t = self.timing
        return [
            sys.executable, "-m", "sparrow", "master",
            "--data-dir", str(self.data_dir),
            "--listen", self.listen,
            "--http", f"127.0.0.1:{self.http_port}",
            "--heartbeat-interval", str(t.heartbeat),
            "--lease", str(t.lease),
            "--dead-after", str(t.dead_after),
            "--margin", str(t.margin),
            "--log-format", "json",
            "--cluster-secret-file", str(secret_file(self.root)),
        ]  # fmt: skip

    def get_json(self, path: str) -> Any:
        status, body = http_get(self.api + path, headers=bearer(self.root, self.api))
        assert status == 200, f"GET {path}: {status} {body!r}"
        return json.loads(body)

    def post_json(self, path: str, body: Any) -> Any:
        """POST ``body`` as the bootstrap admin; the answer (asserting 200)."""
        headers = {**bearer(self.root, self.api), "Content-Type": "application/json"}
        request = urllib.request.Request(self.api + path, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200, f"POST {path}: {resp.status}"
            return json.loads(resp.read())

    def approve(self, *node_ids: str, timeout: float = 20.0) -> None:
        """What an operator does for a new node (docs/operations.md, "Adding a node"): wait until
        the master lists each of ``node_ids`` (its Hello bound its key), then approve each one
        still pending (POST /v1/nodes/ID/approve). The harness admits nodes here, and only here."""

        def listed() -> dict[str, Any] | None:
            nodes = {n["node_id"]: n for n in self.get_json("/v1/nodes")["nodes"]}
            return nodes if all(nodes.get(i, {}).get("admission") is not None for i in node_ids) else None

        nodes = wait_for(listed, timeout=timeout, what=f"nodes {', '.join(node_ids)} listed", interval=0.05)
        for node_id in node_ids:
            if nodes[node_id]["admission"] == "pending":
                self.post_json(f"/v1/nodes/{node_id}/approve", {})

    def metrics(self) -> str:
        status, body = http_get(self.api + "/metrics", headers=scrape_bearer(secret_file(self.root)))
        assert status == 200, status
        return body.decode()

    def epochs_published(self) -> float:
        value = metric(self.metrics(), "sparrow_master_epochs_published_total")
        assert value is not None, "sparrow_master_epochs_published_total missing"
        return value


class Node(Proc):
    def __init__(
        self, node_id: str, root: Path, master: str, timing: Timing, extra_args: tuple[str, ...] = ()
    ) -> None:
        super().__init__(node_id, root)
        self.node_id = node_id
        self.extra_args = extra_args
        self.timing = timing
        self.master = master  # the heartbeat address it is given (its proxy)
        self.iscsi_port = free_port()
        self.http_port = free_port()
        self.replication_port = free_port()
        #: What the node tells the master others should dial for replication (None: its listener).
        self.advertise_replication: str | None = None

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.iscsi_port}"

    def url(self, volume: str, lun: int = 0) -> str:
        return f"iscsi://{self.portal}/{BASE_IQN}:{volume}/{lun}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sparrow", "node",
            "--data-dir", str(self.data_dir),
            "--node-id", self.node_id,
            "--master", self.master,
            "--iscsi", self.portal,
            "--replication", f"127.0.0.1:{self.replication_port}",
            "--http", f"127.0.0.1:{self.http_port}",
            "--heartbeat-interval", str(self.timing.heartbeat),
            "--fence-margin", str(self.timing.fence_margin),
            "--log-format", "json",
            "--cluster-secret-file", str(secret_file(self.root)),
            *(("--advertise-replication", self.advertise_replication) if self.advertise_replication else ()),
            *self.extra_args,
        ]  # fmt: skip

    def health(self) -> dict[str, Any]:
        """GET /healthz in full (the scrape token): 200, or 503 while the node is unhealthy (a fenced
        primary, a failed task)."""
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        status, body = http_get(url, headers=scrape_bearer(secret_file(self.root)))
        assert status in (200, 503), status
        return dict(json.loads(body))

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        status, body = http_get(url, headers=scrape_bearer(secret_file(self.root)))
        assert status == 200, status
        return body.decode()

    def access_state(self, volume_id: str) -> str | None:
        """The LU's access state for the volume (lower case), None when it is not exported."""
        for v in self.health()["volumes"]:
            if v["volume_id"] == volume_id:
                return str(v["access_state"])
        return None

    def persisted(self, volume_id: str) -> dict[str, Any] | None:
        """The node's durable (epoch, role) record for the volume, if any."""
        path = self.data_dir / "cluster" / f"{volume_id}.json"
        return dict(json.loads(path.read_text())["body"]) if path.exists() else None


class Cluster:
    """A master and ``n`` nodes ``n1..nN``, each node's heartbeats through its own proxy; with
    ``replication_proxies`` each node's replication listener too (``replication_proxy(node_id)``:
    every replication connection *to* that node; the node advertises the proxy)."""

    def __init__(
        self,
        root: Path,
        n: int,
        timing: Timing = TIMING,
        node_args: tuple[str, ...] = (),
        *,
        replication_proxies: bool = False,
    ) -> None:
        self.root = root
        self.timing = timing
        self.master = Master(root, timing)
        self.proxies: dict[str, FaultProxy] = {}
        self.replication_proxies: dict[str, FaultProxy] = {}
        self.nodes: dict[str, Node] = {}
        for i in range(1, n + 1):
            node_id = f"n{i}"
            proxy = FaultProxy(("127.0.0.1", self.master.listen_port)).start()
            self.proxies[node_id] = proxy
            node = self.nodes[node_id] = Node(node_id, root, proxy.address, timing, node_args)
            if replication_proxies:
                inbound = FaultProxy(("127.0.0.1", node.replication_port)).start()
                self.replication_proxies[node_id] = inbound
                node.advertise_replication = inbound.address

    def start(self) -> Cluster:
        self.master.start()
        for node in self.nodes.values():
            node.spawn()
        for node in self.nodes.values():
            node.wait_ready()
        self.master.approve(*self.nodes)
        return self

    def close(self) -> dict[str, int]:
        """SIGTERM every process still running (SIGCONT first if stopped); the exit codes by name."""
        codes: dict[str, int] = {}
        for proc in [*self.nodes.values(), self.master]:
            if proc.running:
                try:
                    codes[proc.name] = proc.term()
                except subprocess.TimeoutExpired:
                    proc.kill9()
                    codes[proc.name] = -9
        for proxy in [*self.proxies.values(), *self.replication_proxies.values()]:
            proxy.close()
        return codes

    def proxy(self, node_id: str) -> FaultProxy:
        return self.proxies[node_id]

    def replication_proxy(self, node_id: str) -> FaultProxy:
        return self.replication_proxies[node_id]

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def logs(self) -> str:
        """The tail of every log, for failure messages."""
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(30)}" for p in [self.master, *self.nodes.values()])

    # -- the CLI and the API ----------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            [sys.executable, "-m", "sparrow", *args, "--api", self.master.api],
            check=check,
            timeout=30,
            env=daemon_env(self.root),
        )

    def inspect(self, volume: str) -> dict[str, Any]:
        """``sparrow volume inspect VOLUME --json``."""
        return dict(json.loads(self.cli("volume", "inspect", volume, "--json").stdout))

    def node_list(self) -> list[dict[str, Any]]:
        """``sparrow node list --json``."""
        return list(json.loads(self.cli("node", "list", "--json").stdout))

    def volume(self, volume: str) -> dict[str, Any]:
        """GET /v1/volumes/VOLUME (cheaper than the CLI, for polling)."""
        return dict(self.master.get_json(f"/v1/volumes/{volume}"))

    def wait_converged(
        self, volume: str, *, epoch: int, copies: int, timeout: float = 20.0
    ) -> dict[str, Any]:
        """Wait until the volume is published at ``epoch`` with a primary and ``copies`` copies on
        distinct nodes, every one alive and reporting that epoch, converged; returns the API view."""

        def converged() -> dict[str, Any] | None:
            v = self.volume(volume)
            replicas = v["replicas"]
            ok = (
                v["epoch"] == epoch
                and v["primary"] is not None
                and len(replicas) == copies
                and len({r["node_id"] for r in replicas}) == copies
                and all(
                    r["state"] == "alive" and r["observed_epoch"] == epoch and r["converged"] is True
                    for r in replicas
                )
            )
            return v if ok else None

        return wait_for(
            converged, timeout=timeout, what=f"{volume} converged at epoch {epoch}", interval=0.05
        )

    def wait_serving(self, node_id: str, volume_id: str, timeout: float = 20.0) -> None:
        node = self.node(node_id)
        wait_for(
            lambda: node.access_state(volume_id) == "active_optimized",
            timeout=timeout,
            what=f"{node_id} serving {volume_id}",
            interval=0.05,
        )
