"""``writeturn doctor``: check a database and print each finding with its fix."""

from __future__ import annotations

import argparse
import asyncio

from ..migrations import DEFAULT_NAMESPACE
from ..tools.doctor import DEFAULT_IDLE_THRESHOLD, diagnose, format_json, format_text
from ._common import Parser, add_url_option, database_url, seconds

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add ``writeturn doctor``."""
    parser = sub.add_parser(
        "doctor",
        help="check a database: versions, settings, migrations, leaked locks and transactions",
        description=(
            "Check a database writeturn writes to and report each finding as OK, WARN or "
            "FAIL, with the fix for each problem. It only reads (on SQLite, SQLite itself "
            "rolls back a crashed writer's hot journal when the file is opened)."
        ),
        epilog="exit status: 0 nothing FAILed (WARNs allowed), 1 a check FAILed (or the "
        "database is unreachable), 2 invalid usage",
    )
    add_url_option(parser)
    parser.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help="the serializer's namespace, which names its locks (default: %(default)s)",
    )
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        dest="keys",
        metavar="KEY",
        help="a write key whose advisory lock to report by name (Postgres); repeatable",
    )
    parser.add_argument(
        "--idle-threshold",
        type=seconds("idle threshold", allow_zero=True),
        default=DEFAULT_IDLE_THRESHOLD,
        metavar="SECONDS",
        help="an advisory lock or transaction idle longer than this is leaked "
        "(default: %(default)g)",
    )
    parser.add_argument(
        "--show-queries",
        action="store_true",
        help="show other sessions' SQL text, literals included (default: only the "
        "statement's kind, such as SELECT, since literals may hold secrets)",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    url = database_url(args.url)
    assert url is not None
    checks = asyncio.run(
        diagnose(
            url,
            namespace=args.namespace,
            keys=args.keys,
            idle_threshold=args.idle_threshold,
            show_queries=args.show_queries,
        )
    )
    print(format_json(checks) if args.json else format_text(url, checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0
