"""The compiled build (setup.py, frontend/build.py): a daemon says in /metrics which build it runs;
with no C compiler the install falls back to pure Python, except in CI, where it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from frontend import build
from tests.integration.daemon import Daemon
from tests.tools import expected_compiled

pytestmark = pytest.mark.integration

_PROJECT = ("setup.py", "pyproject.toml", "README.md", "frontend", "store", "sparrow")


def test_the_daemon_reports_the_build_it_runs(daemon: Daemon) -> None:
    status, body = daemon.get("/metrics")
    assert status == 200
    expected = "true" if expected_compiled() else "false"
    assert f'sparrow_build_info{{compiled="{expected}"}} 1.0' in body.decode()


def _setup_build(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`setup.py build` of a copy of the project, with the given environment."""
    src = tmp_path / "src"
    src.mkdir()
    for name in _PROJECT:
        if (build.ROOT / name).is_dir():
            skip = shutil.ignore_patterns("*.so", "_compiled.json", "__pycache__")
            shutil.copytree(build.ROOT / name, src / name, ignore=skip)
        else:
            shutil.copy(build.ROOT / name, src / name)
    base = {k: v for k, v in os.environ.items() if k not in ("CI", build.COMPILE_ENV)}
    command = [sys.executable, "setup.py", "build", "--build-base", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=src, env={**base, **env}, capture_output=True, text=True, timeout=280)
    return done, tmp_path / "out"


def _built(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("frontend/*") if p.suffix in (".so", ".json")) + sorted(
        p.name for p in out.rglob("frontend/iscsi/*") if p.suffix == ".so"
    )


@pytest.mark.timeout(300)
def test_without_a_compiler_the_build_falls_back_to_pure_python(tmp_path: Path) -> None:
    done, out = _setup_build(tmp_path, CC="false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING: building pure Python, compiling failed" in done.stderr
    assert _built(out) == []
    assert list(out.rglob("frontend/iscsi/fastpath.py"))


@pytest.mark.timeout(300)
def test_in_ci_a_missing_compiler_fails_the_build(tmp_path: Path) -> None:
    done, _ = _setup_build(tmp_path, CC="false", CI="true")
    assert done.returncode != 0
    assert "compiling the hot modules failed" in done.stderr, done.stderr[-3000:]


def test_the_build_switch_skips_compiling(tmp_path: Path) -> None:
    done, out = _setup_build(tmp_path, CI="true", **{build.COMPILE_ENV: "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert _built(out) == []
