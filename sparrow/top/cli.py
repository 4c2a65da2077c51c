"""``sparrow top [--api URL] [--token TOKEN] [--interval S] [--once]``: the cluster, live.

Every ``--interval`` seconds: ``GET /v1/volumes`` and ``GET /v1/nodes`` from the master (with the
token the other commands use, sparrow.cli._client), and each live node's ``/metrics`` (no token:
the route is open, and the address is the node's word: :func:`scrape`) at the ``http`` address
the node gave in its Hello; the I/O rates come from two
such snapshots (sparrow.top.snapshot). In a terminal the frame is redrawn in place on the
alternate screen (rich's Live) until ``q`` or Ctrl-C, both exit 0 with the terminal restored.
Written to anything else (a pipe, a file) it prints one plain frame per interval. ``--once``
takes two snapshots one interval apart, prints one plain frame with their rates and exits.

A master that cannot be reached ends ``--once`` with the usual one-line error (exit 1); the live
view shows the error in place of the frame and tries again at the next interval. A node whose
``/metrics`` cannot be read is named under the tables; its volumes' rates count without it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
import termios
import time
import tty
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from sparrow.cli import ApiClient, CliError, _client, _reason_text
from sparrow.top.render import frame, plain_text
from sparrow.top.snapshot import IoRate, Snapshot, io_rates, metrics_targets, nodes_from_json, snapshot

#: Seconds a node's /metrics may take before it is reported as not read (the frame waits for it).
SCRAPE_TIMEOUT = 2.0
#: The most a node's /metrics answer may hold (~5 kB a volume it serves: some 13000 volumes).
MAX_METRICS_BYTES = 64 << 20
#: Columns of a plain frame when $COLUMNS does not say.
PLAIN_WIDTH = 160
QUIT_KEYS = frozenset({"q", "Q"})


# --- fetching ----------------------------------------------------------------------------------


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT, limit: int = MAX_METRICS_BYTES) -> str:
    """GET a node's /metrics text; OSError (any reason) when it cannot be read.

    The address is what a node said it is, so the answer is not trusted: the whole exchange
    (connect, headers, body) has ``timeout`` seconds, not each read (a node dripping a byte a
    second is cut off), the answer at most ``limit`` bytes, no redirect is followed and nothing
    but the request line and Host is sent (no token, no cookie, no proxy)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise OSError(f"not an http://HOST:PORT/ address: {url!r}")
    deadline = time.monotonic() + timeout
    data = bytearray()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        host = parts.netloc.encode("idna")
        sock.sendall(b"GET " + (parts.path or "/").encode() + b" HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole answer within {timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no whole answer within {timeout:g} s") from None
            if not chunk:
                break
            data += chunk
            if len(data) > limit:
                raise OSError(f"answer larger than {limit} bytes")
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or not status[0].startswith(b"HTTP/1."):
        raise OSError("not an HTTP answer")
    if status[1] != b"200":
        raise OSError(f"HTTP {status[1][:3].decode('ascii', 'replace')}")
    return body.decode("utf-8", errors="replace")


def take_snapshot(client: ApiClient, now: Callable[[], float] = time.monotonic) -> Snapshot:
    """Ask the master and scrape every live node (in parallel); ``now`` is read once both
    answered, so the rates' time span matches the counters' (the scrapes are the last to come)."""
    volumes = client.request("GET", "/v1/volumes")
    nodes_answer: Any = None
    nodes_error = None
    try:
        nodes_answer = client.request("GET", "/v1/nodes")
    except CliError as e:  # a tenant token sees no nodes (403): the volumes still show
        nodes_error = str(e)
    targets = metrics_targets(nodes_from_json(nodes_answer))
    texts: dict[str, str] = {}
    errors: dict[str, str] = {}
    if targets:
        with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            futures = {node_id: pool.submit(scrape, url) for node_id, url in targets.items()}
            for node_id, future in futures.items():
                try:
                    texts[node_id] = future.result()
                except (OSError, ValueError) as e:
                    reason = e.reason if isinstance(e, urllib.error.URLError) else e
                    errors[node_id] = _reason_text(reason)
    return snapshot(
        now(), volumes, nodes_answer, nodes_error=nodes_error, scrapes=texts, scrape_errors=errors
    )


# --- the command -------------------------------------------------------------------------------


def _clock_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _frame(
    client: ApiClient,
    current: Snapshot,
    rates: Mapping[str, IoRate] | None,
    interval: float,
    *,
    live: bool = False,
) -> RenderableType:
    return frame(
        current, rates, source=client.base_url, clock_text=_clock_text(), interval=interval, live=live
    )


def _print_plain(renderable: RenderableType, out: TextIO) -> None:
    """One plain frame at a width tables fit in ($COLUMNS, else :data:`PLAIN_WIDTH`)."""
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else PLAIN_WIDTH
    out.write(plain_text(renderable, width))
    out.flush()


def cmd_top(args: argparse.Namespace, out: TextIO) -> int:
    client = _client(args)
    interval: float = args.interval
    try:
        if args.once:
            first = take_snapshot(client)
            time.sleep(interval)  # the span of the rates
            current = take_snapshot(client)
            _print_plain(_frame(client, current, io_rates(first, current), interval), out)
        elif out.isatty():
            _live(client, interval, out)
        else:
            _plain_frames(client, interval, out)
    except KeyboardInterrupt:  # Ctrl-C is how one leaves a live view: not an error
        return 0
    return 0


def _plain_frames(client: ApiClient, interval: float, out: TextIO) -> None:
    previous = None
    while True:
        started = time.monotonic()
        current = take_snapshot(client)
        rates = None if previous is None else io_rates(previous, current)
        _print_plain(_frame(client, current, rates, interval), out)
        out.write("\n")
        previous = current
        time.sleep(max(0.0, started + interval - time.monotonic()))


def _live(client: ApiClient, interval: float, out: TextIO) -> None:
    console = Console(file=out)
    previous: Snapshot | None = None
    with (
        _keys(sys.stdin) as read_key,
        Live(
            Text("asking the master ..."),
            console=console,
            screen=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        ) as live,
    ):
        while True:
            started = time.monotonic()
            view: RenderableType
            try:
                current = take_snapshot(client)
            except CliError as e:
                view = Text(f"sparrow top  {client.base_url}  {_clock_text()}\n{e}", style="red")
                previous = None
            else:
                rates = None if previous is None else io_rates(previous, current)
                view = _frame(client, current, rates, interval, live=True)
                previous = current
            live.update(view, refresh=True)
            deadline = started + interval
            while (left := deadline - time.monotonic()) > 0:
                if read_key(left) in QUIT_KEYS:
                    return


@contextlib.contextmanager
def _keys(stdin: TextIO) -> Iterator[Callable[[float], str | None]]:
    """``read_key(timeout)``: one key pressed within ``timeout`` seconds, or None. The terminal is
    in cbreak mode meanwhile (keys arrive unbuffered and unechoed; Ctrl-C still interrupts) and
    restored however the view ends. Without a terminal on stdin it only waits."""
    if not stdin.isatty():

        def wait(timeout: float) -> str | None:
            time.sleep(timeout)
            return None

        yield wait
        return
    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read_key(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        yield read_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
