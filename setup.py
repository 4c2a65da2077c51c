"""Builds Sparrow, compiling the hot frontend modules with mypyc where it can (frontend/build.py;
docs/architecture.md, "The build").

SPARROW_COMPILE=0 skips compiling. Unset, a failure to compile (no C compiler, no Python headers, a
mypyc error) falls back to the pure-Python modules with a warning, unless CI=true; SPARROW_COMPILE=1
and CI=true make it fatal. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_sparrow_build", HERE / "frontend" / "build.py")
assert _spec is not None and _spec.loader is not None
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

mode = os.environ.get(build.COMPILE_ENV, "auto")
required = mode == "1" or (mode == "auto" and os.environ.get("CI", "").lower() == "true")


def fall_back(why: str) -> None:
    if required:
        raise SystemExit(f"sparrow: compiling the hot modules failed ({why}); "
                         f"required by {build.COMPILE_ENV}=1 or CI=true")
    print(f"sparrow: WARNING: building pure Python, compiling failed: {why}", file=sys.stderr)


class BuildHot(build_ext):
    """build_ext that falls back to pure Python when the C compile fails, and writes the manifest
    (the sources compiled) beside frontend/build.py once it succeeds."""

    def run(self) -> None:
        self._remove_strays({e.name for e in self.extensions})
        try:
            super().run()
        except Exception as e:  # distutils' CompileError, LinkError, DistutilsExecError, PlatformError
            fall_back(f"{type(e).__name__}: {e}")
            self.extensions = []
            self._remove_strays(set())
            return
        manifest = json.dumps({"compiler": "mypyc", "modules": build.source_hashes(HERE)}, indent=1)
        for root in {Path(self.build_lib), HERE} if self.inplace else {Path(self.build_lib)}:
            (root / "frontend" / build.MANIFEST.name).write_text(manifest + "\n")

    def _remove_strays(self, keep: set[str]) -> None:
        """An editable build leaves in the source tree no extension of an earlier build that this one
        does not make (a module taken off the list would still shadow its .py), nor, failing, the
        manifest."""
        if not self.inplace:
            return
        for path in (HERE / "frontend").rglob("*.so"):
            relative = path.relative_to(HERE)
            name = ".".join((*relative.parts[:-1], path.name.split(".")[0]))
            if name not in keep:
                path.unlink()
        if not keep:
            (HERE / "frontend" / build.MANIFEST.name).unlink(missing_ok=True)

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []


#: The commands that build extensions; pip also runs setup.py for metadata alone (egg_info,
#: dist_info), where compiling would only cost time.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def hot_extensions() -> list[Any]:
    if mode == "0" or not BUILDS & set(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify

        # pip builds in an isolated environment without the runtime dependencies: their imports are
        # typed Any there (mypy --strict with them is `make lint`'s job).
        sources = [str(build.source_path(m, HERE).relative_to(HERE)) for m in build.COMPILED_MODULES]
        return list(mypycify(["--ignore-missing-imports", *sources], group_name=build.GROUP, opt_level="3"))
    except (Exception, SystemExit) as e:  # mypyc exits on a type error
        fall_back(f"mypyc: {type(e).__name__}: {e}")
        return []


setup(ext_modules=hot_extensions(), cmdclass={"build_ext": BuildHot})
