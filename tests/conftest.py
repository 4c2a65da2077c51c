"""Checks every test gets: no bug caught inside the iSCSI core (frontend/internal_errors.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from frontend import internal_errors


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
