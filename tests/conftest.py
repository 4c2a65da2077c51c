"""Checks every test gets: no bug caught inside the iSCSI core (frontend/internal_errors.py), no
secret in a daemon's log, audit log or a CLI's output (tests/leaks.py), and no answer of the master
API that its OpenAPI document does not describe (sparrow.master.openapi_check: turned on here for
the apps tests build in this process, and by tests/integration/process.py for every daemon)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from frontend import internal_errors
from sparrow.master import openapi_check
from tests.leaks import WATCH


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(openapi_check.VALIDATE_ENV, "1")


@pytest.fixture(autouse=True)
def _no_openapi_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which a master app in this process answered outside its OpenAPI document
    (the violation is logged with what was wrong), unless it says it provokes one on purpose
    (``@pytest.mark.openapi_violations_expected``)."""
    before = openapi_check.count()
    yield
    found = openapi_check.count() - before
    if request.node.get_closest_marker("openapi_violations_expected") is None:
        assert not found, f"{found} answer(s) of the master API outside its OpenAPI document: see the log"


@pytest.fixture(autouse=True)
def _no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which the iSCSI core caught an internal error in this process (the
    integration fixtures check the daemons' logs for the same event). A test that provokes one on
    purpose says so with ``@pytest.mark.internal_errors_expected``."""
    before = internal_errors.count()
    yield
    if request.node.get_closest_marker("internal_errors_expected") is None:
        caught = internal_errors.count() - before
        assert not caught, f"{caught} internal error(s) caught in the iSCSI core: see the traceback logged"


@pytest.fixture(autouse=True)
def _no_secret_in_logs() -> Iterator[None]:
    """Fail a test when a secret the harness knows (tests/leaks.py) appears in what its daemons
    logged or its CLI calls printed. Autouse, so it is torn down after the fixtures that stop the
    daemons: their last lines are read too."""
    yield
    leaks = WATCH.check()
    if leaks:
        pytest.fail("a secret leaked:\n" + "\n".join(f"  {leak}" for leak in leaks[:20]), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A test whose captured output (its in-process logs, stdout, stderr) holds a secret fails too."""
    report: pytest.TestReport = yield
    if report.when == "call" and report.passed:
        tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
        leaks = WATCH.check_captured(report.sections, tmp_path)
        if leaks:
            report.outcome = "failed"
            report.longrepr = "a secret leaked:\n" + "\n".join(f"  {leak}" for leak in leaks[:20])
    return report


#: What the session's last check found (printed in the terminal summary).
_SESSION_PROBLEMS: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """What module-scoped fixtures' daemons logged after the last test that checked; and the guard
    that the harness registered something when daemons ran (an empty registry checks nothing).
    Either fails the run (exit status 1)."""
    _SESSION_PROBLEMS.extend(str(leak) for leak in WATCH.check(final=True))
    if WATCH.watched and not WATCH.registered:
        _SESSION_PROBLEMS.append(
            f"{WATCH.watched} daemon(s) ran but tests/leaks.py found no secret to look for"
        )
    if _SESSION_PROBLEMS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SESSION_PROBLEMS:
        terminalreporter.section("secret check (tests/leaks.py)", red=True)
        for problem in _SESSION_PROBLEMS[:20]:
            terminalreporter.write_line(
                f"a secret leaked: {problem}" if " appears in " in problem else problem
            )
