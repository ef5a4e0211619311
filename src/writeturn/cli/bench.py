"""``writeturn bench``: parse the options, check them, run, print the tables and the targets."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from pathlib import Path

from ..dialects import SQLITE_SYNCHRONOUS
from ..errors import ConfigurationError
from ..tools.bench import (
    STRATEGIES,
    TEMP_SQLITE,
    WORKLOADS,
    BenchOptions,
    BenchResults,
    latency_plot_path,
    print_results,
    run_bench,
    write_json,
    write_plot,
)
from ..tools.bench._model import WRITETURN_STRATEGIES
from ..urls import normalize_url
from ._common import Parser, ProgressLine, choice_list, comma_list, rate, whole

__all__ = ["register"]

DEFAULT_MEMORY_WRITES = 100_000
PLOT_EXTRA = "pip install 'writeturn[bench]'"


def register(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add ``writeturn bench``."""
    p = sub.add_parser(
        "bench",
        help="compare writeturn with other ways of writing concurrently, side by side",
        description=(
            "Run the same workloads through several write strategies (raw, bulk, naive, lock, "
            "queue, semaphore, and writeturn's turn, advisory and batch) and compare writes/s, "
            "latency, errors, invariants, invalidated connections and fairness. Each cell "
            "starts from fresh writeturn_bench_* tables, dropped after it."
        ),
        epilog="exit status: 0 done, 1 a writeturn cell broke an invariant or failed (or a "
        "database is unreachable), 2 usage",
    )
    p.add_argument(
        "--url",
        action="append",
        default=None,
        metavar="URL",
        help=f"database URL, repeatable; {TEMP_SQLITE!r} (the default) is a temporary "
        "SQLite file; a password is never printed",
    )
    p.add_argument(
        "--sqlite-synchronous",
        type=choice_list("sqlite synchronous", SQLITE_SYNCHRONOUS, str.upper),
        default=["NORMAL"],
        help="SQLite sync levels, comma list (default: NORMAL)",
    )
    p.add_argument(
        "--writes", type=whole("writes", 1), default=2000, help="writes per cell (default 2000)"
    )
    p.add_argument(
        "--writers",
        type=comma_list(whole("writers", 1)),
        default=[1, 8, 64],
        help="concurrent writers, comma list (default: 1,8,64)",
    )
    p.add_argument(
        "--workloads",
        type=choice_list("workloads", WORKLOADS),
        default=list(WORKLOADS),
        help=f"comma list of {','.join(WORKLOADS)} (default: all)",
    )
    p.add_argument(
        "--strategies",
        type=choice_list("strategies", STRATEGIES),
        default=list(STRATEGIES),
        help=f"comma list of {','.join(STRATEGIES)} (default: all)",
    )
    # Below 1: a cell that cancels every write commits nothing and measures nothing.
    p.add_argument(
        "--cancel-rate",
        type=comma_list(rate("cancel rate", include_one=False)),
        default=[0.0],
        help="share of writes cancelled at a random moment, from 0 up to (not including) 1; "
        "a comma list runs each (e.g. 0,0.3 for the cancellation target) (default: 0)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument(
        "--burst",
        type=whole("burst", 1),
        default=8,
        help="writes each writer submits at once (default 8)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also measure the memory of writes queued behind a held turn",
    )
    p.add_argument(
        "--memory-writes",
        type=whole("memory writes", 1),
        default=DEFAULT_MEMORY_WRITES,
        help="writes queued for --memory (default 100000)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write all results")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="plot writes/s by writers to FILE.png and latency to FILE-latency.png "
        f"(needs matplotlib: {PLOT_EXTRA})",
    )
    p.set_defaults(run=run)


def check_before_running(args: argparse.Namespace) -> None:
    """Refuse, before a long run, what would only fail at its end."""
    if args.plot is not None:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            raise ConfigurationError(
                f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}"
            ) from None
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            raise ConfigurationError(
                f"{option} {str(path)!r}: folder {str(path.parent)!r} does not exist; create it "
                "or choose another path"
            )
    for url in args.url or ():
        if url != TEMP_SQLITE:
            normalize_url(url)  # UnsupportedDatabase names the supported forms, password masked


def run(args: argparse.Namespace) -> int:
    check_before_running(args)
    progress = ProgressLine(sys.stderr, "cells")
    options = BenchOptions(
        urls=args.url or [TEMP_SQLITE],
        sqlite_synchronous=args.sqlite_synchronous,
        writes=args.writes,
        writers=args.writers,
        workloads=args.workloads,
        strategies=args.strategies,
        cancel_rates=args.cancel_rate,
        seed=args.seed,
        burst=args.burst,
        memory_writes=args.memory_writes if args.memory else 0,
        progress=progress.update if progress.enabled else None,
    )
    try:
        results = asyncio.run(run_bench(options))
    finally:
        progress.finish()
    print_results(results, sys.stdout)
    if args.json is not None:
        write_json(results, args.json)
        print(f"results written to {args.json}")
    if args.plot is not None:
        write_plot(results, args.plot)
        print(f"plots written to {args.plot} and {latency_plot_path(args.plot)}")
    return 1 if _writeturn_broke(results) else 0


def _writeturn_broke(results: BenchResults) -> bool:
    return any(
        c.strategy in WRITETURN_STRATEGIES
        and (c.status == "failed" or (c.status == "ok" and (c.violations or c.failed)))
        for c in results.cells
    )
