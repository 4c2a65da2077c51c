"""sparrow.cli error paths: one line on stderr, exit 1 (2 for usage), never a traceback."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from sparrow.cli import main
from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.lease import LeaseConfig
from sparrow.config import HostPort
from sparrow.master.api import MasterApi, MasterMetrics, build_app
from sparrow.master.auth import bootstrap_admin
from sparrow.master.control import restore

BASE = "iqn.2026-11.io.sparrow"


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback URL where nothing listens: the port is bound (so nobody else takes it) but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, f"expected one line, got {text!r}"
    assert "Traceback" not in text
    return text.rstrip("\n")


@pytest.mark.parametrize(
    "argv",
    [
        ("volume", "list"),
        ("volume", "list", "--json"),
        ("volume", "inspect", "vol1"),
        ("volume", "create", "vol1", "--size", "64MiB"),
        ("volume", "resize", "vol1", "--size", "1G"),
        ("volume", "delete", "vol1"),
    ],
)
def test_daemon_unreachable(dead_url: str, argv: tuple[str, ...]) -> None:
    code, out, err = run(*argv, "--api", dead_url)
    assert code == 1
    assert out == ""
    assert (
        one_line(err) == f"sparrow: error: cannot reach the Sparrow daemon at {dead_url}: connection refused"
    )


def test_api_url_from_environment(dead_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARROW_API", dead_url)
    code, _, err = run("volume", "list")
    assert code == 1
    assert dead_url in one_line(err)


def test_flag_beats_environment(dead_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARROW_API", "http://192.0.2.1:1")  # would time out, not refuse
    code, _, err = run("volume", "list", "--api", dead_url)
    assert code == 1
    assert one_line(err).endswith(f"{dead_url}: connection refused")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("volume", "create", "v", "--size", "12X"), "invalid size '12X'"),
        (("volume", "create", "v", "--size", "0"), "greater than zero"),
        (("volume", "create", "v", "--size", "64MB"), "ambiguous"),
        (("volume", "resize", "v", "--size=-1G"), "greater than zero"),
        (("volume", "create", "v"), "--size is required"),
        (("volume", "create", "v", "--size", "1M", "--block-size", "1000"), "invalid choice: 1000"),
        (("volume", "create", "v", "--size", "1M", "--chap-user", "u"), "--chap-user and --chap-secret"),
        (
            ("volume", "create", "v", "--size", "1M", "--chap-mutual-user", "m", "--chap-mutual-secret", "s"),
            "mutual CHAP needs --chap-user",
        ),
        (("volume", "resize", "v"), "--size"),
        (("volume", "frobnicate"), "invalid choice: 'frobnicate'"),
        (("volume",), "required"),
        ((), "required"),
    ],
)
def test_usage_errors(dead_url: str, argv: tuple[str, ...], fragment: str) -> None:
    code, out, err = (
        run(*argv, "--api", dead_url) if argv[:1] == ("volume",) and len(argv) > 1 else run(*argv)
    )
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith("sparrow")
    assert fragment in line
    assert "cannot reach" not in line  # refused before any request was made


@pytest.mark.parametrize("url", ["foo", "ftp://127.0.0.1:3280", "http://"])
def test_bad_api_url(url: str) -> None:
    code, _, err = run("volume", "list", "--api", url)
    assert code == 2
    assert one_line(err) == f"sparrow: error: invalid API URL {url!r}: expected http://HOST:PORT"


def test_serve_bad_flag_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run("serve", "--data-dir", str(tmp_path), "--iscsi", "0.0.0.0")
    assert code == 2
    assert one_line(err) == (
        "sparrow: error: invalid address '0.0.0.0' for --iscsi: missing port (expected HOST:PORT)"
    )


def test_serve_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sparrow.toml"
    path.write_text('[iscsi]\nlisten = "0.0.0.0:3260"\nport = 3260\n')
    code, _, err = run("serve", "--config", str(path))
    assert code == 1
    line = one_line(err)
    assert line.startswith(f"sparrow: error: {path}: unknown key 'iscsi.port'")


def test_serve_missing_config_file(tmp_path: Path) -> None:
    code, _, err = run("serve", "--config", str(tmp_path / "absent.toml"))
    assert code == 1
    assert "cannot read config file" in one_line(err)


def test_serve_bad_demo_volume(tmp_path: Path) -> None:
    code, _, err = run("serve", "--data-dir", str(tmp_path), "--demo-volume", "demo:lots")
    assert code == 2
    assert "invalid size 'lots'" in one_line(err)


# --- the CLI against the real API (aiohttp test server, real VolumeManager in tmp_path) ----------


@pytest.fixture
async def api_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The master's API (``sparrow serve`` and ``sparrow master`` both serve it) with no node: the
    CLI's requests and answers end to end; nothing is placed, so creates pass ``--wait 0``. The
    bootstrap admin token is in a credentials file of the test's own (``$SPARROW_CREDENTIALS``)."""
    store = AuthorityStore.open_in(tmp_path)
    control = restore(store, LeaseConfig(), 100.0)
    api = MasterApi(control=control, metrics=MasterMetrics(), clock=lambda: 100.0, base_iqn=BASE)
    server = TestServer(build_app(api))
    await server.start_server()
    monkeypatch.delenv("SPARROW_TOKEN", raising=False)
    monkeypatch.setenv("SPARROW_CREDENTIALS", str(tmp_path / "credentials.json"))
    bootstrap_admin(store, HostPort(server.host, server.port or 0))
    yield str(server.make_url("")).rstrip("/")
    await server.close()
    store.close()


