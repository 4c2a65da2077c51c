"""Checks every test gets: no bug caught inside the iSCSI core (frontend/internal_errors.py), and no
answer of the master API that its OpenAPI document does not describe (sparrow.master.openapi_check:
turned on here for the apps tests build in this process, and by tests/integration/process.py for
every daemon)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from frontend import internal_errors
from sparrow.master import openapi_check


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(openapi_check.VALIDATE_ENV, "1")


@pytest.fixture(autouse=True)
def _no_openapi_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which a master app in this process answered outside its OpenAPI document
    (the violation is logged with what was wrong), unless it says it provokes one on purpose
    (``@pytest.mark.openapi_violations_expected``)."""
    before = openapi_check.count()
    yield
    found = openapi_check.count() - before
    if request.node.get_closest_marker("openapi_violations_expected") is None:
        assert not found, f"{found} answer(s) of the master API outside its OpenAPI document: see the log"


@pytest.fixture(autouse=True)
def _no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which the iSCSI core caught an internal error in this process (the
    integration fixtures check the daemons' logs for the same event). A test that provokes one on
    purpose says so with ``@pytest.mark.internal_errors_expected``."""
    before = internal_errors.count()
    yield
    if request.node.get_closest_marker("internal_errors_expected") is None:
        caught = internal_errors.count() - before
        assert not caught, f"{caught} internal error(s) caught in the iSCSI core: see the traceback logged"
