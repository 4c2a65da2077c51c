"""``sparrow volume pause|resume|update`` and ``sparrow cluster show|update`` (the API:
sparrow.master.volume_verbs_api, sparrow.master.settings_api).

    sparrow volume pause NAME [--wait SECONDS] [--json]
    sparrow volume resume NAME [--wait SECONDS] [--json]
    sparrow volume update NAME (--chap-user U --chap-secret-file F
                                [--chap-mutual-user U --chap-mutual-secret-file F] | --no-chap) [--json]
    sparrow cluster show [--json]
    sparrow cluster update (--discovery-chap-user U --discovery-chap-secret-file F
                            [--discovery-chap-mutual-user U --discovery-chap-mutual-secret-file F]
                            | --no-discovery-chap) [--json]

Pause and resume wait (``--wait``, default 10 s, 0: do not) until the primary has applied them;
a wait that runs out is a one-line warning (exit 0: the wish is recorded, the master goes on).
Secrets are read from files (first line, without its newline), never from the command line,
where ``ps`` would show them. Errors are one line (sparrow.cli).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def add_volume_verbs(
    vcommands: Any,
    with_api: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    add_wait: Callable[[argparse.ArgumentParser, str], None],
) -> None:
    """``volume pause``, ``volume resume`` and ``volume update``."""
    pause = with_api(
        vcommands.add_parser(
            "pause",
            help="stop serving a volume: its initiators get NOT READY and retry",
            description="Pause NAME: reads and writes get NOT READY (04h/01h, retried by initiators) "
            "until `sparrow volume resume`. Kept by the master: a restart of any process keeps it; "
            "a failover keeps it too.",
        )
    )
    resume = with_api(vcommands.add_parser("resume", help="serve a paused volume again"))
    for p, what in ((pause, "paused"), (resume, "served again")):
        p.add_argument("name")
        p.add_argument("--json", action="store_true", help="print the volume as JSON")
        add_wait(p, what)
    pause.set_defaults(func=cmd_volume_pause)
    resume.set_defaults(func=cmd_volume_resume)

    update = with_api(
        vcommands.add_parser(
            "update",
            help="change a volume's CHAP (on, changed or off) without recreating it",
            description="New logins need the new CHAP at once; sessions already logged in are kept.",
        )
    )
    update.add_argument("name")
    update.add_argument("--chap-user", metavar="USER")
    update.add_argument("--chap-secret-file", metavar="FILE", type=Path, help="the secret's first line")
    update.add_argument("--chap-mutual-user", metavar="USER")
    update.add_argument("--chap-mutual-secret-file", metavar="FILE", type=Path)
    update.add_argument("--no-chap", action="store_true", help="turn CHAP off")
    update.add_argument("--json", action="store_true", help="print the volume as JSON")
    update.set_defaults(func=cmd_volume_update)


def cmd_volume_pause(args: argparse.Namespace, out: TextIO) -> int:
    return _pause(args, out, "pause")


def cmd_volume_resume(args: argparse.Namespace, out: TextIO) -> int:
    return _pause(args, out, "resume")


def _pause(args: argparse.Namespace, out: TextIO, verb: str) -> int:
    from sparrow.cli import _client, _quote, _wait_query

    path = f"/v1/volumes/{_quote(args.name)}/{verb}{_wait_query(args.wait)}"
    volume = _client(args, args.wait).request("POST", path)
    if args.json:
        print(json.dumps(volume, indent=2), file=out)
    else:
        print(f"volume {volume['name']} {'paused' if volume.get('paused') else 'serving'}", file=out)
    pending = volume.get("status") if isinstance(volume, dict) else None
    if args.wait > 0 and pending in ("pausing: asked by the operator", "resuming: asked by the operator"):
        print(f"sparrow: warning: volume {args.name}: still {pending.split(':')[0]}", file=args.err)
    return 0


def _secret(path: Path | None, flag: str) -> str | None:
    from sparrow.cli import UsageError

    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"sparrow volume update: error: {flag} {path}: {e.strerror or e}") from None
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise UsageError(f"sparrow volume update: error: {flag} {path} is empty")
    return secret


def update_body(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The PATCH body of ``volume update`` (``cluster update``: ``prefix`` "discovery_"), a
    UsageError for a bad combination of flags."""
    from sparrow.cli import UsageError

    command = "cluster update" if prefix else "volume update"
    flag = "--" + prefix.replace("_", "-")
    user, secret_file = getattr(args, f"{prefix}chap_user"), getattr(args, f"{prefix}chap_secret_file")
    mutual_user = getattr(args, f"{prefix}chap_mutual_user")
    mutual_file = getattr(args, f"{prefix}chap_mutual_secret_file")
    if getattr(args, f"no_{prefix}chap"):
        if any(v is not None for v in (user, secret_file, mutual_user, mutual_file)):
            raise UsageError(f"sparrow {command}: error: --no-{flag[2:]}chap goes alone")
        return {f"{prefix}chap": None}
    if user is None or secret_file is None:
        either = f"{flag}chap-user and {flag}chap-secret-file, or --no-{flag[2:]}chap"
        raise UsageError(f"sparrow {command}: error: give {either}")
    if (mutual_user is None) != (mutual_file is None):
        raise UsageError(
            f"sparrow {command}: error: {flag}chap-mutual-user and {flag}chap-mutual-secret-file go together"
        )
    body: dict[str, Any] = {
        f"{prefix}chap_user": user,
        f"{prefix}chap_secret": _secret(secret_file, f"{flag}chap-secret-file"),
    }
    if mutual_user is not None:
        body[f"{prefix}chap_mutual_user"] = mutual_user
        body[f"{prefix}chap_mutual_secret"] = _secret(mutual_file, f"{flag}chap-mutual-secret-file")
    return body