async def cli(*argv: str) -> tuple[int, str, str]:
    """The blocking CLI runs in a thread so the server keeps serving on this loop."""
    return await asyncio.to_thread(run, *argv)


async def test_create_list_inspect_resize_delete(api_url: str) -> None:
    code, out, err = await cli("volume", "create", "vol1", "--size", "64MiB", "--wait", "0", "--api", api_url)
    assert (code, err) == (0, "")
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["iqn"].strip() == "iqn.2026-11.io.sparrow:vol1"
    assert lines["url"].strip() == "-" and lines["epoch"].strip() == "0"  # no node: not placed
    code, out, err = await cli(
        "volume",
        "create",
        "big",
        "--size",
        "1.5GiB",
        "--block-size",
        "4096",
        "--chap-user",
        "u",
        "--chap-secret",
        "secret-12345",
        "--wait",
        "0",
        "--api",
        api_url,
    )
    assert code == 0
    assert "chap:       user u" in out and "secret-12345" not in out

    code, out, _ = await cli("volume", "pause", "big", "--wait", "0", "--api", api_url)
    assert (code, out) == (0, "volume big paused\n")
    code, out, _ = await cli("volume", "list", "--api", api_url)
    assert code == 0
    assert out.splitlines() == [
        "NAME  SIZE     BLOCK  IQN                          PAUSED",
        "big   1.5 GiB  4096   iqn.2026-11.io.sparrow:big   yes",
        "vol1  64 MiB   512    iqn.2026-11.io.sparrow:vol1  no",
    ]
    code, out, _ = await cli("volume", "resume", "big", "--wait", "0", "--api", api_url)
    assert (code, out) == (0, "volume big serving\n")

    code, out, _ = await cli("volume", "inspect", "vol1", "--api", api_url)
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["size"].strip() == "64 MiB (67108864 bytes)"
    assert lines["iqn"].strip() == "iqn.2026-11.io.sparrow:vol1"
    assert (
        lines["serial"].strip()
        == json.loads((await cli("volume", "inspect", "vol1", "--json", "--api", api_url))[1])["serial"]
    )

    code, out, _ = await cli("volume", "inspect", "vol1", "--json", "--api", api_url)
    assert code == 0 and json.loads(out)["size"] == 64 * 1024**2

    code, out, _ = await cli("volume", "resize", "vol1", "--size", "128M", "--wait", "0", "--api", api_url)
    assert (code, out) == (0, "volume vol1 is now 128 MiB (134217728 bytes)\n")

    code, out, _ = await cli("volume", "delete", "vol1", "--api", api_url)
    assert (code, out) == (0, "deleted volume vol1\n")
    code, out, _ = await cli("volume", "list", "--json", "--api", api_url)
    assert [v["name"] for v in json.loads(out)] == ["big"]


