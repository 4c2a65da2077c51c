"""A failing daemon task on a real `sparrow master` (issue 7, finding 4 and "an exception inside any
daemon task ... turns /healthz not-ok"): one Hello whose capacity overflows SQLite used to kill the
node recorder without a log line, so no node saying Hello afterwards was ever recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import http_get
from tests.integration.process import scrape_bearer
from tests.integration.rogue import NodeLink, raw_hello, secret_file, secret_of
from tests.integration.test_master import FakeNode, MasterProcess
from tests.tools import wait_for

pytestmark = pytest.mark.integration


def _health(master: MasterProcess) -> tuple[int, dict[str, Any]]:
    status, body = http_get(master.api + "/healthz")
    return status, dict(json.loads(body))


def test_a_failed_upsert_is_logged_reported_and_the_recorder_goes_on(tmp_path: Path) -> None:
    master = MasterProcess(tmp_path / "master")
    master.start()
    evil = NodeLink(master.listen_port, secret_of(master.root))  # a member, with the secret
    good = FakeNode("n1", master.listen_port, incarnation=1, secret=secret_of(master.root))
    try:
        evil.send_plain(raw_hello("evil", capacity_bytes=1 << 63))

        def outcome() -> str | None:
            if any(e.get("task") == "node-recorder" for e in master.events("task failed")):
                return "recorder failed"
            if any(e.get("code") == "bad_field" for e in master.events("closing node connection")):
                return "refused at the edge"  # a bounded codec refuses the Hello itself
            return None

        if wait_for(outcome, timeout=10, what="the evil Hello handled") == "recorder failed":
            (failed,) = [e for e in master.events("task failed") if e.get("task") == "node-recorder"]
            assert "OverflowError" in failed["error"] and failed.get("exception"), failed  # traceback
            status, health = _health(master)
            assert status == 503 and health["status"] == "unhealthy", health
            assert [f["task"] for f in health["tasks_failed"]] == ["node-recorder"], health
            assert health["reasons"][0].startswith("task node-recorder failed: OverflowError"), health
            scraped = http_get(master.api + "/metrics", headers=scrape_bearer(secret_file(master.root)))
            text = scraped[1].decode()
            assert 'sparrow_task_failures_total{task="node-recorder"} 1.0' in text, text

        good.connect()
        good.beat()
        wait_for(lambda: _health(master)[0] == 200, timeout=10, what="healthy after n1 was recorded")
    finally:
        evil.close()
        good.close()
        assert master.stop() == 0, master.log_tail()
    master.start()  # only the authority knows n1 now: it was recorded
    try:
        nodes = json.loads(master.cli("node", "list", "--json").stdout)
        assert "n1" in [n["node_id"] for n in nodes], nodes
    finally:
        assert master.stop() == 0, master.log_tail()
