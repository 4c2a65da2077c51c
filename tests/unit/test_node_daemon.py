"""sparrow.node.daemon: the flags of ``sparrow node`` and the addresses it advertises."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sparrow import cli
from sparrow.config import ConfigError, HostPort
from sparrow.node import daemon
from sparrow.node.daemon import NodeConfig, advertised, filesystem_bytes, node_config

REQUIRED: dict[str, object] = {"data_dir": "/d", "node_id": "n1", "master": "10.0.0.9:3290"}


def test_defaults() -> None:
    config = node_config(**REQUIRED)  # type: ignore[arg-type]
    assert config == NodeConfig(
        data_dir=Path("/d"),
        node_id="n1",
        master=HostPort("10.0.0.9", 3290),
        iscsi=HostPort("0.0.0.0", 3260),
        replication=HostPort("0.0.0.0", 3291),
        http=HostPort("127.0.0.1", 3281),
    )


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
    ],
)
def test_bad_flags_are_usage_errors(override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        node_config(**{**REQUIRED, **override})  # type: ignore[arg-type]
    assert info.value.usage
    assert message in str(info.value)


def test_a_wildcard_listener_is_advertised_at_the_hosts_address_and_bound_port() -> None:
    assert advertised(HostPort("0.0.0.0", 0), 41000, lambda: "192.0.2.7") == HostPort("192.0.2.7", 41000)
    assert advertised(HostPort("127.0.0.1", 3260), None, lambda: "x") == HostPort("127.0.0.1", 3260)


def test_filesystem_bytes(tmp_path: Path) -> None:
    capacity, free = filesystem_bytes(tmp_path)
    assert capacity >= free > 0


def test_sparrow_node_runs_the_node_daemon_with_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[NodeConfig] = []

    def fake_run(config: NodeConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(daemon, "run", fake_run)
    monkeypatch.setattr("sparrow.logs.configure_logging", lambda *a, **k: None)
    argv = ["node", "--data-dir", "/d", "--node-id", "n1", "--master", "m:3290", "--iscsi", "127.0.0.1:3300"]
    assert cli.main([*argv, "--heartbeat-interval", "0.5"]) == 0
    [config] = seen
    assert (config.node_id, config.master, config.iscsi) == (
        "n1",
        HostPort("m", 3290),
        HostPort("127.0.0.1", 3300),
    )
    assert config.heartbeat_interval == 0.5


def test_sparrow_node_without_its_flags_is_a_usage_error() -> None:
    err = io.StringIO()
    assert cli.main(["node", "--node-id", "n1"], out=io.StringIO(), err=err) == 2
    assert "--data-dir is required" in err.getvalue()
