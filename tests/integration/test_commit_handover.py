"""Advisory mode on Postgres passes a key's turn on as a write's COMMIT goes out: the
database's lock holds the next write until that COMMIT has ended, so the next write's
BEGIN travels during the COMMIT, while its function still starts after it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, WriteSerializer

from ._db import create_tables, ledger, pg_leftovers, record
from .test_connections import _asyncpg_kwargs

pytestmark = pytest.mark.postgres

#: A COMMIT that takes COMMIT_SECONDS: a deferred trigger sleeps when it fires, at COMMIT.
SLOW_COMMIT_DDL = (
    "CREATE TABLE slow (id INTEGER)",
    "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
)
WAITING_FOR_A_WRITE_LOCK = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def _slow(session: AsyncSession, seq: int) -> None:
    await record(session, "k", "slow", seq)
    await session.execute(text("INSERT INTO slow VALUES (:i)"), {"i": seq})


async def _after(session: AsyncSession, seq: int) -> int:
    """The next write: it must see the slow write's row, so it ran after that COMMIT."""
    seen = (await session.execute(text("SELECT count(*) FROM slow"))).scalar_one()
    await record(session, "k", "next", seq)
    return int(seen)


async def _max_waiting(observer: asyncpg.Connection, until: asyncio.Future[object]) -> int:
    most = 0
    while not until.done():
        most = max(most, int(await observer.fetchval(WAITING_FOR_A_WRITE_LOCK)))
        await asyncio.sleep(0.02)
    return most


async def _slow_commit_then_next(pg_url: str, **options: Any) -> int:
    """A write whose COMMIT is slow, and the next write of its key: both commit, in
    that order, the next one after seeing the first's row. Returns how many
    sessions at most waited for a write lock during the slow COMMIT."""
    observer = await asyncpg.connect(**_asyncpg_kwargs(pg_url))
    try:
        async with (
            asyncio.timeout(60),
            WriteSerializer.from_url(pg_url, coordination="advisory", **options) as ser,
        ):
            await create_tables(ser.engine)
            async with ser.engine.begin() as conn:
                for ddl in SLOW_COMMIT_DDL:
                    await conn.exec_driver_sql(ddl)
            slow = ser.submit(_slow, 1, key="k")
            after = ser.submit(_after, 2, key="k")
            waiting = await _max_waiting(observer, asyncio.ensure_future(asyncio.shield(slow)))
            assert await after == 1  # the next write saw the slow write's row
            assert (slow.outcome, after.outcome) == (Outcome.COMMITTED, Outcome.COMMITTED)
            assert [r[2] for r in await ledger(ser.engine)] == ["slow", "next"]
            assert ser.stats().connections_invalidated == 0
            assert await pg_leftovers(ser.engine) == (0, 0)
            return waiting
    finally:
        await observer.close()


async def test_the_next_begin_travels_during_the_commit(pg_url: str) -> None:
    # Its BEGIN went out during the slow COMMIT: it waited for the key's lock.
    assert await _slow_commit_then_next(pg_url) == 1


async def test_a_write_that_may_run_again_keeps_its_turn_until_its_commit(pg_url: str) -> None:
    # Until its COMMIT is acknowledged (a retry keeps its place): nobody waited.
    assert await _slow_commit_then_next(pg_url, retries=2) == 0


async def test_with_no_connection_to_spare_the_turn_waits_for_the_commit(pg_url: str) -> None:
    """Passing the turn on early needs a second connection for the next write: with
    none to spare (a one-connection pool), the turn waits for the COMMIT as before,
    so the next write never waits for the pool (and never hits its pool_timeout)."""
    assert await _slow_commit_then_next(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2) == 0
