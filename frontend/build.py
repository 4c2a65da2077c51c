"""The build: which modules mypyc compiles, whether this process runs them compiled, and the switch
that forces pure Python (docs/architecture.md, "The build").

``setup.py`` compiles ``COMPILED_MODULES`` with mypyc into one extension group (``GROUP``) where a C
compiler works, and writes ``MANIFEST`` beside this file: the sha256 of each source it compiled. Each
module's extension sits beside its ``.py``, and Python's import prefers the extension. The modules
call one another directly in C, so they run all compiled or all pure, never mixed.

``frontend/__init__.py`` calls ``select()`` before any of them is imported. It keeps the compiled
modules only when the manifest vouches for every source (an editable install whose source was edited
after the build would otherwise run the old code) and ``SPARROW_PURE_PYTHON=1`` is not set;
otherwise it puts ``SourceFirst`` at the head of ``sys.meta_path``, which loads these modules from
their ``.py`` (a stale build says so on a terminal only: tests compare stderr). ``compiled()`` tells
which build runs (``sparrow_build_info`` in /metrics).

This module is loaded by ``setup.py`` on its own, so it imports nothing outside the standard library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Final

#: The hot modules: the fast path and what it calls per command (docs/performance.md, "mypyc").
COMPILED_MODULES: Final = (
    "frontend.iscsi.fastpath",
    "frontend.iscsi.connection",
    "frontend.iscsi.pdu",
    "frontend.iscsi.tasks",
    "frontend.iscsi.dataout",
)
#: The mypyc group: its shared library is ``frontend/_hot__mypyc*.so``, inside the package, so that
#: it never collides with another mypyc build's library at the top level of site-packages.
GROUP: Final = "frontend._hot"
#: Written by setup.py after a successful compile: {"modules": {name: sha256 of the source}, ...}.
MANIFEST: Final = Path(__file__).with_name("_compiled.json")
#: Set to 1: never run the compiled modules (debugging; the pure-Python half of CI).
PURE_ENV: Final = "SPARROW_PURE_PYTHON"
#: Build time: 0 never compiles, 1 fails the install when compiling fails; unset (auto) falls back to
#: pure Python when there is no compiler, unless CI=true (then a failure is fatal, as with 1).
COMPILE_ENV: Final = "SPARROW_COMPILE"

ROOT: Final = Path(__file__).resolve().parent.parent


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_hashes(root: Path = ROOT) -> dict[str, str]:
    return {m: hashlib.sha256(source_path(m, root).read_bytes()).hexdigest() for m in COMPILED_MODULES}


class SourceFirst:
    """A meta-path finder that loads ``COMPILED_MODULES`` from their ``.py`` (and bytecode cache),
    shadowing the compiled extension beside it."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name not in COMPILED_MODULES or not path:
            return None
        leaf = name.rpartition(".")[2] + ".py"
        for entry in path:
            candidate = os.path.join(entry, leaf)
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(name, candidate)
        return None


def pure_reason(environ: Mapping[str, str] = os.environ, root: Path = ROOT) -> str | None:
    """Why this process must not run the compiled modules, or None if it may (when there are any)."""
    if environ.get(PURE_ENV, "") not in ("", "0"):
        return f"{PURE_ENV}={environ[PURE_ENV]}"
    manifest = root / "frontend" / MANIFEST.name
    try:
        built = json.loads(manifest.read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return "not compiled"
    stale = sorted(m for m, digest in source_hashes(root).items() if built.get(m) != digest)
    if stale:
        return "source changed since the build: " + ", ".join(stale)
    return None


def select() -> None:
    """Called by frontend/__init__.py: keep the compiled modules, or shadow them with their sources."""
    if any(isinstance(f, SourceFirst) for f in sys.meta_path):
        return
    reason = pure_reason()
    if reason is None:
        return
    if reason.startswith("source changed") and sys.stderr.isatty():
        print(f"sparrow: running pure Python, {reason} (rebuild: pip install -e .)", file=sys.stderr)
    sys.meta_path.insert(0, SourceFirst())


def compiled() -> bool:
    """True if the hot modules run compiled in this process."""
    from frontend.iscsi import fastpath

    return not (fastpath.__file__ or "").endswith(".py")
