"""Isolation levels: under REPEATABLE READ and SERIALIZABLE a write's function sees every
write that committed before its turn, in one serializer and across two (as across
processes), in turn and advisory mode, with and without group commit and the journal.

The danger these pin: at the snapshot levels Postgres fixes a transaction's snapshot
with its first statement, before that statement waits. A write whose first statement
waits for the key's advisory lock would run after the previous write's COMMIT but see
the database as it was before it: a read-modify-write then loses updates silently.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from writeturn import ConfigurationError, Outcome, WriteSerializer, migrations

from ._db import pg_leftovers, quietly, serializer

pytestmark = pytest.mark.postgres

SNAPSHOT_LEVELS = ["REPEATABLE READ", "SERIALIZABLE"]
APPENDS = 40


async def _tables(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE seqs (key TEXT NOT NULL, n INTEGER NOT NULL)")
            await conn.exec_driver_sql("CREATE TABLE counter (key TEXT PRIMARY KEY, n INTEGER)")
            await conn.exec_driver_sql("INSERT INTO counter VALUES ('k', 0)")
    finally:
        await engine.dispose()


async def append_next(session: AsyncSession, key: str) -> int:
    """Read the key's highest number, append the next one: a stale read appends a duplicate."""
    top = (
        await session.execute(
            text("SELECT COALESCE(MAX(n), 0) FROM seqs WHERE key = :k"), {"k": key}
        )
    ).scalar_one()
    await asyncio.sleep(0)
    await session.execute(text("INSERT INTO seqs VALUES (:k, :n)"), {"k": key, "n": top + 1})
    return int(top) + 1


async def increment(session: AsyncSession) -> int:
    n = (await session.execute(text("SELECT n FROM counter WHERE key = 'k'"))).scalar_one()
    await session.execute(text("UPDATE counter SET n = :n WHERE key = 'k'"), {"n": n + 1})
    return int(n) + 1


