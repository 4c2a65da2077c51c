"""sparrow.logs: a logged exception's traceback never shows local variables (they can hold CHAP
secrets, tokens, keys), in JSON and on the console. rich being installed (for ``sparrow top``)
makes structlog's console renderer default to rich tracebacks *with* locals."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
import structlog

from sparrow.config import LogFormat
from sparrow.logs import configure_logging

SECRET = "local-secret-value-0123456789"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def fails_with_a_secret_in_its_locals() -> None:
    chap_secret = SECRET
    raise RuntimeError(f"refused ({len(chap_secret)} characters)")


@pytest.mark.parametrize("fmt", [LogFormat.JSON, LogFormat.CONSOLE])
def test_a_logged_traceback_shows_no_local_variable(fmt: LogFormat, restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(fmt, "info", stream)
    try:
        fails_with_a_secret_in_its_locals()
    except RuntimeError:
        structlog.get_logger("test").exception("it failed")
    text = stream.getvalue()
    assert "fails_with_a_secret_in_its_locals" in text and "refused (29 characters)" in text, text
    assert SECRET not in text, text
