"""Score the verbose output of libiscsi's ``iscsi-test-cu -v``.

Every distinct test is "passed" (ran clean), "skipped" (printed [SKIPPED]: the target said it lacks
something, or the case did not apply) or "failed". Same rules as ../shared/tools/cu-score.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_SUITE = re.compile(r"^Suite: (\S+)")
_TEST = re.compile(r"^\s+Test: (\S+) \.\.\.(.*)$")


def score(text: str) -> dict[str, str]:
    results: dict[str, str] = {}
    suite: str | None = None
    current: str | None = None
    for line in text.splitlines():
        m = _SUITE.match(line)
        if m:
            suite, current = m.group(1), None
            continue
        m = _TEST.match(line)
        if m:
            current = f"{suite}.{m.group(1)}"
            results[current] = "passed"
            line = m.group(2)
        if current is None:
            continue
        m = re.match(rf"^Suite {re.escape(suite or '')}, Test (\S+) had failures", line.strip())
        if m:
            results[f"{suite}.{m.group(1)}"] = "failed"
            continue
        if "[FAILED]" in line:
            results[current] = "failed"
        elif "[SKIPPED]" in line and results[current] == "passed":
            results[current] = "skipped"
    return results


def merged(results: dict[str, str]) -> dict[str, str]:
    """One result per distinct test. A case run again on another volume configuration (recorded as
    ``CONFIG:NAME``) fails if it failed anywhere, else passes if it passed anywhere, else is skipped."""
    out: dict[str, str] = {}
    for name, result in results.items():
        base = name.split(":", 1)[1] if ":" in name else name
        seen = out.get(base)
        if seen is None or result == "failed" or (result == "passed" and seen == "skipped"):
            out[base] = result
    return out


def counts(results: dict[str, str]) -> dict[str, int]:
    return {k: sum(1 for v in results.values() if v == k) for k in ("passed", "skipped", "failed")}


def main(argv: list[str]) -> int:
    results = score(Path(argv[0]).read_text(errors="replace"))
    if "--json" in argv:
        print(json.dumps(results, indent=1, sort_keys=True))
    c = counts(results)
    print(f"{len(results)} tests: {c['passed']} passed, {c['skipped']} skipped, {c['failed']} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
