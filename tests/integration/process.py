"""A daemon process for integration tests: started, stopped, killed and restarted for real.

Readiness is learned the way systemd learns it: the process gets its own NOTIFY_SOCKET and is ready
once it sends READY=1 (every Sparrow daemon sends it only once its listeners are bound).
Logs are JSON lines, appended across restarts, in ``ROOT/<name>.log``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sparrow.clustersecret import load_cluster_secret
from sparrow.master.openapi_check import VALIDATE_ENV
from sparrow.metricsauth import scrape_token
from tests.leaks import WATCH


def daemon_env(root: Path) -> dict[str, str]:
    """The environment of a test's daemons and CLI calls: XDG_CONFIG_HOME under the test's root, so
    a daemon writes its bootstrap admin token to ROOT/xdg/sparrow/credentials.json and the CLI finds
    it there by itself (sparrow.auth.credentials), as on a real machine; and a master checks every
    request and answer against its OpenAPI document (sparrow.master.openapi_check; a violation is
    logged, and fails the test: tests/integration/conftest.py)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SPARROW_CREDENTIALS", "SPARROW_TOKEN", "SPARROW_API")
    }
    env["XDG_CONFIG_HOME"] = str(root / "xdg")
    env.setdefault(VALIDATE_ENV, "1")
    return env


#: Every daemon process spawned in this test session, for the checks of their logs after each test
#: (tests/integration/conftest.py).
SPAWNED: list[Proc] = []


def credentials_file(root: Path) -> Path:
    return root / "xdg" / "sparrow" / "credentials.json"


def admin_token(root: Path, api: str) -> str:
    """The bootstrap admin token a daemon of this test wrote for ``api`` (http://HOST:PORT)."""
    entry = json.loads(credentials_file(root).read_text())["apis"][api.rstrip("/")]
    return str(entry["token"])


def bearer(root: Path, api: str) -> dict[str, str]:
    """The Authorization header for a direct urllib call to ``api`` as the bootstrap admin."""
    return {"Authorization": f"Bearer {admin_token(root, api)}"}


def scrape_bearer(secret: Path) -> dict[str, str]:
    """The Authorization header that opens /metrics (sparrow.metricsauth) of the daemons holding
    the cluster secret file ``secret`` (``sparrow serve``'s: DATA_DIR/cluster.secret)."""
    return {"Authorization": f"Bearer {scrape_token(load_cluster_secret(secret))}"}


class Proc:
    """One daemon process, restartable on the same data directory and ports."""

    name: str

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.data_dir = root / name
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped
        self._notify: socket.socket | None = None
        self._notify_path: Path | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    # -- life -------------------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process; :meth:`wait_ready` waits for its READY=1."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self not in SPAWNED:
            SPAWNED.append(self)
        path = Path(tempfile.mkdtemp(prefix="sparrow-notify-")) / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(path))
        self._notify, self._notify_path = notify, path
        env = dict(daemon_env(self.root), NOTIFY_SOCKET=str(path), PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.stopped = False
        WATCH.process(self)  # its log and audit log are checked for secrets (tests/leaks.py)

    def wait_ready(self, timeout: float = 20.0) -> None:
        notify, path = self._notify, self._notify_path
        assert notify is not None and path is not None and self.proc is not None, "not spawned"
        deadline = time.monotonic() + timeout
        try:
            while True:
                notify.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    msg = ""
                if "READY=1" in msg.split("\n"):
                    return
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} not READY within {timeout}s:\n{self.log_tail()}")
        finally:
            notify.close()
            path.unlink(missing_ok=True)
            path.parent.rmdir()
            self._notify = self._notify_path = None

    def start(self, timeout: float = 20.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def restart(self, timeout: float = 20.0) -> None:
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.stopped = False

    def term(self, timeout: float = 30.0) -> int:
        """SIGTERM (after SIGCONT if stopped) and wait: the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            if self.stopped:
                self.sigcont()
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def sigstop(self) -> float:
        """SIGSTOP; returns the monotonic time the signal was sent (the process runs no more after)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True
        return time.monotonic()

    def sigcont(self) -> float:
        assert self.proc is not None
        at = time.monotonic()
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False
        return at

    # -- logs -------------------------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        """The log from byte ``offset`` on."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log records whose ``event`` is ``name``, over every run of the process."""
        out = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                out.append(record)
        return out
