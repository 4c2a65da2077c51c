"""A real `sparrow serve` process for integration tests (a :class:`~tests.integration.process.Proc`)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.process import Proc, bearer, daemon_env
from tests.tools import free_port, run

BASE_IQN = "iqn.2026-11.io.sparrow"


class Daemon(Proc):
    """`sparrow serve` on loopback with its own data directory and free ports."""

    def __init__(self, data_dir: Path, *, extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(data_dir.name, data_dir.parent)
        self.iscsi_port = free_port()
        self.http_port = free_port()
        self.extra_args = extra_args

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sparrow", "serve",
            "--data-dir", str(self.data_dir),
            "--iscsi", self.portal,
            "--http", f"127.0.0.1:{self.http_port}",
            "--log-format", "json",
            *self.extra_args,
        ]  # fmt: skip

    def stop(self, *, timeout: float = 20.0) -> int:
        """SIGTERM and wait: returns the exit code."""
        return self.term(timeout)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.iscsi_port}"

    def url(self, volume: str, lun: int = 0, chap: tuple[str, str] | None = None) -> str:
        auth = f"{chap[0]}%{chap[1]}@" if chap else ""
        return f"iscsi://{auth}{self.portal}/{BASE_IQN}:{volume}/{lun}"

    def cli(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run(
            [sys.executable, "-m", "sparrow", *args, "--api", self.api],
            check=check,
            timeout=timeout,
            env=daemon_env(self.root),
        )

    def create_volume(self, name: str, size: str = "64MiB", *extra: str) -> dict[str, Any]:
        self.cli("volume", "create", name, "--size", size, *extra)
        return self.inspect(name)

    def inspect(self, name: str) -> dict[str, Any]:
        out = self.cli("volume", "inspect", name, "--json").stdout
        return dict(json.loads(out))

    def get(self, path: str) -> tuple[int, bytes]:
        """GET as the bootstrap admin."""
        request = urllib.request.Request(self.api + path, headers=bearer(self.root, self.api))
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())
