"""The revision graph: registered steps and the path finder (pure; no files, no I/O).

In the Alembic style (``script/revision.py``): each step is one module in this package that
declares::

    kind: str            # "volume" (node JSON records) or "authority" (the master's SQLite store)
    from_version: int
    to_version: int      # > from_version; a step may skip versions
    describe: str        # one line, for plans and the history
    def upgrade(record: dict[str, Any]) -> dict[str, Any]   # JSON kinds: pure, returns a new body
    def upgrade(connection: sqlite3.Connection) -> None    # SQLite kinds: runs inside the runner's
                                                           # transaction; must not COMMIT

Step modules are named ``<kind>_v<from>_to_v<to>`` and the name must agree with what they declare.
Every kind starts at version 1; the graph's *head* for a kind is the highest version a step reaches.
Paths only go forward: a downgrade is a restore from a backup, not a step.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from store.migrations.errors import BadStep, NoMigrationPath

KIND_VOLUME = "volume"
KIND_AUTHORITY = "authority"
#: A node's per-volume epoch and role (sparrow.cluster.nodestate), and its identity record.
KIND_CLUSTER_VOLUME = "cluster-volume"
KIND_CLUSTER_NODE = "cluster-node"
#: Kinds whose records are JSON envelopes (``store.metadata``): ``upgrade(record) -> record``.
JSON_KINDS = frozenset({KIND_VOLUME, KIND_CLUSTER_VOLUME, KIND_CLUSTER_NODE})
#: Kinds that are SQLite databases: ``upgrade(connection)``.
SQLITE_KINDS = frozenset({KIND_AUTHORITY})
KINDS = JSON_KINDS | SQLITE_KINDS
#: Every kind's first schema version.
BASE_VERSION = 1

STEP_MODULE = re.compile(r"(?P<kind>[a-z]+)_v(?P<from_version>\d+)_to_v(?P<to_version>\d+)")


@dataclass(frozen=True, slots=True)
class Step:
    """One registered step: an edge ``from_version -> to_version`` of one kind."""

    name: str
    kind: str
    from_version: int
    to_version: int
    describe: str
    upgrade: Callable[[Any], Any]

    def __str__(self) -> str:
        return f"{self.kind} v{self.from_version} -> v{self.to_version}: {self.describe}"

    @classmethod
    def from_module(cls, module: ModuleType) -> Step:
        """Read a step module's declarations; BadStep when one is missing or wrong."""
        name = module.__name__.rsplit(".", 1)[-1]
        kind = getattr(module, "kind", None)
        from_version = getattr(module, "from_version", None)
        to_version = getattr(module, "to_version", None)
        describe = getattr(module, "describe", None)
        upgrade = getattr(module, "upgrade", None)
        if kind not in KINDS:
            raise BadStep(name, f"kind must be one of {sorted(KINDS)}, not {kind!r}")
        assert isinstance(kind, str)
        for label, value in (("from_version", from_version), ("to_version", to_version)):
            if type(value) is not int or value < BASE_VERSION:
                raise BadStep(name, f"{label} must be an int >= {BASE_VERSION}, not {value!r}")
        assert isinstance(from_version, int) and isinstance(to_version, int)
        if to_version <= from_version:
            raise BadStep(name, f"steps go forward only: {from_version} -> {to_version}")
        if not isinstance(describe, str) or not describe.strip() or "\n" in describe.strip():
            raise BadStep(name, "describe must be one non-empty line")
        if not callable(upgrade):
            raise BadStep(name, "upgrade is not a function")
        return cls(name, kind, from_version, to_version, describe.strip(), upgrade)


class StepGraph:
    """The registered steps. ``path`` is a breadth-first search, so it returns a shortest chain;
    among chains of equal length the one whose steps jump furthest first wins (deterministic)."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self._steps: tuple[Step, ...] = tuple(steps)
        seen: dict[tuple[str, int, int], str] = {}
        for step in self._steps:
            edge = (step.kind, step.from_version, step.to_version)
            if edge in seen:
                raise BadStep(step.name, f"duplicates step {seen[edge]}")
            seen[edge] = step.name

    @property
    def steps(self) -> tuple[Step, ...]:
        return self._steps

    def head(self, kind: str) -> int:
        """The newest version of ``kind`` the steps know (BASE_VERSION when there are none)."""
        return max([BASE_VERSION, *(s.to_version for s in self._steps if s.kind == kind)])

    def knows(self, kind: str, version: int) -> bool:
        """True when ``version`` is the base or an end of some step of ``kind``."""
        return version == BASE_VERSION or any(
            s.kind == kind and version in (s.from_version, s.to_version) for s in self._steps
        )

    def path(self, kind: str, found: int, target: int) -> tuple[Step, ...]:
        """The steps from ``found`` to ``target`` (empty when equal); NoMigrationPath if none."""
        if found == target:
            return ()
        edges: dict[int, list[Step]] = {}
        for step in self._steps:
            if step.kind == kind:
                edges.setdefault(step.from_version, []).append(step)
        for out in edges.values():
            out.sort(key=lambda s: -s.to_version)
        came_by: dict[int, Step] = {}
        queue = deque([found])
        visited = {found}
        while queue:
            version = queue.popleft()
            for step in edges.get(version, ()):
                if step.to_version in visited:
                    continue
                visited.add(step.to_version)
                came_by[step.to_version] = step
                if step.to_version == target:
                    chain: list[Step] = []
                    at = target
                    while at != found:
                        chain.append(came_by[at])
                        at = came_by[at].from_version
                    return tuple(reversed(chain))
                queue.append(step.to_version)
        raise NoMigrationPath(kind, found, target)


def discover_steps(package: str = "store.migrations") -> tuple[Step, ...]:
    """Import every step module of ``package`` (named ``<kind>_v<from>_to_v<to>``)."""
    pkg = importlib.import_module(package)
    steps = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        match = STEP_MODULE.fullmatch(info.name)
        if match is None:
            continue
        step = Step.from_module(importlib.import_module(f"{package}.{info.name}"))
        declared = (step.kind, step.from_version, step.to_version)
        named = (match["kind"], int(match["from_version"]), int(match["to_version"]))
        if declared != named:
            raise BadStep(info.name, f"declares {declared}, its name says {named}")
        steps.append(step)
    return tuple(steps)


_default: StepGraph | None = None


def default_graph() -> StepGraph:
    """The steps shipped in ``store.migrations`` (discovered once)."""
    global _default
    if _default is None:
        _default = StepGraph(discover_steps())
    return _default
