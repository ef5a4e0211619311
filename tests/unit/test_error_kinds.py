"""What a driver error means, on a real SQLite file: the errors come from SQLite itself.

The Postgres half is tests/integration/test_error_kinds.py (it needs the server).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from writeturn._error_kinds import ErrorKind, classify


async def raised(aw: Awaitable[Any]) -> BaseException:
    """The exception ``aw`` raises (the test fails if it raises none)."""
    try:
        await aw
    except Exception as exc:
        return exc
    pytest.fail("the statement did not fail")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    yield engine
    await engine.dispose()


async def test_the_write_lock_held_past_the_busy_timeout_is_transient(engine: AsyncEngine) -> None:
    async with engine.connect() as holder, engine.connect() as waiter:
        await holder.exec_driver_sql("BEGIN IMMEDIATE")
        await waiter.exec_driver_sql("PRAGMA busy_timeout=50")
        exc = await raised(waiter.exec_driver_sql("BEGIN IMMEDIATE"))
        await holder.rollback()
    assert isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)
    assert classify("sqlite", exc) == ErrorKind.TRANSIENT
    # The rules are per database: on Postgres this text could only be a message
    # some function raised.
    assert classify("postgresql", exc) == ErrorKind.OTHER


async def test_writeturns_journal_table_missing(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        exc = await raised(conn.exec_driver_sql("SELECT 1 FROM writeturn_journal"))
    assert isinstance(exc, OperationalError)
    assert classify("sqlite", exc) == ErrorKind.MISSING_TABLE


async def test_an_applications_missing_table_is_not_writeturns_schema(engine: AsyncEngine) -> None:
    # SQLite names the table, and only writeturn's own tables mean "not migrated".
    async with engine.connect() as conn:
        exc = await raised(conn.exec_driver_sql("SELECT 1 FROM ledger"))
    assert "no such table: ledger" in str(exc)
    assert classify("sqlite", exc) == ErrorKind.OTHER


async def test_a_unique_violation_is_other(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        await conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        exc = await raised(conn.exec_driver_sql("INSERT INTO t VALUES (1)"))
        await conn.rollback()
    assert isinstance(exc, IntegrityError)
    assert classify("sqlite", exc) == ErrorKind.OTHER


async def test_a_closed_connection_is_lost_and_never_not_sent(engine: AsyncEngine) -> None:
    # Closing aiosqlite's own connection under SQLAlchemy's: SQLAlchemy finds it closed
    # and invalidates it. SQLite has no "refused before sending" to tell apart.
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")
        raw = await conn.get_raw_connection()
        await raw.driver_connection.close()
        exc = await raised(conn.exec_driver_sql("SELECT 1"))
    assert isinstance(exc, DBAPIError) and exc.connection_invalidated
    assert classify("sqlite", exc) == ErrorKind.LOST


def test_an_error_that_is_not_the_drivers_is_other() -> None:
    assert classify("sqlite", ValueError("database is locked")) == ErrorKind.OTHER
    assert classify("postgresql", RuntimeError("boom")) == ErrorKind.OTHER
