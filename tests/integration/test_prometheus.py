"""The alerting rules (docs/alerts.yml) and the daemons' /metrics, checked with Prometheus's own
promtool (Debian's ``prometheus`` package; `make test` installs it, a missing promtool fails).

- ``promtool check rules`` accepts the rules, and ``promtool test rules`` shows each tested alert
  firing when it should and not before (tests/prometheus/alerts_test.yml);
- ``promtool check metrics`` accepts a live scrape of a master and of a node that has served I/O
  through a real initiator, with no lint complaint;
- every metric a rule names is in those scrapes, so no rule watches a metric nobody exports.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster
from tests.integration.test_node import qemu_io
from tests.tools import require_tool

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "docs" / "alerts.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yml"


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_promtool_accepts_the_alerting_rules_and_they_fire_as_tested() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"SUCCESS: \d+ rules found", checked.stdout), checked.stdout
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout


def rule_metrics() -> set[str]:
    """The sparrow_* metric names the rules' expressions use."""
    exprs = re.findall(r"expr: (>-\n(?:\s{10}.*\n)+|.*\n)", RULES.read_text())
    return set(re.findall(r"\bsparrow_[a-z_]+", "".join(exprs)))


def families(scrape: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", scrape, flags=re.MULTILINE))


def test_promtool_accepts_live_scrapes_of_a_master_and_a_node(make_cluster: Callable[[int], Cluster]) -> None:
    require_tool("promtool")
    require_tool("qemu-io")
    cluster = make_cluster(2)
    cluster.cli("volume", "create", "watched", "--size", "16MiB", "--replicas", "2")
    v = cluster.wait_converged("watched", epoch=1, copies=2)
    primary = cluster.node(v["primary"]["node_id"])
    cluster.wait_serving(primary.node_id, v["volume_id"])
    qemu_io(primary.url("watched"), "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")

    scrapes = {"master": cluster.master.metrics(), "node": primary.metrics()}
    assert 'sparrow_scsi_command_seconds_bucket{le="+Inf",op="write",volume="watched"}' in scrapes["node"]
    assert "sparrow_master_volumes_unserved 0.0" in scrapes["master"], scrapes["master"]
    for name, scrape in scrapes.items():
        checked = promtool("check", "metrics", stdin=scrape)
        assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", (
            f"promtool check metrics on the {name}'s scrape:\n{checked.stdout}{checked.stderr}"
        )

    exported = families(scrapes["master"]) | families(scrapes["node"])
    missing = rule_metrics() - exported
    assert rule_metrics() and not missing, f"rules watch metrics nobody exports: {sorted(missing)}"
