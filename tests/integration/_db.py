"""Small helpers the integration tests share: the test tables and database checks."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from writeturn import WriteSerializer

LEDGER_DDL = (
    "CREATE TABLE ledger (id {serial}, key TEXT NOT NULL, writer TEXT, seq INTEGER NOT NULL)"
)
COUNTER_DDL = "CREATE TABLE counter (key TEXT PRIMARY KEY, n INTEGER NOT NULL)"


def serial(engine: AsyncEngine) -> str:
    if engine.dialect.name == "sqlite":
        return "INTEGER PRIMARY KEY AUTOINCREMENT"
    return "BIGSERIAL PRIMARY KEY"


async def create_tables(engine: AsyncEngine, *keys: str) -> None:
    """A ledger (one row per write, id = commit order on a key) and a counter per key."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql(LEDGER_DDL.format(serial=serial(engine)))
        await conn.exec_driver_sql(COUNTER_DDL)
        for key in keys or ("k",):
            await conn.execute(text("INSERT INTO counter VALUES (:k, 0)"), {"k": key})


async def record(session: AsyncSession, key: str, writer: str | None, seq: int) -> int:
    """Write one ledger row; return its id."""
    result = await session.execute(
        text("INSERT INTO ledger (key, writer, seq) VALUES (:k, :w, :s) RETURNING id"),
        {"k": key, "w": writer, "s": seq},
    )
    return int(result.scalar_one())


async def increment(session: AsyncSession, key: str = "k", pause: float = 0.0) -> int:
    """Read-then-write increment, with a yield between the read and the write."""
    n = (await session.execute(text("SELECT n FROM counter WHERE key = :k"), {"k": key})).scalar()
    await asyncio.sleep(pause)
    await session.execute(text("UPDATE counter SET n = :n WHERE key = :k"), {"n": n + 1, "k": key})
    return int(n) + 1


async def increment_concurrently(ser: WriteSerializer, tasks: int = 50, each: int = 10) -> None:
    """``tasks`` writers at once, each running ``each`` increments of key "k" in turn."""

    async def task(i: int) -> None:
        for _ in range(each):
            await ser.run(increment, key="k", writer=f"t{i}")

    await asyncio.gather(*(task(i) for i in range(tasks)))


async def counter(engine: AsyncEngine, key: str = "k") -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(text("SELECT n FROM counter WHERE key = :k"), {"k": key})).scalar()
        )


async def ledger(engine: AsyncEngine, key: str | None = None) -> list[tuple[Any, ...]]:
    """(id, key, writer, seq) rows in commit order."""
    sql = "SELECT id, key, writer, seq FROM ledger"
    params: dict[str, Any] = {}
    if key is not None:
        sql += " WHERE key = :k"
        params["k"] = key
    async with engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(text(sql + " ORDER BY id"), params))]


async def pg_leftovers(engine: AsyncEngine) -> tuple[int, int]:
    """(advisory locks held, sessions idle in transaction) in this database, on Postgres."""
    if engine.dialect.name != "postgresql":
        return (0, 0)
    async with engine.connect() as conn:
        locks = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
                )
            )
        ).scalar_one()
        idle = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                )
            )
        ).scalar_one()
        await conn.rollback()
    return int(locks), int(idle)


@asynccontextmanager
async def serializer(url: str, **options: Any) -> AsyncIterator[WriteSerializer]:
    ser = WriteSerializer.from_url(url, **options)
    async with ser:
        yield ser


async def quietly(aw: Any) -> Any:
    """Await ``aw``; return the exception instead of raising it."""
    try:
        return await aw
    except BaseException as exc:
        return exc


def sqlite_threads_alive() -> set[str]:
    """Names of the aiosqlite connection threads running now."""
    return {
        t.name
        for t in threading.enumerate()
        if "_connection_worker_thread" in t.name and t.is_alive()
    }


class _AsyncioReports(logging.Handler):
    """What asyncio logs about futures and tasks nobody awaited."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text_ = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text_ += f": {record.exc_info[1]!r}"
        self.messages.append(text_)


@contextmanager
def loop_reports() -> Iterator[list[str]]:
    """Everything the running loop's exception handler and the "asyncio" logger report.

    Futures are reported when they are collected: garbage is collected before the
    list is final, so an orphan that is only reachable from a cycle shows up too.
    """
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    def on_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        seen.append(f"{context.get('message')}: {exc!r}")

    handler = _AsyncioReports()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    previous = loop.get_exception_handler()
    loop.set_exception_handler(on_exception)
    try:
        yield seen
        gc.collect()
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
        logger.removeHandler(handler)
        seen.extend(handler.messages)
