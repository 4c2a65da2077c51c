from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running `sparrow serve` on loopback with its own data dir; stopped (SIGTERM) afterwards."""
    d = Daemon(tmp_path / "data")
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        code = d.stop()
        assert code == 0, f"daemon exited {code} on SIGTERM:\n{d.log()}"