@asynccontextmanager
async def started(url: str, count: int, **options: Any) -> AsyncIterator[list[WriteSerializer]]:
    """``count`` started serializers of one database (more than one: as processes would)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serializer(url, **options)) for _ in range(count)]


async def _numbers(url: str) -> list[int]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT n FROM seqs WHERE key = 'k' ORDER BY n"))
            return [int(r[0]) for r in rows]
    finally:
        await engine.dispose()


async def _appends(sers: list[WriteSerializer], seed: int, **write: Any) -> list[Any]:
    """APPENDS writes on key "k", spread over ``sers``, all submitted at once."""
    rnd = random.Random(seed)
    handles = [
        rnd.choice(sers).submit(append_next, "k", key="k", writer=f"w{i % 4}", **write)
        for i in range(APPENDS)
    ]
    return list(await asyncio.gather(*(quietly(h) for h in handles)))


@pytest.mark.parametrize("batch_max", [1, 16])
# Two serializers stand for two processes; turn mode orders one serializer's writes only.
@pytest.mark.parametrize(
    ("coordination", "serializers"), [("advisory", 1), ("advisory", 2), ("turn", 1)]
)
@pytest.mark.parametrize("level", SNAPSHOT_LEVELS)
async def test_a_write_sees_every_write_committed_before_its_turn(
    pg_url: str, level: str, coordination: str, serializers: int, batch_max: int
) -> None:
    await _tables(pg_url)
    async with started(
        pg_url, serializers, coordination=coordination, isolation_level=level, batch_max=batch_max
    ) as sers:
        results = await _appends(sers, seed=serializers * 10 + batch_max)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors[:3]
        numbers = await _numbers(pg_url)
        assert numbers == list(range(1, APPENDS + 1)), (
            f"{len(set(numbers))} distinct numbers of {len(numbers)}: stale snapshots"
        )
        assert sorted(results) == numbers
        assert await pg_leftovers(sers[0].engine) == (0, 0)


@pytest.mark.parametrize("level", SNAPSHOT_LEVELS)
async def test_a_read_modify_write_counter_fails_no_write_at_snapshot_levels(
    pg_url: str, level: str
) -> None:
    await _tables(pg_url)
    async with started(pg_url, 2, isolation_level=level) as sers:
        handles = [sers[i % 2].submit(increment, key="k") for i in range(APPENDS)]
        results = await asyncio.gather(*(quietly(h) for h in handles))
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], f"{len(errors)} of {APPENDS} failed: {errors[0]!r}"
        assert sorted(results) == list(range(1, APPENDS + 1))


@pytest.mark.parametrize("level", SNAPSHOT_LEVELS)
async def test_the_journal_seq_never_collides_at_snapshot_levels(pg_url: str, level: str) -> None:
    await migrations.upgrade_async(pg_url)
    await _tables(pg_url)
    async with started(pg_url, 2, isolation_level=level, journal=True) as sers:
        handles = [
            sers[i % 2].submit(append_next, "k", key="k", idempotency_key=f"ik-{i}")
            for i in range(APPENDS)
        ]
        results = await asyncio.gather(*(quietly(h) for h in handles))
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors[:3]
        assert sorted(h.seq for h in handles) == list(range(1, APPENDS + 1))
        assert await _numbers(pg_url) == list(range(1, APPENDS + 1))


async def test_the_server_default_level_counts_too(pg_url: str) -> None:
    """A database whose default is SERIALIZABLE gets the same care as an engine that asks."""
    await _tables(pg_url)
    engine = create_async_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            db = (await conn.exec_driver_sql("SELECT current_database()")).scalar_one()
            await conn.exec_driver_sql(
                f"ALTER DATABASE \"{db}\" SET default_transaction_isolation = 'serializable'"
            )
    finally:
        await engine.dispose()
    async with started(pg_url, 2) as sers:
        results = await _appends(sers, seed=7)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors[:3]
        assert await _numbers(pg_url) == list(range(1, APPENDS + 1))


@pytest.mark.parametrize("seed", [1, 2])
async def test_stopped_writes_leave_no_lock_at_snapshot_levels(pg_url: str, seed: int) -> None:
    """Writes cancelled or timed out at random points, waiting for the lock included: every
    outcome is true, the numbers stay gap-free, and no lock outlives its write."""
    await _tables(pg_url)
    rnd = random.Random(seed)
    async with started(pg_url, 2, isolation_level="SERIALIZABLE", cancel_grace=0.01) as sers:
        handles = []
        for i in range(60):
            timeout = rnd.choice([None, None, 0.005, 0.02])
            h = rnd.choice(sers).submit(append_next, "k", key="k", timeout=timeout)
            handles.append(h)
            if rnd.random() < 0.3:
                asyncio.get_running_loop().call_later(rnd.uniform(0, 0.05), h.cancel)
            if i % 10 == 0:
                await asyncio.sleep(rnd.uniform(0, 0.01))
        await asyncio.gather(*(quietly(h) for h in handles))
        committed = [h for h in handles if h.outcome is Outcome.COMMITTED]
        numbers = await _numbers(pg_url)
        assert numbers == list(range(1, len(numbers) + 1)), numbers
        assert len(committed) == len(numbers) > 0
        stopped = [h for h in handles if h.outcome is not Outcome.COMMITTED]
        assert stopped, "the storm stopped no write: it tests nothing"
        assert all(h.outcome is not Outcome.UNKNOWN for h in handles)
        await asyncio.sleep(0.1)
        assert await pg_leftovers(sers[0].engine) == (0, 0)


@pytest.mark.parametrize("level", SNAPSHOT_LEVELS)
async def test_advisory_mode_behind_a_transaction_pooler_refuses_snapshot_levels(
    pg_url: str, level: str
) -> None:
    """Behind PgBouncer in transaction mode a lock can live only as long as a transaction,
    and that transaction's snapshot is taken as it waits: refused, with what to use."""
    ser = WriteSerializer.from_url(pg_url, isolation_level=level, pgbouncer=True)
    with pytest.raises(ConfigurationError, match=level) as caught:
        await ser.start()
    assert "READ COMMITTED" in str(caught.value) and "turn" in str(caught.value)
    await ser.close()
    async with WriteSerializer.from_url(
        pg_url, isolation_level=level, pgbouncer=True, coordination="turn"
    ) as ser:
        await _tables(pg_url)
        assert await ser.run(increment, key="k") == 1
