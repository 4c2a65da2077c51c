"""Structured logging: JSON lines for journald and files, a console renderer on a terminal.

Named ``logs`` (not ``logging``) so that ``import logging`` always means the standard library.

Every line carries an ISO-8601 UTC timestamp, the level, the logger name and the event. Context
bound with ``structlog.contextvars.bind_contextvars`` (per connection: peer, initiator, target) is
merged into every line logged from that task. Records from the standard ``logging`` module (asyncio,
aiohttp) are rendered the same way, so the output is uniformly one format.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
import structlog.tracebacks
from structlog.typing import Processor

from sparrow.config import LogFormat


def use_json(fmt: LogFormat, stream: TextIO) -> bool:
    """``auto`` means JSON unless ``stream`` is a terminal (journald and files get JSON)."""
    if fmt is LogFormat.AUTO:
        try:
            return not stream.isatty()
        except (AttributeError, ValueError):
            return True
    return fmt is LogFormat.JSON


def configure_logging(
    fmt: LogFormat = LogFormat.AUTO, level: str = "info", stream: TextIO | None = None
) -> None:
    """Set up structlog and the standard library's root logger to write to ``stream`` (stdout)."""
    stream = sys.stdout if stream is None else stream
    json = use_json(fmt, stream)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        # Tracebacks as data, without local variables: locals can hold CHAP secrets.
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        shared.append(structlog.processors.ExceptionRenderer(transformer))
    else:
        # Plain tracebacks: with rich installed (sparrow top) structlog would default to rich's,
        # which print every frame's local variables (secrets among them).
        renderer = structlog.dev.ConsoleRenderer(
            colors=_colors(stream), exception_formatter=structlog.dev.plain_traceback
        )

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp logs every request at INFO; the API is low-traffic, but keep the journal for events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _colors(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
