"""The compiled build (frontend/build.py): which build this run is, the pure-Python switch, and a
source edited after the build never running as its old compiled code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from frontend import build
from tests.tools import expected_compiled

_WHICH = (
    "import importlib, json; from frontend import build; "
    "print(json.dumps({m: importlib.import_module(m).__file__ for m in build.COMPILED_MODULES}))"
)


def _module_files(**env: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _WHICH], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True, timeout=60)
    files: dict[str, str] = json.loads(out.stdout)
    return files


def test_this_run_is_the_build_it_should_be() -> None:
    """CI runs the suite twice, compiled and with SPARROW_PURE_PYTHON=1 (Makefile): this fails if
    either run is not what it claims, e.g. compiled in CI but silently pure."""
    assert build.compiled() is expected_compiled()
    files = {m: sys.modules[m].__file__ or "" for m in build.COMPILED_MODULES if m in sys.modules}
    assert all(f.endswith(".py") is not expected_compiled() for f in files.values()), files


def test_compiled_modules_are_all_compiled_or_all_pure() -> None:
    files = _module_files(**{build.PURE_ENV: "0"})
    assert len({f.endswith(".py") for f in files.values()}) == 1, files
    if expected_compiled():
        assert not any(f.endswith(".py") for f in files.values()), files


def test_the_pure_switch_loads_every_hot_module_from_its_source() -> None:
    files = _module_files(**{build.PURE_ENV: "1"})
    assert files == {m: str(build.source_path(m)) for m in build.COMPILED_MODULES}


def test_the_finder_shadows_only_the_compiled_modules() -> None:
    finder = build.SourceFirst()
    package = [str(build.ROOT / "frontend" / "iscsi")]
    spec = finder.find_spec("frontend.iscsi.pdu", package)
    assert spec is not None and spec.origin == str(build.ROOT / "frontend" / "iscsi" / "pdu.py")
    assert finder.find_spec("frontend.iscsi.login", package) is None
    assert finder.find_spec("frontend.iscsi.pdu", None) is None


def _tree(root: Path) -> Path:
    for m in build.COMPILED_MODULES:
        target = build.source_path(m, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(build.source_path(m), target)
    return root


def test_pure_unless_a_manifest_vouches_for_every_source(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert build.pure_reason({}, root) == "not compiled"
    manifest = root / "frontend" / build.MANIFEST.name
    manifest.write_text(json.dumps({"compiler": "mypyc", "modules": build.source_hashes(root)}))
    assert build.pure_reason({}, root) is None
    assert build.pure_reason({build.PURE_ENV: "1"}, root) == "SPARROW_PURE_PYTHON=1"
    assert build.pure_reason({build.PURE_ENV: "0"}, root) is None
    with build.source_path("frontend.iscsi.tasks", root).open("a") as f:
        f.write("# edited after the build\n")
    assert build.pure_reason({}, root) == "source changed since the build: frontend.iscsi.tasks"
    manifest.write_text("{")
    assert build.pure_reason({}, root) == "not compiled"
