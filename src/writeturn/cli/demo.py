"""``writeturn demo``: writers race on a hot key, with cancellations; each guarantee is checked."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..tools.demo import (
    DEFAULT_TIME_LIMIT,
    MAX_KEYS,
    MAX_WRITERS,
    MAX_WRITES,
    DemoOptions,
    DemoReport,
    format_report,
    run_demo,
)
from ._common import Parser, ProgressLine, add_url_option, database_url, rate, seconds, whole

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add ``writeturn demo``."""
    parser = sub.add_parser(
        "demo",
        help="watch writers race on one hot key, with cancellations; check every guarantee",
        description=(
            "Several writers queue many read-then-write updates on one hot key at once while "
            "a share of them is cancelled at random moments; then each guarantee is checked "
            "against the database."
        ),
        epilog="exit status: 0 every guarantee holds, 1 a check failed (or the run did), "
        "2 invalid usage",
    )
    add_url_option(parser, "a temporary SQLite file")
    parser.add_argument(
        "--writers",
        type=whole("writers", 1, MAX_WRITERS),
        default=4,
        help="number of writers (default: %(default)s)",
    )
    parser.add_argument(
        "--writes",
        type=whole("writes", 1, MAX_WRITES),
        default=50,
        help="writes each writer queues at once (default: %(default)s)",
    )
    parser.add_argument(
        "--cancel-rate",
        type=rate("cancel rate", include_one=True),
        default=0.3,
        metavar="RATE",
        help="share of the writes cancelled, from 0 to 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--coordination",
        choices=("turn", "advisory"),
        default="advisory",
        help="how writes are coordinated (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the random plan (default: %(default)s)"
    )
    parser.add_argument(
        "--keys",
        type=whole("keys", 0, MAX_KEYS),
        default=1,
        help="other keys besides the hot one (default: %(default)s)",
    )
    parser.add_argument(
        "--time-limit",
        type=seconds("time limit", allow_zero=False),
        default=DEFAULT_TIME_LIMIT,
        metavar="SECONDS",
        help="give up (exit 1) if the writes have not settled by then (default: %(default)g)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the demo's tables afterwards, to look at them (default: drop them)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only the guarantee lines and the verdict"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    progress = ProgressLine(sys.stderr, "writes settled")
    options = DemoOptions(
        url=database_url(args.url, required=False),
        writers=args.writers,
        writes=args.writes,
        cancel_rate=args.cancel_rate,
        coordination=args.coordination,
        seed=args.seed,
        keys=args.keys,
        time_limit=args.time_limit,
        keep=args.keep,
    )
    try:
        report = _run_in_new_loop(options, progress)
    finally:
        progress.finish()
    print(format_report(report, quiet=args.quiet))
    return 0 if report.passed else 1


def _run_in_new_loop(options: DemoOptions, progress: ProgressLine) -> DemoReport:
    """``asyncio.run(run_demo(options))``, except that the tasks of a stalled run
    are left behind with the loop instead of being waited for forever."""
    loop = asyncio.new_event_loop()
    try:
        report = loop.run_until_complete(
            run_demo(options, progress=progress.update if progress.enabled else None)
        )
        if not report.stalled:
            _finish_loop(loop)
        return report
    except BaseException:
        _finish_loop(loop)
        raise
    finally:
        loop.close()


def _finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    leftover = asyncio.all_tasks(loop)
    if leftover:
        for task in leftover:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
