"""The master API's OpenAPI document (sparrow.master.openapi) and the checker of its traffic
(sparrow.master.openapi_check): the checked-in file is current and valid, every route is in it and
everything in it is a route, and the checker finds what it should without quoting a value."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from openapi_spec_validator import OpenAPIV31SpecValidator

from sparrow.auth import tokens
from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.lease import LeaseConfig
from sparrow.master import api as master_api
from sparrow.master import openapi, openapi_check
from sparrow.master.api import MasterApi, MasterMetrics, build_app
from sparrow.master.control import restore
from sparrow.master.openapi_check import OpenApiValidator

DOC: dict[str, Any] = json.loads(openapi.checked_in())


def _app(data_dir: Path) -> tuple[web.Application, str]:
    """The master's app on a fresh authority, and an admin token for it."""
    store = AuthorityStore.open_in(data_dir)
    admin = tokens.mint("admin", created_at=1.0)
    store.add_token(admin.record)
    control = restore(store, LeaseConfig(), 10.0)
    metrics = MasterMetrics()
    metrics.bind(control, lambda: 10.0)
    return build_app(MasterApi(control=control, metrics=metrics, clock=lambda: 10.0)), admin.plaintext


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    app, _ = _app(tmp_path)
    async with TestClient(TestServer(app)) as c:
        yield c


# --- the document ------------------------------------------------------------------------------


def test_the_checked_in_document_is_what_the_module_builds() -> None:
    assert openapi.checked_in() == openapi.render(), "stale: run `make openapi`"
    assert openapi.main(["--check"]) == 0


def test_the_document_is_a_valid_openapi_3_1_document() -> None:
    errors = [e.message for e in OpenAPIV31SpecValidator(DOC).iter_errors()]
    assert errors == []
    assert DOC["openapi"].startswith("3.1")


def test_every_registered_route_is_documented_and_every_documented_route_is_registered(
    tmp_path: Path,
) -> None:
    app, _ = _app(tmp_path)
    registered = openapi.registered_routes(app)
    documented = openapi.documented_routes(DOC)
    assert registered - documented == set(), "routes missing from the document (sparrow.master.openapi)"
    assert documented - registered == set(), "documented routes the app does not have"
    assert ("GET", "/openapi.json") in registered


