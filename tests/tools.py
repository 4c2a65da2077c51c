"""Shared helpers for tests that run real processes: ports, tools, deadlines."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from sparrow.cluster.masteridentity import MasterIdentity
from tests.leaks import WATCH, is_sparrow_command

T = TypeVar("T")

#: The identity of the tests' fake masters (a real master derives its own from master.key).
FAKE_MASTER = MasterIdentity(b"fake-master-identity-seed-32byte")

APT_PACKAGES = "libiscsi-bin libiscsi-dev gcc python3-dev qemu-utils qemu-block-extra tgt prometheus"


def require_tool(name: str) -> str:
    """The path of an external tool. A missing tool FAILS the test (never skips): install it with
    `make test`, which installs the apt packages the suite needs."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make test` (it installs: {APT_PACKAGES})")
    return path


#: Ports handed to test daemons come from below the kernel's ephemeral range (32768-60999 on Linux),
#: so a port chosen here is never taken in the meantime by some process's port-0 bind (the
#: heartbeat listener inside every `sparrow serve`, outgoing connections).
_TEST_PORTS = range(20000, 32000)
_next_port = random.Random().randrange(len(_TEST_PORTS))


def expected_compiled() -> bool:
    """Whether this test run must run the compiled hot modules (frontend/build.py): never under
    SPARROW_PURE_PYTHON=1; always in CI (CI=true, where failing to compile fails the install);
    elsewhere whatever this checkout was built as, so that a machine without a compiler still
    passes."""
    from frontend import build

    if os.environ.get(build.PURE_ENV, "") not in ("", "0"):
        return False
    if os.environ.get("CI", "").lower() == "true":
        return True
    return build.pure_reason() is None


def free_port() -> int:
    """A loopback TCP port nobody listens on now, outside the ephemeral range."""
    global _next_port
    for _ in range(len(_TEST_PORTS)):
        port = _TEST_PORTS[_next_port % len(_TEST_PORTS)]
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free test port in 20000-31999")


def wait_for(condition: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # the condition may fail until it holds
            last_error = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_error!r}")
        time.sleep(interval)


def run(
    cmd: list[str], *, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    if is_sparrow_command(cmd):  # its output is checked for secrets (tests/leaks.py)
        WATCH.cli_run(cmd, env, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
