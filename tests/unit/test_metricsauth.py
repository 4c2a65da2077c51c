"""sparrow.metricsauth: the scrape token's derivation, the /metrics door of the master (the real
API app, aiohttp test client) and of a node (its real HTTP app), ``sparrow metrics token`` and
``--public-metrics`` / ``[http] public_metrics``; the same door in front of the full ``/healthz``.
Real processes: tests/integration/test_metrics_door.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prometheus_client import CollectorRegistry

from sparrow.auth import tokens
from sparrow.cli import main
from sparrow.cluster.channel import ClusterSecret
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.clustersecret import SERVE_SECRET_NAME, generate_cluster_secret, load_cluster_secret
from sparrow.config import ConfigError, Overrides, load_config
from sparrow.metrics import PrometheusMetrics
from sparrow.metricsauth import SCRAPE_PREFIX, SCRAPE_TOKEN_ROUTE, MetricsDoor, scrape_token
from sparrow.node.daemon import Node, build_node_app
from sparrow.replication.streamauth import derive_stream_key
from tests.unit.test_master_api import Master

SECRET_TEXT = b"0123456789abcdef0123456789abcdef-the-unit-tests"


def refused(door: MetricsDoor, reason: str) -> float:
    return door.refused.labels(reason=reason)._value.get()


# --- the derivation ----------------------------------------------------------------------------


def test_the_scrape_token_is_stable_and_one_way_from_the_cluster_key() -> None:
    secret = ClusterSecret.from_text(SECRET_TEXT)
    token = scrape_token(secret)
    assert token == scrape_token(ClusterSecret.from_text(SECRET_TEXT + b"\n"))  # the file's newline
    assert token.startswith(SCRAPE_PREFIX) and len(token) == len(SCRAPE_PREFIX) + 64
    expected = HKDF(hashes.SHA256(), 32, salt=None, info=b"sparrow metrics scrape v1").derive(secret.key)
    assert token == SCRAPE_PREFIX + expected.hex()
    # Not the secret, nor any other key derived from it or from a master key of the same bytes.
    derived = bytes.fromhex(token.removeprefix(SCRAPE_PREFIX))
    others = {
        SECRET_TEXT,
        secret.key,
        secret.handshake_key,
        MasterIdentity.derive(secret.key).seed,
        derive_stream_key(secret.key, "ab" * 16, 1, "n1", "n2"),
    }
    assert derived not in others
    assert all(o.hex() not in token for o in others)
    assert scrape_token(ClusterSecret.from_text(SECRET_TEXT.replace(b"0", b"1"))) != token


# --- the door itself ---------------------------------------------------------------------------


def test_the_door_opens_to_the_scrape_token_only_and_counts_what_it_refuses() -> None:
    token = scrape_token(ClusterSecret.from_text(SECRET_TEXT))
    door = MetricsDoor(token, registry=CollectorRegistry())
    assert door.admits(f"Bearer {token}") and door.admits(f"bearer  {token} ")
    for header in (None, "", "Bearer", "Basic " + token, token):
        assert not door.admits(header)
        door.refuse(header)
    for header in (f"Bearer {token[:-1]}", f"Bearer {token}0", "Bearer spw_0000000000000000_" + "A" * 43):
        assert not door.admits(header)
        response = door.refuse(header)
        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (refused(door, "missing"), refused(door, "wrong")) == (5.0, 3.0)
    assert MetricsDoor(token, public=True).admits(None)
    assert not MetricsDoor(None).admits("Bearer ")


# --- the master (and serve): the real API app ------------------------------------------------------


def mint(master: Master, role: str, tenant: str | None = None) -> tokens.NewToken:
    new = tokens.mint(role, tenant=tenant, created_at=2.0)
    master.store.add_token(new.record)
    return new


async def scrape(
    client: TestClient[Any, Any], credential: str | None, path: str = "/metrics"
) -> tuple[int, str]:
    headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
    resp = await client.get(path, headers=headers)
    return resp.status, await resp.text()


async def test_the_master_metrics_open_to_the_scrape_token_and_untenanted_api_tokens(master: Master) -> None:
    reader = mint(master, "reader")
    status, text = await scrape(master.client, scrape_token(master.secret))
    assert status == 200 and "sparrow_master_nodes" in text
    assert (await scrape(master.client, master.token))[0] == 200
    assert (await scrape(master.client, reader.plaintext))[0] == 200


async def test_the_master_metrics_refuse_none_wrong_revoked_and_tenant_tokens(master: Master) -> None:
    tenant = mint(master, "admin", tenant="team-a")
    revoked = mint(master, "admin")
    master.store.revoke_token(revoked.record.token_id, revoked_at=3.0)
    other_cluster = scrape_token(ClusterSecret.from_text(SECRET_TEXT))
    for credential in (None, "nonsense", other_cluster, revoked.plaintext):
        status, text = await scrape(master.client, credential)
        assert status == 401, credential
        assert "sparrow_" not in text and "\n" not in text.strip(), text  # one line, no metric
    assert (refused(master.door, "missing"), refused(master.door, "wrong")) == (1.0, 3.0)
    status, text = await scrape(master.client, tenant.plaintext)  # valid, but sees only its volumes
    assert status == 403 and "sparrow_" not in text


async def test_the_scrape_token_is_handed_to_an_admin_token_only(master: Master) -> None:
    status, text = await scrape(master.client, master.token, SCRAPE_TOKEN_ROUTE)
    assert status == 200 and scrape_token(master.secret) in text
    for role, tenant in (("operator", None), ("reader", None), ("admin", "team-a")):
        new = mint(master, role, tenant)
        status, text = await scrape(master.client, new.plaintext, SCRAPE_TOKEN_ROUTE)
        assert status == 403 and SCRAPE_PREFIX not in text
    for credential in (None, scrape_token(master.secret)):  # the scrape token opens /metrics only
        status, text = await scrape(master.client, credential, SCRAPE_TOKEN_ROUTE)
        assert status == 401 and SCRAPE_PREFIX not in text
        assert (await scrape(master.client, credential, "/v1/volumes"))[0] == 401


# --- a node: its real HTTP app ---------------------------------------------------------------------


@pytest.mark.parametrize("public", [False, True])
async def test_a_node_answers_its_metrics_to_the_scrape_token_only_unless_public(public: bool) -> None:
    secret = ClusterSecret.from_text(SECRET_TEXT)
    metrics = PrometheusMetrics()
    door = MetricsDoor.of(secret, public=public, registry=metrics.registry)
    node: Any = None  # /metrics never reads the node
    client: TestClient[Any, Any] = TestClient(TestServer(build_node_app(node, metrics, door)))
    await client.start_server()
    try:
        status, text = await scrape(client, scrape_token(secret))
        assert status == 200 and "sparrow_metrics_scrapes_refused_total" in text
        for credential in (
            None,
            "spw_0000000000000000_" + "A" * 43,
            scrape_token(ClusterSecret.from_text(b"x" * 40)),
        ):
            status, text = await scrape(client, credential)
            if public:
                assert status == 200
            else:
                assert status == 401 and "sparrow_" not in text, text
        assert refused(door, "missing") + refused(door, "wrong") == (0.0 if public else 3.0)
    finally:
        await client.close()


# --- /healthz: without names to anyone, in full behind the same door ------------------------------


def _names_nothing(text: str, *names: str) -> bool:
    return not [name for name in names if name in text]


async def test_the_master_healthz_names_nothing_without_a_credential_and_all_with_one(master: Master) -> None:
    master.node_reports("n1", 1)
    await master.json("POST", "/v1/volumes", {"name": "vol-hidden", "size": "1MiB"}, status=201)
    master.control.step(10.0)
    volume_id = master.store.volumes()[0].volume_id
    status, text = await scrape(master.client, None, "/healthz")
    assert status == 503 and _names_nothing(text, "vol-hidden", volume_id, "n1"), text
    assert json.loads(text) == {
        "status": "unhealthy",
        "reasons": ["1 volume not served"],
        "counts": {
            "volumes": 1, "volumes_not_served": 1, "tasks_failed": 0, "nodes": 1, "nodes_alive": 1,
            "volumes_paused": 0,
        },
    }  # fmt: skip
    reader = mint(master, "reader")
    for credential in (scrape_token(master.secret), master.token, reader.plaintext):
        status, text = await scrape(master.client, credential, "/healthz")
        assert status == 503 and json.loads(text)["volumes_not_served"][0]["name"] == "vol-hidden"
    assert refused(master.door, "missing") + refused(master.door, "wrong") == 0.0


async def test_the_master_healthz_refuses_a_wrong_credential_rather_than_answer_less(master: Master) -> None:
    await master.json("POST", "/v1/volumes", {"name": "vol-hidden", "size": "1MiB"}, status=201)
    tenant = mint(master, "admin", tenant="team-a")
    revoked = mint(master, "admin")
    master.store.revoke_token(revoked.record.token_id, revoked_at=3.0)
    other_cluster = scrape_token(ClusterSecret.from_text(SECRET_TEXT))
    for credential in ("nonsense", other_cluster, revoked.plaintext):
        status, text = await scrape(master.client, credential, "/healthz")
        assert status == 401 and "the full /healthz" in text and _names_nothing(text, "vol-hidden"), text
    resp = await master.client.get("/healthz", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (refused(master.door, "missing"), refused(master.door, "wrong")) == (1.0, 3.0)
    status, text = await scrape(master.client, tenant.plaintext, "/healthz")  # other tenants' names
    assert status == 403 and _names_nothing(text, "vol-hidden")


class _FakeNode:
    """What a node's /healthz reads: its full answer (the shape of Node.health)."""

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "reasons": [], "volumes_not_served": [], "tasks_failed": [],
            "node_id": "node-hidden", "incarnation": 1,
            "master": {"address": "10.9.8.7:3290", "connected": True, "last_error": None},
            "lease": {"valid": True, "remaining_seconds": 4.0}, "fences": 0, "last_error": None,
            "volumes": [{"volume_id": "ab" * 16, "name": "vol-hidden", "iqn": "iqn.x:vol-hidden",
                         "access_state": "active_optimized", "paused": False}],
            "offline": [],
        }  # fmt: skip


