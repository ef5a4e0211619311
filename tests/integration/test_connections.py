"""Connections: a small pool shared with readers, statements stopped without a pooled
connection, dead connections replaced before a write begins, driver errors mapped to
writeturn's, and connections kept through inner timeouts and savepoints."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from writeturn import Outcome, TurnTimeout, WriteHandle, WriteSerializer, WriteturnError

from ._db import create_tables, ledger, pg_leftovers, record

SEED = 20261201


def _asyncpg_kwargs(url: str) -> dict[str, Any]:
    u = make_url(url)
    return {
        "host": u.host,
        "port": u.port or 5432,
        "user": u.username,
        "password": u.password,
        "database": u.database,
    }


async def _terminate_others(url: str) -> int:
    """Terminate every other backend of the test database; return how many."""
    conn = await asyncpg.connect(**_asyncpg_kwargs(url))
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


# -- 1. a small pool, readers on the same engine, a third of the writes cancelled ---------


@pytest.mark.slow
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_a_small_pool_serves_writes_and_readers_without_starving(
    db_url: str, coordination: str
) -> None:
    keys = [f"k{i}" for i in range(20)]
    rnd = random.Random(SEED)
    ser = WriteSerializer.from_url(
        db_url, coordination=coordination, pool_size=2, max_overflow=0, pool_timeout=10
    )
    async with asyncio.timeout(120), ser:
        await create_tables(ser.engine, *keys)
        handles: dict[tuple[str, int], WriteHandle[Any]] = {}
        reads = 0

        async def write(session: AsyncSession, key: str, i: int) -> None:
            await asyncio.sleep(rnd.choice((0, 0.001, 0.003)))
            await record(session, key, None, i)

        async def reader() -> None:
            nonlocal reads
            for _ in range(25):
                async with ser.engine.connect() as conn:
                    await conn.execute(text("SELECT count(*) FROM ledger"))
                    await conn.rollback()
                reads += 1
                await asyncio.sleep(rnd.uniform(0, 0.005))

        loop = asyncio.get_running_loop()
        for i in range(4):
            for key in keys:
                h = ser.submit(write, key, i, key=key)
                handles[(key, i)] = h
                if rnd.random() < 1 / 3:
                    loop.call_later(rnd.uniform(0, 0.02), h.cancel)
        results = await asyncio.gather(
            *(reader() for _ in range(4)),
            *(_outcome_of(h) for h in handles.values()),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors[:3]  # no reader timed out, no write failed
        assert reads == 100
        committed = {k for k, h in handles.items() if h.outcome is Outcome.COMMITTED}
        rows = {(r[1], r[3]) for r in await ledger(ser.engine)}
        assert rows == committed
        assert 0 < len(committed) < len(handles)
        assert ser.stats().connections_invalidated == 0
        assert await pg_leftovers(ser.engine) == (0, 0)
        # Nothing stays parked: after a quiet second the pool has every connection back.
        await asyncio.sleep(1.5)
        assert ser.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def _outcome_of(h: WriteHandle[Any]) -> Outcome:
    """Await a write; a cancellation is expected, any other exception is returned."""
    try:
        await h
    except asyncio.CancelledError:
        pass
    return h.outcome


# -- 2. a stuck statement is stopped without a pooled connection --------------------------


@pytest.mark.postgres
async def test_a_stuck_statement_is_interrupted_while_the_pool_is_full(pg_url: str) -> None:
    cleanup = 5.0
    ser = WriteSerializer.from_url(
        pg_url, pool_size=2, max_overflow=0, pool_timeout=30, cleanup_timeout=cleanup
    )
    async with asyncio.timeout(60), ser:
        await create_tables(ser.engine)
        blocker = await asyncpg.connect(**_asyncpg_kwargs(pg_url))
        try:
            await blocker.execute("BEGIN; UPDATE counter SET n = n WHERE key = 'k'")

            async def stuck(session: AsyncSession) -> None:
                await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = 'k'"))

            async with ser.engine.connect() as reader:  # the pool's other connection
                await reader.execute(text("SELECT 1"))
                t0 = time.monotonic()
                with pytest.raises(TurnTimeout):
                    await ser.run(stuck, key="k", timeout=0.5)
                took = time.monotonic() - t0
                await reader.rollback()
            # Well before cleanup_timeout, which is what a failed interrupt waits for.
            assert took < cleanup / 2, f"took {took:.2f}s"
            assert ser.stats().connections_invalidated == 0
            assert ser.stats().interrupts >= 1
        finally:
            await blocker.execute("ROLLBACK")
            await blocker.close()
        await ser.run(stuck, key="k", timeout=10)  # the connection still works


# -- 3. a connection killed while idle is replaced before the write begins -----------------


@pytest.mark.postgres
@pytest.mark.parametrize("batch_max", [1, 64])
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_a_connection_killed_while_idle_costs_the_write_nothing(
    pg_url: str, coordination: str, batch_max: int
) -> None:
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(pg_url, coordination=coordination, batch_max=batch_max) as ser,
    ):
        await create_tables(ser.engine)
        ran: list[int] = []

        async def write(session: AsyncSession, i: int) -> None:
            ran.append(i)
            await record(session, "k", None, i)

        await ser.run(write, 1, key="k")  # leaves its connection parked
        assert await _terminate_others(pg_url) >= 1
        await asyncio.sleep(0.2)  # the event loop sees the sockets close
        await ser.run(write, 2, key="k", timeout=10)
        assert ran == [1, 2]  # the function ran once: nothing was retried
        assert [r[3] for r in await ledger(ser.engine)] == [1, 2]


@pytest.mark.postgres
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_every_idle_connection_of_the_pool_killed_at_once_costs_the_write_nothing(
    pg_url: str, coordination: str
) -> None:
    """A server restart (or a kill of every backend) leaves the pool full of dead
    connections: the write gets a fresh one, not DatabaseUnreachable after three."""
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(pg_url, coordination=coordination, pool_size=8) as ser,
    ):
        await create_tables(ser.engine)
        # Six connections checked out at once, then checked in: the pool holds six idle.
        held = [await ser.engine.connect() for _ in range(6)]
        for conn in held:
            await conn.close()
        assert ser.engine.pool.checkedin() >= 6  # type: ignore[attr-defined]
        assert await _terminate_others(pg_url) >= 6
        await asyncio.sleep(0.2)  # the event loop sees the sockets close

        async def write(session: AsyncSession, i: int) -> None:
            await record(session, "k", None, i)

        await ser.run(write, 1, key="k", timeout=10)
        assert [r[3] for r in await ledger(ser.engine)] == [1]


# -- 4. backends terminated under group commit: only writeturn's errors --------------------


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_terminate_storm_under_group_commit_raises_only_writeturn_errors(
    pg_url: str,
) -> None:
    rnd = random.Random(SEED)
    keys = ("a", "b", "c", "d")
    async with (
        asyncio.timeout(120),
        WriteSerializer.from_url(pg_url, batch_max=16, batch_window=0.002) as ser,
    ):
        await create_tables(ser.engine, *keys)
        handles: dict[tuple[str, int], WriteHandle[Any]] = {}

        async def write(session: AsyncSession, key: str, i: int) -> None:
            await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = :k"), {"k": key})
            await asyncio.sleep(rnd.choice((0, 0.0005)))
            await record(session, key, None, i)

        done = asyncio.Event()

        async def killer() -> int:
            killed = 0
            while not done.is_set():
                await asyncio.sleep(rnd.uniform(0.01, 0.04))
                killed += await _terminate_others(pg_url)
            return killed

        kill = asyncio.ensure_future(killer())
        i = 0
        for _ in range(40):
            for _ in range(rnd.randint(1, 10)):
                key = rnd.choice(keys)
                handles[(key, i)] = ser.submit(write, key, i, key=key)
                i += 1
            await asyncio.sleep(rnd.uniform(0, 0.01))
        results = await asyncio.gather(*handles.values(), return_exceptions=True)
        done.set()
        killed = await kill
        assert killed > 10
        raw = [r for r in results if isinstance(r, BaseException) and not _ours(r)]
        assert raw == [], f"{len(raw)} raw errors, e.g. {raw[:3]!r}"
        assert any(isinstance(r, BaseException) for r in results)  # the storm hurt
        # Outcome truth, and no half-applied write: counters equal ledger rows. Read
        # through an engine of its own: the serializer's pool may hold killed connections.
        known = {k: h for k, h in handles.items() if h.outcome is not Outcome.UNKNOWN}
        committed = {k for k, h in known.items() if h.outcome is Outcome.COMMITTED}
        verify = create_async_engine(pg_url)
        try:
            rows = await ledger(verify)
            async with verify.connect() as conn:
                counters = {k: n for k, n in await conn.execute(text("SELECT key, n FROM counter"))}
        finally:
            await verify.dispose()
        landed = {(r[1], r[3]) for r in rows}
        assert committed <= landed
        assert landed - committed <= {k for k, h in handles.items() if k not in known}
        assert counters == {k: sum(1 for r in rows if r[1] == k) for k in keys}


def _ours(exc: BaseException) -> bool:
    return isinstance(exc, WriteturnError)


# -- 5. the write function's own timeout around a statement --------------------------------


def slow_statement(url: str, seconds: float = 3.0) -> str:
    """A statement that runs for about ``seconds`` (SQLite: a long count), interruptible."""
    if url.startswith("postgresql"):
        return f"SELECT pg_sleep({seconds})"
    rows = int(seconds * 100_000_000)
    return (
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {rows}) "
        "SELECT count(*) FROM c"
    )


@pytest.mark.parametrize("how", ["submit", "transaction"])
async def test_an_inner_timeout_stops_the_statement_not_the_write(db_url: str, how: str) -> None:
    postgres = db_url.startswith("postgresql")
    async with asyncio.timeout(60), WriteSerializer.from_url(db_url) as ser:
        await create_tables(ser.engine)
        seen: list[str] = []

        async def body(session: AsyncSession) -> None:
            await record(session, "k", "before", 1)
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(0.2):
                    await session.execute(text(slow_statement(db_url)))
            except TimeoutError:
                seen.append(f"timeout after {time.monotonic() - t0:.1f}s")
            try:
                await record(session, "k", "after", 2)
            except Exception as exc:  # Postgres: the transaction was aborted
                seen.append(type(exc).__name__)

        task = asyncio.current_task()
        assert task is not None
        error: BaseException | None = None
        try:
            if how == "submit":
                h = ser.submit(body, key="k")
                outcome_of = h
                await h
            else:
                ctx = ser.transaction(key="k")
                outcome_of = ctx.handle  # type: ignore[assignment]
                async with ctx as session:
                    await body(session)
        except Exception as exc:
            error = exc
        assert task.cancelling() == 0  # nothing cancelled this task
        assert seen and seen[0].startswith("timeout")
        assert ser.stats().connections_invalidated == 0
        rows = [r[2] for r in await ledger(ser.engine)]
        if postgres:
            # The statement's failure aborted the transaction: said, not hidden.
            assert seen[1:] == ["DBAPIError"]
            assert outcome_of.outcome is Outcome.ROLLED_BACK
            assert isinstance(error, WriteturnError) and "begin_nested" in str(error)
            assert rows == []
        else:
            # SQLite keeps the transaction after a failed statement: the rest commits.
            assert seen[1:] == []
            assert error is None
            assert outcome_of.outcome is Outcome.COMMITTED
            assert rows == ["before", "after"]
        await ser.run(record, "k", "next", 3, key="k", timeout=10)


# -- 6. a cancellation while a savepoint ends -----------------------------------------------


@pytest.mark.parametrize("how", ["submit", "transaction"])
async def test_a_cancel_while_a_savepoint_ends_keeps_the_connection(db_url: str, how: str) -> None:
    async with asyncio.timeout(60), WriteSerializer.from_url(db_url) as ser:
        await create_tables(ser.engine)
        for i in range(4):
            stop: list[Any] = []

            async def body(session: AsyncSession, i: int = i, stop: list[Any] = stop) -> None:
                async with session.begin_nested():
                    await record(session, "k", "nested", i)
                    # Lands while RELEASE SAVEPOINT is in flight.
                    asyncio.get_running_loop().call_soon(stop[0])

            if how == "submit":
                h = ser.submit(body, key="k")
                stop.append(h.cancel)
                with pytest.raises(asyncio.CancelledError):
                    await h
            else:
                ctx = ser.transaction(key="k")
                stop.append(ctx.handle.cancel)
                h = ctx.handle  # type: ignore[assignment]

                async def block(ctx: Any = ctx) -> None:
                    async with ctx as session:
                        await body(session)

                with pytest.raises(asyncio.CancelledError):
                    await asyncio.ensure_future(block())
            assert h.outcome is Outcome.ROLLED_BACK
        assert ser.stats().connections_invalidated == 0
        assert await ledger(ser.engine) == []
        await ser.run(record, "k", "next", 9, key="k", timeout=10)
        assert [r[2] for r in await ledger(ser.engine)] == ["next"]
