"""What a driver error means, on a real Postgres: each error is made by the server or
by asyncpg on a real connection, then classified.

The SQLite half is tests/unit/test_error_kinds.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from writeturn._error_kinds import ErrorKind, classify

pytestmark = pytest.mark.postgres


async def raised(aw: Awaitable[Any]) -> BaseException:
    """The exception ``aw`` raises (the test fails if it raises none)."""
    try:
        await aw
    except Exception as exc:
        return exc
    pytest.fail("the statement did not fail")


def kind(exc: BaseException) -> ErrorKind:
    return classify("postgresql", exc)


def sqlstate(exc: BaseException) -> str | None:
    assert isinstance(exc, DBAPIError)
    return getattr(exc.orig, "sqlstate", None)


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_url)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        await conn.exec_driver_sql("INSERT INTO t VALUES (1, 0), (2, 0)")
    yield engine
    await engine.dispose()


async def test_writeturns_journal_table_missing(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        exc = await raised(conn.exec_driver_sql("SELECT 1 FROM writeturn_journal"))
    assert sqlstate(exc) == "42P01"  # undefined_table
    assert kind(exc) == ErrorKind.MISSING_TABLE


async def test_a_unique_violation_is_other(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        exc = await raised(conn.exec_driver_sql("INSERT INTO t VALUES (1, 0)"))
    assert isinstance(exc, IntegrityError) and sqlstate(exc) == "23505"
    assert kind(exc) == ErrorKind.OTHER


async def test_a_serialization_failure_is_transient(engine: AsyncEngine) -> None:
    # Two REPEATABLE READ transactions update one row: the second to write, whose
    # snapshot predates the first one's COMMIT, cannot be serialized.
    rr = engine.execution_options(isolation_level="REPEATABLE READ")
    async with rr.connect() as first, rr.connect() as second:
        await first.exec_driver_sql("SELECT n FROM t WHERE id = 1")
        await second.exec_driver_sql("SELECT n FROM t WHERE id = 1")
        await first.exec_driver_sql("UPDATE t SET n = n + 1 WHERE id = 1")
        await first.commit()
        exc = await raised(second.exec_driver_sql("UPDATE t SET n = n + 1 WHERE id = 1"))
        await second.rollback()
    assert sqlstate(exc) == "40001"
    assert kind(exc) == ErrorKind.TRANSIENT


async def test_a_deadlock_is_transient(engine: AsyncEngine) -> None:
    async with engine.connect() as a, engine.connect() as b:
        await a.exec_driver_sql("UPDATE t SET n = n + 1 WHERE id = 1")
        await b.exec_driver_sql("UPDATE t SET n = n + 1 WHERE id = 2")

        async def cross(conn: AsyncConnection, row: int) -> BaseException | None:
            try:
                await conn.exec_driver_sql(f"UPDATE t SET n = n + 1 WHERE id = {row}")
            except DBAPIError as exc:
                await conn.rollback()  # lets the other one through
                return exc
            return None

        waits = asyncio.ensure_future(cross(a, 2))
        await asyncio.sleep(0.2)  # a waits for b's row before b asks for a's
        errors = [e for e in await asyncio.gather(waits, cross(b, 1)) if e is not None]
        await a.rollback()
        await b.rollback()
    (exc,) = errors  # Postgres aborts one of the two
    assert sqlstate(exc) == "40P01"
    assert kind(exc) == ErrorKind.TRANSIENT


async def test_a_statement_in_an_aborted_transaction(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await raised(conn.exec_driver_sql("INSERT INTO t VALUES (1, 0)"))
        exc = await raised(conn.exec_driver_sql("SELECT 1"))
        await conn.rollback()
    assert sqlstate(exc) == "25P02"
    assert kind(exc) == ErrorKind.ABORTED


async def test_a_backend_terminated_mid_statement_is_lost(engine: AsyncEngine) -> None:
    async with engine.connect() as victim, engine.connect() as admin:
        pid = (await victim.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
        sleeping = asyncio.ensure_future(victim.exec_driver_sql("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.2)
        await admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        await admin.rollback()
        exc = await raised(sleeping)
    assert isinstance(exc, DBAPIError) and exc.connection_invalidated
    # It was sent: the server ended the session while it ran.
    assert kind(exc) == ErrorKind.LOST


async def test_a_closed_connection_refuses_before_sending_and_is_lost(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")  # a transaction is open
        raw = await conn.get_raw_connection()
        await raw.driver_connection.close()
        exc = await raised(conn.commit())
    assert "connection is closed" in str(exc)
    assert kind(exc) == ErrorKind.NOT_SENT | ErrorKind.LOST


async def test_a_connection_busy_with_another_call_refuses_before_sending(
    engine: AsyncEngine,
) -> None:
    # asyncpg's own refusal: the connection stays alive, nothing was sent.
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        running = asyncio.ensure_future(driver.execute("SELECT pg_sleep(0.3)"))
        await asyncio.sleep(0.05)
        exc = await raised(driver.fetchval("SELECT 1"))
        await running
    assert "another operation is in progress" in str(exc)
    assert kind(exc) == ErrorKind.NOT_SENT


async def test_a_lock_wait_past_lock_timeout(engine: AsyncEngine) -> None:
    async with engine.connect() as holder, engine.connect() as waiter:
        await holder.exec_driver_sql("SELECT pg_advisory_lock(42)")
        await waiter.exec_driver_sql("SET lock_timeout = '50ms'")
        exc = await raised(waiter.exec_driver_sql("SELECT pg_advisory_lock(42)"))
        await waiter.rollback()
        await holder.exec_driver_sql("SELECT pg_advisory_unlock(42)")
        await holder.rollback()
    assert sqlstate(exc) == "55P03"  # lock_not_available
    assert kind(exc) == ErrorKind.LOCK_TIMEOUT


@pytest.mark.parametrize(
    ("statements", "state"),
    [
        # duplicate_prepared_statement: another client's statement of that name is there
        (["PREPARE writeturn_s AS SELECT 1", "PREPARE writeturn_s AS SELECT 1"], "42P05"),
        # invalid_sql_statement_name: this client's statement is not there
        (["EXECUTE writeturn_gone"], "26000"),
    ],
)
async def test_prepared_statements_that_clash(
    engine: AsyncEngine, statements: list[str], state: str
) -> None:
    # What asyncpg's named statements meet behind a transaction-mode pooler, made here
    # on one server connection with the same SQLSTATEs.
    async with engine.connect() as conn:
        for sql in statements[:-1]:
            await conn.exec_driver_sql(sql)
        exc = await raised(conn.exec_driver_sql(statements[-1]))
        await conn.rollback()
    assert sqlstate(exc) == state
    assert kind(exc) == ErrorKind.STATEMENT_CLASH


async def test_a_write_in_a_read_only_transaction_is_unwritable(engine: AsyncEngine) -> None:
    # What a standby, or a primary fenced with default_transaction_read_only, answers.
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        exc = await raised(conn.exec_driver_sql("UPDATE t SET n = 1"))
    assert sqlstate(exc) == "25006"  # read_only_sql_transaction
    assert kind(exc) == ErrorKind.UNWRITABLE


async def test_an_unwritable_error_invalidates_the_connection_and_its_pool(
    engine: AsyncEngine,
) -> None:
    """Once installed, SQLAlchemy treats it as a disconnect: the connection is
    discarded, and every connection the pool made before it is recycled."""
    from writeturn._error_kinds import install

    install(engine)
    install(engine)  # once per engine, however many serializers share it
    others = [await engine.connect() for _ in range(2)]
    pids = {(await c.exec_driver_sql("SELECT pg_backend_pid()")).scalar() for c in others}
    for c in others:
        await c.close()
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        exc = await raised(conn.exec_driver_sql("UPDATE t SET n = 1"))
        assert isinstance(exc, DBAPIError) and exc.connection_invalidated
        assert kind(exc) == ErrorKind.LOST | ErrorKind.UNWRITABLE
    # Every pooled connection made before was recycled: new backends only.
    fresh = [await engine.connect() for _ in range(2)]
    try:
        again = {(await c.exec_driver_sql("SELECT pg_backend_pid()")).scalar() for c in fresh}
    finally:
        for c in fresh:
            await c.close()
    assert not again & pids
