"""The secret check of the test run itself (tests/leaks.py): what it registers, what it reads,
and that a planted line fails it, naming the file and the line (never the secret)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparrow.masterkey import master_identity, master_key
from sparrow.nodekey import node_key
from sparrow.replication.streamauth import derive_stream_key
from tests.leaks import (
    WATCH,
    Leak,
    SecretWatch,
    find_leaks,
    forms,
    harvest,
    register_token,
    secrets_on_command_line,
)
from tests.unit.test_master_api import Master

SECRET = "a-test-secret-0123456789"


@dataclass
class FakeProc:
    """What SecretWatch needs of a tests.integration.process.Proc."""

    root: Path
    data_dir: Path
    log_path: Path
    running: bool = True


def proc(tmp_path: Path) -> FakeProc:
    data = tmp_path / "data"
    data.mkdir()
    return FakeProc(tmp_path, data, tmp_path / "data.log")


def test_a_leak_names_the_file_the_line_and_what_leaked_never_the_secret() -> None:
    data = b"one\ntwo " + SECRET.encode() + b" and " + SECRET.encode() + b" again\nthree\n" + SECRET.encode()
    leaks = find_leaks(data, {SECRET.encode(): "the test secret"}, "x.log", first_line=10)
    assert leaks == [Leak("x.log", 11, "the test secret"), Leak("x.log", 13, "the test secret")]
    assert SECRET not in str(leaks[0]) and str(leaks[0]) == "the test secret appears in x.log, line 11"


def test_bytes_are_looked_for_as_hex_and_base64_too() -> None:
    key = bytes(range(32))
    assert set(forms(key)) == {
        key.hex().encode(),
        base64.b64encode(key).rstrip(b"="),
        base64.urlsafe_b64encode(key).rstrip(b"="),
    }
    assert SECRET.encode() in forms(SECRET.encode())
    assert forms(b"short") == ()  # would match ordinary words


def test_a_planted_line_in_a_watched_log_is_found_once(tmp_path: Path) -> None:
    watch = SecretWatch()
    p = proc(tmp_path)
    p.log_path.write_text('{"event": "started"}\n')
    watch.process(p)
    watch.secret(SECRET, "the planted secret", root=tmp_path)
    assert watch.check() == []
    with p.log_path.open("a") as log:
        log.write('{"event": "ok"}\n{"event": "oops", "detail": "' + SECRET + '"}\n')
    assert watch.check() == [Leak(str(p.log_path), 3, "the planted secret")]
    assert watch.check() == []  # read once: appended lines only


def test_a_line_being_written_is_read_when_complete_and_the_last_one_at_the_end(tmp_path: Path) -> None:
    watch = SecretWatch()
    p = proc(tmp_path)
    watch.process(p)
    watch.secret(SECRET, "s", root=tmp_path)
    with p.log_path.open("a") as log:
        log.write("first line\n" + SECRET[:10])
    assert watch.check() == []
    with p.log_path.open("a") as log:
        log.write(SECRET[10:])  # the secret was cut in two by the check: still found
    p.running = False  # exited: its log is read to the end, then it is no longer watched
    assert watch.check() == [Leak(str(p.log_path), 2, "s")]
    assert watch.processes == []


def test_the_audit_log_is_watched_and_a_symlink_or_a_device_is_not_read(tmp_path: Path) -> None:
    watch = SecretWatch()
    p = proc(tmp_path)
    watch.process(p)
    watch.secret(SECRET, "s", root=tmp_path)
    os.symlink("/dev/zero", p.data_dir / "audit.jsonl")  # never read: it would not end
    assert watch.check() == []
    (p.data_dir / "audit.jsonl").unlink()
    (p.data_dir / "audit.jsonl").write_text(f'{{"type": "call", "args": "{SECRET}"}}\n')
    assert watch.check() == [Leak(str(p.data_dir / "audit.jsonl"), 1, "s")]


def test_a_replaced_log_is_read_from_its_start(tmp_path: Path) -> None:
    watch = SecretWatch()
    p = proc(tmp_path)
    watch.process(p)
    watch.secret(SECRET, "s", root=tmp_path)
    p.log_path.write_text("x" * 100 + "\n")
    assert watch.check() == []
    p.log_path.unlink()
    p.log_path.write_text(SECRET + "\n")
    assert watch.check() == [Leak(str(p.log_path), 1, "s")]


def test_a_token_a_test_registers_is_looked_for_by_its_secret_part() -> None:
    token = "spw_0123456789abcdef_" + "C" * 43
    register_token(token, "the reader token")  # the session's watch, for this test only
    assert WATCH.extra[b"C" * 43] == "the reader token"
    assert not any(b"0123456789abcdef" in needle for needle in WATCH.extra)  # the id is public
    with pytest.raises(AssertionError):
        register_token("not-a-token", "x")


def test_the_cli_secrets_given_and_printed_are_registered_and_its_output_checked(tmp_path: Path) -> None:
    watch = SecretWatch()
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    token = "spw_0123456789abcdef_" + "A" * 43
    argv = ["python", "-m", "sparrow", "volume", "create", "v", "--chap-secret", SECRET, "--api", "http://x"]
    given = secrets_on_command_line(argv)
    assert given[SECRET.encode()] == "the value of --chap-secret" and set(given) == set(
        forms(SECRET.encode())
    )
    watch.cli_run(argv, env, "created v\n", "")
    # `token create` shows the token it made: that is no leak, but the token is a secret from now on
    watch.cli_run(["python", "-m", "sparrow", "token", "create", "--role", "reader"], env, token + "\n", "")
    assert watch.check() == []
    watch.cli_run(["python", "-m", "sparrow", "volume", "list"], env, f"oops {SECRET}\n", f"{token}\n")
    assert watch.check() == [
        Leak("the output of `sparrow volume list` (stdout)", 1, "the value of --chap-secret"),
        Leak("the output of `sparrow volume list` (stderr)", 1, "a token printed by the CLI"),
    ]


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[Master]:
    (tmp_path / "master").mkdir()
    m = Master(tmp_path / "master")
    await m.client.start_server()
    yield m
    await m.client.close()
    m.store.close()


async def test_the_harvest_finds_what_the_daemons_made(master: Master, tmp_path: Path) -> None:
    """A data directory as a master leaves it: master.key, an authority with a CHAP volume and its
    assignment history; the root: the harness's cluster secret and the credentials file."""
    data_dir = tmp_path / "master"
    key = master_key(data_dir)
    (tmp_path / "cluster.secret").write_text("c" * 64 + "\n")
    token = "spw_0123456789abcdef_" + "B" * 43
    (tmp_path / "xdg" / "sparrow").mkdir(parents=True)
    (tmp_path / "xdg" / "sparrow" / "credentials.json").write_text(
        f'{{"apis": {{"http://x": {{"token": "{token}"}}}}}}'
    )
    node_dir = tmp_path / "n1"
    node_dir.mkdir()
    seed = node_key(node_dir)[0].seed
    master.node_reports("n1", 1)
    master.node_reports("n2", 1)
    body = {"name": "locked", "size": 1 << 20, "replicas": 2, "chap_user": "u", "chap_secret": SECRET}
    created = await master.json("POST", "/v1/volumes", body, 201)
    master.control.step(master.clock())
    (published,) = [a for a in [master.control.current(created["volume_id"])] if a is not None]
    assert published.primary is not None

    found = harvest(tmp_path, data_dir)
    whats = {what for what in found.values()}
    assert found[SECRET.encode()] == "CHAP secret of volume locked"
    assert found[b"c" * 64] == "the cluster.secret file in " + tmp_path.name + "/"
    assert found[b"B" * 43] == "a token in credentials.json"
    assert any(w.startswith("the master.key file") for w in whats)
    replica = next(r for r in published.replicas if r != published.primary)
    stream_key = derive_stream_key(key, published.volume_id, published.epoch, published.primary, replica)
    assert found[stream_key.hex().encode()].startswith("stream key (")
    assert key.hex().encode() in found  # the master key itself (derived from the file's text)
    identity_seed = master_identity(data_dir).seed  # what the master signs its MasterHello with
    assert found[identity_seed.hex().encode()].endswith("the master identity's seed")
    assert found[base64.b64encode(identity_seed).rstrip(b"=")].endswith("the master identity's seed")
    in_node_dir = harvest(tmp_path, node_dir)
    assert in_node_dir[seed.hex().encode()].startswith("the node.key file in n1/")
    assert in_node_dir[base64.b64encode(seed).rstrip(b"=")] == "the node.key file in n1/, its seed"


def test_a_tests_captured_output_is_checked_against_the_secrets_in_its_tmp_path(tmp_path: Path) -> None:
    """In-process daemons (unit tests) log to pytest's capture: their data directory under
    tmp_path is harvested (here an authority-less master's master.key) and the capture read."""
    watch = SecretWatch()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "master.key").write_text("k" * 64 + "\n")
    sections = [("Captured stdout call", "fine\nkey " + "k" * 64 + "\n"), ("Captured log call", "fine\n")]
    assert watch.check_captured(sections, tmp_path) == [
        Leak("Captured stdout call", 2, "the master.key file in data/")
    ]
    assert watch.check_captured(sections, None) == []  # nothing registered, no tmp_path
    watch.secret("fine", "a registered word")  # too short to look for
    watch.secret("a-registered-secret", "the test's own")
    assert watch.check_captured([("Captured stderr call", "x a-registered-secret")], None) == [
        Leak("Captured stderr call", 1, "the test's own")
    ]
