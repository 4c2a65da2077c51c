"""sparrow.node.daemon: the flags of ``sparrow node`` and the addresses it advertises."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sparrow import cli
from sparrow.clustersecret import generate_cluster_secret, load_cluster_secret
from sparrow.config import ConfigError, HostPort
from sparrow.node import daemon
from sparrow.node.daemon import NodeConfig, advertised, filesystem_bytes, node_config

REQUIRED: dict[str, object] = {"data_dir": "/d", "node_id": "n1", "master": "10.0.0.9:3290"}


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "cluster.secret"
    generate_cluster_secret(path)
    return str(path)


def test_defaults(secret_file: str) -> None:
    config = node_config(**REQUIRED, cluster_secret_file=secret_file)  # type: ignore[arg-type]
    assert config == NodeConfig(
        data_dir=Path("/d"),
        node_id="n1",
        master=HostPort("10.0.0.9", 3290),
        iscsi=HostPort("0.0.0.0", 3260),
        replication=HostPort("0.0.0.0", 3291),
        http=HostPort("127.0.0.1", 3281),
        cluster_secret=load_cluster_secret(Path(secret_file)),
    )
    assert config.fence_margin == 0.5  # sparrow.cluster.lease.DEFAULT_FENCE_MARGIN


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (None, "--cluster-secret-file is required: make a secret with `sparrow secret generate PATH`"),
        ("/nonexistent/cluster.secret", "does not exist"),
    ],
)
def test_a_node_without_a_cluster_secret_is_a_usage_error(secret: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        node_config(**REQUIRED, cluster_secret_file=secret)  # type: ignore[arg-type]
    assert info.value.usage
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"data_dir": None}, "--data-dir is required"),
        ({"node_id": None}, "--node-id is required"),
        ({"master": None}, "--master is required"),
        ({"node_id": "Bad_Id"}, "invalid node id"),
        ({"master": "0.0.0.0:3290"}, "give the master's host and port"),
        ({"master": "master-host"}, "missing port"),
        ({"iscsi": "host:99999"}, "out of range"),
        ({"heartbeat_interval": 0.0}, "must be positive"),
        ({"fence_margin": -0.5}, "--fence-margin must be a non-negative number"),
        ({"fence_margin": float("nan")}, "--fence-margin must be a non-negative number"),
        ({"fence_margin": float("inf")}, "--fence-margin must be a non-negative number"),
        ({"advertise_replication": "proxy-host"}, "missing port"),
    ],
)
def test_bad_flags_are_usage_errors(override: dict[str, object], message: str, secret_file: str) -> None:
    with pytest.raises(ConfigError) as info:
        node_config(**{**REQUIRED, "cluster_secret_file": secret_file, **override})  # type: ignore[arg-type]
    assert info.value.usage
    assert message in str(info.value)


def test_a_wildcard_listener_is_advertised_at_the_hosts_address_and_bound_port() -> None:
    assert advertised(HostPort("0.0.0.0", 0), 41000, lambda: "192.0.2.7") == HostPort("192.0.2.7", 41000)
    assert advertised(HostPort("127.0.0.1", 3260), None, lambda: "x") == HostPort("127.0.0.1", 3260)


def test_filesystem_bytes(tmp_path: Path) -> None:
    capacity, free = filesystem_bytes(tmp_path)
    assert capacity >= free > 0


def test_sparrow_node_runs_the_node_daemon_with_the_flags(
    monkeypatch: pytest.MonkeyPatch, secret_file: str
) -> None:
    seen: list[NodeConfig] = []

    def fake_run(config: NodeConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(daemon, "run", fake_run)
    monkeypatch.setattr("sparrow.logs.configure_logging", lambda *a, **k: None)
    argv = ["node", "--data-dir", "/d", "--node-id", "n1", "--master", "m:3290", "--iscsi", "127.0.0.1:3300"]
    argv += ["--cluster-secret-file", secret_file]
    argv += ["--advertise-replication", "10.0.0.5:4291"]
    assert cli.main([*argv, "--heartbeat-interval", "0.5", "--fence-margin", "0.75"]) == 0
    [config] = seen
    assert config.advertise_replication == HostPort("10.0.0.5", 4291)
    assert (config.node_id, config.master, config.iscsi) == (
        "n1",
        HostPort("m", 3290),
        HostPort("127.0.0.1", 3300),
    )
    assert (config.heartbeat_interval, config.fence_margin) == (0.5, 0.75)


def test_sparrow_node_without_its_flags_is_a_usage_error() -> None:
    err = io.StringIO()
    assert cli.main(["node", "--node-id", "n1"], out=io.StringIO(), err=err) == 2
    assert "--data-dir is required" in err.getvalue()


def test_sparrow_node_without_a_secret_says_how_to_make_one(tmp_path: Path) -> None:
    err = io.StringIO()
    argv = ["node", "--data-dir", str(tmp_path), "--node-id", "n1", "--master", "m:3290"]
    assert cli.main(argv, out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1
    assert "sparrow secret generate PATH" in err.getvalue()
