"""The operator verbs of the ``sparrow`` command (the API: sparrow.master.moves_api).

    sparrow volume failover NAME [--to NODE] [--wait [SECONDS]] [--json]
    sparrow volume rebuild NAME --replica NODE [--wait [SECONDS]] [--json]
    sparrow node drain NODE [--wait [SECONDS]] [--json]
    sparrow node undrain NODE [--json]

``--wait`` (alone: up to :data:`MOVE_WAIT` seconds) waits until the move is done: the new primary
serves (failover), the copy is back in sync (rebuild), the node holds no copy (drain). In a
terminal (and without ``--json``) a progress bar of the resync shows meanwhile
(sparrow.progress); otherwise nothing until one final line (or the JSON answer). A wait that runs
out is an error (exit 1) that says what it was waiting for: the move itself goes on.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, TextIO

from sparrow.progress import progress_of, render

#: Seconds ``--wait`` with no value waits (a rebuild of a large volume takes a while).
MOVE_WAIT = 3600.0
#: Seconds between two looks at the master while waiting.
POLL_INTERVAL = 0.5


def _move_wait_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}") from None
    if not 0 < value <= MOVE_WAIT:
        raise argparse.ArgumentTypeError(f"--wait must be more than 0 and at most {MOVE_WAIT:g} seconds")
    return value


def add_volume_moves(
    vcommands: Any, with_api: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    """``volume failover`` and ``volume rebuild``."""
    failover = with_api(
        vcommands.add_parser(
            "failover",
            help="move the primary to an in-sync replica (planned failover)",
            description="Planned failover: the primary moves to an in-sync replica (--to, or the best "
            "one) under the next epoch; the old primary stays as a copy, out of sync until it caught "
            "up. Refused with the reason when there is no in-sync replica to move to.",
        )
    )
    failover.add_argument("name")
    failover.add_argument(
        "--to", metavar="NODE", help="the replica to make primary (default: the best in sync)"
    )
    _add_wait(failover, "the new primary serves")
    failover.set_defaults(func=cmd_volume_failover)

    rebuild = with_api(
        vcommands.add_parser(
            "rebuild",
            help="throw a replica's copy away and copy it afresh",
            description="The copy on NODE is released and added back as a new copy, which resync "
            "copies in full. Refused for the primary's copy and for the last in-sync replica.",
        )
    )
    rebuild.add_argument("name")
    rebuild.add_argument("--replica", metavar="NODE", required=True, help="the node whose copy to rebuild")
    _add_wait(rebuild, "the copy is back in sync")
    rebuild.set_defaults(func=cmd_volume_rebuild)


def add_node_moves(node_commands: Any, api_help: str, token_help: str) -> None:
    """``node drain`` and ``node undrain``."""
    drain = node_commands.add_parser(
        "drain",
        help="move every primary and copy off a node; no new copies on it",
        description="Drain NODE: it gets no new copies, each primary on it moves to an in-sync "
        "replica, each copy on it gets a new copy elsewhere, synced before the old one goes. With no "
        "spare node the drain waits (`sparrow node list` says why). Persisted by the master.",
    )
    undrain = node_commands.add_parser("undrain", help="let a drained node take copies again")
    for p in (drain, undrain):
        p.add_argument("node_id", metavar="NODE")
        p.add_argument("--api", metavar="URL", help=api_help)
        p.add_argument("--token", metavar="TOKEN", help=token_help)
    undrain.add_argument("--json", action="store_true", help="print the answer as JSON")
    _add_wait(drain, "the node holds no copy")
    drain.set_defaults(func=cmd_node_drain)
    undrain.set_defaults(func=cmd_node_undrain)


def _add_wait(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--wait",
        nargs="?",
        type=_move_wait_arg,
        const=MOVE_WAIT,
        default=0.0,
        metavar="SECONDS",
        help=f"wait until {what} (alone: up to {MOVE_WAIT:g} s); a progress bar in a terminal",
    )
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


# -- commands ------------------------------------------------------------------------------------------


def cmd_volume_failover(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.cli import _client, _quote

    client = _client(args, min(args.wait, 60.0))
    body = {} if args.to is None else {"to": args.to}
    wait = f"?wait={min(args.wait, 60.0):g}" if args.wait else ""
    volume = client.request("POST", f"/v1/volumes/{_quote(args.name)}/failover{wait}", body)
    primary = (volume.get("primary") or {}).get("node_id")
    if args.wait:
        target = args.to or primary

        def done(v: dict[str, Any]) -> bool:
            return bool(v.get("served")) and (v.get("primary") or {}).get("node_id") == target

        volume = _wait(
            args, out, f"failover {args.name}", lambda: _volume(args, client), done, f"{target} serving"
        )
        primary = target
    if args.json:
        print(json.dumps(volume, indent=2), file=out)
        return 0
    line = f"volume {args.name}: primary is {primary} (epoch {volume.get('epoch')})"
    if args.to is not None and primary != args.to:  # not published within the API's bound (202)
        line += f"; failover to {args.to} asked: {volume.get('status')}"
    print(line, file=out)
    return 0


def cmd_volume_rebuild(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.cli import _client, _quote

    client = _client(args)
    volume = client.request("POST", f"/v1/volumes/{_quote(args.name)}/rebuild", {"replica": args.replica})
    if args.wait:
        epoch = int(volume.get("epoch") or 0)

        def done(v: dict[str, Any]) -> bool:
            return int(v.get("epoch") or 0) > epoch and any(
                r.get("node_id") == args.replica and r.get("sync") == "in_sync"
                for r in v.get("replicas") or ()
            )

        volume = _wait(
            args,
            out,
            f"rebuild {args.name} on {args.replica}",
            lambda: _volume(args, client),
            done,
            f"the copy on {args.replica} in sync",
            nodes=(args.replica,),
        )
    if args.json:
        print(json.dumps(volume, indent=2), file=out)
    elif args.wait:
        print(f"volume {args.name}: the copy on {args.replica} is rebuilt and in sync", file=out)
    else:
        status = volume.get("status") or f"rebuild of the copy on {args.replica} asked"
        print(f"volume {args.name}: {status}", file=out)
    return 0


def cmd_node_drain(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.cli import _client, _quote

    client = _client(args)
    node = client.request("POST", f"/v1/nodes/{_quote(args.node_id)}/drain")
    if args.wait:

        def look() -> dict[str, Any]:
            listed = client.request("GET", "/v1/nodes").get("nodes", [])
            found = next((n for n in listed if n.get("node_id") == args.node_id), None)
            if found is None:
                raise _Gone(f"node {args.node_id} is no longer listed")
            return {"node": found, "volumes": client.request("GET", "/v1/volumes").get("volumes", [])}

        def done(view: dict[str, Any]) -> bool:
            return str(view["node"].get("drain_status") or "").startswith("drained")

        node = _wait(args, out, f"drain {args.node_id}", look, done, f"{args.node_id} holding no copy")[
            "node"
        ]
    if args.json:
        print(json.dumps(node, indent=2), file=out)
    else:
        print(f"node {args.node_id} is draining: {node.get('drain_status')}", file=out)
    return 0


def cmd_node_undrain(args: argparse.Namespace, out: TextIO) -> int:
    from sparrow.cli import _client, _quote

    node = _client(args).request("POST", f"/v1/nodes/{_quote(args.node_id)}/undrain")
    if args.json:
        print(json.dumps(node, indent=2), file=out)
    else:
        print(f"node {args.node_id} takes new copies again", file=out)
    return 0


# -- waiting -------------------------------------------------------------------------------------------


class _Gone(Exception):
    pass


def _volume(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    from sparrow.cli import _quote

    answer: dict[str, Any] = client.request("GET", f"/v1/volumes/{_quote(args.name)}")
    return answer


def _wait(
    args: argparse.Namespace,
    out: TextIO,
    label: str,
    look: Callable[[], dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
    what: str,
    *,
    nodes: tuple[str, ...] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll ``look()`` until ``done``; a bar on ``out`` when it is a terminal and not ``--json``."""
    from sparrow.cli import CliError

    bar = not args.json and out.isatty()
    deadline = clock() + args.wait
    shown = False
    try:
        while True:
            try:
                view = look()
            except _Gone as e:
                raise CliError(str(e)) from None
            if done(view):
                return view
            if bar:
                volumes = view.get("volumes", [view])
                print(
                    "\r" + render(label, progress_of(volumes, nodes), _columns()),
                    end="",
                    file=out,
                    flush=True,
                )
                shown = True
            if clock() >= deadline:
                raise CliError(
                    f"timed out after {args.wait:g}s waiting for {what} (the move goes on): "
                    f"{view.get('status') or (view.get('node') or {}).get('drain_status') or 'no status'}"
                )
            sleep(POLL_INTERVAL)
    finally:
        if shown:
            print(file=out)


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns - 1