async def test_daemon_errors_are_one_line(api_url: str) -> None:
    first = await cli("volume", "create", "dup", "--size", "1M", "--wait", "0", "--json", "--api", api_url)
    assert first[0] == 0
    # A retried create with the same parameters answers with the volume (idempotent).
    again = await cli("volume", "create", "dup", "--size", "1M", "--wait", "0", "--json", "--api", api_url)
    assert again[0] == 0 and json.loads(again[1])["volume_id"] == json.loads(first[1])["volume_id"]
    code, out, err = await cli("volume", "create", "dup", "--size", "2M", "--wait", "0", "--api", api_url)
    assert (code, out) == (1, "")
    assert one_line(err) == (
        "sparrow: error: volume dup exists with other parameters: size is 1048576 (1 MiB), "
        "asked 2097152 (2 MiB)"
    )

    code, _, err = await cli("volume", "inspect", "ghost", "--api", api_url)
    assert code == 1 and one_line(err) == "sparrow: error: no volume named 'ghost'"

    code, _, err = await cli("volume", "resize", "dup", "--size", "512K", "--api", api_url)
    assert code == 1 and "volumes only grow" in one_line(err)

    code, _, err = await cli("volume", "create", "Bad_Name", "--size", "1M", "--wait", "0", "--api", api_url)
    assert code == 1 and "not a volume name: 'Bad_Name'" in one_line(err)


async def test_empty_list(api_url: str) -> None:
    assert await cli("volume", "list", "--api", api_url) == (0, "no volumes\n", "")


async def test_not_the_sparrow_api(api_url: str) -> None:
    code, _, err = await cli("volume", "list", "--api", api_url + "/metrics-and-more")
    assert code == 1
    assert one_line(err).startswith("sparrow: error: no such endpoint: GET /metrics-and-more/v1/volumes")


# --- tokens ---------------------------------------------------------------------------------------


