"""``sparrow master key --data-dir DIR``: the master's public key, the one its nodes pin
(``sparrow node --master-key HEX``; docs/cluster.md, "Master identity"). Reads ``DIR/master.key``
(a ``sparrow master`` or ``sparrow serve`` data directory) and never makes one."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO


def add_master_key_command(master: Any) -> None:
    """``master key``, an optional subcommand: ``sparrow master --data-dir ...`` still runs the
    master."""
    commands = master.add_subparsers(dest="master_command", metavar="COMMAND")
    key = commands.add_parser(
        "key",
        help="print the master's public key (what nodes pin with --master-key)",
        description="Print the public key this master proves to every node, derived from "
        "DATA_DIR/master.key. Give it to each node as --master-key, or compare it with the key a "
        "node logged as pinned on first use.",
    )
    key.add_argument("--data-dir", metavar="DIR", required=True, dest="key_data_dir")
    key.add_argument("--json", action="store_true", help="print {\"master_key\": HEX}")
    key.set_defaults(func=cmd_master_key)


def cmd_master_key(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from sparrow.cli import CliError
    from sparrow.cluster.channel import SecretError
    from sparrow.cluster.nodeidentity import key_text
    from sparrow.masterkey import existing_master_identity

    try:
        identity = existing_master_identity(Path(args.key_data_dir))
    except SecretError as e:
        raise CliError(f"sparrow master key: error: {e}") from None
    text = key_text(identity.public)
    print(json.dumps({"master_key": text}) if args.json else text, file=out)
    return 0
