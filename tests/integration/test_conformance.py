"""libiscsi's iscsi-test-cu is the judge of the iSCSI target.

The whole suite runs against a volume with 512-byte logical and physical blocks. Five cases need a
volume whose physical block holds several logical blocks (they skip with "LBPPB < 2"), and one case
(GetLBAStatus.UnmapSingle) cannot pass on such a volume, so those five run again against a 512e
volume (512-byte blocks, 4 KiB physical) and are recorded under the prefix ``512e:``.

The result of every case is kept in tests/conformance/expected.json. Any change fails the test: a
regression is a bug; an improvement must update the file in the same commit
(`make conformance-update` rewrites it from a fresh run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from frontend.internal_errors import INTERNAL_ERROR_EVENT
from tests.conformance.score import counts, merged, score
from tests.integration.daemon import Daemon
from tests.tools import require_tool, run

EXPECTED = Path(__file__).parent.parent / "conformance" / "expected.json"
#: Where the raw output of the last run is kept, for reading failures.
LAST_RUN = Path(os.environ.get("SPARROW_CU_OUTPUT", "/tmp/sparrow-iscsi-test-cu.txt"))
#: The cases that need LOGICAL BLOCKS PER PHYSICAL BLOCK >= 2.
LBPPB_CASES = (
    "ALL.CompareAndWrite.InvalidDataOutSize",
    "ALL.WriteSame10.InvalidDataOutSize",
    "ALL.WriteSame16.InvalidDataOutSize",
    "ALL.WriteSame10.UnmapUnaligned",
    "ALL.WriteSame16.UnmapUnaligned",
)

pytestmark = [pytest.mark.integration, pytest.mark.conformance]


@pytest.mark.timeout(1500)
def test_iscsi_test_cu_matches_expected(daemon: Daemon) -> None:
    tool = require_tool("iscsi-test-cu")
    daemon.create_volume("conformance", "64MiB")
    daemon.create_volume("conformance-512e", "64MiB", "--physical-block-size", "4096")
    url = daemon.url("conformance")
    proc = run([tool, "-v", "-d", "-S", url, url], timeout=1200, check=False)
    output = proc.stdout + proc.stderr
    url_512e = daemon.url("conformance-512e")
    proc = run([tool, "-v", "-d", "-S", "-t", ",".join(LBPPB_CASES), url_512e, url_512e],
               timeout=300, check=False)
    output_512e = proc.stdout + proc.stderr
    LAST_RUN.write_text(output + "\n\n===== 512e volume =====\n\n" + output_512e)

    results = score(output)
    assert len(results) > 200, f"iscsi-test-cu ran only {len(results)} tests:\n{output[-3000:]}"
    extra = {f"512e:{name}": result for name, result in score(output_512e).items()}
    assert len(extra) == len(LBPPB_CASES), f"the 512e pass ran {sorted(extra)}:\n{output_512e[-3000:]}"
    results.update(extra)

    if os.environ.get("SPARROW_UPDATE_CONFORMANCE") == "1":
        EXPECTED.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    expected: dict[str, str] = json.loads(EXPECTED.read_text())
    changed = {
        name: (expected.get(name, "absent"), results.get(name, "absent"))
        for name in sorted(set(expected) | set(results))
        if expected.get(name) != results.get(name)
    }
    c = counts(merged(results))
    summary = f"{c['passed']} passed, {c['skipped']} skipped, {c['failed']} failed"
    assert not changed, (
        f"conformance changed ({summary}); raw output in {LAST_RUN}\n"
        + "\n".join(f"  {n}: expected {a}, got {b}" for n, (a, b) in changed.items())
        + "\nIf these are improvements, run `make conformance-update` and commit expected.json."
    )
    assert INTERNAL_ERROR_EVENT not in daemon.log(), "the iSCSI core caught a bug during the suite"