async def test_token_commands_end_to_end(api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = await cli("token", "create", "--role", "reader", "--tenant", "team-a", "--api", api_url)
    assert code == 0 and out.startswith("spw_") and out.count("\n") == 1 and "shown once" in one_line(err)
    reader = out.strip()
    code, out, _ = await cli("token", "list", "--json", "--api", api_url)
    listed = json.loads(out)
    assert [(t["role"], t["tenant"]) for t in listed] == [("admin", None), ("reader", "team-a")]
    assert reader not in out

    code, out, err = await cli("volume", "list", "--api", api_url, "--token", reader)
    assert (code, out, err) == (0, "no volumes\n", "")
    code, out, err = await cli(
        "volume", "create", "team-a-x", "--size", "1M", "--api", api_url, "--token", reader
    )
    assert code == 1 and "needs operator" in one_line(err)
    code, _, err = await cli("token", "list", "--api", api_url, "--token", reader)
    assert code == 1 and "may not token.manage" in one_line(err)

    code, out, _ = await cli("token", "revoke", listed[1]["id"], "--api", api_url)
    assert (code, out) == (0, f"revoked token {listed[1]['id']}\n")
    monkeypatch.setenv("SPARROW_TOKEN", reader)  # the environment beats the credentials file
    code, _, err = await cli("volume", "list", "--api", api_url)
    assert code == 1
    assert one_line(err) == (
        "sparrow: error: invalid or revoked token (token refused: give --token, set $SPARROW_TOKEN or "
        "add it to the credentials file)"
    )


async def test_without_a_token_the_cli_says_so_in_one_line(
    api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARROW_CREDENTIALS", str(tmp_path / "none.json"))
    monkeypatch.setattr("sparrow.auth.credentials.SYSTEM_CREDENTIALS", tmp_path / "none-either.json")
    code, out, err = await cli("volume", "create", "v", "--size", "1M", "--api", api_url)
    assert (code, out) == (1, "")
    assert one_line(err).startswith(
        "sparrow: error: missing token (send Authorization: Bearer <token>) (no token found"
    )


def test_token_create_offline_takes_the_lock_and_prints_a_working_token(tmp_path: Path) -> None:
    AuthorityStore.open_in(tmp_path).close()
    code, out, err = run("token", "create", "--role", "admin", "--data-dir", str(tmp_path), "--json")
    assert code == 0, err
    made = json.loads(out)
    with AuthorityStore.open_in(tmp_path) as store:
        record = store.token(made["id"])
    from sparrow.auth import tokens

    assert record is not None and tokens.verify(record, tokens.parse(made["token"])[1]).role == "admin"
    from store.lock import DataDirLock

    lock = DataDirLock(tmp_path)
    lock.acquire()
    try:
        code, out, err = run("token", "create", "--role", "admin", "--data-dir", str(tmp_path))
        assert code == 1 and "stop the daemon first" in one_line(err)
    finally:
        lock.release()


async def test_volume_update_reads_secrets_from_files_and_its_errors_are_one_line(
    api_url: str, tmp_path: Path
) -> None:
    assert (await cli("volume", "create", "u1", "--size", "1M", "--wait", "0", "--api", api_url))[0] == 0
    secret = tmp_path / "secret"
    secret.write_text("file-secret-123\nignored second line\n")
    code, out, err = await cli(
        "volume", "update", "u1", "--chap-user", "bob", "--chap-secret-file", str(secret), "--api", api_url
    )
    assert (code, out, err) == (0, "volume u1: chap user bob\n", "")
    code, out, _ = await cli("volume", "inspect", "u1", "--json", "--api", api_url)
    assert json.loads(out)["chap"] == {"user": "bob", "mutual_user": None} and "file-secret" not in out
    for argv, message in [
        (("--no-chap", "--chap-user", "x"), "sparrow volume update: error: --no-chap goes alone"),
        (("--chap-user", "x"), "give --chap-user and --chap-secret-file, or --no-chap"),
        (("--chap-user", "x", "--chap-secret-file", str(tmp_path / "none")), "No such file or directory"),
    ]:
        code, _, err = await cli("volume", "update", "u1", *argv, "--api", api_url)
        assert code != 0 and message in one_line(err), err
    code, _, err = await cli("volume", "update", "ghost", "--no-chap", "--api", api_url)
    assert code == 1 and one_line(err) == "sparrow: error: no volume named 'ghost'"
    code, out, _ = await cli("volume", "update", "u1", "--no-chap", "--api", api_url)
    assert (code, out) == (0, "volume u1: chap off\n")


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else() -> None:
    """An API address that answers a redirect (a proxy, a mistyped port, an attacker's listener)
    gets a one-line error; the bearer token is never sent to the Location (urllib would)."""
    import http.server
    import threading

    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"volumes": []}')

        def log_message(self, *args: object) -> None:
            pass

    elsewhere = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/volumes"

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    redirecting = http.server.HTTPServer(("127.0.0.1", 0), Redirecting)
    servers = (elsewhere, redirecting)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        api = f"http://127.0.0.1:{redirecting.server_address[1]}"
        token = "spw_0123456789abcdef_" + "R" * 43
        code, out, err = run("volume", "list", "--api", api, "--token", token)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert code == 1 and out == ""
    assert "HTTP 302" in err and "redirect" in err and "not followed" in err and len(err.splitlines()) == 1
    assert seen == []


def test_an_answer_too_large_or_too_slow_is_cut_off_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API address that is not Sparrow's (or a hostile one) cannot fill the CLI's memory with an
    endless answer, nor hold it by dripping one: past MAX_ANSWER or the request's timeout in all, one
    line and exit 1."""
    import http.server
    import threading
    import time

    import sparrow.cli

    monkeypatch.setattr(sparrow.cli, "MAX_ANSWER", 1 << 20)
    monkeypatch.setattr(sparrow.cli, "API_TIMEOUT", 1.0)

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                if self.path.startswith("/v1/volumes"):  # endless, fast
                    while True:
                        self.wfile.write(b" " * 65536)
                else:  # a byte at a time, each well inside the socket timeout
                    for _ in range(100):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.1)
            except OSError:
                pass  # the CLI hung up: what is expected

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, out, err = run("volume", "list", "--api", api, "--token", "spw_0123456789abcdef_" + "R" * 43)
        assert (code, out) == (1, "") and len(err.splitlines()) == 1, err
        assert "larger than 1 MiB: not read" in err, err
        started = time.monotonic()
        code, out, err = run("node", "list", "--api", api, "--token", "spw_0123456789abcdef_" + "R" * 43)
        assert (code, out) == (1, "") and len(err.splitlines()) == 1, err
        assert "did not arrive within 1 s" in err, err
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()
        server.server_close()
