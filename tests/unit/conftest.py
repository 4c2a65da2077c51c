"""Fixtures shared by the unit tests of the master's HTTP surface."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.test_master_api import Master


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[Master]:
    """The master's real API app on an in-process test server (tests.unit.test_master_api.Master)."""
    m = Master(tmp_path)
    await m.client.start_server()
    yield m
    await m.client.close()
    m.store.close()