@pytest.mark.parametrize("public", [False, True])
async def test_a_nodes_healthz_names_nothing_without_the_scrape_token_unless_public(public: bool) -> None:
    secret = ClusterSecret.from_text(SECRET_TEXT)
    metrics = PrometheusMetrics()
    door = MetricsDoor.of(secret, public=public, registry=metrics.registry)
    app = build_node_app(cast(Node, _FakeNode()), metrics, door)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        status, text = await scrape(client, None, "/healthz")
        assert status == 200
        if public:  # the lab escape hatch opens the full answer too
            assert json.loads(text)["volumes"][0]["name"] == "vol-hidden"
        else:
            assert _names_nothing(text, "vol-hidden", "ab" * 16, "node-hidden", "10.9.8.7"), text
            assert json.loads(text)["counts"] == {
                "volumes": 1, "volumes_not_served": 0, "tasks_failed": 0, "fences": 0, "offline": 0,
            }  # fmt: skip
        status, text = await scrape(client, scrape_token(secret), "/healthz")
        assert status == 200 and json.loads(text)["volumes"][0]["name"] == "vol-hidden"
        other_cluster = scrape_token(ClusterSecret.from_text(b"x" * 40))
        for credential in ("spw_0000000000000000_" + "A" * 43, other_cluster):
            status, text = await scrape(client, credential, "/healthz")
            if public:
                assert status == 200
            else:
                assert status == 401 and _names_nothing(text, "vol-hidden"), text
        assert refused(door, "wrong") == (0.0 if public else 2.0)
    finally:
        await client.close()