def add_cluster_commands(
    commands: Any, with_api: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    """``cluster show`` and ``cluster update`` (the cluster's settings, held by the master)."""
    cluster = commands.add_parser("cluster", help="the cluster's settings, held by the master")
    sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    show = with_api(sub.add_parser("show", help="show the cluster's settings"))
    show.add_argument("--json", action="store_true", help="print the settings as JSON")
    show.set_defaults(func=cmd_cluster_show)
    update = with_api(
        sub.add_parser(
            "update",
            help="change the discovery CHAP of every node",
            description="The next discovery (SendTargets) login at any node needs it; sessions "
            "already logged in are kept.",
        )
    )
    update.add_argument("--discovery-chap-user", metavar="USER")
    update.add_argument("--discovery-chap-secret-file", metavar="FILE", type=Path)
    update.add_argument("--discovery-chap-mutual-user", metavar="USER")
    update.add_argument("--discovery-chap-mutual-secret-file", metavar="FILE", type=Path)
    update.add_argument("--no-discovery-chap", action="store_true", help="turn discovery CHAP off")
    update.add_argument("--json", action="store_true", help="print the settings as JSON")
    update.set_defaults(func=cmd_cluster_update)


def _print_settings(settings: Any, out: TextIO, as_json: bool) -> None:
    if as_json:
        print(json.dumps(settings, indent=2), file=out)
        return
    chap = settings.get("discovery_chap") if isinstance(settings, dict) else None
    text = "off" if chap is None else f"user {chap['user']}" + (
        f", mutual user {chap['mutual_user']}" if chap.get("mutual_user") else ""
    )
    print(f"discovery chap: {text}", file=out)


def cmd_cluster_show(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.cli import _client

    _print_settings(_client(args).request("GET", "/v1/cluster"), out, args.json)
    return 0


def cmd_cluster_update(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.cli import _client

    body = update_body(args, "discovery_")
    _print_settings(_client(args).request("PATCH", "/v1/cluster", body), out, args.json)
    return 0


def cmd_volume_update(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.cli import _client, _quote

    volume = _client(args).request("PATCH", f"/v1/volumes/{_quote(args.name)}", update_body(args))
    if args.json:
        print(json.dumps(volume, indent=2), file=out)
    else:
        chap = volume.get("chap")
        text = "off" if chap is None else f"user {chap['user']}" + (
            f", mutual user {chap['mutual_user']}" if chap.get("mutual_user") else ""
        )
        print(f"volume {volume['name']}: chap {text}", file=out)
    return 0
