"""``sparrow top``: a live terminal view of the cluster (nodes, volumes, copies, I/O rates).

``snapshot.py`` is the sans-IO core (the master's JSON answers and the nodes' scraped ``/metrics``
-> a frozen :class:`~sparrow.top.snapshot.Snapshot`; rates from two snapshots and their ``now``),
``render.py`` turns a snapshot and its rates into rich renderables, ``cli.py`` fetches, refreshes
and reads the keyboard. This module only adds the command to the parser: rich and the rest are
imported when ``sparrow top`` runs, not by every other command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TextIO

DEFAULT_INTERVAL = 2.0


def _interval_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("--interval must be 0.1..3600 seconds")
    return value


def add_top_command(
    commands: Any, with_api: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    top = with_api(
        commands.add_parser(
            "top",
            help="a live view of nodes, volumes, copies and I/O rates",
            description="A live view of the cluster: nodes (state, heartbeat, capacity, draining), "
            "volumes (epoch, primary, copies and their sync state, served) and each volume's I/O "
            "rates from the nodes' /metrics. q or Ctrl-C quits. Not a terminal: plain frames.",
        )
    )
    top.add_argument(
        "--interval",
        type=_interval_arg,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"seconds between refreshes, and the span of the rates (default {DEFAULT_INTERVAL:g})",
    )
    top.add_argument(
        "--once", action="store_true", help="print one plain frame (rates over one interval) and exit"
    )
    top.set_defaults(func=_cmd_top)


def _cmd_top(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.top.cli import cmd_top

    return cmd_top(args, out)
