"""``writeturn bench``: parse the options, run, print the tables and the targets."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..dialects import SQLITE_SYNCHRONOUS
from ..errors import WriteturnError
from ..urls import redact
from ._model import (
    STRATEGIES,
    TEMP_SQLITE,
    WORKLOADS,
    WRITETURN_STRATEGIES,
    BenchOptions,
    BenchResults,
)
from ._report import format_cells, format_memory, format_targets, write_json, write_plot
from ._run import run_bench

__all__ = ["register_cli", "print_results"]

DEFAULT_MEMORY_WRITES = 100_000


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``writeturn bench`` to the CLI."""
    p = sub.add_parser(
        "bench",
        help="compare writeturn with other ways of writing concurrently, side by side",
        description=(
            "Run the same workloads through several write strategies (raw, bulk, naive, lock, "
            "queue, semaphore, and writeturn's turn, advisory and batch) and compare writes/s, "
            "latency, errors, invariants, invalidated connections and fairness. Each cell "
            "starts from fresh writeturn_bench_* tables, dropped after it."
        ),
        epilog="exit status: 0 done, 1 a writeturn cell broke an invariant or failed, 2 usage",
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
        type=_choices(SQLITE_SYNCHRONOUS, str.upper),
        default=["NORMAL"],
        help="SQLite sync levels, comma list (default: NORMAL)",
    )
    p.add_argument("--writes", type=_positive, default=2000, help="writes per cell (default 2000)")
    p.add_argument(
        "--writers",
        type=_int_list,
        default=[1, 8, 64],
        help="concurrent writers, comma list (default: 1,8,64)",
    )
    p.add_argument(
        "--workloads",
        type=_choices(WORKLOADS),
        default=list(WORKLOADS),
        help=f"comma list of {','.join(WORKLOADS)} (default: all)",
    )
    p.add_argument(
        "--strategies",
        type=_choices(STRATEGIES),
        default=list(STRATEGIES),
        help=f"comma list of {','.join(STRATEGIES)} (default: all)",
    )
    p.add_argument(
        "--cancel-rate",
        type=_rate_list,
        default=[0.0],
        help="share of writes cancelled at a random moment; a comma list runs each "
        "(e.g. 0,0.3 for the cancellation target) (default: 0)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument(
        "--burst", type=_positive, default=8, help="writes each writer submits at once (default 8)"
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also measure the memory of writes queued behind a held turn",
    )
    p.add_argument(
        "--memory-writes",
        type=_positive,
        default=DEFAULT_MEMORY_WRITES,
        help="writes queued for --memory (default 100000)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write all results")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="plot writes/s by writers (needs matplotlib: the 'bench' extra)",
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
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
        progress=_progress_printer(sys.stderr),
    )
    try:
        results = asyncio.run(run_bench(options))
    except WriteturnError as exc:
        print(f"writeturn bench: {redact(str(exc))}", file=sys.stderr)
        return 2
    finally:
        if sys.stderr.isatty():
            print(file=sys.stderr)
    print_results(results, sys.stdout)
    if args.json is not None:
        write_json(results, args.json)
        print(f"results written to {args.json}")
    if args.plot is not None:
        write_plot(results, args.plot)
        print(f"plot written to {args.plot}")
    return 1 if _writeturn_broke(results) else 0


def print_results(results: BenchResults, out: TextIO) -> None:
    """The cell tables, the memory figure and the targets, as text."""
    m = results.machine
    out.write(f"machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}\n")
    out.write(format_cells(results))
    out.write(format_memory(results))
    out.write(format_targets(results.targets))


def _writeturn_broke(results: BenchResults) -> bool:
    return any(
        c.strategy in WRITETURN_STRATEGIES
        and (c.status == "failed" or (c.status == "ok" and (c.violations or c.failed)))
        for c in results.cells
    )


def _progress_printer(stream: TextIO) -> Callable[[int, int, str], None] | None:
    if not stream.isatty():
        return None

    def show(done: int, total: int, what: str) -> None:
        stream.write(f"\r[{done:>4}/{total}] {what[:60]:<60}")
        stream.flush()

    return show


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",") if part.strip()]


def _rate_list(text: str) -> list[float]:
    out: list[float] = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number") from None
        if not 0 <= rate < 1:
            raise argparse.ArgumentTypeError(f"cancel rate {rate} must be in [0, 1)")
        out.append(rate)
    return out


def _choices(
    allowed: tuple[str, ...], norm: Callable[[str], str] = str.strip
) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [norm(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad) or 'nothing'}: choose from {', '.join(allowed)}"
            )
        return values

    return parse
