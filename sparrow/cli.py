"""The ``sparrow`` command.

    sparrow serve [--config FILE] [--data-dir DIR] [--iscsi HOST:PORT] [--http HOST:PORT]
                  [--advertise HOST[:PORT]]... [--base-iqn IQN] [--demo-volume NAME:SIZE]
                  [--log-format auto|json|console] [--log-level LEVEL]
    sparrow volume create NAME --size SIZE [--block-size 512|4096] [--physical-block-size 512|4096]
                  [--chap-user U --chap-secret S [--chap-mutual-user U --chap-mutual-secret S]]
                  [--backing PATH] [--replicas 1|2|3] [--json]
    sparrow volume list [--json]
    sparrow volume inspect NAME [--json]
    sparrow volume explain NAME [--json]   why it is (not) served, and what to do
    sparrow volume resize NAME --size SIZE
    sparrow volume delete NAME
    sparrow migrate DATA_DIR [--list-versions] [--dry-run] [--target-version V]
                  [--kind volume|authority|cluster-volume|cluster-node]
    sparrow master --data-dir DIR [--listen HOST:PORT] [--http HOST:PORT] [--heartbeat-interval S]
                  [--lease S] [--dead-after S] [--margin S] [--base-iqn IQN] [--log-format F]
    sparrow node list [--json]
    sparrow node forget ID
    sparrow node rekey NODE [--key HEX]: rebind a node's identity (sparrow.nodekeys_cli)
    sparrow node approve NODE [--key HEX]: admit a pending node as a member (sparrow.nodekeys_cli)
    sparrow volume failover NAME [--to NODE] | rebuild NAME --replica NODE, sparrow node drain|undrain
                  NODE: the operator verbs (sparrow.moves_cli)
    sparrow node --data-dir DIR --node-id ID --master HOST:PORT [--iscsi HOST:PORT]
                  [--replication HOST:PORT] [--http HOST:PORT] [--heartbeat-interval S] [--fence-margin S]
                  [--replication-ack-timeout S] [--advertise-replication HOST:PORT]
                  [--resync-rate BYTES/s]
    sparrow token create --role admin|operator|reader [--tenant PREFIX] [--name NAME] [--json]
                  [--data-dir DIR: offline, the daemon stopped]
    sparrow token list [--json]
    sparrow token revoke ID
    sparrow top [--interval S] [--once]: nodes, volumes, copies and I/O rates, live (sparrow.top)

Volume commands talk to the daemon's HTTP API (``--api URL``, else $SPARROW_API, else
http://127.0.0.1:3280) with urllib, sending a bearer token: ``--token``, else $SPARROW_TOKEN, else
the URL's entry in the credentials file (sparrow.auth.credentials; a daemon writes its bootstrap
admin token there on its first start). Every error is one line on stderr; the exit code is 1, or 2 for
a usage error (bad flag, bad size, bad URL). Never a traceback. ``migrate`` works on the data
directory itself (the daemon must be stopped: it holds the directory's lock).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from sparrow.sizes import SizeError, format_size, parse_size
from store.migrations.graph import KINDS

#: ``--public-metrics`` of master, node and serve (sparrow.metricsauth).
PUBLIC_METRICS_HELP = (
    "answer GET /metrics and the full /healthz without a credential (for labs only: both name "
    "volumes); "
    "by default it needs the scrape token (`sparrow metrics token`) or, on the master, an API token"
)

DEFAULT_API = "http://127.0.0.1:3280"
API_ENV = "SPARROW_API"
#: Seconds to wait for the daemon; a create with fallocate or a delete that drains sessions can take a while.
#: Seconds ``volume create`` and ``resize`` wait for the volume to be served (``--wait``).
DEFAULT_WAIT = 10.0
MAX_WAIT = 60.0
API_TIMEOUT = 60.0
#: The most of one answer the CLI reads (the largest real one, a list of 10 000 volumes, is a few
#: MiB); an error answer gets less. Past it, or past the request's timeout in all, the CLI stops
#: reading with one line: an address that is not the Sparrow API cannot hold it or fill its memory.
MAX_ANSWER = 64 << 20
MAX_ERROR_ANSWER = 1 << 20
TOKEN_HELP = "API token (default $SPARROW_TOKEN, else the credentials file's entry for the API URL)"


class CliError(Exception):
    """An error to print as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class UsageError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code=2)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that raise instead of exiting (so main() can be called in-process)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


