"""``sparrow top [--api URL] [--token TOKEN] [--interval S] [--once]``: the cluster, live.

Every ``--interval`` seconds: ``GET /v1/volumes`` and ``GET /v1/nodes`` from the master (with the
token the other commands use, sparrow.cli._client), and each live node's ``/metrics`` at the
``http`` address the node gave in its Hello, with the scrape token the master hands an admin token
(``GET /v1/metrics/scrape-token``, sparrow.metricsauth; kept once given: :class:`ScrapeToken`) and
nothing else (the address is the node's word: :func:`scrape`); the I/O rates come from two
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
from sparrow.metricsauth import SCRAPE_TOKEN_ROUTE
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


def scrape(
    url: str, timeout: float = SCRAPE_TIMEOUT, limit: int = MAX_METRICS_BYTES, *, token: str | None = None
) -> str:
    """GET a node's /metrics text; OSError (any reason) when it cannot be read.

    The address is what a node said it is, so the answer is not trusted: the whole exchange
    (connect, headers, body) has ``timeout`` seconds, not each read (a node dripping a byte a
    second is cut off), the answer at most ``limit`` bytes, no redirect is followed and nothing
    but the request line, Host and the scrape ``token`` is sent (never the API token, no cookie,
    no proxy). A node that said it is a cluster member holds the scrape token already."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise OSError(f"not an http://HOST:PORT/ address: {url!r}")
    deadline = time.monotonic() + timeout
    data = bytearray()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        host = parts.netloc.encode("idna")
        authorization = b"" if token is None else b"Authorization: Bearer " + token.encode("ascii") + b"\r\n"
        request = b"GET " + (parts.path or "/").encode() + b" HTTP/1.0\r\nHost: " + host + b"\r\n"
        sock.sendall(request + authorization + b"\r\n")
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


class ScrapeToken:
    """The nodes' scrape token, asked of the master until it gives it, then kept (admin tokens
    only: another gets 403 at each frame, and each node's /metrics is reported unreadable with
    the master's reason)."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.error: str | None = None

    def get(self, client: ApiClient) -> str | None:
        if self.token is None:
            try:
                answer = client.request("GET", SCRAPE_TOKEN_ROUTE)
            except CliError as e:
                self.error = f"no scrape token: {e}"
                return None
            token = answer.get("token") if isinstance(answer, dict) else None
            if not isinstance(token, str) or not token.isascii() or not token.isprintable():
                self.error = "no scrape token: the master's answer holds none"
                return None
            self.token, self.error = token, None
        return self.token


def take_snapshot(
    client: ApiClient, now: Callable[[], float] = time.monotonic, credential: ScrapeToken | None = None
) -> Snapshot:
    """Ask the master and scrape every live node (in parallel) with ``credential``'s token; ``now``
    is read once both answered, so the rates' time span matches the counters' (the scrapes are the
    last to come)."""
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
        credential = credential if credential is not None else ScrapeToken()
        token = credential.get(client)
        with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            futures = {node_id: pool.submit(scrape, url, token=token) for node_id, url in targets.items()}
            for node_id, future in futures.items():
                try:
                    texts[node_id] = future.result()
                except (OSError, ValueError) as e:
                    reason = e.reason if isinstance(e, urllib.error.URLError) else e
                    why = _reason_text(reason)
                    errors[node_id] = why if credential.error is None else f"{why} ({credential.error})"
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
    credential = ScrapeToken()
    try:
        if args.once:
            first = take_snapshot(client, credential=credential)
            time.sleep(interval)  # the span of the rates
            current = take_snapshot(client, credential=credential)
            _print_plain(_frame(client, current, io_rates(first, current), interval), out)
        elif out.isatty():
            _live(client, interval, out, credential)
        else:
            _plain_frames(client, interval, out, credential)
    except KeyboardInterrupt:  # Ctrl-C is how one leaves a live view: not an error
        return 0
    return 0


def _plain_frames(client: ApiClient, interval: float, out: TextIO, credential: ScrapeToken) -> None:
    previous = None
    while True:
        started = time.monotonic()
        current = take_snapshot(client, credential=credential)
        rates = None if previous is None else io_rates(previous, current)
        _print_plain(_frame(client, current, rates, interval), out)
        out.write("\n")
        previous = current
        time.sleep(max(0.0, started + interval - time.monotonic()))


def _live(client: ApiClient, interval: float, out: TextIO, credential: ScrapeToken) -> None:
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
                current = take_snapshot(client, credential=credential)
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
