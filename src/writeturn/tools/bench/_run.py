"""``run_bench``: every cell of the options on every database, then the targets."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ...dialects import SQLITE_SYNCHRONOUS
from ...errors import ConfigurationError, DatabaseUnreachable
from ...urls import backend_of, describe_error, normalize_url, redact
from ._cell import CellSpec, run_cell
from ._memory import measure_memory
from ._model import (
    STRATEGIES,
    TEMP_SQLITE,
    WORKLOADS,
    BenchOptions,
    BenchResults,
    CellResult,
)
from ._strategies import Database, make_engine
from ._targets import compute_targets

__all__ = ["run_bench", "check_options", "check_reachable"]


class PoolErrorCounter(logging.Handler):
    """Counts (and keeps off the terminal) the errors SQLAlchemy's pool logs, such as a
    reset cut short by a cancellation; each cell reports how many it caused."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextmanager
def _counting_pool_errors() -> Iterator[PoolErrorCounter]:
    logger = logging.getLogger("sqlalchemy.pool")
    handler, propagate = PoolErrorCounter(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


async def run_bench(options: BenchOptions) -> BenchResults:
    """Run every cell ``options`` asks for and compute the targets.

    Each strategy x workload x writers x cancel-rate cell starts from fresh
    ``writeturn_bench_*`` tables, dropped again after it. Prints nothing:
    ``options.progress`` is told after each cell.
    """
    check_options(options)
    with ExitStack() as stack:
        databases = list(_databases(options, stack))
        for db in databases:  # fail in a second, not after the cells of the first database
            await check_reachable(db)
        pool_errors = stack.enter_context(_counting_pool_errors())
        cells: list[CellResult] = []
        total = len(databases) * _cells_per_database(options)
        for db in databases:
            cells.extend(await _run_database(db, options, len(cells), total, pool_errors))
        memory = None
        if options.memory_writes > 0:
            memory = await measure_memory(databases[0], options.memory_writes)
    labels = [db.label for db in databases]
    return BenchResults(
        options=_options_dict(options, databases),
        machine=machine(),
        databases=labels,
        cells=cells,
        memory=memory,
        targets=compute_targets(cells, labels, memory),
    )


async def check_reachable(db: Database) -> None:
    """Raise :class:`DatabaseUnreachable` (password masked) unless ``db`` answers ``SELECT 1``."""
    engine = make_engine(db, connect_args={"timeout": 10} if db.backend == "postgresql" else {})
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise DatabaseUnreachable(
            f"cannot reach {redact(db.url)} ({describe_error(exc, db.url)}); check that the "
            "server runs and that the URL's host, port, database and credentials are right"
        ) from None
    finally:
        await engine.dispose()


def check_options(options: BenchOptions) -> None:
    """Raise :class:`ConfigurationError` naming the first bad option."""
    _check_members("strategies", options.strategies, STRATEGIES)
    _check_members("workloads", options.workloads, WORKLOADS)
    _check_members("sqlite_synchronous", options.sqlite_synchronous, SQLITE_SYNCHRONOUS)
    if options.writes < 1 or not options.writers or min(options.writers) < 1:
        raise ConfigurationError("writes and every writers count must be at least 1")
    if any(not 0 <= r < 1 for r in options.cancel_rates) or not options.cancel_rates:
        raise ConfigurationError("each cancel rate must be at least 0 and below 1, e.g. 0.3")
    if options.burst < 1 or options.memory_writes < 0:
        raise ConfigurationError("burst must be at least 1 and memory_writes at least 0")
    if not options.urls:
        raise ConfigurationError(f"give at least one URL (or {TEMP_SQLITE!r})")


def _check_members(name: str, values: list[str], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigurationError(
            f"{name}: {', '.join(map(repr, bad)) or 'none given'}; choose from {', '.join(allowed)}"
        )


def _cells_per_database(options: BenchOptions) -> int:
    return (
        len(options.workloads)
        * len(options.writers)
        * len(options.cancel_rates)
        * len(options.strategies)
    )


def _databases(options: BenchOptions, stack: ExitStack) -> Iterator[Database]:
    """One Database per URL, and per synchronous level for SQLite."""
    seen: set[str] = set()
    for raw in options.urls:
        if raw == TEMP_SQLITE:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="writeturn-bench-"))
            raw = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        url = normalize_url(raw)
        backend = backend_of(url)
        levels: list[str | None] = (
            list(options.sqlite_synchronous) if backend == "sqlite" else [None]
        )
        for level in levels:
            label = f"sqlite {level}" if level else backend
            n = 2
            base = label
            while label in seen:
                label, n = f"{base} #{n}", n + 1
            seen.add(label)
            yield Database(label, url, backend, level)


async def _run_database(
    db: Database, options: BenchOptions, done: int, total: int, pool_errors: PoolErrorCounter
) -> list[CellResult]:
    admin = make_engine(db, pool_pre_ping=True)  # survives a server restart between cells
    out: list[CellResult] = []
    try:
        for workload in options.workloads:
            for writers in options.writers:
                for rate in options.cancel_rates:
                    for strategy in options.strategies:
                        spec = CellSpec(
                            db,
                            workload,
                            writers,
                            rate,
                            strategy,
                            options.writes,
                            options.burst,
                            options.seed,
                        )
                        before = pool_errors.count
                        cell = await run_cell(spec, admin)
                        cell.pool_errors = pool_errors.count - before
                        out.append(cell)
                        if options.progress is not None:
                            what = f"{db.label} {workload} w={writers} c={rate} {strategy}"
                            options.progress(done + len(out), total, what)
    finally:
        await admin.dispose()
    return out


def _options_dict(options: BenchOptions, databases: list[Database]) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("progress", "urls")}
    d["databases"] = {
        db.label: (
            "temporary SQLite file"
            if db.backend == "sqlite" and "writeturn-bench-" in str(db.url.database)
            else redact(db.url)
        )
        for db in databases
    }
    return d


def machine() -> dict[str, Any]:
    """What ran the bench (for the JSON file and BENCHMARKS.md)."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "sqlalchemy": _version("SQLAlchemy"),
        "aiosqlite": _version("aiosqlite"),
        "asyncpg": _version("asyncpg"),
        "writeturn": _version("writeturn"),
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"
