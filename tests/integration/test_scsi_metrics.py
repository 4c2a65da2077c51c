"""/metrics counts each SCSI command under the kind its CommandSpec gives (frontend/scsi/commands.py):
bytes read, bytes written, everything else as "other"."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon import Daemon
from tests.tools import require_tool, run

pytestmark = pytest.mark.integration


def _by_op(text: str, name: str, volume: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("volume") == volume:
                out[s.labels["op"]] = s.value
    return out


def test_reads_and_writes_are_counted_by_their_kind(daemon: Daemon) -> None:
    qemu_io = require_tool("qemu-io")
    daemon.create_volume("counted", "16MiB")
    out = run([
        qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", daemon.url("counted"),
    ]).stdout  # fmt: skip
    assert "Pattern verification failed" not in out, out
    status, body = daemon.get("/metrics")
    assert status == 200
    text = body.decode()
    nbytes = _by_op(text, "sparrow_scsi_bytes_total", "counted")
    assert nbytes == {"read": 1024 * 1024, "write": 1024 * 1024}, nbytes  # no bytes for "other"
    commands = _by_op(text, "sparrow_scsi_commands_total", "counted")
    assert commands["other"] >= 1, commands  # INQUIRY, READ CAPACITY, ... when qemu opens the LU
