"""``sparrow top``'s frame: a snapshot and its rates as rich renderables (no I/O).

One frame is a title line, the nodes table, the volumes table and a line per problem of the frame
itself (a node whose ``/metrics`` could not be read, no node list). Cells are words, not colours
alone, so a plain (non-terminal) frame says the same; colours only underline them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from sparrow.sizes import format_size
from sparrow.top.snapshot import CopyRow, IoRate, NodeRow, Snapshot, VolumeRow

_STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red"}
_SYNC_WORDS = {"in_sync": "in sync", "syncing": "syncing", "stale": "stale"}
_SYNC_STYLE = {"in_sync": "green", "syncing": "yellow", "stale": "red"}


def rate_text(per_second: float) -> str:
    """Operations per second: ``0``, ``12.5``, ``840``, ``12.3k``."""
    if per_second >= 10_000:
        return f"{per_second / 1000:.1f}k"
    if per_second >= 100 or per_second == 0:
        return f"{per_second:.0f}"
    return f"{per_second:.1f}"


def bytes_rate_text(per_second: float) -> str:
    """Bytes per second: ``0 B/s``, ``512 B/s``, ``4.0 MiB/s``."""
    value = per_second
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}/s" if unit == "B" else f"{value:.1f} {unit}/s"
        value /= 1024
    raise AssertionError("unreachable")


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s ago" if seconds < 60 else f"{seconds / 60:.0f}m ago"


def _size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _node_state(node: NodeRow) -> Text:
    return Text(node.state, style=_STATE_STYLE.get(node.state, ""))


def _draining(node: NodeRow) -> str:
    if not node.draining:
        return "no"
    return f"yes: {node.drain_status}" if node.drain_status else "yes"


def nodes_table(snapshot: Snapshot) -> RenderableType:
    if snapshot.nodes_error is not None:
        return Text(f"nodes: {snapshot.nodes_error}", style="yellow")
    table = Table(title="nodes", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("NODE", "STATE", "HEARTBEAT", "CAPACITY", "FREE", "DRAINING"):
        table.add_column(header, no_wrap=header != "DRAINING")
    for node in snapshot.nodes:
        table.add_row(
            node.node_id,
            _node_state(node),
            age_text(node.heartbeat_age),
            _size(node.capacity_bytes),
            _size(node.free_bytes),
            _draining(node),
        )
    if not snapshot.nodes:
        table.add_row("(none)", "", "", "", "", "")
    return table


def copy_text(copy: CopyRow) -> Text:
    """``n1* in sync``, ``n2 syncing 42%``, ``n3 stale (dead)``: ``*`` marks the primary."""
    text = Text(copy.node_id + ("*" if copy.primary else ""))
    text.append(" ")
    text.append(_SYNC_WORDS.get(copy.sync, copy.sync), style=_SYNC_STYLE.get(copy.sync, ""))
    fraction = copy.resync_fraction
    if copy.sync == "syncing" and fraction is not None:
        text.append(f" {fraction * 100:.0f}%", style="yellow")
    if not copy.alive:
        text.append(" (dead)", style="red")
    return text


def _copies(volume: VolumeRow) -> Text:
    if not volume.copies:
        return Text("-")
    text = Text()
    for i, copy in enumerate(volume.copies):
        if i:
            text.append(", ")
        text.append_text(copy_text(copy))
    return text


def _served(volume: VolumeRow) -> Text:
    if volume.served:
        return Text("served", style="green")
    return Text("not served" + (f": {volume.status}" if volume.status else ""), style="red")


def volumes_table(snapshot: Snapshot, rates: Mapping[str, IoRate] | None) -> RenderableType:
    table = Table(title="volumes", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("VOLUME", no_wrap=True)
    table.add_column("SIZE", no_wrap=True, justify="right")
    table.add_column("EPOCH", no_wrap=True, justify="right")
    table.add_column("PRIMARY", no_wrap=True)
    table.add_column("COPIES (*primary)")
    table.add_column("STATUS")
    for header in ("R/s", "W/s", "READ", "WRITE"):
        table.add_column(header, no_wrap=True, justify="right")
    for volume in snapshot.volumes:
        rate = None if rates is None else rates.get(volume.name)
        io = (
            ("-", "-", "-", "-")
            if rate is None
            else (
                rate_text(rate.read_ops),
                rate_text(rate.write_ops),
                bytes_rate_text(rate.read_bytes),
                bytes_rate_text(rate.write_bytes),
            )
        )
        table.add_row(
            volume.name,
            format_size(volume.size),
            str(volume.epoch),
            volume.primary or "-",
            _copies(volume),
            _served(volume),
            *io,
        )
    if not snapshot.volumes:
        table.add_row("(none)", *[""] * 9)
    return table


def title(snapshot: Snapshot, source: str, clock_text: str, interval: float, *, live: bool) -> Text:
    alive = sum(1 for n in snapshot.nodes if n.state == "alive")
    served = sum(1 for v in snapshot.volumes if v.served)
    text = Text(f"sparrow top  {source}  {clock_text}", style="bold")
    nodes = "" if snapshot.nodes_error is not None else f"nodes {alive}/{len(snapshot.nodes)} alive  "
    hint = "  (q or Ctrl-C quits)" if live else ""
    text.append(f"\n{nodes}volumes {served}/{len(snapshot.volumes)} served  rates over {interval:g}s{hint}")
    return text


def problems(snapshot: Snapshot) -> list[Text]:
    return [
        Text(f"no I/O figures from {node_id}: {why}", style="yellow")
        for node_id, why in sorted(snapshot.scrape_errors.items())
    ]


def frame(
    snapshot: Snapshot,
    rates: Mapping[str, IoRate] | None,
    *,
    source: str,
    clock_text: str,
    interval: float,
    live: bool = False,
) -> Group:
    """The whole frame. ``rates`` None: the first frame, before a second snapshot. ``live``: the
    title says how to quit."""
    return Group(
        title(snapshot, source, clock_text, interval, live=live),
        nodes_table(snapshot),
        volumes_table(snapshot, rates),
        *problems(snapshot),
    )


def plain_text(renderable: RenderableType, width: int) -> str:
    """A renderable as plain text (no colour, no cursor moves), lines without trailing blanks."""
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=False, no_color=True, highlight=False, width=width).print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
