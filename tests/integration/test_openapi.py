"""The OpenAPI document on a real daemon: served without a token, and the harness's checker really
runs in every daemon (tests/integration/process.py sets SPARROW_OPENAPI_VALIDATE; a violation is
logged and fails the test: tests/integration/conftest.py)."""

from __future__ import annotations

import copy
import json
import urllib.request
from pathlib import Path

import pytest

from sparrow.master import openapi
from sparrow.master.openapi_check import CHECKING_EVENT, VALIDATE_ENV, VIOLATION_EVENT
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration


def test_the_document_is_served_without_a_token(daemon: Daemon) -> None:
    with urllib.request.urlopen(daemon.api + "/openapi.json", timeout=10) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "application/json"
        assert response.read() == openapi.checked_in()
    assert daemon.events(CHECKING_EVENT), "the harness turns the checker on in every daemon"
    assert not daemon.events(VIOLATION_EVENT)


@pytest.mark.openapi_violations_expected
def test_a_daemon_logs_an_answer_its_document_does_not_describe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checker against a document that leaves out a field /healthz answers: the daemon logs the
    violation (the harness's fixture would fail any other test on it) and answers as ever."""
    narrower = json.loads(openapi.checked_in())
    health = copy.deepcopy(narrower["components"]["schemas"]["Health"])
    del health["properties"]["nodes_alive"]
    health["required"].remove("nodes_alive")
    narrower["components"]["schemas"]["Health"] = health
    document = tmp_path / "narrower.json"
    document.write_text(json.dumps(narrower))
    monkeypatch.setenv(VALIDATE_ENV, str(document))
    d = Daemon(tmp_path / "data")
    d.start()
    try:
        status, body = d.get("/healthz")
        assert status in (200, 503) and "nodes_alive" in json.loads(body)
        [violation] = d.events(VIOLATION_EVENT)
        assert violation["path"] == "/healthz" and violation["status"] == status
        # The full answer matches neither shape of /healthz now (HealthAnswer: PublicHealth or Health).
        assert "fails oneOf" in violation["problem"] and "schemas/Health'" in violation["problem"]
        assert d.get("/v1/volumes")[0] == 200
        assert len(d.events(VIOLATION_EVENT)) == 1
    finally:
        assert d.stop() == 0
