"""``writeturn migrate``: apply or inspect the migrations of writeturn's own tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .. import migrations
from ..urls import normalize_url, redact
from ._common import Parser, add_url_option, database_url, seconds

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add ``writeturn migrate`` (upgrade, downgrade, current, history)."""
    database = Parser(add_help=False)
    add_url_option(database)
    locking = Parser(add_help=False)
    locking.add_argument(
        "--namespace",
        default=migrations.DEFAULT_NAMESPACE,
        help="namespace of the migration lock (default: %(default)s)",
    )
    locking.add_argument(
        "--lock-timeout",
        type=seconds("lock timeout", allow_zero=False),
        default=migrations.DEFAULT_LOCK_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for another migrator to finish (default: %(default)g)",
    )
    parser = sub.add_parser(
        "migrate",
        help="create or update writeturn's own tables",
        description=(
            "Apply or inspect the migrations of writeturn's own tables. Concurrent runs "
            "against one database apply each revision once: each waits for the migration lock."
        ),
        epilog="exit status: 0 success, 1 failure (e.g. lock timeout, unreachable database), "
        "2 invalid usage or configuration",
    )
    actions = parser.add_subparsers(dest="migrate_action", metavar="ACTION")
    actions.required = True
    up = actions.add_parser(
        "upgrade", parents=[database, locking], help="apply migrations up to REV (default: head)"
    )
    up.add_argument("revision", nargs="?", default="head", metavar="REV")
    down = actions.add_parser(
        "downgrade", parents=[database, locking], help="revert migrations down to REV (e.g. base)"
    )
    down.add_argument("revision", metavar="REV")
    actions.add_parser("current", parents=[database], help="show the database's revision")
    # --url is accepted (and unused) so that one command line works for every action.
    actions.add_parser(
        "history", parents=[database], help="list the available revisions, oldest first"
    )
    for name, action in actions.choices.items():
        action.set_defaults(run=run, error_prefix=f"migrate {name}")


def run(args: argparse.Namespace) -> int:
    action: str = args.migrate_action
    if action == "history":
        for line in migrations.history_lines():
            print(line)
        return 0
    raw = database_url(args.url)
    assert raw is not None
    url = normalize_url(raw)
    shown = redact(url)
    head = migrations.head_revision()

    def at(revision: str | None) -> str:
        return f"{revision or 'base'}{' (head)' if revision == head else ''}"

    if action == "current":
        print(at(migrations.current(url)))
        return 0
    step: Callable[..., migrations.MigrationResult] = (
        migrations.upgrade if action == "upgrade" else migrations.downgrade
    )
    result = step(url, args.revision, namespace=args.namespace, lock_timeout=args.lock_timeout)
    verb = "applied" if action == "upgrade" else "reverted"
    if not result.steps:
        print(f"nothing to do: {shown} is at {at(result.revision)}")
    else:
        print(f"{verb} {', '.join(result.steps)} on {shown}; now at {at(result.revision)}")
    return 0
