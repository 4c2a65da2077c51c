"""``sparrow volume pause|resume|update`` (the API: sparrow.master.volume_verbs_api).

    sparrow volume pause NAME [--wait SECONDS] [--json]
    sparrow volume resume NAME [--wait SECONDS] [--json]
    sparrow volume update NAME (--chap-user U --chap-secret-file F
                                [--chap-mutual-user U --chap-mutual-secret-file F] | --no-chap) [--json]

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


def update_body(args: argparse.Namespace) -> dict[str, Any]:
    """The PATCH body of ``volume update`` (UsageError for a bad combination of flags)."""
    from sparrow.cli import UsageError

    chap = (args.chap_user, args.chap_secret_file, args.chap_mutual_user, args.chap_mutual_secret_file)
    if args.no_chap:
        if any(v is not None for v in chap):
            raise UsageError("sparrow volume update: error: --no-chap goes alone")
        return {"chap": None}
    if args.chap_user is None or args.chap_secret_file is None:
        raise UsageError(
            "sparrow volume update: error: give --chap-user and --chap-secret-file, or --no-chap"
        )
    if (args.chap_mutual_user is None) != (args.chap_mutual_secret_file is None):
        raise UsageError(
            "sparrow volume update: error: --chap-mutual-user and --chap-mutual-secret-file go together"
        )
    body: dict[str, Any] = {
        "chap_user": args.chap_user,
        "chap_secret": _secret(args.chap_secret_file, "--chap-secret-file"),
    }
    if args.chap_mutual_user is not None:
        body["chap_mutual_user"] = args.chap_mutual_user
        body["chap_mutual_secret"] = _secret(args.chap_mutual_secret_file, "--chap-mutual-secret-file")
    return body


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