# --- the HTTP client -----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is for this client: urllib would follow it with the
    bearer token, to wherever the ``Location`` points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class ApiClient:
    """A small synchronous JSON client for the daemon's API. It never follows a redirect (the
    token goes to the API's address and nowhere else)."""

    def __init__(self, base_url: str, timeout: float = API_TIMEOUT, token: str | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"invalid API URL {base_url!r}: expected http://HOST:PORT")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token = token

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        deadline = time.monotonic() + self.timeout
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                raw = self._read_answer(resp, url, deadline)
        except urllib.error.HTTPError as e:
            with e:
                message = _http_error_message(e)
                if e.code == 401:
                    how = "give --token, set $SPARROW_TOKEN or add it to the credentials file"
                    message = f"{message} ({'no token found' if not self.token else 'token refused'}: {how})"
                raise CliError(message) from None
        except urllib.error.URLError as e:
            raise CliError(self._unreachable(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:
            raise CliError(self._unreachable(e)) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"unexpected answer from {url}: not JSON (is this the Sparrow API?)") from None

    def _read_answer(self, resp: http.client.HTTPResponse, url: str, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := resp.read1(1 << 16):
            size += len(chunk)
            if size > MAX_ANSWER:
                raise CliError(f"the answer from {url} is larger than {MAX_ANSWER >> 20} MiB: not read")
            if time.monotonic() > deadline:
                raise CliError(f"the answer from {url} did not arrive within {self.timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)

    def _unreachable(self, reason: object) -> str:
        return f"cannot reach the Sparrow daemon at {self.base_url}: {_reason_text(reason)}"


def _reason_text(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve host ({reason.strerror})"
    if isinstance(reason, http.client.RemoteDisconnected | ConnectionResetError):
        return "the connection was closed before an answer came"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    text = str(reason) or type(reason).__name__
    return text.splitlines()[0]


def _http_error_message(e: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(e.read(MAX_ERROR_ANSWER))
    except (ValueError, OSError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return str(payload["error"])
    if 300 <= e.code < 400:
        return (
            f"the daemon answered HTTP {e.code} {e.reason}, a redirect to {e.headers.get('Location')!r}: "
            "not followed (the token goes to the API's own address only; give that with --api)"
        )
    return f"the daemon answered HTTP {e.code} {e.reason}"


# --- argument types ------------------------------------------------------------------------------


def _wait_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}") from None
    if not 0 <= value <= MAX_WAIT:
        raise argparse.ArgumentTypeError(f"--wait must be 0..{MAX_WAIT:g} seconds")
    return value


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# --- volume commands -----------------------------------------------------------------------------


def _client(args: argparse.Namespace, wait: float = 0.0) -> ApiClient:
    from sparrow.auth.credentials import resolve_token

    url = args.api or os.environ.get(API_ENV) or DEFAULT_API
    return ApiClient(url, timeout=API_TIMEOUT + wait, token=resolve_token(url, getattr(args, "token", None)))


def _wait_query(wait: float) -> str:
    """``?wait=SECONDS``: the master answers once the volume is served (or it cannot be yet)."""
    return f"?wait={wait:g}" if wait > 0 else ""


def _warn_unserved(volume: Any, wait: float, err: TextIO) -> None:
    """One line on stderr when a volume the master recorded is not served yet (exit code 0: the
    volume exists; ``status`` says what it waits for)."""
    if wait <= 0 or not isinstance(volume, dict) or "epoch" not in volume:
        return
    if volume.get("served") is False or volume.get("url") is None:
        reason = volume.get("status") or (
            "not placed yet" if volume.get("url") is None else "its primary has not reported it served yet"
        )
        print(f"sparrow: warning: volume {volume.get('name')} is not served yet: {reason}", file=err)


def cmd_volume_create(args: argparse.Namespace, out: TextIO) -> int:
    if args.size is None and args.backing is None:
        raise UsageError("sparrow volume create: error: --size is required (unless --backing names a device)")
    if (args.chap_user is None) != (args.chap_secret is None):
        raise UsageError("sparrow volume create: error: --chap-user and --chap-secret go together")
    if (args.chap_mutual_user is None) != (args.chap_mutual_secret is None):
        raise UsageError(
            "sparrow volume create: error: --chap-mutual-user and --chap-mutual-secret go together"
        )
    if args.chap_mutual_user is not None and args.chap_user is None:
        raise UsageError("sparrow volume create: error: mutual CHAP needs --chap-user and --chap-secret too")
    body: dict[str, Any] = {"name": args.name, "block_size": args.block_size}
    if args.size is not None:
        body["size"] = args.size
    optional = {
        "backing": args.backing,
        "physical_block_size": args.physical_block_size,
        "chap_user": args.chap_user,
        "chap_secret": args.chap_secret,
        "chap_mutual_user": args.chap_mutual_user,
        "chap_mutual_secret": args.chap_mutual_secret,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.replicas is not None:
        body["replicas"] = args.replicas
    volume = _client(args, args.wait).request("POST", f"/v1/volumes{_wait_query(args.wait)}", body)
    _print_volume(volume, out, as_json=args.json)
    _warn_unserved(volume, args.wait, args.err)
    return 0


def cmd_volume_list(args: argparse.Namespace, out: TextIO) -> int:
    answer = _client(args).request("GET", "/v1/volumes")
    _print_listing(
        answer,
        "volumes",
        out,
        as_json=args.json,
        header=("NAME", "SIZE", "BLOCK", "IQN", "PAUSED"),
        row=lambda v: (
            v["name"],
            format_size(v["size"]),
            str(v["block_size"]),
            v["iqn"],
            "yes" if v.get("paused") else "no",
        ),
    )
    return 0


def _print_listing(
    answer: Any,
    key: str,
    out: TextIO,
    *,
    as_json: bool,
    header: Sequence[str],
    row: Callable[[dict[str, Any]], Sequence[str]],
) -> None:
    """A list answer (``{key: [...]}``) as JSON, as "no KEY", or as a table of ``header`` and one
    ``row(item)`` per item."""
    items = answer.get(key, []) if isinstance(answer, dict) else []
    if as_json:
        print(json.dumps(items, indent=2), file=out)
    elif not items:
        print(f"no {key}", file=out)
    else:
        _print_table([header, *(row(item) for item in items)], out)


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip(), file=out)


def cmd_volume_inspect(args: argparse.Namespace, out: TextIO) -> int:
    volume = _client(args).request("GET", f"/v1/volumes/{_quote(args.name)}")
    _print_volume(volume, out, as_json=args.json)
    return 0


def cmd_volume_explain(args: argparse.Namespace, out: TextIO) -> int:
    body = _client(args).request("GET", f"/v1/volumes/{_quote(args.name)}/explain")
    if args.json:
        print(json.dumps(body, indent=2), file=out)
    else:
        from sparrow.cluster.explain import render

        print(render(body), file=out)
    return 0


def cmd_volume_resize(args: argparse.Namespace, out: TextIO) -> int:
    path = f"/v1/volumes/{_quote(args.name)}/resize{_wait_query(args.wait)}"
    volume = _client(args, args.wait).request("POST", path, {"size": args.size})
    _warn_unserved(volume, args.wait, args.err)
    if args.json:
        print(json.dumps(volume, indent=2), file=out)
    else:
        print(
            f"volume {volume['name']} is now {format_size(volume['size'])} ({volume['size']} bytes)", file=out
        )
    return 0


def cmd_volume_delete(args: argparse.Namespace, out: TextIO) -> int:
    _client(args).request("DELETE", f"/v1/volumes/{_quote(args.name)}")
    print(f"deleted volume {args.name}", file=out)
    return 0


def _copy_text(r: dict[str, Any]) -> str:
    """One copy of a volume: "n2 (replica, alive, syncing 12 MiB of 1 GiB)"; its sync state as the
    master recorded it (``in sync``, ``stale``: may lack acknowledged writes, or ``syncing`` with
    the bytes copied so far)."""
    sync = r.get("sync")
    resync = r.get("resync")
    if sync == "syncing" and resync:
        sync_text = f"syncing {format_size(resync['done_bytes'])} of {format_size(resync['total_bytes'])}"
    else:
        sync_text = {"in_sync": "in sync", None: ""}.get(sync, str(sync))
    parts = [r["role"], r["state"], *([sync_text] if sync_text else [])]
    return f"{r['node_id']} ({', '.join(parts)})"


def _print_volume(v: dict[str, Any], out: TextIO, *, as_json: bool) -> None:
    """A volume as the master describes it (sparrow.master.api.volume_json)."""
    if as_json:
        print(json.dumps(v, indent=2), file=out)
        return
    primary = v.get("primary")
    copies = ", ".join(_copy_text(r) for r in v.get("replicas") or [])
    chap = v.get("chap")
    if chap is None:
        chap_text = "none"
    elif chap.get("mutual_user"):
        chap_text = f"user {chap['user']}, mutual user {chap['mutual_user']}"
    else:
        chap_text = f"user {chap['user']}"
    lines = [
        ("name", v["name"]),
        ("size", f"{format_size(v['size'])} ({v['size']} bytes)"),
        ("block size", str(v["block_size"])),
        ("phys block", str(v.get("physical_block_size") or v["block_size"])),
        ("replicas", f"{len(v.get('replicas') or [])} of {v['replicas_wanted']}"),
        ("epoch", str(v["epoch"])),
        ("primary", f"{primary['node_id']} at {primary['portal']}" if primary else "-"),
        ("copies", copies or "-"),
        ("status", v.get("status") or "ok"),
        ("paused", "yes" if v.get("paused") else "no"),
        ("iqn", v.get("iqn") or "-"),
        ("lun", str(v.get("lun", 0))),
        ("url", v.get("url") or "-"),
        ("chap", chap_text),
        ("serial", v.get("serial") or "-"),
        ("naa", v.get("naa") or "-"),
        ("volume id", v["volume_id"]),
        ("backing", v.get("backing") or "sparse file in the data directory"),
        ("created", str(v.get("created_at") or "-")),
    ]
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}", file=out)


# --- serve -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from sparrow.config import ConfigError, Overrides, load_config

    overrides = Overrides(
        data_dir=args.data_dir,
        iscsi=args.iscsi,
        http=args.http,
        advertise=tuple(args.advertise) if args.advertise else None,
        base_iqn=args.base_iqn,
        demo_volume=args.demo_volume,
        log_format=args.log_format,
        log_level=args.log_level,
        allow_backing=tuple(args.allow_backing) if args.allow_backing else None,
        public_metrics=True if args.public_metrics else None,
    )
    try:
        config = load_config(Path(args.config) if args.config else None, overrides)
    except ConfigError as e:
        raise CliError(str(e), code=2 if e.usage else 1) from None

    from sparrow.embedded import run
    from sparrow.logs import configure_logging

    configure_logging(config.log_format, config.log_level)
    return run(config)


# --- node --------------------------------------------------------------------------------------


def cmd_node(args: argparse.Namespace, out: TextIO) -> int:
    """``sparrow node --data-dir DIR --node-id ID --master HOST:PORT``: run a cluster node
    (sparrow.node.daemon). ``sparrow node list`` is a subcommand of its own (cmd_node_list)."""
    from sparrow.config import ConfigError
    from sparrow.node.daemon import node_config

    try:
        config = node_config(
            data_dir=args.data_dir,
            node_id=args.node_id,
            master=args.master,
            iscsi=args.iscsi,
            replication=args.replication,
            http=args.http,
            heartbeat_interval=args.heartbeat_interval,
            log_format=args.log_format,
            log_level=args.log_level,
            cluster_secret_file=args.cluster_secret_file,
            allow_backing=tuple(args.allow_backing or ()),
            fence_margin=args.fence_margin,
            replication_ack_timeout=args.replication_ack_timeout,
            advertise_replication=args.advertise_replication,
            resync_rate=args.resync_rate,
            master_key=args.master_key,
            public_metrics=args.public_metrics,
        )
    except ConfigError as e:
        raise CliError(f"sparrow node: error: {e}", code=2 if e.usage else 1) from None

    from sparrow.logs import configure_logging
    from sparrow.node.daemon import run

    configure_logging(config.log_format, config.log_level)
    return run(config)


# --- migrate -----------------------------------------------------------------------------------


def _version_arg(text: str) -> int:
    try:
        version = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: expected a positive integer") from None
    if version < 1:
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: expected a positive integer")
    return version


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    """``sparrow migrate``: schema migrations of the durable state in DATA_DIR (store.migrations)."""
    from pathlib import Path

    from store.blockstore import StoreError
    from store.migrations import HISTORY_FILE, migrate, versions

    data_dir = Path(args.data_dir)
    kinds = frozenset({args.kind}) if args.kind else None
    try:
        if args.list_versions:
            for kv in versions(data_dir, kinds=kinds):
                parts = [f"{n} at version {v}" for v, n in kv.counts.items()]
                if kv.unreadable:
                    parts.append(f"{kv.unreadable} unreadable")
                counts = ", ".join(parts) if parts else "no records"
                print(f"{kv.kind}: {counts} (latest version {kv.latest})", file=out)
            return 0
        report = migrate(data_dir, args.target_version, dry_run=args.dry_run, kinds=kinds)
    except (StoreError, OSError) as e:
        raise CliError(str(e)) from None
    verb = "would migrate" if report.dry_run else "migrated"
    for applied in report.applied:
        print(
            f"{verb} {applied.kind} {applied.item}: version {applied.from_version} -> {applied.to_version}",
            file=out,
        )
        for change in applied.changes:
            print(f"    {change}", file=out)
    for problem in report.problems:
        print(f"left unchanged {problem.kind} {problem}", file=out)
    records = _plural(len(report.applied), "record")
    if report.dry_run:
        print(
            f"dry run: {records} would be migrated, {report.unchanged} already current; nothing was written",
            file=out,
        )
    elif report.applied:
        print(f"backup written to {report.backup_dir}", file=out)
        print(
            f"{records} migrated, {report.unchanged} already current; history in {data_dir / HISTORY_FILE}",
            file=out,
        )
    else:
        print(
            f"nothing to migrate: {_plural(report.unchanged, 'record')} already at the target version",
            file=out,
        )
    if report.problems:
        first = report.problems[0]
        more = f" (and {len(report.problems) - 1} more, listed above)" if len(report.problems) > 1 else ""
        raise CliError(f"{_plural(len(report.problems), 'record')} not migrated: {first.kind} {first}{more}")
    return 0


# --- cluster: the master and its nodes ---------------------------------------------------------


def cmd_node_list(args: argparse.Namespace, out: TextIO) -> int:
    """``sparrow node list``: the nodes the master knows (GET /v1/nodes)."""
    answer = _client(args).request("GET", "/v1/nodes")

    def row(n: dict[str, Any]) -> tuple[str, ...]:
        age = n.get("last_heartbeat_age")
        return (
            str(n["node_id"]),
            str(n["state"]),
            str(n["incarnation"]),
            "-" if age is None else f"{age:.1f}s ago",
            str(n.get("iscsi_portal") or "-"),
            "yes" if n.get("draining") else "no",
            str(n.get("admission") or "-"),
        )

    header = ("NODE", "STATE", "INCARNATION", "LAST-HEARTBEAT", "PORTAL", "DRAINING", "ADMISSION")
    _print_listing(answer, "nodes", out, as_json=args.json, header=header, row=row)
    return 0


def cmd_node_forget(args: argparse.Namespace, out: TextIO) -> int:
    """``sparrow node forget ID``: the master forgets a dead node that holds no copy
    (DELETE /v1/nodes/ID; admin)."""
    _client(args).request("DELETE", f"/v1/nodes/{_quote(args.node_id)}")
    print(f"forgot node {args.node_id}", file=out)
    return 0


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds, e.g. 1.5") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected a positive number of seconds")
    return value


def cmd_master(args: argparse.Namespace, out: TextIO) -> int:
    """``sparrow master``: run the cluster master (sparrow.master.daemon)."""
    if not args.data_dir:
        raise UsageError("sparrow master: error: the following arguments are required: --data-dir")
    from pathlib import Path

    from frontend.target import DEFAULT_BASE_IQN
    from sparrow.cluster.lease import LeaseConfig
    from sparrow.cluster.nodeidentity import AdmissionPolicy
    from sparrow.config import ConfigError, LogFormat, parse_host_port
    from sparrow.master.daemon import DEFAULT_HTTP, DEFAULT_LISTEN, MasterConfig, run
    from store.backing import BackingPolicy

    try:
        listen = parse_host_port(args.listen, what="--listen") if args.listen else DEFAULT_LISTEN
        http_addr = parse_host_port(args.http, what="--http") if args.http else DEFAULT_HTTP
    except ConfigError as e:
        raise UsageError(f"sparrow master: error: {e}") from None
    defaults = LeaseConfig()
    try:
        timing = LeaseConfig(
            heartbeat_interval=args.heartbeat_interval or defaults.heartbeat_interval,
            lease_seconds=args.lease or defaults.lease_seconds,
            dead_after=args.dead_after or defaults.dead_after,
            margin=defaults.margin if args.margin is None else args.margin,
        )
    except ValueError as e:
        raise UsageError(f"sparrow master: error: {e}") from None
    from sparrow.clustersecret import secret_from_flag

    try:
        secret = secret_from_flag(args.cluster_secret_file)
    except ConfigError as e:
        raise UsageError(f"sparrow master: error: {e}") from None
    try:
        allowed_backing = BackingPolicy.of(args.allow_backing or ()).prefixes
    except ValueError as e:
        raise UsageError(f"sparrow master: error: --allow-backing: {e}") from None
    config = MasterConfig(
        data_dir=Path(args.data_dir),
        listen=listen,
        http=http_addr,
        timing=timing,
        base_iqn=args.base_iqn or DEFAULT_BASE_IQN,
        cluster_secret=secret,
        allowed_backing=allowed_backing,
        admission=AdmissionPolicy(args.admission),
        public_metrics=args.public_metrics,
    )

    from sparrow.logs import configure_logging

    configure_logging(LogFormat(args.log_format or "auto"), args.log_level or "info")
    return run(config)


def cmd_secret_generate(args: argparse.Namespace, out: TextIO) -> int:
    """``sparrow secret generate PATH``: a fresh cluster secret, 0600, never over an existing file."""
    from pathlib import Path

    from sparrow.clustersecret import generate_cluster_secret

    path = Path(args.path).expanduser()
    try:
        generate_cluster_secret(path)
    except FileExistsError:
        raise CliError(f"sparrow secret generate: error: {path} exists; not overwritten") from None
    except OSError as e:
        raise CliError(f"sparrow secret generate: error: cannot write {path}: {e.strerror or e}") from None
    print(
        f"wrote a new cluster secret to {path} (mode 0600); give the same file to the master and every node",
        file=out,
    )
    return 0


def _add_cluster_commands(commands: Any) -> None:
    """``sparrow master`` and ``sparrow node list``. ``node`` may already exist (the node daemon's
    command): then ``list`` joins its subcommands (optional ones, so ``sparrow node`` keeps working)."""
    master = commands.add_parser(
        "master",
        help="run the cluster master",
        description="Run the Sparrow cluster master: the single authority that places volumes on "
        "nodes, grants primary leases and publishes assignments (docs/cluster.md).",
    )
    master.add_argument("--data-dir", metavar="DIR", help="where the authority database lives")
    master.add_argument(
        "--listen", metavar="HOST:PORT", help="heartbeat listen address for nodes (default 0.0.0.0:3290)"
    )
    master.add_argument(
        "--http", metavar="HOST:PORT", help="control API listen address (default 127.0.0.1:3280)"
    )
    master.add_argument(
        "--heartbeat-interval",
        metavar="S",
        type=_seconds_arg,
        help="seconds between control steps (default 1)",
    )
    master.add_argument(
        "--lease", metavar="S", type=_seconds_arg, help="primary lease in seconds (default 5)"
    )
    master.add_argument(
        "--dead-after",
        metavar="S",
        type=_seconds_arg,
        help="a silent node is dead after S seconds (default 8)",
    )
    master.add_argument(
        "--margin", metavar="S", type=float, help="extra wait past a lease for clock drift (default 1)"
    )
    master.add_argument(
        "--base-iqn", metavar="IQN", help="target names are IQN:VOLUME (default iqn.2026-11.io.sparrow)"
    )
    master.add_argument(
        "--log-format", choices=("auto", "json", "console"), help="auto: JSON unless stdout is a terminal"
    )
    master.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    master.add_argument(
        "--cluster-secret-file",
        metavar="PATH",
        help="the cluster secret every node must prove it holds (make one: sparrow secret generate PATH)",
    )
    master.add_argument(
        "--allow-backing",
        metavar="PREFIX",
        action="append",
        help="a path prefix volumes may be backed by (repeatable; default: no backing allowed)",
    )
    master.add_argument(
        "--admission",
        choices=("approve", "open"),
        default="approve",
        help="approve (default): a new node waits for `sparrow node approve` before it holds any "
        "copy; open: a node id's first key is approved on first use (labs)",
    )
    master.add_argument("--public-metrics", action="store_true", help=PUBLIC_METRICS_HELP)
    master.set_defaults(func=cmd_master)
    from sparrow.masterkey_cli import add_master_key_command

    add_master_key_command(master)

    secret = commands.add_parser(
        "secret",
        help="the cluster secret",
        description="The cluster secret that authenticates the master and its nodes to each other.",
    )
    secret_commands = secret.add_subparsers(dest="secret_command", required=True, metavar="COMMAND")
    generate = secret_commands.add_parser(
        "generate", help="write a fresh cluster secret to PATH (mode 0600; never overwrites)"
    )
    generate.add_argument("path", metavar="PATH")
    generate.set_defaults(func=cmd_secret_generate)

    node = commands.choices.get("node")
    if node is None:
        node = commands.add_parser(
            "node", help="cluster nodes", description="Cluster nodes, as the master sees them."
        )
    node_commands = next((a for a in node._actions if isinstance(a, argparse._SubParsersAction)), None)
    if node_commands is None:
        node_commands = node.add_subparsers(dest="node_command", metavar="COMMAND")
        node_commands.required = node.get_default("func") is None
    lst = node_commands.add_parser("list", help="list the nodes the master knows")
    lst.add_argument("--api", metavar="URL", help=f"master API (default ${API_ENV} or {DEFAULT_API})")
    lst.add_argument("--token", metavar="TOKEN", help=TOKEN_HELP)
    lst.add_argument("--json", action="store_true", help="print the nodes as JSON")
    lst.set_defaults(func=cmd_node_list)
    forget = node_commands.add_parser(
        "forget",
        help="forget a dead node that holds no copy of any volume",
        description="Remove a dead node that holds no copy from the master (its record and what it "
        "last reported). A live node, or one an assignment still names, is refused with the reason.",
    )
    forget.add_argument("node_id", metavar="ID", help="the node's id")
    forget.add_argument("--api", metavar="URL", help=f"master API (default ${API_ENV} or {DEFAULT_API})")
    forget.set_defaults(func=cmd_node_forget)
    from sparrow.moves_cli import add_node_moves

    add_node_moves(node_commands, f"master API (default ${API_ENV} or {DEFAULT_API})", TOKEN_HELP)
    from sparrow.nodekeys_cli import add_node_key_commands

    add_node_key_commands(node_commands, f"master API (default ${API_ENV} or {DEFAULT_API})", TOKEN_HELP)


# --- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparrow", description="Sparrow: block volumes served over iSCSI.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon", description="Run the Sparrow daemon.")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (flags override it)")
    serve.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where volumes live (default: /var/lib/sparrow as root, else ~/.local/share/sparrow)",
    )
    serve.add_argument("--iscsi", metavar="HOST:PORT", help="iSCSI listen address (default 0.0.0.0:3260)")
    serve.add_argument("--http", metavar="HOST:PORT", help="HTTP API listen address (default 127.0.0.1:3280)")
    serve.add_argument(
        "--advertise",
        metavar="HOST[:PORT]",
        action="append",
        help="portal address given to initiators by SendTargets (repeatable)",
    )
    serve.add_argument(
        "--base-iqn", metavar="IQN", help="target names are IQN:VOLUME (default iqn.2026-11.io.sparrow)"
    )
    serve.add_argument("--demo-volume", metavar="NAME:SIZE", help="create this volume at startup if missing")
    serve.add_argument(
        "--allow-backing",
        metavar="PREFIX",
        action="append",
        help="a path prefix volumes may be backed by (repeatable; default: no backing allowed)",
    )
    serve.add_argument("--public-metrics", action="store_true", help=PUBLIC_METRICS_HELP)
    serve.add_argument(
        "--log-format", choices=("auto", "json", "console"), help="auto: JSON unless stdout is a terminal"
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=cmd_serve)

    volume = commands.add_parser(
        "volume",
        help="manage volumes through the daemon's API",
        description="Manage volumes through the running daemon.",
    )
    vcommands = volume.add_subparsers(dest="volume_command", required=True, metavar="COMMAND")

    def add_wait(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--wait",
            type=_wait_arg,
            default=DEFAULT_WAIT,
            metavar="SECONDS",
            help=f"wait up to SECONDS until the volume is {what} (default {DEFAULT_WAIT:g}; 0: do not wait)",
        )

    def with_api(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--api", metavar="URL", help=f"daemon API (default ${API_ENV} or {DEFAULT_API})")
        p.add_argument("--token", metavar="TOKEN", help=TOKEN_HELP)
        return p

    create = with_api(vcommands.add_parser("create", help="create a volume and export it"))
    create.add_argument("name")
    create.add_argument("--size", type=_size_arg, help="e.g. 64MiB, 10G, 1.5GiB (binary units)")
    create.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    create.add_argument(
        "--physical-block-size",
        type=int,
        choices=(512, 4096),
        help="physical block size reported to initiators (default: the block size); 4096 with "
        "--block-size 512 is a 512e volume, so file systems align to 4 KiB",
    )
    create.add_argument("--chap-user", metavar="USER")
    create.add_argument("--chap-secret", metavar="SECRET")
    create.add_argument("--chap-mutual-user", metavar="USER")
    create.add_argument("--chap-mutual-secret", metavar="SECRET")
    create.add_argument(
        "--backing", metavar="PATH", help="a block device or file to serve instead of a new file"
    )
    create.add_argument(
        "--replicas",
        type=int,
        choices=(1, 2, 3),
        help="copies of the volume (a cluster master places them; a single node serves 1)",
    )
    create.add_argument("--json", action="store_true", help="print the volume as JSON")
    add_wait(create, "served")
    create.set_defaults(func=cmd_volume_create)

    lst = with_api(vcommands.add_parser("list", help="list volumes"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_volume_list)

    inspect = with_api(vcommands.add_parser("inspect", help="show one volume and how to attach it"))
    inspect.add_argument("name")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_volume_inspect)

    why = with_api(
        vcommands.add_parser(
            "explain",
            help="why a volume is (not) served, and what to do",
            description="Why the volume is in its state, in words and (--json) as fields: the reason, "
            "since when, which node, the numbers; the SCSI commands it answered as unsupported; "
            "local volumes of its name a node skipped at start.",
        )
    )
    why.add_argument("name")
    why.add_argument("--json", action="store_true")
    why.set_defaults(func=cmd_volume_explain)

    resize = with_api(vcommands.add_parser("resize", help="grow a volume"))
    resize.add_argument("name")
    resize.add_argument(
        "--size", type=_size_arg, required=True, help="the new size (larger than the old one)"
    )
    resize.add_argument("--json", action="store_true")
    add_wait(resize, "served at its new size")
    resize.set_defaults(func=cmd_volume_resize)

    delete = with_api(vcommands.add_parser("delete", help="delete a volume (its data is gone)"))
    delete.add_argument("name")
    delete.set_defaults(func=cmd_volume_delete)
    from sparrow.moves_cli import add_volume_moves
    from sparrow.volverbs_cli import add_cluster_commands, add_volume_verbs

    add_volume_moves(vcommands, with_api)
    add_volume_verbs(vcommands, with_api, add_wait)
    add_cluster_commands(commands, with_api)

    node = commands.add_parser(
        "node",
        help="run a cluster node (`node list`: the nodes the master knows)",
        description="Run a cluster node: it serves the volumes the master assigns to it.",
    )
    node.add_argument("--data-dir", metavar="DIR", help="where this node's volumes and cluster state live")
    node.add_argument("--node-id", metavar="ID", help="this node's id, [a-z0-9][a-z0-9.-]{0,62}")
    node.add_argument("--master", metavar="HOST:PORT", help="the master's heartbeat address")
    node.add_argument("--iscsi", metavar="HOST:PORT", help="iSCSI listen address (default 0.0.0.0:3260)")
    node.add_argument("--replication", metavar="HOST:PORT", help="replication address (default 0.0.0.0:3291)")
    node.add_argument(
        "--advertise-replication",
        metavar="HOST:PORT",
        help="the replication address other nodes dial (default: --replication's)",
    )
    node.add_argument(
        "--http", metavar="HOST:PORT", help="/metrics and /healthz listen address (default 127.0.0.1:3281)"
    )
    node.add_argument(
        "--heartbeat-interval", metavar="SECONDS", type=float, help="seconds between heartbeats (default 1)"
    )
    node.add_argument(
        "--fence-margin",
        metavar="SECONDS",
        type=float,
        help="stop serving this long before the lease expires (default 0.5)",
    )
    node.add_argument(
        "--replication-ack-timeout",
        metavar="SECONDS",
        type=float,
        help="report a replica behind after this long without its acknowledgement (default 2)",
    )
    node.add_argument(
        "--resync-rate",
        metavar="BYTES/s",
        help="resync copies sent by this node per second, e.g. 200MiB (default 200MiB; 0: unlimited)",
    )
    node.add_argument("--log-format", choices=("auto", "json", "console"))
    node.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    node.add_argument(
        "--cluster-secret-file", metavar="PATH", help="the cluster secret, the same file as the master's"
    )
    node.add_argument(
        "--master-key",
        metavar="HEX",
        help="pin the master's key (`sparrow master key` prints it; default: the pin in DATA_DIR, "
        "else the first master's)",
    )
    node.add_argument(
        "--allow-backing",
        metavar="PREFIX",
        action="append",
        help="a path prefix volumes may be backed by (repeatable; default: no backing allowed)",
    )
    node.add_argument("--public-metrics", action="store_true", help=PUBLIC_METRICS_HELP)
    node.set_defaults(func=cmd_node)

    migrate = commands.add_parser(
        "migrate",
        help="migrate the records in a data directory to this Sparrow's schema",
        description="Upgrade the schema of the durable records in DATA_DIR (stop the daemon first). "
        "A backup goes to DATA_DIR/backups/ and a history entry to DATA_DIR/migrations.log; running "
        "it again does nothing. Block data is never touched.",
    )
    migrate.add_argument("data_dir", metavar="DATA_DIR")
    migrate.add_argument(
        "--list-versions", action="store_true", help="count the records at each schema version and exit"
    )
    migrate.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    migrate.add_argument(
        "--target-version",
        metavar="V",
        type=_version_arg,
        help="migrate to version V (default: the newest this Sparrow knows, per kind)",
    )
    migrate.add_argument("--kind", choices=sorted(KINDS), help="only records of this kind (default: all)")
    migrate.set_defaults(func=cmd_migrate)
    _add_cluster_commands(commands)
    from sparrow.auth.cli import add_token_commands

    add_token_commands(commands, with_api)
    from sparrow.opscli import add_ops_commands

    add_ops_commands(commands)
    from sparrow.metrics_cli import add_metrics_command

    add_metrics_command(commands)
    from sparrow.top import add_top_command

    add_top_command(commands, with_api)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        args = build_parser().parse_args(argv)
        args.err = err  # for warnings of commands that succeed
        code: int = args.func(args, out)
        return code
    except CliError as e:
        message = str(e)
        if not message.startswith("sparrow"):
            message = f"sparrow: error: {message}"
        print(message, file=err)
        return e.code
    except SystemExit as e:  # --help and --version exit through argparse
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("sparrow: interrupted", file=err)
        return 130
    except BrokenPipeError:  # `sparrow volume list | head`
        return 0
    except Exception as e:  # a bug or an unexpected answer: still one line, never a traceback
        print(f"sparrow: error: unexpected {type(e).__name__}: {e}", file=err)
        return 1