def test_a_route_added_without_documentation_is_found(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)

    async def snapshot(request: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_post("/v1/volumes/{name}/snapshot", snapshot)
    assert openapi.registered_routes(app) - openapi.documented_routes(DOC) == {
        ("POST", "/v1/volumes/{name}/snapshot")
    }


def test_what_the_code_defines_is_taken_from_it() -> None:
    """Spot checks of the derived parts (the whole is checked by the first test)."""
    schemas = DOC["components"]["schemas"]
    assert schemas["Volume"]["properties"]["status_kind"]["enum"][:-1] == [
        k.value for k in master_api.StatusKind
    ]
    wait = DOC["components"]["parameters"]["Wait"]["schema"]
    assert wait["maximum"] == master_api.MAX_WAIT
    drain = DOC["paths"]["/v1/nodes/{node_id}/drain"]["post"]
    assert drain["x-sparrow-action"] == "node.drain"
    assert drain["x-sparrow-audit-verb"] == "node.drain"
    assert DOC["paths"]["/openapi.json"]["get"]["security"] == []
    health = DOC["paths"]["/healthz"]["get"]  # public; a credential is optional and opens the full answer
    assert health["security"] == [{}, {"bearer": []}]
    assert health["x-sparrow-action"] == "metrics.read"
    assert set(health["responses"]) == {"200", "401", "403", "503"}
    assert "security" not in DOC["paths"]["/v1/volumes"]["get"]  # the document's default: bearer
    assert set(DOC["paths"]["/v1/volumes"]["post"]["responses"]) >= {"201", "400", "401", "403", "409", "503"}


async def test_openapi_json_is_served_without_a_token(client: TestClient[Any, Any]) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.read() == openapi.checked_in()
    assert (await client.get("/v1/volumes")).status == 401  # the others still need one


# --- the checker -------------------------------------------------------------------------------

VALIDATOR = OpenApiValidator(DOC)
TOKEN = "spw_0123456789abcdef_" + "x" * 43
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _problems(
    method: str, path: str, answer: web.Response, body: dict[str, Any] | None = None, *, auth: bool = True
) -> list[str]:
    raw = None if body is None else json.dumps(body).encode()
    headers = {**(BEARER if auth else {}), **({"Content-Type": "application/json"} if raw else {})}
    request = make_mocked_request(method, path, headers=headers)
    return VALIDATOR.problems(request, raw, answer)


def _token(**changes: Any) -> dict[str, Any]:
    return {
        "id": "0123456789abcdef",
        "role": "reader",
        "tenant": None,
        "name": None,
        "created_at": 1.0,
        "revoked_at": None,
        **changes,
    }


def test_an_answer_the_document_describes_passes() -> None:
    assert _problems("GET", "/v1/tokens", web.json_response({"tokens": [_token()]})) == []
    assert _problems("GET", "/v1/volumes/nope", web.json_response({"error": "no"}, status=404)) == []
    challenge = {"WWW-Authenticate": 'Bearer realm="sparrow"'}
    refused = web.json_response({"error": "who?"}, status=401, headers=challenge)
    assert _problems("GET", "/v1/volumes", refused, auth=False) == []
    assert _problems("DELETE", "/v1/tokens/0123456789abcdef", web.Response(status=204)) == []


def test_an_undocumented_field_status_or_shape_is_a_violation() -> None:
    [extra] = _problems("GET", "/v1/tokens", web.json_response({"tokens": [_token(paused=True)]}))
    assert "$.tokens[0]" in extra and "'paused' was unexpected" in extra
    [missing] = _problems("GET", "/v1/tokens", web.json_response({"tokens": [{"id": "0123456789abcdef"}]}))
    assert "'role' is a required property" in missing
    [status] = _problems("GET", "/v1/volumes", web.json_response({"error": "boom"}, status=500))
    assert "500" in status
    [challenge] = _problems(
        "GET", "/v1/volumes", web.json_response({"error": "who?"}, status=401), auth=False
    )
    assert "WWW-Authenticate" in challenge
    [enum] = _problems("GET", "/v1/tokens", web.json_response({"tokens": [_token(role="root")]}))
    assert "$.tokens[0].role" in enum and "enum" in enum


def test_success_for_a_request_the_document_refuses_is_a_violation() -> None:
    body = {"name": "Not-A-Name", "size": "1MiB"}
    refused = web.json_response({"error": "name"}, status=400)
    assert _problems("POST", "/v1/volumes", refused, body) == []
    problems = _problems("POST", "/v1/volumes", web.json_response({"error": "x"}, status=201), body)
    assert any("answered 201 to a request the document refuses" in p for p in problems)
    no_token = _problems("GET", "/v1/tokens", web.json_response({"tokens": []}), auth=False)
    assert any("refuses" in p for p in no_token)


def test_a_violation_never_quotes_a_value() -> None:
    secret = "TOPSECRET-CHAP"
    body = {"name": "vol1", "size": 1, "chap_user": "u", "chap_secret": secret, "bogus": secret}
    problems = _problems("POST", "/v1/volumes", web.json_response({"error": "x"}, status=201), body)
    problems += _problems(
        "POST", "/v1/tokens", web.json_response(_token(id=secret, token=secret), status=201)
    )
    problems += _problems("GET", "/v1/tokens", web.json_response({"tokens": [_token(name=[secret])]}))
    assert len(problems) >= 3
    assert not [p for p in problems if secret in p]


@pytest.mark.openapi_violations_expected
async def test_the_middleware_logs_and_counts_a_violation_and_sends_the_answer_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    narrower = copy.deepcopy(DOC)
    health = narrower["components"]["schemas"]["Health"]
    del health["properties"]["nodes_alive"]
    health["required"].remove("nodes_alive")
    path = tmp_path / "narrower.json"
    path.write_text(json.dumps(narrower))
    monkeypatch.setenv(openapi_check.VALIDATE_ENV, str(path))
    (tmp_path / "data").mkdir()
    app, token = _app(tmp_path / "data")
    before = openapi_check.count()
    async with TestClient(TestServer(app)) as c:
        response = await c.get("/healthz", headers={"Authorization": f"Bearer {token}"})  # in full
        assert response.status == 200 and (await response.json())["nodes_alive"] == 0
        assert openapi_check.count() == before + 1
        assert (await c.get("/v1/tokens", headers={"Authorization": f"Bearer {token}"})).status == 200
        assert openapi_check.count() == before + 1


def test_without_the_variable_there_is_no_checker_and_no_openapi_core(tmp_path: Path) -> None:
    code = f"""
import sys
from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.lease import LeaseConfig
from sparrow.master.api import MasterApi, MasterMetrics, build_app
from sparrow.master.control import restore
control = restore(AuthorityStore.open_in({str(tmp_path)!r}), LeaseConfig(), 10.0)
app = build_app(MasterApi(control=control, metrics=MasterMetrics(), clock=lambda: 10.0))
assert len(app.middlewares) == 2, app.middlewares
assert not [m for m in sys.modules if m.startswith("openapi_core")], "imported"
"""
    env = {k: v for k, v in os.environ.items() if k != openapi_check.VALIDATE_ENV}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)
    assert openapi_check.enabled({openapi_check.VALIDATE_ENV: "1"})
    assert not openapi_check.enabled({openapi_check.VALIDATE_ENV: "0"})
    assert not openapi_check.enabled({})
