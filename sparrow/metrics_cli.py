"""``sparrow metrics token``: the scrape token that opens every daemon's ``/metrics`` of a cluster
(sparrow.metricsauth), for Prometheus's ``authorization: credentials_file:`` (docs/operations.md,
"Prometheus").

It reads the cluster secret as the daemons do, and never makes one: ``--cluster-secret-file PATH``
(``sparrow master`` and ``sparrow node``), ``--data-dir DIR`` (``sparrow serve``'s own
``DIR/cluster.secret``) or ``--config FILE`` (``sparrow serve``'s config: its
``cluster_secret_file``, else its data directory's secret).
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO


def add_metrics_command(commands: Any) -> None:
    metrics = commands.add_parser(
        "metrics",
        help="the scrape token of /metrics",
        description='Credentials for the daemons\' GET /metrics (docs/operations.md, "Prometheus").',
    )
    sub = metrics.add_subparsers(dest="metrics_command", required=True, metavar="COMMAND")
    token = sub.add_parser(
        "token",
        help="print the scrape token (derived from the cluster secret)",
        description="Print the bearer token every master, node and serve of this cluster accepts on "
        "GET /metrics. It is derived from the cluster secret (one way: it does not reveal it) and "
        "changes only with it. Write it to the file Prometheus reads (authorization: "
        "credentials_file:), readable by Prometheus and nobody else.",
    )
    source = token.add_mutually_exclusive_group(required=True)
    source.add_argument("--cluster-secret-file", metavar="PATH", help="the secret of sparrow master/node")
    source.add_argument(
        "--data-dir", metavar="DIR", help="sparrow serve's data directory (its cluster.secret)"
    )
    source.add_argument("--config", metavar="FILE", help="sparrow serve's TOML config")
    token.set_defaults(func=cmd_metrics_token)


def cmd_metrics_token(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from sparrow.cli import CliError
    from sparrow.cluster.channel import SecretError
    from sparrow.clustersecret import SERVE_SECRET_NAME, load_cluster_secret
    from sparrow.config import ConfigError, Overrides, load_config
    from sparrow.metricsauth import scrape_token

    what = "sparrow metrics token: error"
    if args.cluster_secret_file:
        path = Path(args.cluster_secret_file).expanduser()
    elif args.data_dir:
        path = Path(args.data_dir).expanduser() / SERVE_SECRET_NAME
    else:
        try:
            config = load_config(Path(args.config).expanduser(), Overrides())
        except ConfigError as e:
            raise CliError(f"{what}: {e}") from None
        path = config.cluster_secret_file or config.data_dir / SERVE_SECRET_NAME
    try:
        secret = load_cluster_secret(path)
    except SecretError as e:
        raise CliError(f"{what}: {e}") from None
    print(scrape_token(secret), file=out)
    return 0
