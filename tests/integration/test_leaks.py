"""The run's secret check (tests/leaks.py) on real daemons: the harness registers by itself what
it and the daemons made (cluster secret, master key, bootstrap token, CHAP secrets, stream keys),
and a secret planted in a daemon's log or audit log is found, naming the file and the line.

Each test calls the check itself (``WATCH.check()``), which consumes what it read: the planted
lines do not fail the test again at its teardown.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from sparrow.masterkey import master_key
from sparrow.replication.streamauth import derive_stream_key
from tests.integration.cluster import Cluster
from tests.integration.daemon import Daemon
from tests.integration.process import admin_token
from tests.leaks import WATCH, Leak

pytestmark = pytest.mark.integration

CHAP_SECRET = "leak-check-chap-secret-42"


def planted(path_line: tuple[str, int]) -> str:
    path, line = path_line
    with open(path) as f:
        return f.read().splitlines()[line - 1]


def test_a_token_planted_in_a_serve_log_fails_the_check(daemon: Daemon) -> None:
    daemon.create_volume("v", "8MiB")
    assert WATCH.check() == []  # the daemon's own lines hold no secret
    token = admin_token(daemon.root, daemon.api)
    with daemon.log_path.open("a") as log:
        log.write(json.dumps({"event": "planted", "authorization": f"Bearer {token}"}) + "\n")
    (leak,) = WATCH.check()
    assert (leak.where, leak.what) == (str(daemon.log_path), "a token in credentials.json")
    assert '"event": "planted"' in planted((leak.where, leak.line))
    assert token not in str(leak)


def test_the_harness_registers_the_clusters_secrets_and_finds_them_in_any_watched_file(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(2)
    cluster.cli("volume", "create", "locked", "--size", "8MiB", "--replicas", "2",
                "--chap-user", "iqn.leak", "--chap-secret", CHAP_SECRET)  # fmt: skip
    v = cluster.wait_converged("locked", epoch=1, copies=2)
    assert WATCH.check() == []

    registered = WATCH.by_root[cluster.root]
    kinds = {what.split(" (")[0].split(" of volume")[0].split(" in ")[0] for what in registered.values()}
    assert {
        "the cluster.secret file",
        "the master.key file",
        "a token",
        "CHAP secret",
        "stream key",
    } <= kinds, kinds

    primary = v["primary"]["node_id"]
    replica = next(r["node_id"] for r in v["replicas"] if r["node_id"] != primary)
    stream_key = derive_stream_key(master_key(cluster.master.data_dir), v["volume_id"], 1, primary, replica)
    secret_text = (cluster.root / "cluster.secret").read_text().strip()
    node_log = cluster.node(replica).log_path
    audit = cluster.master.data_dir / "audit.jsonl"
    with node_log.open("a") as log:
        log.write(json.dumps({"event": "planted", "key": stream_key.hex()}) + "\n")
    with audit.open("a") as log:
        log.write(json.dumps({"type": "planted", "secret": secret_text, "chap": CHAP_SECRET}) + "\n")
    leaks = sorted(WATCH.check(), key=lambda leak: (leak.where, leak.what))
    assert [(leak.where, leak.what) for leak in leaks] == [
        (str(audit), "CHAP secret of volume locked"),
        (str(audit), "the cluster.secret file in c0/"),
        (str(node_log), f"stream key ({v['volume_id'][:8]}, epoch 1, {primary} -> {replica})"),
    ]
    assert all("planted" in planted((leak.where, leak.line)) for leak in leaks)
    assert all(isinstance(leak, Leak) for leak in leaks)
