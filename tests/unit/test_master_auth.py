"""sparrow.master.auth on the real API app (aiohttp test client, tmp_path AuthorityStore): 401 and
403 before any handler runs, tenants, the token routes, and backing for admins only. The same
verbs against real `sparrow serve` and `sparrow master` processes: tests/integration/test_auth.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sparrow.auth import tokens
from sparrow.cluster.authority import AuthorityStore
from sparrow.config import HostPort
from sparrow.master.auth import ROUTE_ACTIONS, bootstrap_admin
from tests.unit.test_master_api import Master

MiB = 1 << 20


async def as_(master: Master, token: str | None, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    resp = await master.client.request(method, path, json=body, headers=headers)
    data = await resp.json() if resp.content_type == "application/json" else await resp.text()
    if resp.status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    return resp.status, data


def mint(master: Master, role: str, tenant: str | None = None) -> str:
    new = tokens.mint(role, tenant=tenant, created_at=2.0)
    master.store.add_token(new.record)
    return new.plaintext


def names(master: Master) -> list[str]:
    return [v.name for v in master.store.volumes()]


async def test_only_healthz_and_openapi_are_public(master: Master) -> None:
    for path in ("/healthz", "/openapi.json"):
        assert (await as_(master, None, "GET", path))[0] in (200, 503)
    assert (await as_(master, None, "GET", "/metrics"))[0] == 401  # sparrow.metricsauth
    for method, path in [
        ("GET", "/v1/volumes"),
        ("GET", "/v1/nodes"),
        ("GET", "/v1/tokens"),
        ("GET", "/nope"),
    ]:
        status, body = await as_(master, None, method, path)
        assert status == 401 and "missing token" in body["error"]
    assert {m for m, _ in ROUTE_ACTIONS} <= {"GET", "POST", "PATCH", "DELETE"}


@pytest.mark.parametrize(
    "header",
    ["Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer spw_0000000000000000_" + "A" * 43, "Bearer not-a-token"],
)
async def test_a_wrong_token_is_401_and_changes_nothing(master: Master, header: str) -> None:
    resp = await master.client.post(
        "/v1/volumes", json={"name": "v", "size": "1MiB"}, headers={"Authorization": header}
    )
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="sparrow"'
    assert names(master) == []


async def test_a_revoked_token_stops_working_at_once(master: Master) -> None:
    operator = mint(master, "operator")
    assert (await as_(master, operator, "POST", "/v1/volumes", {"name": "a", "size": "1MiB"}))[0] == 201
    token_id = tokens.parse(operator)[0]
    assert (await as_(master, master.token, "DELETE", f"/v1/tokens/{token_id}"))[0] == 204
    status, _ = await as_(master, operator, "POST", "/v1/volumes", {"name": "b", "size": "1MiB"})
    assert status == 401 and names(master) == ["a"]
    assert (await as_(master, master.token, "DELETE", f"/v1/tokens/{token_id}"))[0] == 404


async def test_roles(master: Master) -> None:
    reader, operator = mint(master, "reader"), mint(master, "operator")
    await master.json("POST", "/v1/volumes", {"name": "v", "size": "1MiB"}, status=201)
    assert (await as_(master, reader, "GET", "/v1/volumes"))[0] == 200
    assert (await as_(master, reader, "GET", "/v1/volumes/v"))[0] == 200
    assert (await as_(master, reader, "GET", "/v1/nodes"))[0] == 200
    for method, path, body in [
        ("POST", "/v1/volumes", {"name": "w", "size": "1MiB"}),
        ("POST", "/v1/volumes/v/resize", {"size": "2MiB"}),
        ("DELETE", "/v1/volumes/v", None),
        ("GET", "/v1/tokens", None),
        ("POST", "/v1/tokens", {"role": "reader"}),
    ]:
        status, answer = await as_(master, reader, method, path, body)
        assert status == 403 and "needs" in answer["error"], (method, path)
    for method, path, body in [("GET", "/v1/tokens", None), ("POST", "/v1/tokens", {"role": "admin"})]:
        assert (await as_(master, operator, method, path, body))[0] == 403
    assert names(master) == ["v"] and master.store.volumes()[0].size == MiB
    assert len(master.store.tokens()) == 3
    assert (await as_(master, operator, "POST", "/v1/volumes/v/resize", {"size": "2MiB"}))[0] == 200
    assert (await as_(master, operator, "DELETE", "/v1/volumes/v"))[0] == 204


async def test_a_tenant_token_lists_sees_and_changes_only_its_prefix(master: Master) -> None:
    for name in ("team-a-db", "team-a-web", "team-b-db"):
        await master.json("POST", "/v1/volumes", {"name": name, "size": "1MiB"}, status=201)
    a = mint(master, "operator", tenant="team-a")
    status, listed = await as_(master, a, "GET", "/v1/volumes")
    assert status == 200 and [v["name"] for v in listed["volumes"]] == ["team-a-db", "team-a-web"]
    assert (await as_(master, a, "GET", "/v1/volumes/team-a-db"))[0] == 200
    assert (await as_(master, a, "GET", "/v1/volumes/team-a-db/explain"))[0] == 200
    for method, path, body in [
        ("GET", "/v1/volumes/team-b-db", None),
        ("GET", "/v1/volumes/team-b-db/explain", None),
        ("POST", "/v1/volumes/team-b-db/resize", {"size": "2MiB"}),
        ("DELETE", "/v1/volumes/team-b-db", None),
        ("POST", "/v1/volumes", {"name": "team-b-new", "size": "1MiB"}),
        ("GET", "/v1/nodes", None),
    ]:
        status, answer = await as_(master, a, method, path, body)
        assert status == 403 and "tenant 'team-a'" in answer["error"], (method, path)
    assert names(master) == ["team-a-db", "team-a-web", "team-b-db"]
    assert all(v.size == MiB for v in master.store.volumes())
    assert (await as_(master, a, "POST", "/v1/volumes", {"name": "team-a-new", "size": "1MiB"}))[0] == 201
    tenant_admin = mint(master, "admin", tenant="team-a")
    assert (await as_(master, tenant_admin, "GET", "/v1/tokens"))[0] == 403  # tenants never manage tokens


async def test_token_routes(master: Master) -> None:
    status, made = await as_(
        master, master.token, "POST", "/v1/tokens", {"role": "reader", "tenant": "t", "name": "x"}
    )
    assert (
        status == 201
        and made["token"].startswith("spw_")
        and (made["role"], made["tenant"]) == ("reader", "t")
    )
    status, listed = await as_(master, master.token, "GET", "/v1/tokens")
    assert status == 200 and [t["id"] for t in listed["tokens"]][-1] == made["id"]
    assert all("token" not in t and "secret_sha256" not in t for t in listed["tokens"])
    assert (await as_(master, made["token"], "GET", "/v1/volumes"))[0] == 200
    for body in ({"role": "root"}, {"role": "reader", "tenant": "../x"}, {}, {"role": "admin", "extra": 1}):
        assert (await as_(master, master.token, "POST", "/v1/tokens", body))[0] == 400


async def test_backing_is_for_admins_and_only_under_the_allowed_prefixes(master: Master) -> None:
    operator = mint(master, "operator")
    body = {"name": "raw", "size": "1MiB", "backing": "/dev/sdz"}
    status, answer = await as_(master, operator, "POST", "/v1/volumes", body)
    assert status == 403 and "needs admin" in answer["error"]
    status, answer = await as_(
        master, master.token, "POST", "/v1/volumes", {**body, "backing": "/etc/shadow"}
    )
    assert status == 403 and "not under an allowed backing prefix (/dev)" in answer["error"]
    status, answer = await as_(
        master, master.token, "POST", "/v1/volumes", {**body, "backing": "/dev/../etc/x"}
    )
    assert status == 403
    assert names(master) == []
    assert (await as_(master, master.token, "POST", "/v1/volumes", body))[0] == 201


async def test_bootstrap_writes_an_admin_token_once(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "credentials.json"
    with AuthorityStore.open_in(tmp_path) as store:
        assert bootstrap_admin(store, HostPort("0.0.0.0", 3280), path=path) == path
        (record,) = store.tokens()
        store.revoke_token(record.token_id, revoked_at=3.0)
        assert bootstrap_admin(store, HostPort("0.0.0.0", 3280), path=path) is None  # once only
    assert record.role is tokens.Role.ADMIN
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    entry = json.loads(path.read_text())["apis"]["http://127.0.0.1:3280"]  # wildcard -> loopback
    assert tokens.verify(record, tokens.parse(entry["token"])[1]).role is tokens.Role.ADMIN
