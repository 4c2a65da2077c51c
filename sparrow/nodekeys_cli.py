"""``sparrow node rekey NODE [--key HEX]``: rebind a node's identity on the master
(POST /v1/nodes/NODE/rekey, admin; sparrow.master.nodekeys_api; docs/operations.md, "Replacing a
node's disk"). ``sparrow node approve NODE [--key HEX]``: make a pending node a member, or approve
one ahead of its first Hello (POST /v1/nodes/NODE/approve, admin; docs/operations.md, "Adding a
node")."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO


def add_node_key_commands(node_commands: Any, api_help: str, token_help: str) -> None:
    """``node rekey`` and ``node approve``."""
    rekey = node_commands.add_parser(
        "rekey",
        help="rebind a stopped node to a new key (its disk was replaced or its node.key lost)",
        description="Rebind NODE's identity on the master: to --key (the public key the node logs "
        "at start as `node key`, and in its `master refused this node` line), or, without it, to "
        "none, so the node's next Hello binds its key on first use (and, under the master's default "
        "--admission approve, waits for `sparrow node approve`). Refused while the node is alive.",
    )
    _arguments(rekey, "the node's public key, 64 hex digits (pinned)", api_help, token_help)
    rekey.set_defaults(func=cmd_node_rekey)
    approve = node_commands.add_parser(
        "approve",
        help="let a new node hold copies (it waits, pending, until approved)",
        description="Approve NODE as a member of the cluster: without --key, the key it proved when "
        "it said Hello (`sparrow node list` shows it pending, with its key: compare it with the "
        "`node key` the node logs at start); with --key, that key, before the node first connects "
        "(its first Hello must then prove exactly that key).",
    )
    _arguments(approve, "the node's public key, 64 hex digits", api_help, token_help)
    approve.set_defaults(func=cmd_node_approve)


def _arguments(parser: argparse.ArgumentParser, key_help: str, api_help: str, token_help: str) -> None:
    """The arguments both node-key verbs take: NODE, --key, and the API client's."""
    parser.add_argument("node_id", metavar="NODE")
    parser.add_argument("--key", metavar="HEX", help=key_help)
    parser.add_argument("--api", metavar="URL", help=api_help)
    parser.add_argument("--token", metavar="TOKEN", help=token_help)
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def _post(args: argparse.Namespace, verb: str) -> dict[str, Any]:
    from sparrow.cli import _client, _quote

    body = {} if args.key is None else {"key": args.key}
    answer: dict[str, Any] = _client(args).request("POST", f"/v1/nodes/{_quote(args.node_id)}/{verb}", body)
    return answer


def cmd_node_approve(args: argparse.Namespace, out: TextIO) -> int:
    answer = _post(args, "approve")
    if args.json:
        print(json.dumps(answer, indent=2), file=out)
    else:
        print(f"node {args.node_id} approved with key {answer.get('node_key')}", file=out)
    return 0


def cmd_node_rekey(args: argparse.Namespace, out: TextIO) -> int:
    answer = _post(args, "rekey")
    if args.json:
        print(json.dumps(answer, indent=2), file=out)
    elif answer.get("node_key") is None:
        print(f"node {args.node_id} unbound: its next Hello binds its key (then approve it)", file=out)
    else:
        print(f"node {args.node_id} bound to key {answer['node_key']}", file=out)
    return 0
