"""``sparrow token create|list|revoke``: API tokens (sparrow.auth.tokens) through the master's API,
or, with ``create --data-dir DIR``, offline in the authority itself (the recovery when no admin
token is left: the daemon must be stopped, the command takes the data directory's lock)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from sparrow.auth import tokens
from sparrow.cli import CliError, UsageError, _client, _print_listing, _quote


def cmd_token_create(args: argparse.Namespace, out: TextIO) -> int:
    if args.data_dir is not None:
        answer = _create_offline(Path(args.data_dir), args.role, args.tenant, args.name)
    else:
        body: dict[str, Any] = {"role": args.role}
        if args.tenant is not None:
            body["tenant"] = args.tenant
        if args.name is not None:
            body["name"] = args.name
        answer = _client(args).request("POST", "/v1/tokens", body)
    if args.json:
        print(json.dumps(answer, indent=2), file=out)
        return 0
    scope = f", tenant {answer['tenant']!r}" if answer.get("tenant") else ""
    print(answer["token"], file=out)
    print(
        f"token {answer['id']} ({answer['role']}{scope}): shown once, keep it (sparrow --token, "
        "$SPARROW_TOKEN or the credentials file)",
        file=args.err,
    )
    return 0


def _create_offline(data_dir: Path, role: str, tenant: str | None, name: str | None) -> dict[str, Any]:
    from sparrow.cluster.authority import AuthorityError, AuthorityStore
    from sparrow.lifecycle import StartupError, lock_data_dir
    from sparrow.master.auth import token_json
    from store.blockstore import StoreError

    if not (data_dir / "authority.sqlite3").exists():
        raise CliError(f"{data_dir} holds no authority database (authority.sqlite3)")
    try:
        lock = lock_data_dir(data_dir)
    except StartupError as e:
        raise CliError(f"{e} (stop the daemon first)") from None
    try:
        new = tokens.mint(role, tenant=tenant, name=name, created_at=time.time())
        with AuthorityStore.open_in(data_dir) as store:
            store.add_token(new.record)
    except tokens.InvalidToken as e:
        raise UsageError(f"sparrow token create: error: {e}") from None
    except (AuthorityError, StoreError) as e:
        raise CliError(str(e)) from None
    finally:
        lock.release()
    return {**token_json(new.record), "token": new.plaintext}


def cmd_token_list(args: argparse.Namespace, out: TextIO) -> int:
    answer = _client(args).request("GET", "/v1/tokens")

    def row(t: dict[str, Any]) -> tuple[str, ...]:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t["created_at"])))
        return (str(t["id"]), str(t["role"]), t.get("tenant") or "-", t.get("name") or "-", created)

    header = ("ID", "ROLE", "TENANT", "NAME", "CREATED")
    _print_listing(answer, "tokens", out, as_json=args.json, header=header, row=row)
    return 0


def cmd_token_revoke(args: argparse.Namespace, out: TextIO) -> int:
    _client(args).request("DELETE", f"/v1/tokens/{_quote(args.id)}")
    print(f"revoked token {args.id}", file=out)
    return 0


def add_token_commands(
    commands: Any, with_api: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    token = commands.add_parser(
        "token",
        help="manage API tokens (admin)",
        description="API tokens: admin (everything), operator (volumes), reader (list, inspect); "
        "a tenant token sees only volumes whose name starts with its prefix.",
    )
    sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = with_api(sub.add_parser("create", help="make a token (printed once)"))
    create.add_argument("--role", required=True, choices=[r.value for r in tokens.Role])
    create.add_argument("--tenant", metavar="PREFIX", help="only volumes whose name starts with PREFIX")
    create.add_argument("--name", metavar="NAME", help="what the token is for")
    create.add_argument(
        "--data-dir",
        metavar="DIR",
        help="offline: write the token into DIR's authority directly (the daemon must be stopped)",
    )
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_token_create)
    lst = with_api(sub.add_parser("list", help="list the tokens in force (never their secrets)"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_token_list)
    revoke = with_api(sub.add_parser("revoke", help="revoke a token: it stops working at once"))
    revoke.add_argument("id", metavar="ID")
    revoke.set_defaults(func=cmd_token_revoke)
