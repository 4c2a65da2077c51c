"""A real `sparrow serve` process for integration tests.

Readiness is learned the way systemd learns it: the test listens on a NOTIFY_SOCKET and waits for
READY=1, which the daemon sends only once its listeners are bound.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.tools import free_port, run

BASE_IQN = "iqn.2026-11.io.sparrow"


@dataclass
class Daemon:
    data_dir: Path
    iscsi_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.iscsi_port}"

    def url(self, volume: str, lun: int = 0, chap: tuple[str, str] | None = None) -> str:
        auth = f"{chap[0]}%{chap[1]}@" if chap else ""
        return f"iscsi://{auth}{self.portal}/{BASE_IQN}:{volume}/{lun}"

    def start(self, *, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock_path = Path(tempfile.mkdtemp(prefix="sparrow-notify-")) / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_path))
        notify.settimeout(timeout)
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), PYTHONUNBUFFERED="1")
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-daemon.log"
        cmd = [
            sys.executable, "-m", "sparrow", "serve",
            "--data-dir", str(self.data_dir),
            "--iscsi", self.portal,
            "--http", f"127.0.0.1:{self.http_port}",
            "--log-format", "json",
            *self.extra_args,
        ]
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        try:
            while True:
                notify.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    raise AssertionError(f"daemon not READY within {timeout}s:\n{self.log()}") from None
                if "READY=1" in msg.split("\n"):
                    return
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        finally:
            notify.close()
            sock_path.unlink(missing_ok=True)
            sock_path.parent.rmdir()

    def stop(self, *, timeout: float = 20.0) -> int:
        """SIGTERM and wait: returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "sparrow", *args, "--api", self.api], check=check, timeout=timeout)

    def create_volume(self, name: str, size: str = "64MiB", *extra: str) -> dict[str, Any]:
        self.cli("volume", "create", name, "--size", size, *extra)
        return self.inspect(name)

    def inspect(self, name: str) -> dict[str, Any]:
        out = self.cli("volume", "inspect", name, "--json").stdout
        return dict(json.loads(out))

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.api + path, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
