"""Issue 7, findings 1 and 2, against real daemons on loopback: every API verb with the right,
a missing, a wrong, a revoked, a too-small-role and an other-tenant token, on `sparrow serve` and
on `sparrow master`, with the state checked after each refusal (nothing changed); backing paths
outside the allowed prefixes, through a symlink, of the wrong size, by a non-admin; the CLI finding
the bootstrap token by itself; `sparrow token` end to end; no plaintext token in the authority."""

from __future__ import annotations

import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sparrow.auth import tokens
from sparrow.master.auth import ROUTE_ACTIONS
from tests.integration.cluster import TIMING, Master, http_get
from tests.integration.daemon import Daemon
from tests.integration.process import Proc, admin_token, credentials_file, daemon_env
from tests.leaks import register_token
from tests.tools import run

pytestmark = pytest.mark.integration

MiB = 1 << 20


def call(api: str, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    """One request with ``Authorization: Bearer token`` (none when None): status and JSON answer."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as e:
        with e:
            raw, status = e.read(), e.code
            if status == 401:
                assert e.headers["WWW-Authenticate"].startswith("Bearer")
    return int(status), json.loads(raw) if raw else None


class Server:
    """A running daemon serving the master API, and the tokens of each kind the tests use."""

    def __init__(self, proc: Proc, api: str) -> None:
        self.proc = proc
        self.api = api
        self.tokens: dict[str, str] = {"admin": admin_token(proc.root, api)}  # the bootstrap token

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, answer = call(self.api, method, path, self.tokens["admin"], body)
        assert got == status, (method, path, got, answer)
        return answer

    def mint(self, kind: str, role: str, tenant: str | None = None) -> str:
        body = {"role": role, **({"tenant": tenant} if tenant else {})}
        made = self.ok("POST", "/v1/tokens", body, status=201)
        self.tokens[kind] = made["token"]
        register_token(made["token"], f"the {kind} token")  # minted over plain HTTP (tests/leaks.py)
        return str(made["id"])

    def state(self) -> Any:
        """What a refused request must not change: volumes (name, size), tokens in force, and
        the files of the data directory's volumes/."""
        volumes = sorted((v["name"], v["size"]) for v in self.ok("GET", "/v1/volumes")["volumes"])
        in_force = sorted(t["id"] for t in self.ok("GET", "/v1/tokens")["tokens"])
        files = (
            sorted(os.listdir(self.proc.data_dir / "volumes"))
            if (self.proc.data_dir / "volumes").exists()
            else []
        )
        return volumes, in_force, files


@pytest.fixture(params=["serve", "master"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    proc: Daemon | Master
    if request.param == "serve":
        proc = Daemon(tmp_path / "data", extra_args=("--allow-backing", str(tmp_path / "allowed")))
    else:
        proc = Master(tmp_path, TIMING)
    proc.start()
    try:
        yield Server(proc, proc.api)
    finally:
        if proc.running:
            assert proc.term() == 0, proc.log_tail()


def wrong_token() -> str:
    return f"spw_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def assert_refused(
    server: Server, method: str, path: str, body: Any, forbidden: Iterable[str], state: Callable[[], object]
) -> None:
    """No token, a wrong one and a revoked one get 401, each token kind in ``forbidden`` 403; each
    answer names the error and ``state()`` is the same afterwards."""
    before = state()
    refusals: list[tuple[str | None, int]] = [
        (None, 401),
        (wrong_token(), 401),
        (server.tokens["revoked"], 401),
        *((server.tokens[kind], 403) for kind in forbidden),
    ]
    for token, expected in refusals:
        got, answer = call(server.api, method, path, token, body)
        assert got == expected, (method, path, token and token[:20], got, answer)
        assert isinstance(answer["error"], str) and answer["error"]
        assert state() == before, f"{method} {path} changed something on a {expected}"


def test_every_verb_with_every_kind_of_token(server: Server) -> None:
    for name in ("team-a-vol", "team-b-vol"):
        server.ok("POST", "/v1/volumes?wait=10", {"name": name, "size": "1MiB"}, status=201)
    server.mint("operator", "operator")
    server.mint("reader", "reader")
    server.mint("tenant", "operator", tenant="team-a")
    server.mint("tenant_admin", "admin", tenant="team-a")
    revoked_id = server.mint("revoked", "admin")
    server.ok("DELETE", f"/v1/tokens/{revoked_id}", status=204)
    victim = server.mint("victim", "reader")

    verbs: list[tuple[str, str, Any, str, int, tuple[str, ...]]] = [
        # method, path, body, the least token that may, its status, the tokens that get 403
        (
            "POST",
            "/v1/volumes?wait=10",
            {"name": "team-b-new", "size": "1MiB"},
            "operator",
            201,
            ("reader", "tenant"),
        ),
        ("GET", "/v1/volumes", None, "reader", 200, ()),
        ("GET", "/v1/volumes/team-b-vol", None, "reader", 200, ("tenant",)),
        (
            "POST",
            "/v1/volumes/team-b-vol/resize?wait=10",
            {"size": "2MiB"},
            "operator",
            200,
            ("reader", "tenant"),
        ),
        ("GET", "/v1/nodes", None, "reader", 200, ("tenant", "tenant_admin")),
        (
            "DELETE",
            "/v1/nodes/no-such-node",
            None,
            "admin",
            404,
            ("operator", "reader", "tenant", "tenant_admin"),
        ),
        ("GET", "/v1/tokens", None, "admin", 200, ("operator", "tenant_admin")),
        ("POST", "/v1/tokens", {"role": "reader"}, "admin", 201, ("operator", "reader", "tenant_admin")),
        ("DELETE", f"/v1/tokens/{victim}", None, "admin", 204, ("operator", "tenant_admin")),
        ("DELETE", "/v1/volumes/team-b-vol", None, "operator", 204, ("reader", "tenant")),
    ]
    for method, path, body, allowed, status, forbidden in verbs:
        assert_refused(server, method, path, body, forbidden, server.state)
        got, answer = call(server.api, method, path, server.tokens[allowed], body)
        assert got == status, (method, path, allowed, got, answer)

    volumes, in_force, _ = server.state()
    assert volumes == [("team-a-vol", MiB), ("team-b-new", MiB)]  # resized to 2 MiB, then deleted
    assert victim not in in_force
    assert call(server.api, "GET", "/v1/volumes", server.tokens["victim"])[0] == 401  # revoked: at once

    # A tenant lists only its own volumes, and may change them.
    got, listed = call(server.api, "GET", "/v1/volumes", server.tokens["tenant"])
    assert got == 200 and [v["name"] for v in listed["volumes"]] == ["team-a-vol"]
    assert (
        call(
            server.api,
            "POST",
            "/v1/volumes?wait=0",
            server.tokens["tenant"],
            {"name": "team-a-2", "size": "1MiB"},
        )[0]
        == 201
    )
    assert call(server.api, "GET", "/v1/volumes/team-a-2", server.tokens["tenant"])[0] == 200
    # /healthz needs no token (it may be 503 while the new volume is placed); /metrics needs one
    # with no tenant, or the scrape token (sparrow.metricsauth; tests/integration/test_metrics_door.py).
    assert call(server.api, "GET", "/healthz", None)[0] in (200, 503)
    assert http_get(server.api + "/metrics")[0] == 401
    assert call(server.api, "GET", "/metrics", server.tokens["tenant"])[0] == 403


def test_the_authority_holds_no_plaintext_token(server: Server) -> None:
    server.mint("operator", "operator", tenant="x")
    server.proc.term()
    stored = b"".join(p.read_bytes() for p in server.proc.data_dir.glob("authority.sqlite3*"))
    assert len(server.tokens) == 2
    for token in server.tokens.values():
        assert token.encode() not in stored
        assert tokens.parse(token)[1].encode() not in stored  # nor the secret alone


def test_the_cli_finds_the_bootstrap_token_by_itself(server: Server, tmp_path: Path) -> None:
    path = credentials_file(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    env = daemon_env(tmp_path)
    cli = [sys.executable, "-m", "sparrow"]
    out = run(
        [*cli, "volume", "create", "cli-vol", "--size", "1MiB", "--wait", "0", "--api", server.api], env=env
    )
    assert "cli-vol" in out.stdout
    # Another user (another config home) has no token: 401 in one line, nothing created.
    other = dict(env, XDG_CONFIG_HOME=str(tmp_path / "someone-else"))
    refused = run(
        [*cli, "volume", "create", "x", "--size", "1MiB", "--api", server.api], env=other, check=False
    )
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("sparrow: error: missing token")
    assert [v[0] for v in server.state()[0]] == ["cli-vol"]
    # A restart does not mint another bootstrap token.
    server.proc.term()
    server.proc.start()
    assert len(server.ok("GET", "/v1/tokens")["tokens"]) == 1


def test_token_commands_end_to_end(server: Server, tmp_path: Path) -> None:
    env = daemon_env(tmp_path)
    cli = [sys.executable, "-m", "sparrow", "token"]
    made = run([*cli, "create", "--role", "reader", "--name", "dash", "--api", server.api], env=env)
    token = made.stdout.strip()
    assert token.startswith("spw_") and "shown once" in made.stderr
    listed = json.loads(run([*cli, "list", "--json", "--api", server.api], env=env).stdout)
    assert [(t["role"], t["name"]) for t in listed] == [("admin", "bootstrap"), ("reader", "dash")]
    volume = [sys.executable, "-m", "sparrow", "volume"]
    assert run([*volume, "list", "--api", server.api, "--token", token], env=env).stdout == "no volumes\n"
    denied = run(
        [*volume, "create", "v", "--size", "1M", "--api", server.api, "--token", token], env=env, check=False
    )
    assert denied.returncode == 1 and denied.stderr.count("\n") == 1 and "needs operator" in denied.stderr
    run([*cli, "revoke", listed[1]["id"], "--api", server.api], env=env)
    gone = run([*volume, "list", "--api", server.api], env=dict(env, SPARROW_TOKEN=token), check=False)
    assert gone.returncode == 1 and gone.stderr.startswith("sparrow: error: invalid or revoked token")


def test_lost_bootstrap_token_recovery_offline(server: Server, tmp_path: Path) -> None:
    """`sparrow token create --data-dir DIR --role admin` with the daemon stopped: a new admin token."""
    env = daemon_env(tmp_path)
    busy = run([sys.executable, "-m", "sparrow", "token", "create", "--role", "admin", "--data-dir",
                str(server.proc.data_dir)], env=env, check=False)  # fmt: skip
    assert busy.returncode == 1 and "stop the daemon first" in busy.stderr
    server.proc.term()
    made = run([sys.executable, "-m", "sparrow", "token", "create", "--role", "admin", "--data-dir",
                str(server.proc.data_dir)], env=env)  # fmt: skip
    server.proc.start()
    assert call(server.api, "GET", "/v1/tokens", made.stdout.strip())[0] == 200


# --- backing paths (finding 1) ----------------------------------------------------------------


def test_backing_only_for_admins_under_allowed_prefixes_never_grown(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    secret = outside / "secret.img"
    secret.write_bytes(b"\x11" * MiB)
    (allowed / "escape.img").symlink_to(secret)
    small = allowed / "small.img"
    small.write_bytes(b"\x22" * MiB)
    daemon = Daemon(tmp_path / "data", extra_args=("--allow-backing", str(allowed)))
    daemon.start()
    try:
        server = Server(daemon, daemon.api)
        server.mint("operator", "operator")
        before = server.state()
        admin = server.tokens["admin"]
        cases = [
            (admin, {"name": "a", "backing": str(secret)}, 403, "not under an allowed backing prefix"),
            (admin, {"name": "b", "backing": str(allowed / "escape.img")}, 403, "resolves to"),
            (
                admin,
                {"name": "c", "backing": str(allowed / ".." / "outside" / "secret.img")},
                403,
                "not under",
            ),
            (admin, {"name": "d", "backing": str(small), "size": "2MiB"}, 400, "needs exactly"),  # grow it?
            (admin, {"name": "e", "backing": str(small), "size": "512KiB"}, 400, "needs exactly"),
            (
                admin,
                {"name": "f", "backing": str(allowed / "absent.img"), "size": "1MiB"},
                400,
                "No such file",
            ),
            (server.tokens["operator"], {"name": "g", "backing": str(small)}, 403, "needs admin"),
        ]
        for token, body, status, fragment in cases:
            got, answer = call(daemon.api, "POST", "/v1/volumes", token, body)
            assert (got, fragment in answer["error"]) == (status, True), (body, answer)
            assert server.state() == before
        assert secret.read_bytes() == b"\x11" * MiB and small.read_bytes() == b"\x22" * MiB
        assert not (allowed / "absent.img").exists()

        # Exactly its size (or no size: the file's own) is fine; it is never resized.
        created = server.ok("POST", "/v1/volumes?wait=10", {"name": "raw", "backing": str(small)}, status=201)
        assert (created["size"], created["served"]) == (MiB, True)
        got, answer = call(daemon.api, "POST", "/v1/volumes/raw/resize", admin, {"size": "2MiB"})
        assert got == 400 and "never resized" in answer["error"]
        assert small.stat().st_size == MiB
    finally:
        assert daemon.term() == 0, daemon.log_tail()
    assert small.read_bytes() == b"\x22" * MiB


@pytest.mark.parametrize("kind", ["serve", "master"])
def test_by_default_every_backing_is_refused(kind: str, tmp_path: Path) -> None:
    proc: Daemon | Master = Daemon(tmp_path / "data") if kind == "serve" else Master(tmp_path, TIMING)
    proc.start()
    try:
        server = Server(proc, proc.api)
        path = tmp_path / "file.img"
        path.write_bytes(bytes(MiB))
        body = {"name": "x", "backing": str(path), "size": "1MiB"}
        got, answer = call(server.api, "POST", "/v1/volumes", server.tokens["admin"], body)
        assert got == 403 and "none are allowed" in answer["error"]
        assert server.state()[0] == []
    finally:
        assert proc.term() == 0, proc.log_tail()


# --- every route of the table (sparrow.master.auth.ROUTE_ACTIONS) ------------------------------

#: A body each route would accept from a token allowed to send it.
ROUTE_BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/volumes"): {"name": "team-b-new", "size": "1MiB"},
    ("POST", "/v1/volumes/{name}/resize"): {"size": "2MiB"},
    ("PATCH", "/v1/volumes/{name}"): {"chap_user": "intruder", "chap_secret": "intruder-secret-12"},
    ("PATCH", "/v1/cluster"): {
        "discovery_chap_user": "intruder",
        "discovery_chap_secret": "intruder-secret-12",
    },
    ("POST", "/v1/tokens"): {"role": "admin"},
}


def test_every_route_refuses_a_missing_wrong_revoked_too_small_or_other_tenant_token(server: Server) -> None:
    """Each route of the table, on a real daemon, with the tokens that may not use it: 401 or
    403, and nothing changed (volumes with their CHAP and pause, the cluster's discovery CHAP,
    nodes, tokens). Which token gets 403 is derived from the one rule table
    (sparrow.auth.tokens.authorize), so a route added to ROUTE_ACTIONS is covered here too."""
    server.ok("POST", "/v1/volumes?wait=10", {"name": "team-b-vol", "size": "1MiB"}, status=201)
    kinds = {
        "reader": ("reader", None),
        "operator": ("operator", None),
        "tenant": ("operator", "team-a"),
        "tenant_admin": ("admin", "team-a"),
    }
    principals = {
        kind: tokens.Principal(server.mint(kind, role, tenant), tokens.Role(role), tenant)
        for kind, (role, tenant) in kinds.items()
    }
    revoked_id = server.mint("revoked", "admin")
    server.ok("DELETE", f"/v1/tokens/{revoked_id}", status=204)
    victim = server.mint("victim", "reader")

    def state() -> Any:
        volumes = server.ok("GET", "/v1/volumes")["volumes"]
        shown = sorted((v["name"], v["size"], v.get("chap_user"), v.get("paused")) for v in volumes)
        nodes = sorted(n["node_id"] for n in server.ok("GET", "/v1/nodes")["nodes"])
        return server.state(), shown, nodes, server.ok("GET", "/v1/cluster")

    for (method, route), action in sorted(ROUTE_ACTIONS.items()):
        path = route.format(name="team-b-vol", node_id="no-such-node", id=victim)
        body = ROUTE_BODIES.get((method, route))
        if method in ("POST", "PATCH") and body is None:
            body = {}
        named = "team-b-vol" if "{name}" in route else (body or {}).get("name")
        forbidden = []
        for kind, principal in principals.items():
            try:
                tokens.authorize(principal, action, named)
            except tokens.Forbidden:
                forbidden.append(kind)
        assert_refused(server, method, path, body, forbidden, state)