# --- sparrow metrics token ------------------------------------------------------------------------


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_metrics_token_reads_the_secret_as_the_daemons_do(tmp_path: Path) -> None:
    secret_file = tmp_path / "cluster.secret"
    generate_cluster_secret(secret_file)
    expected = scrape_token(load_cluster_secret(secret_file)) + "\n"
    assert run("metrics", "token", "--cluster-secret-file", str(secret_file)) == (0, expected, "")
    assert run("metrics", "token", "--data-dir", str(tmp_path)) == (0, expected, "")  # serve's own
    config = tmp_path / "sparrow.toml"
    config.write_text(f'data_dir = "{tmp_path / "elsewhere"}"\ncluster_secret_file = "{secret_file}"\n')
    assert run("metrics", "token", "--config", str(config)) == (0, expected, "")


def test_metrics_token_without_a_secret_is_one_line_and_makes_none(tmp_path: Path) -> None:
    code, out, err = run("metrics", "token", "--data-dir", str(tmp_path))
    assert code == 1 and out == "" and err.count("\n") == 1 and "does not exist" in err, err
    assert not (tmp_path / SERVE_SECRET_NAME).exists()
    code, _, err = run("metrics", "token")
    assert code == 2 and "one of the arguments" in err


# --- serve's config -------------------------------------------------------------------------------


def test_public_metrics_from_the_file_or_the_flag_and_locked_by_default(tmp_path: Path) -> None:
    assert load_config(None, Overrides(data_dir=str(tmp_path))).public_metrics is False
    assert load_config(None, Overrides(data_dir=str(tmp_path), public_metrics=True)).public_metrics is True
    path = tmp_path / "sparrow.toml"
    path.write_text("[http]\npublic_metrics = true\n")
    assert load_config(path, Overrides()).public_metrics is True
    path.write_text("[http]\npublic_metrics = 1\n")
    with pytest.raises(ConfigError, match="public_metrics must be true or false"):
        load_config(path, Overrides())
