"""CHAP through a real initiator: the right secret logs in, a wrong or missing one serves nothing."""

from __future__ import annotations

import pytest

from tests.integration.daemon import Daemon
from tests.tools import require_tool, run

pytestmark = pytest.mark.integration


def test_chap_secret_is_required_and_checked(daemon: Daemon) -> None:
    iscsi_inq = require_tool("iscsi-inq")
    daemon.create_volume("locked", "8MiB", "--chap-user", "alice", "--chap-secret", "correct-horse-1")
    ok = run([iscsi_inq, daemon.url("locked", chap=("alice", "correct-horse-1"))])
    assert "SPARROW" in ok.stdout, ok.stdout
    for creds in (("alice", "wrong-secret-12"), ("mallory", "correct-horse-1"), None):
        denied = run([iscsi_inq, daemon.url("locked", chap=creds)], check=False)
        assert denied.returncode != 0, creds
        assert "SPARROW" not in denied.stdout
    status, body = daemon.get("/metrics")
    assert status == 200
    line = next(
        (ln for ln in body.decode().splitlines()
         if ln.startswith('sparrow_iscsi_login_failures_total{reason="authentication_failed"}')),
        None,
    )
    assert line is not None and float(line.split()[-1]) >= 3, body.decode()


def test_one_volumes_credentials_open_no_other_volume(daemon: Daemon) -> None:
    """A valid user lying: alice holds the right secret for her volume, and tries bob's with it."""
    iscsi_inq = require_tool("iscsi-inq")
    daemon.create_volume("alices", "8MiB", "--chap-user", "alice", "--chap-secret", "alice-secret-12")
    daemon.create_volume("bobs", "8MiB", "--chap-user", "bob", "--chap-secret", "bob-secret-1234")
    assert "SPARROW" in run([iscsi_inq, daemon.url("alices", chap=("alice", "alice-secret-12"))]).stdout
    for creds in (("alice", "alice-secret-12"), ("bob", "alice-secret-12"), None):
        denied = run([iscsi_inq, daemon.url("bobs", chap=creds)], check=False)
        assert denied.returncode != 0 and "SPARROW" not in denied.stdout, creds
    assert "SPARROW" in run([iscsi_inq, daemon.url("bobs", chap=("bob", "bob-secret-1234"))]).stdout
