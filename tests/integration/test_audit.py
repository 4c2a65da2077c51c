"""The audit trail (sparrow.master.audit) against a real master and node.

A scripted session through the CLI and a plain HTTP client: the log holds exactly its mutating
calls, in order, with who made them and their result, plus the epochs minted; no secret (CHAP
secret, the tokens) appears in the log nor in any daemon's log output. An audit log that cannot
be written makes a mutating call fail with 503 and change nothing.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import Cluster
from tests.integration.process import admin_token, daemon_env
from tests.leaks import register_secret
from tests.tools import run

pytestmark = pytest.mark.integration

CHAP_SECRET = "audit-chap-secret-0123456789"
OTHER_SECRET = "second-chap-secret-9876543210"


def call(api: str, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        api + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            raw = resp.read()
            return int(resp.status), json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return int(e.code), json.loads(raw) if raw else None


def audit_cli(cluster: Cluster, *args: str) -> str:
    command = [sys.executable, "-m", "sparrow", "audit", "--data-dir", str(cluster.master.data_dir), *args]
    return run(command, timeout=30, env=daemon_env(cluster.root)).stdout


def test_the_audit_log_holds_exactly_the_sessions_mutating_calls_and_no_secret(
    make_cluster: Callable[[int], Cluster],
) -> None:
    cluster = make_cluster(1)
    api = cluster.master.api
    admin = admin_token(cluster.root, api)
    admin_id = admin.split("_")[1]

    cluster.cli("volume", "create", "audited", "--size", "16MiB", "--chap-user", "iqn.host",
                "--chap-secret", CHAP_SECRET)  # fmt: skip
    cluster.cli("volume", "inspect", "audited")  # a read: not audited
    cluster.cli("volume", "resize", "audited", "--size", "32MiB")
    minted = json.loads(cluster.cli("token", "create", "--role", "reader", "--name", "ro", "--json").stdout)
    reader, reader_id = minted["token"], minted["id"]
    status, answer = call(api, "DELETE", "/v1/volumes/audited", reader)  # a reader may not delete
    assert status == 403, answer
    cluster.cli("token", "revoke", reader_id)
    status, _ = call(api, "DELETE", "/v1/volumes/audited", reader)  # revoked: 401
    assert status == 401
    again = {"name": "audited", "size": 1 << 20, "chap_user": "x", "chap_secret": OTHER_SECRET}
    register_secret(OTHER_SECRET, "the CHAP secret of the refused create")  # a plain HTTP body
    status, answer = call(api, "POST", "/v1/volumes", admin, again)
    assert status == 409, answer  # the name is taken: refused by the handler
    cluster.cli("volume", "delete", "audited")

    records = [json.loads(line) for line in audit_cli(cluster, "--json").splitlines()]
    harness, *calls = [r for r in records if r["type"] == "call"]
    assert (harness["verb"], harness["args"], harness["status"]) == ("node.approve", {"node_id": "n1"}, 200)
    got = [(c["who"], c["verb"], c["volume"], c["status"]) for c in calls]
    assert got == [
        (admin_id, "volume.create", "audited", 201),
        (admin_id, "volume.resize", "audited", 200),
        (admin_id, "token.create", None, 201),
        (reader_id, "volume.delete", "audited", 403),
        (admin_id, "token.revoke", None, 204),
        (None, "volume.delete", "audited", 401),
        (admin_id, "volume.create", "audited", 409),
        (admin_id, "volume.delete", "audited", 204),
    ], got
    create = calls[0]
    assert create["args"]["name"] == "audited" and create["args"]["chap_user"] == "iqn.host"
    assert create["redacted"] == ["chap_secret"]
    assert calls[1]["args"] == {"name": "audited", "size": 32 << 20, "wait": "10"}
    assert calls[2]["args"] == {"role": "reader", "name": "ro"}
    assert calls[4]["args"] == {"id": reader_id}
    assert calls[5]["claimed"] == reader_id
    assert "exists" in calls[6]["error"]
    epochs = [(r["volume"], r["epoch"], r["copies"], r["reason"]) for r in records if r["type"] == "epoch"]
    assert epochs[:2] == [
        ("audited", 1, ["n1"], epochs[0][3]),
        ("audited", 2, ["n1"], f"resized to {32 << 20} bytes"),
    ], epochs
    assert len(epochs) == 2, epochs

    # the filters: --volume, --since, and the text form
    about = [json.loads(x) for x in audit_cli(cluster, "--json", "--volume", "audited").splitlines()]
    assert len(about) == 8 and {r["volume"] for r in about} == {"audited"}, about
    assert audit_cli(cluster, "--since", "2999-01-01T00:00:00Z") == ""
    text = audit_cli(cluster, "--since", "1h")
    assert f"403  {reader_id}  volume.delete" in text, text
    assert "[withheld: chap_secret]" in text, text

    # the file: 0600, and no secret in it nor in any daemon's log output of the session
    log_path = cluster.master.data_dir / "audit.jsonl"
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    secrets = [CHAP_SECRET, OTHER_SECRET, admin.split("_", 2)[2], reader.split("_", 2)[2]]
    outputs = {"audit.jsonl": log_path.read_text()}
    outputs.update({p.name: p.log() for p in [cluster.master, *cluster.nodes.values()]})
    for name, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:4]}...) appears in {name}"


def test_an_unwritable_audit_log_fails_the_call_with_503_and_changes_nothing(
    make_cluster: Callable[[int], Cluster],
) -> None:
    cluster = make_cluster(1)
    api = cluster.master.api
    admin = admin_token(cluster.root, api)
    log_path = cluster.master.data_dir / "audit.jsonl"
    kept = log_path.with_name("audit.kept")
    os.replace(log_path, kept)

    def refused(what: str) -> None:
        status, answer = call(api, "POST", "/v1/volumes", admin, {"name": "blocked", "size": "16MiB"})
        assert status == 503, (what, status, answer)
        assert "audit log" in answer["error"] and "nothing changed" in answer["error"], answer
        status, answer = call(api, "GET", "/v1/volumes/blocked", admin)
        assert status == 404, (what, answer)  # the create did not happen

    # a full disk: writes to /dev/full fail with ENOSPC
    os.symlink("/dev/full", log_path)
    refused("full")
    status, answer = call(api, "POST", "/v1/tokens", admin, {"role": "admin"})
    assert status == 503, answer
    assert "No space left on device" in answer["error"], answer
    # a removed log is not silently recreated
    log_path.unlink()
    refused("removed")
    # a path that is not a writable file
    log_path.mkdir()
    refused("directory")
    log_path.rmdir()

    os.replace(kept, log_path)
    status, answer = call(api, "POST", "/v1/volumes", admin, {"name": "blocked", "size": "16MiB"})
    assert status == 201, answer
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    # The harness's approval of n1 (Master.approve), then the one call since the log came back.
    assert [x.get("verb") or x["type"] for x in lines if x["type"] != "epoch"] == [
        "node.approve", "result", "volume.create", "result"
    ], lines  # fmt: skip
    assert Path(log_path).is_file()
