"""GET /metrics is a locked door (sparrow.metricsauth) on real processes: a master and a node of a
cluster, and `sparrow serve`. No credential, a wrong one (another cluster's scrape token, a made-up
API token), a revoked API token and another tenant's get no metric text (401; the tenant's 403),
each counted; the scrape token printed by `sparrow metrics token` opens all three; a real
Prometheus scrapes them with it (``authorization: credentials_file``) and is refused without it;
``--public-metrics`` opens the door to anyone."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sparrow.cluster.channel import ClusterSecret
from sparrow.metricsauth import scrape_token
from tests.integration.cluster import Cluster, http_get, metric
from tests.integration.daemon import Daemon
from tests.integration.process import bearer, daemon_env
from tests.integration.rogue import secret_file
from tests.leaks import register_token
from tests.tools import free_port, require_tool, run, wait_for

pytestmark = pytest.mark.integration

VOLUME = "door-watched"
REFUSED = "sparrow_metrics_scrapes_refused_total"


def get(url: str, credential: str | None) -> tuple[int, str]:
    headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
    status, body = http_get(url, headers=headers)
    return status, body.decode()


def mint(api: str, root: Path, role: str, tenant: str | None = None) -> tuple[str, str]:
    """A new API token (id, plaintext) minted as the bootstrap admin."""
    body = json.dumps({"role": role, **({"tenant": tenant} if tenant else {})}).encode()
    request = urllib.request.Request(
        api + "/v1/tokens",
        data=body,
        headers={**bearer(root, api), "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        made = json.loads(resp.read())
    register_token(made["token"], f"a {role} token")  # minted over plain HTTP (tests/leaks.py)
    return str(made["id"]), str(made["token"])


def revoke(api: str, root: Path, token_id: str) -> None:
    url = api + f"/v1/tokens/{token_id}"
    request = urllib.request.Request(url, headers=bearer(root, api), method="DELETE")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 204


def printed_token(*source: str, root: Path) -> str:
    """What `sparrow metrics token` prints (a real CLI process)."""
    out = run([sys.executable, "-m", "sparrow", "metrics", "token", *source], env=daemon_env(root)).stdout
    (line,) = out.splitlines()
    return line


def assert_locked(url: str, token: str, refused_by: Callable[[], str]) -> None:
    """Each wrong credential gets 401, one JSON line and no metric; the door counts them."""
    other_cluster = scrape_token(ClusterSecret.from_text(secrets.token_hex(32).encode()))
    made_up = f"spw_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    counted = refused_by()
    missing, wrong = (metric(counted, f'{REFUSED}{{reason="{r}"}}') or 0.0 for r in ("missing", "wrong"))
    for credential in (None, other_cluster, made_up, token[:-1]):
        status, text = get(url, credential)
        assert status == 401, (url, status, text)
        assert "sparrow_" not in text and VOLUME not in text and text.count("\n") <= 1, text
        assert isinstance(json.loads(text)["error"], str)
    after = refused_by()
    assert metric(after, f'{REFUSED}{{reason="missing"}}') == missing + 1, after
    assert metric(after, f'{REFUSED}{{reason="wrong"}}') == wrong + 3, after


def test_a_clusters_master_and_node_open_their_metrics_to_the_scrape_token_only(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(1)
    cluster.cli("volume", "create", VOLUME, "--size", "16MiB")
    v = cluster.wait_converged(VOLUME, epoch=1, copies=1)
    node = cluster.node(v["primary"]["node_id"])
    cluster.wait_serving(node.node_id, v["volume_id"])
    master = cluster.master
    token = printed_token("--cluster-secret-file", str(secret_file(cluster.root)), root=cluster.root)
    node_url = f"http://127.0.0.1:{node.http_port}/metrics"
    master_url = master.api + "/metrics"

    status, text = get(node_url, token)
    assert status == 200 and f'volume="{VOLUME}"' in text
    status, text = get(master_url, token)
    assert status == 200 and "sparrow_master_volumes" in text
    assert_locked(node_url, token, node.metrics)
    assert_locked(master_url, token, master.metrics)

    # The master also takes an API token with no tenant; never another tenant's, nor a revoked one.
    _, reader = mint(master.api, cluster.root, "reader")
    assert get(master_url, reader)[0] == 200
    _, tenant = mint(master.api, cluster.root, "admin", tenant="team-b")
    status, text = get(master_url, tenant)
    assert status == 403 and "sparrow_" not in text and VOLUME not in text
    revoked_id, revoked = mint(master.api, cluster.root, "admin")
    revoke(master.api, cluster.root, revoked_id)
    status, text = get(master_url, revoked)
    assert status == 401 and "sparrow_" not in text
    assert get(node_url, reader)[0] == 401  # a node knows no API token
    # /healthz stays public (it names volumes: docs/architecture.md, "Security", gaps).
    assert http_get(f"http://127.0.0.1:{node.http_port}/healthz")[0] == 200


def test_serve_opens_its_metrics_to_the_scrape_token_of_its_own_secret(daemon: Daemon) -> None:
    daemon.create_volume(VOLUME, "16MiB")
    token = printed_token("--data-dir", str(daemon.data_dir), root=daemon.root)
    url = daemon.api + "/metrics"
    status, text = get(url, token)
    assert status == 200 and f'volume="{VOLUME}"' in text and "sparrow_master_volumes" in text
    assert_locked(url, token, lambda: get(url, token)[1])
    _, tenant = mint(daemon.api, daemon.root, "reader", tenant="team-b")
    assert get(url, tenant)[0] == 403


@pytest.mark.openapi_violations_expected  # the document describes the locked door, the default
def test_public_metrics_opens_the_door_to_anyone(tmp_path: Path) -> None:
    serve = Daemon(tmp_path / "data", extra_args=("--public-metrics",))
    serve.start()
    try:
        status, text = get(serve.api + "/metrics", None)
        assert status == 200 and "sparrow_master_volumes" in text
    finally:
        assert serve.stop() == 0, serve.log_tail()


# --- a real Prometheus -----------------------------------------------------------------------------


def test_prometheus_scrapes_with_the_scrape_token_and_is_refused_without(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    prometheus = require_tool("prometheus")
    cluster = make_cluster(1)
    node = next(iter(cluster.nodes.values()))
    credentials = tmp_path / "sparrow.token"
    token = printed_token("--cluster-secret-file", str(secret_file(cluster.root)), root=cluster.root)
    credentials.write_text(token)
    credentials.chmod(0o600)
    targets = [cluster.master.api.removeprefix("http://"), f"127.0.0.1:{node.http_port}"]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: sparrow\n    authorization: {{credentials_file: {credentials}}}\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        f"  - job_name: anonymous\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def health() -> dict[tuple[str, str], tuple[str, str]] | None:
            query = urllib.parse.urlencode({"state": "active"})
            try:
                status, body = http_get(f"http://127.0.0.1:{port}/api/v1/targets?{query}")
            except OSError:
                return None
            if status != 200:
                return None
            active: list[dict[str, Any]] = json.loads(body)["data"]["activeTargets"]
            seen = {
                (t["labels"]["job"], t["labels"]["instance"]): (t["health"], t["lastError"]) for t in active
            }
            done = len(seen) == 4 and all(h != "unknown" for h, _ in seen.values())
            return seen if done else None

        seen = wait_for(health, timeout=30, what="Prometheus's first scrape of each target")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    for target in targets:
        assert seen[("sparrow", target)] == ("up", ""), seen
        state, error = seen[("anonymous", target)]
        assert state == "down" and "401" in error, seen
